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


class RankOffsetLoss(hs.SparseTrainer):
    """Each rank's loss raised by its rank (1.0 on rank 1): the same gradients, but warm-up loss levels whose own
    relative drop would end the warm-up on different steps; only the ranks' mean decides, alike on both."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        offset = float(self.accelerator.process_index)
        return (out[0] + offset,) + tuple(out[1:]) if isinstance(out, tuple) else out + offset


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
    if start == "extended":  # a 12-step warm-up whose loss falls by the asked share a few steps after its end: the
        # ranks' own losses differ, their mean decides when it ends (and where the mask is fixed) on both
        schedule = dict(importance_warmup=0.5, budget_schedule_start=0.5, budget_schedule_end=0.5, fix_masks_at=0.5,
                        forward_search_steps=0, warmup_loss_drop=0.12, warmup_extend_until=1.0)
    args = hs.SparseTrainingArguments(
        output_dir=out_dir, max_steps=24 if start == "extended" else 16, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-3, logging_steps=4, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        **{"fix_masks_at": 0.75, **schedule}, mask_groups=2, ddp_find_unused_parameters=False, ddp_backend="gloo", use_cpu=True,
    )
    model = tiny_llama()
    trainer_class = RankOffsetLoss if start == "extended" else hs.SparseTrainer
    trainer = trainer_class(
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
        "warmup_levels": trainer._warmup_loss.levels() if trainer._warmup_loss is not None else None,
    }
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
