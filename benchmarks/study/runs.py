"""One training run of the study and its cache: `RunSpec` (what a run is, and its cache key), `execute` (train
and evaluate one run with its method's Trainer, timing every step) and `Cache` (one JSON per finished run, so a
stopped study resumes where it stopped)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .baselines import baseline_trainers, random_units_mask
from .common import CACHE_VERSION, CONFIG_FIELDS, METHODS, Settings, digest


# ----------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    task: str
    method: str
    sparsity: float
    seed: int
    steps: int
    method_args: dict[str, Any] = field(default_factory=dict)
    tag: str = "main"  # main / equal_time / ablation (not part of the key: identical runs are shared)

    def key(self, settings: Settings) -> str:
        content = {"v": CACHE_VERSION, "task": self.task, "method": self.method, "sparsity": self.sparsity,
                   "seed": self.seed, "steps": self.steps, "args": self.method_args,
                   "settings": settings.for_task(self.task)}
        return f"{self.task}__{self.method}__{self.sparsity:g}__seed{self.seed}__{self.steps}__{digest(content)}"

    def label(self) -> str:
        sp = "" if self.method == "dense" else f" {self.sparsity:.0%}"
        extra = "" if self.tag == "main" else f" [{self.tag}]"
        return f"{self.task} {self.method}{sp} seed {self.seed} ({self.steps} steps){extra}"


def split_sparse_args(method_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    config = {k: v for k, v in method_args.items() if k in CONFIG_FIELDS}
    training = {k: v for k, v in method_args.items() if k not in CONFIG_FIELDS}
    return config, training


def _step_timer():
    """A TrainerCallback with wall-clock marks at the start of training and at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def durations(self) -> list[float]:
            return [float(x) for x in np.diff(self.marks)]

        def typical_step_seconds(self, boundaries: list[int]) -> float:
            """The step time robust to other processes' bursts on a shared machine: the median step time of each
            phase (e.g. search, then fixed mask) weighted by the phase's length; the first step of the run
            (lazy initialisation) is left out when there are enough."""
            d = np.asarray(self.durations())
            if len(d) == 0:
                return float("nan")
            edges = sorted({0, len(d), *[b for b in boundaries if 0 < b < len(d)]})
            total = 0.0
            for lo, hi in zip(edges[:-1], edges[1:]):
                part = d[lo:hi]
                if lo == 0 and len(part) > 3:
                    part = part[1:]
                total += float(np.median(part)) * (hi - lo)
            return total / len(d)

    return StepTimer()


def _phase_boundaries(trainer) -> list[int]:
    """Steps where a SparseTrainer's step changes kind: the end of the budget schedule and the fixed mask."""
    from hf_sparse import SparseTrainer

    if not isinstance(trainer, SparseTrainer) or trainer._fixed_from_start:
        return []
    a = trainer.args
    return [trainer._fraction_step(a.budget_schedule_end), trainer.fix_step()]  # (moved by an extended warm-up)


