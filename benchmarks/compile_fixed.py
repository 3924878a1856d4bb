"""`torch.compile` in the fixed-mask phase: the speed-up with and without compile, and the recompiles after the
mask is fixed (there must be none: the kept counts no longer change, so every step has the same shapes).
`--search` adds the search phase (two forwards and one backward, masks drawn every step at keep probability
`--kept`): its kept counts change every step, and the table shows how many graphs torch.compile builds for them
(its automatic dynamic shapes mark a dimension dynamic the second time it changes) and what that costs.

    python benchmarks/compile_fixed.py                       # MiniLM, batch 32 x 24, kept 0.5, 12 steps each
    python benchmarks/compile_fixed.py --model bert-base --seq 128 --batch 8

Each configuration is a fresh model with the same fixed random mask (or dense); steps are the SparseTrainer's
own `training_step` + the fused AdamW step; the first `--warmup` steps (compilation) are timed apart. Recompiles
are torch._dynamo's frame-compilation count after the warm-up (0 = the compiled graph was reused every step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def run(model_name: str, mode: str, compile_: bool, batch: int, seq: int, kept: float, warmup: int, steps: int):
    import torch._dynamo
    from transformers import Trainer

    import hf_sparse as hs
    from hf_sparse.bench import _args, _prepare, build_model, make_batch

    torch._dynamo.reset()
    model, task = build_model(model_name)
    out = "/tmp/hf_sparse_compile"
    if mode == "dense":
        trainer_cls, args = Trainer, _args(out, torch.device("cpu"), False)
    elif mode == "search":  # every unit kept with probability `kept`: new kept counts every step
        hs.sparsify_model(model, hs.SparseConfig(sparsity=1.0 - kept, score_init="budget"))
        trainer_cls = hs.SparseTrainer
        args = _args(out, torch.device("cpu"), False, budget_schedule_start=0.0, budget_schedule_end=0.0,
                     fix_masks_at=1.0)
    else:
        hs.sparsify_model(model, hs.SparseConfig(sparsity=1.0 - kept))
        structure = hs.SparseStructure(model)
        structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(0)))
        hs.fix_masks(model)
        trainer_cls, args = hs.SparseTrainer, _args(out, torch.device("cpu"), False)
    if compile_:
        model = torch.compile(model)
    trainer = trainer_cls(model=model, args=args)
    _prepare(trainer)
    data = make_batch(trainer.model, task, batch, seq, torch.device("cpu"))

    def step():
        t = time.perf_counter()
        trainer.training_step(trainer.model, data)
        trainer.optimizer.step()
        trainer.model.zero_grad(set_to_none=False)
        trainer.state.global_step += 1
        return time.perf_counter() - t

    first = sum(step() for _ in range(warmup))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    times = [step() for _ in range(steps)]
    recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
    return {"warmup_s": first, "step_ms": 1e3 * statistics.median(times), "recompiles": recompiles}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=24)
    p.add_argument("--kept", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--search", action="store_true", help="also time the search phase with and without compile")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = {}
    for mode in ("dense", "fixed") + (("search",) if a.search else ()):
        for compile_ in (False, True):
            rows[(mode, compile_)] = r = run(a.model, mode, compile_, a.batch, a.seq, a.kept, a.warmup, a.steps)
            print(f"{mode:5s} compile={compile_!s:5s} step {r['step_ms']:7.1f} ms  first {a.warmup} steps "
                  f"{r['warmup_s']:6.1f} s  graphs compiled after them: {r['recompiles']}", flush=True)
    base = rows[("dense", False)]["step_ms"]
    print(f"\n{a.model}, batch {a.batch} x {a.seq}, kept {a.kept}, median of {a.steps} steps\n")
    print("| phase | torch.compile | step (ms) | vs dense eager | graphs compiled after warm-up |")
    print("|---|---|---:|---:|---:|")
    for (mode, compile_), r in rows.items():
        print(f"| {mode} | {'yes' if compile_ else 'no'} | {r['step_ms']:.1f} | {base / r['step_ms']:.2f}x | "
              f"{r['recompiles']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
