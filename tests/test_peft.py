"""PEFT: LoRA adapters train by backward, the frozen base's structure is learned from forward passes only."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hf_sparse as hs
from hf_sparse import SparseConfig, SparseTrainer, SparseTrainingArguments
from hf_sparse.training_args import PAPER_SCHEDULE
from trainer_helpers import arithmetic_sequences, tiny_llama


def test_lora_on_sparse_base(tmp_path):
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    hs.sparsify_model(model, SparseConfig(sparsity=0.5))
    before = {n: p.detach().clone() for n, p in list(model.named_parameters()) + list(model.named_buffers())}
    args = SparseTrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=5e-3, report_to=[],
        save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=10, **PAPER_SCHEDULE,
    )
    trainer = SparseTrainer(model=model, args=args, train_dataset=arithmetic_sequences(128))
    trainer.train()
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    lora = [n for n in before if "lora_" in n]
    assert lora
    for n in lora:
        assert not torch.equal(before[n], after[n].detach()), f"LoRA weight {n} did not train"
    frozen = [n for n in before if "lora_" not in n and not n.endswith(("scores", ".mask", ".fixed"))]
    for n in frozen:
        assert torch.equal(before[n], after[n].detach()), f"base weight {n} changed"
    scores = [n for n in before if n.endswith("scores")]
    assert scores and any(not torch.equal(before[n], after[n].detach()) for n in scores)
    assert abs(hs.sparsity_report(model).sparsity - 0.5) <= 0.02


# --- memory of the gathered layer: LoRA on a sparse base saves no more for backward than on the dense base ---
def _saved_activation_bytes(model, batch) -> int:
    """Bytes of the tensors autograd saves for backward (unique storages), excluding what the model holds anyway:
    parameters, and the kept-unit index tensors the unit groups cache (shared by every step, not per batch)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for g in hs.SparseStructure(model).groups if hs.is_sparsified(model) else []:
        g.index(1)  # make sure the caches exist before the forward
    def cached():
        return {i.untyped_storage().data_ptr() for g in (hs.SparseStructure(model).groups if hs.is_sparsified(model) else [])
                for i in g._index_cache.values()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    index_storages = cached()
    return sum(n for ptr, n in seen.items() if ptr not in index_storages)


def _wide_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=512, max_position_embeddings=64))


@pytest.mark.parametrize("batch_size, seq, dropout, keep", [(16, 16, 0.0, 0.5), (1, 8, 0.0, 0.9), (1, 8, 0.1, 0.5)])
def test_lora_on_a_sparse_base_saves_no_more_than_on_the_dense_base(batch_size, seq, dropout, keep):
    """At small batches the weights dominate: a saved copy of each kept block cost 10-16x the dense LoRA."""
    data = arithmetic_sequences(16)
    batch = {k: torch.tensor(data[:batch_size][k])[:, :seq] for k in ("input_ids", "labels")}
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    dense = get_peft_model(_wide_llama(), config)
    sparse = hs.sparsify_model(get_peft_model(_wide_llama(), config), SparseConfig(sparsity=0.5))
    structure = hs.SparseStructure(sparse)
    structure.set_masks((torch.rand(structure.num_units, generator=torch.Generator().manual_seed(0)) < keep).float())
    torch.manual_seed(0)
    dense_bytes = _saved_activation_bytes(dense.train(), batch)
    torch.manual_seed(0)
    sparse_bytes = _saved_activation_bytes(sparse.train(), batch)
    assert sparse_bytes <= dense_bytes, (sparse_bytes, dense_bytes)


# --- PEFT beyond LoRA: refused at sparsify_model time, naming what is supported ----------------------------
@pytest.mark.parametrize("kind", ["ia3", "adalora", "dora"])
def test_unsupported_peft_adapters_are_refused_before_patching(kind):
    from peft import AdaLoraConfig, IA3Config

    base = tiny_llama()
    if kind == "ia3":
        config = IA3Config(target_modules=["up_proj", "down_proj"], feedforward_modules=["down_proj"])
    elif kind == "adalora":
        config = AdaLoraConfig(r=4, target_modules=["q_proj", "v_proj"], total_step=10)
    else:
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    model = get_peft_model(base, config)
    with pytest.raises(ValueError, match="supports plain LoRA"):
        hs.sparsify_model(model, SparseConfig(sparsity=0.5))
    assert not hs.is_sparsified(model)


def test_lora_on_a_quantized_or_custom_base_layer_is_refused():
    class FakeLinear4bit(torch.nn.Module):  # stands in for bitsandbytes' Linear4bit (not installable on CPU here)
        def __init__(self, linear):
            super().__init__()
            self.weight, self.bias = linear.weight, linear.bias

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.base_layer = FakeLinear4bit(layer.base_layer)
    with pytest.raises(ValueError, match="FakeLinear4bit base layer"):
        hs.sparsify_model(model, SparseConfig(sparsity=0.5))
    assert not hs.is_sparsified(model)
