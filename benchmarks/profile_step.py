#!/usr/bin/env python
"""Where the time of one sparse training step goes (torch.profiler, CPU): the table behind the overhead list
in docs/benchmarks.md.

    python benchmarks/profile_step.py --model minilm --mode search --kept 0.25
"""

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from hf_sparse.bench import _args, _prepare, build_model, make_batch, random_scores


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--mode", choices=["dense", "search", "fixed"], default="search")
    p.add_argument("--kept", type=float, default=0.25)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Trainer

    from hf_sparse import SparseConfig, SparseTrainer, sparsify_model

    dev = torch.device("cpu")
    model, task = build_model(a.model)
    if a.mode == "dense":
        trainer = Trainer(model=model, args=_args("/tmp/hf_sparse_profile", dev, False))
    else:
        sparsify_model(model, SparseConfig(sparsity=1 - a.kept, score_init="budget"))
        extra = dict(fix_masks_at=0.0) if a.mode == "fixed" else dict(fix_masks_at=1.0)
        if a.mode == "fixed":
            random_scores(model)
        trainer = SparseTrainer(model=model, args=_args("/tmp/hf_sparse_profile", dev, False, budget_schedule_start=0.0,
                                                        budget_schedule_end=0.0, **extra))
    _prepare(trainer)
    batch = make_batch(model, task, a.batch_size, a.seq_len, dev)

    def step():
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.model.zero_grad(set_to_none=False)
        trainer.state.global_step += 1

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
