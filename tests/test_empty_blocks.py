"""Blocks whose units are all dropped cost nothing (hf_sparse/empty_blocks.py): their projections and pre-norms
are never called, yet outputs and every gradient equal the stand-in path's, dropout included; the classes
come back on unsparsify / shrink; a decoder's cache stays right."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CORE_ARCHS, tiny_config, tiny_inputs

import hf_sparse as hs
from hf_sparse.architectures import get_architecture
from hf_sparse.empty_blocks import remove_skips, skipped_modules
from hf_sparse.layers import SparseLinear
from hf_sparse.shared_dropout import SharedDropout

# Llama and OPT call dropout as a function, not a module: SharedDropout reseeds module calls only, so after an
# empty block (whose attention dropout draws nothing) their streams would part; they are compared without it.
DROPOUT = {"bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"), "gpt2": ("resid_pdrop", "attn_pdrop"),
           "llama": (), "opt": ()}


def _model_with_dropout(arch: str, p: float = 0.2):
    import transformers as tf

    config = tiny_config(arch)
    for name in DROPOUT[arch]:
        setattr(config, name, p)
    torch.manual_seed(0)
    cls = tf.AutoModelForMaskedLM if arch == "bert" else tf.AutoModelForCausalLM
    return cls.from_config(config, attn_implementation="eager").float()


def _empty_first_layer(model) -> hs.SparseStructure:
    """Layer 0: every head and every neuron dropped; layer 1: half of each kept."""
    structure = hs.SparseStructure(model)
    masks = []
    for name, n in zip(structure.names, structure.sizes):
        m = torch.zeros(n) if ".0." in f".{name}." else (torch.arange(n) % 2 == 0).float()
        masks.append(m)
    structure.set_masks(torch.cat(masks))
    assert sum(g.none_kept for g in structure) == 2
    return structure


def _loss_and_grads(model, arch, seed=3):
    model.zero_grad(set_to_none=True)
    inputs = tiny_inputs(arch, batch=3, seq=8)
    with SharedDropout(model).active(seed):
        out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_an_empty_block_calls_nothing_and_trains_exactly_like_the_stand_in(arch):
    model = _model_with_dropout(arch)
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.0))
    structure = _empty_first_layer(model)
    stand_in = copy.deepcopy(model)
    remove_skips(stand_in)  # the same model computing one stand-in unit per empty group
    assert not skipped_modules(stand_in) and skipped_modules(model)

    # what an empty block must not run: its producing projections, and a pre-norm that feeds only it
    calls = []
    empty = {id(g) for g in structure if g.none_kept}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear) and id(module.group) in empty and module.role == "out":
            module.register_forward_hook(lambda *a, n=name: calls.append(n))
    skipped_norms = [n for n, s in skipped_modules(model) if s.role == "norm" and s.group.none_kept]
    def computed(module, args, out, name):  # a skipped norm hands its input on untouched (its hooks still run)
        if out is not args[0]:
            calls.append(name)

    for name in skipped_norms:
        model.get_submodule(name).register_forward_hook(lambda m, a, out, n=name: computed(m, a, out, n))
    model.train(), stand_in.train()
    loss, grads = _loss_and_grads(model, arch)
    ref_loss, ref_grads = _loss_and_grads(stand_in, arch)

    if arch == "opt":  # OPT's fc1 / fc2 have no module of their own: its empty MLP still computes a stand-in
        assert calls and all(".fc1" in c for c in calls)
    else:
        assert calls == []
    assert len(skipped_norms) == (2 if arch in ("gpt2", "llama") else 0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for name, ref in ref_grads.items():
        assert ref is not None, name  # every parameter gets a gradient on both paths (what DDP / FSDP need)
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-7, msg=name)
    for g in structure:  # the empty groups' own weights got exact zeros
        if g.none_kept:
            for module in model.modules():
                if isinstance(module, SparseLinear) and module.group is g:
                    assert not module.weight.grad.any()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generation_with_an_empty_attention_keeps_the_cache_right(arch):
    model = _model_with_dropout(arch, p=0.0).eval()
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.0))
    _empty_first_layer(model)
    stand_in = copy.deepcopy(model)
    remove_skips(stand_in)
    ids = tiny_inputs(arch, batch=2, seq=5)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(model.generate(ids, **kw), stand_in.generate(ids, **kw), rtol=0, atol=0)
        caches = [m(ids, use_cache=True).past_key_values for m in (model, hs.shrink_model(copy.deepcopy(model)))]
    # every layer's cache, the empty one's included (while training and once shrunk), counts the 5 positions seen:
    # the model reads its position offset from the first layer's cache
    for cache in caches:
        assert [cache.get_seq_length(i) for i in range(model.config.num_hidden_layers)] == [5, 5]
    # a manual decoding loop: the last token through the cache gives the full forward's last logits
    for m in (model, hs.shrink_model(copy.deepcopy(model))):
        with torch.no_grad():
            full = m(ids).logits[:, -1]
            past = m(ids[:, :-1], use_cache=True).past_key_values
            step = m(ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_unsparsify_and_shrink_give_the_classes_back(arch):
    model = _model_with_dropout(arch, p=0.0).eval()
    types = {n: type(m) for n, m in model.named_modules()}
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.0))
    copied = copy.deepcopy(model)  # a copy's skips follow the copy's groups
    for (_, s), (_, t) in zip(skipped_modules(model), skipped_modules(copied)):
        assert t.group is not s.group
    _empty_first_layer(copied)
    assert not any(g.none_kept for g in hs.SparseStructure(model))
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        ref = copied(**inputs).logits
    shrunk = hs.shrink_model(copy.deepcopy(copied))
    assert not skipped_modules(shrunk)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(**inputs).logits, ref, rtol=0, atol=1e-5)
    hs.unsparsify_model(model)
    assert {n: type(m) for n, m in model.named_modules()} == types


def test_a_layout_naming_a_missing_module_is_refused_before_anything_changes():
    model = _model_with_dropout("llama", p=0.0)
    types = {n: type(m) for n, m in model.named_modules()}
    layout = get_architecture(model.config).to_dict()
    layout["mlp"]["empty"] = {"core": "", "norm": "no_such_norm"}
    with pytest.raises(ValueError, match="no_such_norm"):
        hs.sparsify_model(model, hs.SparseConfig(architecture=layout))
    assert {n: type(m) for n, m in model.named_modules()} == types and not hs.is_sparsified(model)
    layout["mlp"]["empty"] = None  # no empty-block layout: the stand-in unit, still exact
    hs.sparsify_model(model, hs.SparseConfig(architecture=layout))
    assert [s.role for _, s in skipped_modules(model)] == ["core", "norm"] * 2  # the attention's only


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_pickled_model_loads_and_keeps_skipping(arch, tmp_path):
    """torch.save of the whole model (pickle names classes by where they are defined: the swapped classes are
    rebuilt from the modules' own ones on load)."""
    model = _model_with_dropout(arch, p=0.0).eval()
    hs.sparsify_model(model, hs.SparseConfig(sparsity=0.0))
    _empty_first_layer(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    inputs = tiny_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    groups = {id(g) for g in hs.SparseStructure(loaded)}
    skips = skipped_modules(loaded)
    assert len(skips) == len(skipped_modules(model)) and all(id(s.group) in groups for _, s in skips)
    assert [type(m) for _, m in loaded.named_modules()] == [type(m) for _, m in model.named_modules()]
