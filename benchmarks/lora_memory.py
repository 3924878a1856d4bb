"""Activation memory of LoRA on a sparse base vs LoRA on the dense base, same shapes.

Counts the bytes autograd saves for backward (unique storages; parameters and the unit groups' cached index
tensors excluded: the model holds them anyway) over one forward + backward of a Llama-shaped decoder from
config (hidden 256, intermediate 1024, 2 layers, 8 heads / 4 key-value heads), LoRA r=8 on q/v/up/down, at
several kept fractions and two batch shapes (at small batches the weights dominate). Deterministic: no timing.

    python benchmarks/lora_memory.py
"""

from __future__ import annotations

import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_sparse as hs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_peft import _saved_activation_bytes  # noqa: E402  (the measurement the test asserts on)


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
                                        num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=64))


def main() -> None:
    g = torch.Generator().manual_seed(0)
    print("| batch x seq | lora_dropout | kept | dense-base LoRA (MB) | sparse-base LoRA (MB) | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for batch, seq in ((16, 16), (1, 8)):
        ids = torch.randint(0, 64, (batch, seq), generator=g)
        data = {"input_ids": ids, "labels": ids}
        for dropout in (0.0, 0.1):
            config = LoraConfig(r=8, lora_alpha=8, lora_dropout=dropout,
                                target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
            dense = get_peft_model(llama(), config).train()
            sparse = hs.sparsify_model(get_peft_model(llama(), config), hs.SparseConfig(sparsity=0.5)).train()
            structure = hs.SparseStructure(sparse)
            for keep in (0.9, 0.5, 0.25):
                mask = torch.rand(structure.num_units, generator=torch.Generator().manual_seed(0)) < keep
                structure.set_masks(mask.float())
                torch.manual_seed(0)
                d = _saved_activation_bytes(dense, data)
                torch.manual_seed(0)
                s = _saved_activation_bytes(sparse, data)
                print(f"| {batch} x {seq} | {dropout} | {keep} | {d / 1e6:.3f} | {s / 1e6:.3f} | {s / d:.2f} |")


if __name__ == "__main__":
    main()
