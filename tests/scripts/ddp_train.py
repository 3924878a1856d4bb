"""Run by tests/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Trains a tiny Llama with SparseTrainer through the search and into the fixed phase, then every rank writes
its masks, scores and weights so the test can check that the ranks agree bit for bit.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer_helpers import arithmetic_sequences, tiny_llama  # noqa: E402

import hf_sparse as hs  # noqa: E402


def main():
    out_dir = sys.argv[1]
    compute = sys.argv[2] if len(sys.argv) > 2 else "gather"
    start = sys.argv[3] if len(sys.argv) > 3 else "plain"
    schedule = dict(budget_schedule_end=0.5)
    if start in ("informed", "forward_search", "forward_search_units"):  # 4 dense steps of Taylor importance
        # (different data on each rank), then (forward_search*: 3 forward-only steps on the frozen weights, each
        # rank's own batches, of the default allocation search or of the per-unit one) the search
        schedule = dict(importance_warmup=0.25, budget_schedule_start=0.25, budget_schedule_end=0.25,
                        forward_search_steps=0 if start == "informed" else 3)
        if start == "forward_search_units":
            schedule["forward_search"] = "units"
    args = hs.SparseTrainingArguments(
        output_dir=out_dir, max_steps=16, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-3, logging_steps=4, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        **schedule, fix_masks_at=0.75, mask_groups=2, ddp_find_unused_parameters=False, ddp_backend="gloo", use_cpu=True,
    )
    model = tiny_llama()
    trainer = hs.SparseTrainer(
        model=model, args=args, sparse_config=hs.SparseConfig(sparsity=0.5, compute=compute),
        train_dataset=arithmetic_sequences(256),
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    state = {
        "world": trainer.accelerator.num_processes,
        "scores": trainer.structure.scores().cpu(),
        "masks": trainer.structure.masks().cpu(),
        "params": {n: p.detach().cpu() for n, p in trainer.model.state_dict().items()},
        "log_history": trainer.state.log_history,
        "importance": trainer._importance.flat().cpu() if trainer._importance is not None else None,
        "structure_run": trainer.structure_run(),
    }
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
