"""The optimizer's share of a training step, with and without keeping the units not computed in the step still
(`hf_sparse.dropped.FrozenUnits`: their weights and optimizer state are read before the step and written back
after it, so weight decay and stale momentum never move a unit that got no gradient).

Times, interleaved on the same trainer: the whole step (forward/backward/structure update + optimizer), and
the optimizer step alone with the hooks attached and detached, under the Trainer's default optimizer
(`adamw_torch_fused`), in the search phase (two masks, kept ~rho) and the fixed phase (top-K mask).

    python benchmarks/optimizer_share.py --model minilm --batch_size 16 --seq_len 128 --kept 0.5 0.25
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from hf_sparse.bench import build_model, make_batch
from hf_sparse.config import SparseConfig
from hf_sparse.patching import sparsify_model
from hf_sparse.trainer import SparseTrainer
from hf_sparse.training_args import SparseTrainingArguments


def measure(model_name: str, batch: int, seq: int, kept: float, phase: str, repeats: int) -> dict:
    model, task = build_model(model_name)
    sparsify_model(model, SparseConfig(sparsity=1.0 - kept, score_init="budget"))
    args = SparseTrainingArguments(
        output_dir=tempfile.mkdtemp(), report_to=[], disable_tqdm=True, save_strategy="no", use_cpu=True,
        learning_rate=1e-5, weight_decay=0.01, max_grad_norm=0.0, budget_schedule_start=0.0, budget_schedule_end=0.0,
        fix_masks_at=0.0 if phase == "fixed" else 1.0, structure_learning_rate=1e-3, importance_warmup=0.0,
    )
    trainer = SparseTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.state.max_steps = 10**6
    trainer.current_gradient_accumulation_steps = 1
    trainer.model_wrapped = model
    if phase == "fixed":  # a learned-looking structure: distinct scores, so the fixed top-K is not a tie-break
        structure = trainer.structure
        structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(0)))
    data = make_batch(model, task, batch, seq, torch.device("cpu"))
    frozen = trainer._frozen_units
    opt = trainer.optimizer
    step_t, on_t, off_t = [], [], []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        trainer.training_step(model, data)
        t1 = time.perf_counter()
        attached = i % 2 == 0
        if attached:
            frozen.attach(opt)
        else:
            frozen.detach()
        opt.step()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=False)
        trainer.state.global_step += 1
        if i >= 2:
            (on_t if attached else off_t).append(t2 - t1)
            step_t.append(t2 - t0)
    frozen.attach(opt)
    computed = float(trainer._computed_units().float().mean())
    return {"phase": phase, "kept": kept, "computed": computed, "step_ms": 1e3 * statistics.median(step_t),
            "opt_ms": 1e3 * statistics.median(off_t), "opt_frozen_ms": 1e3 * statistics.median(on_t)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--repeats", type=int, default=10, help="steps per row (alternating hooks on/off)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{a.model}, batch {a.batch_size} x {a.seq_len}, adamw_torch_fused, {a.threads} threads")
    print("| phase | kept | units computed | step ms | optimizer ms (plain) | optimizer ms (frozen units) | "
          "optimizer share plain -> frozen |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kept in a.kept:
        for phase in ("search", "fixed"):
            r = measure(a.model, a.batch_size, a.seq_len, kept, phase, a.repeats)
            other = r["step_ms"] - (r["opt_ms"] + r["opt_frozen_ms"]) / 2
            print(f"| {phase} | {kept} | {r['computed']:.2f} | {r['step_ms']:.0f} | {r['opt_ms']:.1f} | "
                  f"{r['opt_frozen_ms']:.1f} | {r['opt_ms'] / (other + r['opt_ms']):.1%} -> "
                  f"{r['opt_frozen_ms'] / (other + r['opt_frozen_ms']):.1%} |", flush=True)


if __name__ == "__main__":
    main()
