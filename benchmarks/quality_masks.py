"""Which units the causal-LM study's structures keep, layer by layer (docs/quality.md, "Pretraining from scratch").

Prints, for the small Llama of `benchmarks/quality.py` at 50% sparsity, the kept units of every group for
(1) the random baseline's masks, seeds 0-2 (the exact masks the study trained), and (2) hf_sparse's informed
start after the LM defaults' dense warm-up (seed 0), ranked within each layer and over the whole model.

    python benchmarks/quality_masks.py   # about 30 s on 2 cores
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402  (the study's task, settings and defaults)
from study.baselines import random_units_mask  # noqa: E402  (the random baseline's masks)


def kept_per_group(structure) -> str:
    return ", ".join(f"{g.kind} {int(g.mask.sum())}/{g.num_units}" for g in structure)


def main() -> None:
    import transformers
    from transformers import TrainerCallback

    import hf_sparse
    from hf_sparse import SparseConfig, SparseStructure, SparseTrainer, SparseTrainingArguments

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    task = quality.LmTask(quality.Settings(), os.path.join(root, "docs", "quality_lm", "quality_cache"))
    print("random baseline, 50%:")
    for seed in (0, 1, 2):
        model = hf_sparse.sparsify_model(task.model(seed), SparseConfig(sparsity=0.5, score_init="budget"))
        structure = SparseStructure(model)
        structure.set_masks(random_units_mask(structure, 0.5, seed))
        print(f"  seed {seed}: {kept_per_group(structure)}")

    defaults = quality.HF_SPARSE_DEFAULTS["lm"]
    warmup = defaults["importance_warmup"]
    steps = 200
    stop_at = int(round(warmup * steps)) + 1  # the informed start is set at the end of the warm-up

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= stop_at

    print(f"hf_sparse informed start after {stop_at - 1} dense steps (seed 0), top-K at 50%:")
    for ranking in ("group", "global"):
        model = hf_sparse.sparsify_model(task.model(0), SparseConfig(sparsity=0.5, score_init="budget"))
        args = SparseTrainingArguments(
            output_dir=os.path.join(root, "outputs", "quality_masks"), max_steps=steps, seed=0, data_seed=0,
            report_to=[], disable_tqdm=True, save_strategy="no", use_cpu=not torch.cuda.is_available(),
            warmup_steps=task.s.warmup, importance_warmup=warmup, budget_schedule_start=warmup,
            budget_schedule_end=warmup, fix_masks_at=warmup, importance_ranking=ranking, forward_search_steps=0,
            warmup_loss_drop=0,  # the mask read at a fixed step: stop_at above counts on it
            **task.args(),
        )
        trainer = SparseTrainer(model=model, args=args, callbacks=[Stop()], **task.trainer_kwargs())
        trainer.train()
        print(f"  ranking={ranking}: {kept_per_group(trainer.structure)}")


if __name__ == "__main__":
    main()
