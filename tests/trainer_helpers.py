"""Tiny causal-LM set-ups for the trainer tests (and the 2-process script): a learnable toy sequence task."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def arithmetic_sequences(n: int = 512, length: int = 16, vocab: int = 64, seed: int = 0) -> Dataset:
    """Sequences start, start+d, start+2d, ... (mod vocab): a pattern a tiny decoder learns in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, vocab, (1,), generator=g))
        step = int(torch.randint(1, 4, (1,), generator=g))
        ids = [(start + step * j) % vocab for j in range(length)]
        rows.append({"input_ids": ids, "labels": ids})
    return Dataset.from_list(rows)


def search_args(tmp_path, **kw):
    """SparseTrainingArguments for the trainer tests: the paper's schedule (these tests exercise the search),
    quiet, on the CPU, no checkpoints; `kw` overrides anything."""
    from hf_sparse import SparseTrainingArguments
    from hf_sparse.training_args import PAPER_SCHEDULE

    defaults = dict(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=10, save_strategy="no", report_to=[], disable_tqdm=True, seed=0, use_cpu=True,
        **PAPER_SCHEDULE,
    )
    defaults.update(kw)
    return SparseTrainingArguments(**defaults)


# The FSDP2 trainer test's run (tests/scripts/fsdp2_train.py) and its single-process reference: 8 steps, the
# search from the start to step 4 (budget at its target by then), the mask fixed for the last 2, a checkpoint at 4.
FSDP_ARGS = dict(
    max_steps=8, learning_rate=3e-3, logging_steps=2, save_strategy="steps", save_steps=4, report_to=[],
    disable_tqdm=True, seed=0, importance_warmup=0.0, budget_schedule_start=0.0, budget_schedule_end=0.5,
    fix_masks_at=0.75,
)


# The DeepSpeed test's run (tests/scripts/deepspeed_train.py) and its one-process reference: the library's
# default schedule (dense warm-up, then the informed mask fixed) over 8 steps, a checkpoint at step 6.
DEEPSPEED_ARGS = dict(  # the defaults' schedule without their forward search (exact against one process)
    max_steps=8, learning_rate=3e-3, logging_steps=2, save_strategy="steps", save_steps=6, report_to=[],
    disable_tqdm=True, seed=0, importance_warmup=0.5, budget_schedule_start=0.5, budget_schedule_end=0.5,
    fix_masks_at=0.5, forward_search_steps=0,
)


def deepspeed_config(stage: int) -> dict:
    """ZeRO `stage` with the Trainer's own AdamW (DeepSpeed's CPU Adam needs compiled ops); ZeRO-3 gathers the
    weights for `save_model`."""
    return {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
    }


def plant_costly_units(model, fraction: float = 1 / 16, cost: float = 1.0, seed: int = 0):
    """Planted units with a known answer: `fraction` of the units of every unit group (at least one) add `cost`
    each to the model's loss whenever the mask the layers compute with keeps them; the rest of the loss is the
    model's own. The expected loss falls by `cost` per planted unit dropped, so any search that descends it ranks
    the planted units last; one that ascends it (a flipped sign, losses paired with the wrong masks) keeps them.
    `model` is already sparsified. Returns the planted units as a bool vector over the flat structure."""
    import hf_sparse as hs

    structure = hs.SparseStructure(model)
    g = torch.Generator().manual_seed(seed)
    parts = []
    for group in structure.groups:
        chosen = torch.zeros(group.num_units, dtype=torch.bool)
        chosen[torch.randperm(group.num_units, generator=g)[: max(1, round(fraction * group.num_units))]] = True
        parts.append(chosen)
    planted = torch.cat(parts)

    def add_cost(module, args, output):
        if getattr(output, "loss", None) is None:
            return None
        kept = structure.masks()[planted.to(structure.device)].sum()
        output.loss = output.loss + cost * kept.to(output.loss)
        return output

    model.register_forward_hook(add_cost)
    return planted