def execute(spec: RunSpec, task, out_tmp: str) -> dict[str, Any]:
    """Train one run and evaluate it; returns the result record (no caching here)."""
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    import hf_sparse
    from hf_sparse import SparseConfig, SparseStructure, SparseTrainer, SparseTrainingArguments

    set_seed(spec.seed)
    model = task.model(spec.seed)
    common = dict(
        output_dir=os.path.join(out_tmp, "trainer"), report_to=[], disable_tqdm=True, save_strategy="no",
        max_steps=spec.steps, logging_steps=max(1, spec.steps // 5), seed=spec.seed, data_seed=spec.seed,
        use_cpu=not torch.cuda.is_available(), warmup_steps=task.s.warmup, dataloader_num_workers=0,
        **task.args(),
    )
    kwargs = task.trainer_kwargs()
    if spec.method == "dense":
        trainer = Trainer(model=model, args=TrainingArguments(**common), **kwargs)
    else:
        MagnitudePruningTrainer, MovementPruningTrainer = baseline_trainers()
        margs = dict(spec.method_args)
        if spec.method == "hf_sparse":
            config_kw, train_kw = split_sparse_args(margs)
            config = SparseConfig(sparsity=spec.sparsity, **config_kw)
            hf_sparse.sparsify_model(model, config)
            # the study's runs predate the warm-up's extension (2026-12-08): off unless asked for, so the cached
            # runs (whose keys hold only the arguments given) stay what a rerun gives
            args = SparseTrainingArguments(**common, **{"warmup_loss_drop": 0.0, **train_kw})
            trainer = SparseTrainer(model=model, args=args, **kwargs)
        else:
            schedule = {k: margs[k] for k in ("budget_schedule_start", "budget_schedule_end", "fix_masks_at")}
            compute = "mask" if spec.method == "movement" else "gather"
            score_init = "budget"  # irrelevant to the baselines: they never read the keep probabilities
            config = SparseConfig(sparsity=spec.sparsity, compute=compute, score_init=score_init)
            hf_sparse.sparsify_model(model, config)
            args = SparseTrainingArguments(**common, **schedule, importance_warmup=0.0)  # no informed start
            if spec.method == "random":
                structure = SparseStructure(model)
                structure.set_masks(random_units_mask(structure, spec.sparsity, spec.seed))
                for g in structure:
                    g.fixed.fill_(True)  # trains only the kept weights, from step 0
                trainer = SparseTrainer(model=model, args=args, **kwargs)
            elif spec.method == "magnitude":
                trainer = MagnitudePruningTrainer(model=model, args=args, mask_every=margs["magnitude_every"], **kwargs)
            elif spec.method == "movement":
                trainer = MovementPruningTrainer(model=model, args=args, score_lr=margs["movement_score_lr"], **kwargs)
            else:
                raise ValueError(f"unknown method {spec.method!r}; choose from {METHODS}")

    trainer.remove_callback(PrinterCallback)  # the log dicts stay in trainer.state.log_history, off stdout
    timer = _step_timer()
    trainer.add_callback(timer)
    start = time.perf_counter()
    out = trainer.train()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = trainer.evaluate()
    eval_seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "task": spec.task, "method": spec.method, "sparsity": spec.sparsity if spec.method != "dense" else 0.0,
        "seed": spec.seed, "steps": int(out.global_step), "tag": spec.tag, "method_args": spec.method_args,
        "metric_name": task.metric, "metric": task.metric_from(metrics), "eval_loss": float(metrics["eval_loss"]),
        "train_loss": float(out.training_loss), "train_seconds": train_seconds,
        "step_seconds": timer.typical_step_seconds(_phase_boundaries(trainer)),
        "step_seconds_overall": train_seconds / max(int(out.global_step), 1), "eval_seconds": eval_seconds,
        "step_durations": [round(x, 5) for x in timer.durations()],
        "flops_vs_dense": 1.0, "param_sparsity": 0.0,
    }
    if isinstance(trainer, SparseTrainer):
        state = trainer._sparse_state
        result["flops_vs_dense"] = state["flops_ratio_sum"] / max(state["steps"], 1)
        report = hf_sparse.sparsity_report(trainer.model)
        result["param_sparsity"] = float(report.sparsity)
        result["forward_flops_vs_dense"] = float(report.forward_flops_fraction)
        result["skipped_updates"] = int(state["skipped_updates"])
        # the structure search's last logged diagnostics (how polarised the scores were, ...)
        for entry in trainer.state.log_history if spec.method == "hf_sparse" else []:
            for k, v in entry.items():
                if k.startswith("sparse/") and k not in ("sparse/train_flops_vs_dense",):
                    result.setdefault("last_logs", {})[k] = float(v)
    trainer.accelerator.free_memory()
    del trainer, model
    return result


# ----------------------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------------------
class Cache:
    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.dir, key + ".json")

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            with open(self.path(key), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        tmp = self.path(key) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path(key))  # atomic: a stopped study never leaves half a result
