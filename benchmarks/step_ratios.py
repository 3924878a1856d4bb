"""Search and fixed steps against a dense step, interleaved: the four trainers (dense, nothing kept, search at
kept rho, fixed at kept rho) are built once and take turns, a few steps each per round, so a slow spell of the
machine touches every row alike. Each round gives its own ratios and its own u (nothing kept / dense); the table
is their median, with the spread.

    python benchmarks/step_ratios.py                          # MiniLM 16 x 128, kept 0.25, 6 rounds of 3 steps
    python benchmarks/step_ratios.py --model bert-base --batch_size 8 --rounds 4

`hf-sparse bench` measures each row once after the other; on a noisy machine (+-15% here) this is the steadier
number for the bound targets.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    import torch
    from transformers import Trainer

    from hf_sparse import SparseConfig, SparseTrainer, sparsify_model
    from hf_sparse.bench import _args, _prepare, build_model, make_batch, random_scores, with_fixed_masks

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--kept", type=float, default=0.25)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="steps per trainer and round (the median is taken)")
    p.add_argument("--warmup_rounds", type=int, default=2, help="rounds run first and not counted (the first "
                   "steps of four models in one process run slow while the allocator grows)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev, out = torch.device("cpu"), "/tmp/hf_sparse_step_ratios"

    def sparse(model, fix_masks_at):
        sparsify_model(model, SparseConfig(sparsity=1.0 - a.kept, score_init="budget"))
        if fix_masks_at == 0.0:
            random_scores(model)
        return SparseTrainer(model=model, args=_args(out, dev, False, budget_schedule_start=0.0,
                                                     budget_schedule_end=0.0, fix_masks_at=fix_masks_at))

    def floor(model):
        with_fixed_masks(model)
        return SparseTrainer(model=model, args=_args(out, dev, False))

    makers = {"dense": lambda m: Trainer(model=m, args=_args(out, dev, False)), "floor": floor,
              "search": lambda m: sparse(m, 1.0), "fixed": lambda m: sparse(m, 0.0)}
    trainers, batches = {}, {}
    for name, make in makers.items():
        model, task = build_model(a.model)
        trainers[name] = make(model)
        _prepare(trainers[name])
        batches[name] = make_batch(model, task, a.batch_size, a.seq_len, dev)

    def step(name):
        tr = trainers[name]
        t = time.perf_counter()
        tr.training_step(tr.model, batches[name])
        tr.optimizer.step()
        tr.model.zero_grad(set_to_none=False)
        tr.state.global_step += 1
        return time.perf_counter() - t

    rounds = []
    for r in range(-a.warmup_rounds, a.rounds):
        ms = {name: statistics.median(step(name) for _ in range(a.steps)) * 1e3 for name in trainers}
        u = ms["floor"] / ms["dense"]
        kept = {}
        for name in ("search", "fixed"):
            st = trainers[name].structure
            masks = getattr(trainers[name], "_step_masks", None) if name == "search" else None
            flat = masks.reshape(-1, masks.shape[-1]).mean(0) if masks is not None else st.masks()
            ppu = st.params_per_unit()
            kept[name] = float((ppu * flat).sum() / ppu.sum())
        bounds = {"search": 3.0 / (4.0 * (u + (1 - u) * kept["search"])), "fixed": 1.0 / (u + (1 - u) * kept["fixed"])}
        row = {"u": u, **{f"{n}_ms": v for n, v in ms.items()}}
        for name in ("search", "fixed"):
            row[f"{name}_speedup"] = ms["dense"] / ms[name]
            row[f"{name}_of_bound"] = row[f"{name}_speedup"] / bounds[name]
            row[f"{name}_bound"] = bounds[name]
        if r >= 0:
            rounds.append(row)
        print(f"round {r}{' (warm-up)' if r < 0 else ''}: dense {ms['dense']:.0f} ms, u {u:.3f}, search {row['search_speedup']:.2f}x "
              f"({row['search_of_bound']:.0%}), fixed {row['fixed_speedup']:.2f}x ({row['fixed_of_bound']:.0%})",
              flush=True)

    def med(key):
        values = [r[key] for r in rounds]
        return statistics.median(values), min(values), max(values)

    print(f"\n{a.model}, batch {a.batch_size} x {a.seq_len}, kept {a.kept}: median of {a.rounds} interleaved rounds "
          f"(min - max)\n")
    print("| step | speed-up vs dense | bound | of bound |")
    print("|---|---:|---:|---:|")
    for name in ("search", "fixed"):
        s, b, o = med(f"{name}_speedup"), med(f"{name}_bound"), med(f"{name}_of_bound")
        print(f"| {name} | {s[0]:.2f}x ({s[1]:.2f}-{s[2]:.2f}) | {b[0]:.2f}x | {o[0]:.0%} ({o[1]:.0%}-{o[2]:.0%}) |")
    u = med("u")
    print(f"\nu = {u[0]:.3f} ({u[1]:.3f}-{u[2]:.3f}); dense step {med('dense_ms')[0]:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
