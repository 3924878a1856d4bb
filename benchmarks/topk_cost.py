"""Cost of the per-step Python work on a 7B-shaped structure: `topk_mask` (every fixed-phase step and every log)
and the budget projection (every search step), against 1% of a 7B training step.

Llama-7B shapes: 32 layers x (11,008 MLP neurons + 32 attention heads) = 353,280 units; a neuron costs
3 x 4,096 parameters, a head 4 x 128 x 4,096. Scores are drawn with many ties (rounded to 0.01), the hard
case for the greedy fill. The reference step time is the cost model's: 6 x 6.7e9 x tokens FLOPs at a stated
throughput (the CPU cannot run the step itself).

    python benchmarks/topk_cost.py [--tokens 16384] [--tflops 400]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_sparse.budget import project_to_budget
from hf_sparse.structure import topk_mask


def seven_b_structure(layers: int = 32, neurons: int = 11008, heads: int = 32, hidden: int = 4096, head_dim: int = 128):
    sizes, costs = [], []
    for _ in range(layers):
        sizes += [heads, neurons]
        costs += [torch.full((heads,), 4.0 * head_dim * hidden), torch.full((neurons,), 3.0 * hidden)]
    return sizes, torch.cat(costs)


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per optimizer step (8 x 2048)")
    parser.add_argument("--tflops", type=float, default=400.0, help="sustained training throughput, TFLOP/s")
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    sizes, costs = seven_b_structure()
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(costs.numel(), generator=g).round(decimals=2)
    budget = 0.5 * float(costs.double().sum())
    step_ms = 1e3 * 6 * 6.7e9 * a.tokens / (a.tflops * 1e12)
    rows = [
        ("topk_mask (group ties)", median_ms(lambda: topk_mask(scores, costs, budget, group_sizes=sizes))),
        ("topk_mask (index ties)", median_ms(lambda: topk_mask(scores, costs, budget))),
        ("project_to_budget (weighted)", median_ms(lambda: project_to_budget(scores * 1.3, costs, budget, weights=costs))),
    ]
    print(f"7B-shaped structure: {costs.numel():,} units; reference step {step_ms:.0f} ms "
          f"({a.tokens} tokens at {a.tflops:.0f} TFLOP/s), 1% = {step_ms / 100:.1f} ms; {a.threads} thread(s)")
    print(f"| {'what':30s} | {'ms (median of 7)':>16s} | {'% of the step':>13s} |")
    print(f"|{'-' * 32}|{'-' * 18}:|{'-' * 14}:|")
    for name, ms in rows:
        print(f"| {name:30s} | {ms:16.1f} | {100 * ms / step_ms:12.2f}% |")


if __name__ == "__main__":
    main()
