"""Shared fixtures and tiny-model factories for the hf_sparse tests.

`tiny_model(arch)` builds a randomly initialised Transformers model from a config (no Hub access):
hidden 32, 2 layers, vocab 100, dropout 0, eval mode. Other test files import it directly
(`from conftest import tiny_model`) or through the `tiny_model_factory` fixture.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tiny models gain nothing from intra-op threads, and on a small shared machine the OpenMP workers of two
# threads spin against each other (measured: 5x slower on 2 busy cores). Override with HF_SPARSE_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("HF_SPARSE_TEST_THREADS", "1")))

ARCHS = ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "opt")
# The four architectures the issue names explicitly; the others share their layouts.
CORE_ARCHS = ("bert", "gpt2", "llama", "opt")

VOCAB = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2  # grouped-query attention for llama / mistral / qwen2
INTERMEDIATE = 64
MAX_POS = 64


def tiny_config(arch: str):
    """The Transformers config of the tiny model of `arch` (dropout 0 everywhere)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if arch in ("bert", "roberta"):
        cls = tf.BertConfig if arch == "bert" else tf.RobertaConfig
        return cls(
            **common, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS + 2, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, type_vocab_size=2, pad_token_id=1,
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            **common, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=MAX_POS,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        return cls(
            **common, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS,
            attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )
    if arch == "opt":
        return tf.OPTConfig(
            **common, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=INTERMEDIATE,
            max_position_embeddings=MAX_POS, word_embed_proj_dim=HIDDEN, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, layerdrop=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2,
            enable_bias=True,
        )
    raise ValueError(f"no tiny config for {arch!r}; choose from {ARCHS}")


def tiny_model(arch: str, head: str = "lm", num_labels: int = 3, seed: int = 0, attn: str = "eager"):
    """A tiny randomly initialised model of `arch` in eval mode, in float32.

    head: "lm" (masked LM for bert/roberta, causal LM for the decoders), "classification"
    (AutoModelForSequenceClassification with `num_labels`) or "base" (no head).
    """
    import transformers as tf

    config = tiny_config(arch)
    config._attn_implementation = attn
    if head == "classification":
        config.num_labels = num_labels
        cls = tf.AutoModelForSequenceClassification
    elif head == "lm":
        cls = tf.AutoModelForMaskedLM if arch in ("bert", "roberta") else tf.AutoModelForCausalLM
    elif head == "base":
        cls = tf.AutoModel
    else:
        raise ValueError(f"head must be 'lm', 'classification' or 'base', got {head!r}")
    torch.manual_seed(seed)
    model = cls.from_config(config, attn_implementation=attn)
    return model.float().eval()


def tiny_inputs(arch: str, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    """input_ids (tokens 3..VOCAB-1, so no pad/bos token) and a full attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def state_snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed patch must leave untouched: module types by name, state dict values, attributes."""
    return {
        "types": {name: type(m) for name, m in model.named_modules()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "attrs": {name: sorted(vars(m).keys()) for name, m in model.named_modules()},
        "head_attrs": {
            name: {a: getattr(m, a) for a in ("num_heads", "split_size", "num_key_value_groups", "head_dim") if hasattr(m, a)}
            for name, m in model.named_modules()
        },
    }


def assert_same_state(model: torch.nn.Module, before: dict) -> None:
    after = state_snapshot(model)
    assert after["types"] == before["types"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["attrs"] == before["attrs"]
    assert after["head_attrs"] == before["head_attrs"]


@pytest.fixture(scope="session")
def tiny_model_factory():
    return tiny_model


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def random_group_masks(structure, seed: int = 0, keep: float = 0.5, all_dropped: int | None = 0,
                       all_kept: int | None = 1) -> torch.Tensor:
    """A flat random mask for `structure` (a hf_sparse.SparseStructure): each unit kept with probability
    `keep`, group `all_dropped` with every unit dropped and group `all_kept` with every unit kept. Every
    other group is forced to have at least one kept and one dropped unit, so all code paths run."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i, n in enumerate(structure.sizes):
        m = (torch.rand(n, generator=gen) < keep).float()
        if i == all_dropped:
            m.zero_()
        elif i == all_kept:
            m.fill_(1.0)
        elif n > 1:
            perm = torch.randperm(n, generator=gen)
            m[perm[0]], m[perm[1]] = 1.0, 0.0
        parts.append(m)
    return torch.cat(parts)


def assert_grads_close(params_a: dict, params_b: dict, rtol: float = 1e-5, atol_scale: float = 1e-6) -> None:
    """Per tensor: |a - b| <= rtol * max|b| + atol_scale * (largest gradient in the model), so entries that
    are mathematically zero but numerically ~1e-11 (e.g. key biases under softmax) do not trip it."""
    assert params_a.keys() == params_b.keys()
    scale = max((p.grad.abs().max().item() for p in params_b.values() if p.grad is not None), default=0.0)
    for k, pa in params_a.items():
        pb = params_b[k]
        if pb.grad is None:
            assert pa.grad is None or not pa.grad.any(), k
            continue
        assert pa.grad is not None, k
        tol = rtol * pb.grad.abs().max().item() + atol_scale * scale
        err = (pa.grad - pb.grad).abs().max().item()
        assert err <= tol, f"{k}: max |grad_gather - grad_mask| = {err:.3g} > {tol:.3g}"


def edge_masks(structure, seed: int = 0, keep: float = 0.5) -> torch.Tensor:
    """Groups in module order are [heads 0, neurons 0, heads 1, neurons 1, ...]: no head of layer 0 kept, no
    neuron of layer 1, each unit of the others kept with probability `keep` (at least one kept and one dropped),
    so the layers end with different sizes and both kinds of empty block occur."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for name, n in zip(structure.names, structure.sizes):
        m = (torch.rand(n, generator=gen) < keep).float()
        m[0], m[-1] = 1.0, 0.0
        if (".0." in name and name.endswith("sparse_heads")) or (".1." in name and name.endswith("sparse_neurons")):
            m.zero_()
        parts.append(m)
    return torch.cat(parts)
