"""PEFT: LoRA adapters train by backward, the frozen base's structure is learned from forward passes only."""

import torch
from peft import LoraConfig, get_peft_model

import hf_sparse as hs
from hf_sparse import SparseConfig, SparseTrainer, SparseTrainingArguments
from trainer_helpers import arithmetic_sequences, tiny_llama


def test_lora_on_sparse_base(tmp_path):
    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    hs.sparsify_model(model, SparseConfig(sparsity=0.5))
    before = {n: p.detach().clone() for n, p in list(model.named_parameters()) + list(model.named_buffers())}
    args = SparseTrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=5e-3, report_to=[],
        save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=10,
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
