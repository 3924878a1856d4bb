#!/usr/bin/env python
"""The quality study of issue 7: does hf_sparse learn good masks? Dense training, hf_sparse and three pruning
baselines at the same sparsity, the same units (MLP neurons + attention heads, budget in parameters) and the
same number of steps, over several seeds; the variance of the structure-gradient estimators on a real layer;
and the ablations a user asks about. One command writes everything:

    python benchmarks/quality.py                                  # the full default study (~55 min, 2 quiet CPU cores)
    python benchmarks/quality.py --quick                          # a tiny smoke run (outputs/quality_quick)
    python benchmarks/quality.py --tasks cls --seeds 0 1 2 3 4 --steps_cls 300
    python benchmarks/quality.py --hf_sparse_args '{"structure_learning_rate": 0.2, "lm": {"fix_masks_at": 0.9}}'

Outputs (under --out, default docs/): `results.md` (tables, targets MET/MISSED, the command, the machine),
`results.json` (every number), `img/quality_cls.png`, `img/quality_lm.png`, `img/estimator_variance.png`, and
`quality_cache/` (one JSON per finished run: a rerun skips what is already there, so a long study can be
stopped and continued; delete the folder to start over).

Tasks
  cls  the embedded genre task (`hf_sparse.data.load_genre_dataset`: comedy / history / tragedy of a 40-word passage,
       at most 80 tokens, train and test split by play) with the real pretrained all-MiniLM-L6-v2
       (AutoModelForSequenceClassification, 3 labels), 80 steps of batch 16, lr 1e-4; metric: accuracy on the
       1,024 passages of the 8 test plays.
  lm   a small Llama (hidden 128, 4 layers, 4 query heads, 2 key/value heads, MLP 344) pretrained from scratch on
       the Shakespeare corpus (`load_lm_corpus`, byte-level BPE of 2048 tokens, blocks of 64), 300 steps of batch
       16, lr 1e-3; metric: validation perplexity on the held-out plays (128 evenly spaced blocks).

Methods (every one a `Trainer` with the same data, optimizer, learning-rate schedule, steps and seed)
  dense      the plain `transformers.Trainer`.
  hf_sparse  `SparseTrainer` (VR-PGE search, then the fixed top-K mask); arguments from --hf_sparse_args.
  random     random units: random scores -> `topk_mask` at the budget, fixed from step 0; trains only the kept units.
  magnitude  gradual magnitude pruning of units: mask = top-K of `unit_magnitudes` (L2 norm per unit) filling the
             cubic budget, recomputed every `magnitude_every` steps (default 1); one forward + backward on the kept
             units; the last mask is fixed at fix_masks_at.
  movement   movement pruning of units: a learnable score per unit, hard mask = global top-K of the scores filling
             the cubic budget, mask = hard + s - s.detach() (straight-through), dense compute multiplied by the mask
             (dense backward), scores in AdamW (own group, no weight decay); fixed at fix_masks_at.
The baselines' schedule (budget_schedule_start / end, fix_masks_at) and their own knobs are --baseline_args (default:
cubic from dense over the first half, fixed at 80%, for both tasks: "gradual" pruning is what these methods are).

Training FLOPs vs dense are the matmul-parameter proxy of `SparseTrainer` (`sparse/train_flops_vs_dense`): a dense
step (1 forward + 2 for the backward) is 1; hf_sparse counts its two forwards and one backward at the masks' kept
share; random / magnitude count one forward and backward at the mask's share; dense and movement count 1 (their
backward is dense).

Causal-LM target "at equal wall-clock time": the hf_sparse LM runs are repeated with max_steps scaled so that their
training time matches dense's (steps = dense_steps * dense_step_time / sparse_step_time, measured on the first seed;
a step time is the median step of each phase of the run weighted by the phase's length, robust to short bursts of
other processes), reported beside the equal-step runs (--no-equal_time to skip). Wall-clock numbers are only as good
as the machine is quiet: run the study alone on it. Every metric is deterministic (seeded); times are not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (ROOT, HERE):  # run from a checkout without installing; the study package next to this file
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

# the study's parts (benchmarks/study): the settings and names shared by all (common), the two tasks (tasks), the
# baselines' trainers (baselines), one run and its cache (runs), the estimator-variance study (estimators), the
# summary, targets, tables and plots (report); this file is the command line and the plan (main)
from study.common import BASELINES, CONFIG_FIELDS, METHODS, TASKS, Settings, log, quick_settings  # noqa: E402
from study.estimators import run_estimator_study  # noqa: E402
from study.report import compute_targets, summarize, write_report  # noqa: E402
from study.runs import Cache, RunSpec, execute  # noqa: E402
from study.tasks import ClsTask, LmTask  # noqa: E402

# hf_sparse's arguments per task, chosen from this study's seed-0 runs (docs/results.md, "How the defaults were
# chosen"): a short dense warm-up that accumulates each unit's Taylor importance, the informed start projected onto
# the target budget (every layer near the kept fraction), then the VR-PGE search, then the fixed top-K mask.
HF_SPARSE_DEFAULTS = {
    "cls": {"structure_learning_rate": 0.1, "importance_warmup": 0.2, "budget_schedule_start": 0.2,
            "budget_schedule_end": 0.2, "fix_masks_at": 0.5, "estimator": "disarm", "mask_groups": 4,
            "score_init": "ones"},
    "lm": {"structure_learning_rate": 0.1, "importance_warmup": 0.1, "budget_schedule_start": 0.1,
           "budget_schedule_end": 0.1, "fix_masks_at": 0.3, "estimator": "disarm", "mask_groups": 1,
           "score_init": "budget"},
}
BASELINE_DEFAULTS = {"budget_schedule_start": 0.0, "budget_schedule_end": 0.5, "fix_masks_at": 0.8,
                     "movement_score_lr": 1e-2, "magnitude_every": 1}

# Seconds per training step (batch 16, the default settings, 2 torch threads) measured on the project's 2-core
# AMD EPYC machine, and per run (model build + evaluation); only used for the estimate printed at the start.
STEP_SECONDS = {
    "cls": {"dense": 0.80, "hf_sparse": 0.65, "random": 0.45, "magnitude": 0.55, "movement": 1.05},
    "lm": {"dense": 0.094, "hf_sparse": 0.082, "random": 0.080, "magnitude": 0.083, "movement": 0.100},
}
RUN_OVERHEAD_SECONDS = {"cls": 12.0, "lm": 1.5}  # model build + evaluation (1,024 test passages; 128 LM blocks)
SETUP_SECONDS = {"cls": 15.0, "lm": 15.0}  # data, tokenizer, warm-up
FORWARD_SECONDS_CLS = 0.2  # one no-grad MiniLM forward of a batch of 16 (the estimator study)


# ----------------------------------------------------------------------------------------------------------
# planning and main
# ----------------------------------------------------------------------------------------------------------
def resolve_hf_args(override: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Defaults per task, updated by the flat keys of --hf_sparse_args, then by its "cls" / "lm" sub-dicts."""
    from hf_sparse import SparseTrainingArguments

    known = {f.name for f in dataclasses.fields(SparseTrainingArguments)} | set(CONFIG_FIELDS)
    flat = {k: v for k, v in override.items() if k not in TASKS}
    out = {}
    for task in TASKS:
        per_task = override.get(task, {})
        if not isinstance(per_task, dict):
            raise SystemExit(f"--hf_sparse_args: {task!r} must map to a dict of arguments, got {per_task!r}")
        merged = {**HF_SPARSE_DEFAULTS[task], **flat, **per_task}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise SystemExit(f"--hf_sparse_args: unknown argument(s) {unknown}; use SparseTrainingArguments fields or "
                             f"SparseConfig fields {list(CONFIG_FIELDS)}")
        for bad in ("max_steps", "seed", "output_dir", "sparsity"):
            if bad in merged:
                raise SystemExit(f"--hf_sparse_args: {bad!r} is set by the study itself "
                                 "(use --steps_*/--seeds/--sparsities)")
        out[task] = merged
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--steps_cls", type=int, default=None,
                   help="optimizer steps of every classification run (default 80; quick 8)")
    p.add_argument("--steps_lm", type=int, default=None, help="optimizer steps of every LM run (default 300; quick 8)")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--skip_estimator", action="store_true", help="skip the estimator-variance study")
    p.add_argument("--skip_ablations", action="store_true", help="skip the classification ablations")
    p.add_argument("--equal_time", action=argparse.BooleanOptionalAction, default=True,
                   help="LM: also run hf_sparse with max_steps scaled to dense's wall-clock (default on)")
    p.add_argument("--hf_sparse_args", default="{}",
                   help='JSON dict of SparseTrainingArguments / SparseConfig overrides for hf_sparse, flat (both '
                        'tasks) and/or per task: '
                        '\'{"structure_learning_rate": 0.2, "cls": {"score_init": "magnitude"}}\'')
    p.add_argument("--baseline_args", default="{}",
                   help="JSON dict overriding the baselines' budget_schedule_start/end, fix_masks_at, "
                        f"movement_score_lr, magnitude_every (defaults {json.dumps(BASELINE_DEFAULTS)})")
    p.add_argument("--estimator_points", nargs="+", type=int, default=None,
                   help="fine-tuning steps where the estimator variances are measured (default 0 40 80 120)")
    p.add_argument("--estimator_pairs", type=int, default=None,
                   help="mask pairs per point and setting (default 16: 4 x 16 forwards; quick 4)")
    p.add_argument("--estimator_layer", type=int, default=3)
    p.add_argument("--passage_words", type=int, default=None, help="classification: words per passage (default 40)")
    p.add_argument("--max_length", type=int, default=None, help="classification: tokens per passage (default 80)")
    p.add_argument("--max_train_samples", type=int, default=None, help="truncate both training sets")
    p.add_argument("--max_eval_samples", type=int, default=None, help="truncate both evaluation sets")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output folder (default docs; quick: outputs/quality_quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: 1 seed, 8 steps, 64 training / evaluation examples, a tiny Llama")
    p.add_argument("--dry_run", action="store_true", help="print the plan and the time estimate, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(raw_argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = quick_settings() if a.quick else Settings()
    if a.passage_words:
        settings.cls_passage_words = a.passage_words
    if a.max_length:
        settings.cls_max_length = a.max_length
    if a.max_train_samples:
        settings.cls_max_train = settings.lm_max_train = a.max_train_samples
    if a.max_eval_samples:
        settings.cls_max_eval = settings.lm_max_eval = a.max_eval_samples
    seeds = a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])
    steps = {"cls": a.steps_cls or (8 if a.quick else 80), "lm": a.steps_lm or (8 if a.quick else 300)}
    out_dir = a.out or (os.path.join(ROOT, "outputs", "quality_quick") if a.quick else os.path.join(ROOT, "docs"))
    points = a.estimator_points or ([0, 4, 8] if a.quick else [0, 40, 80, 120])
    pairs = a.estimator_pairs or (4 if a.quick else 16)
    for s in a.sparsities:
        if not 0.0 < s < 1.0:
            raise SystemExit(f"--sparsities are fractions in (0, 1), got {s}")
    try:
        hf_args = resolve_hf_args(json.loads(a.hf_sparse_args))
        baseline_args = {**BASELINE_DEFAULTS, **json.loads(a.baseline_args)}
    except json.JSONDecodeError as e:
        raise SystemExit(f"--hf_sparse_args / --baseline_args must be JSON dicts: {e}")
    unknown = sorted(set(baseline_args) - set(BASELINE_DEFAULTS))
    if unknown:
        raise SystemExit(f"--baseline_args: unknown key(s) {unknown}; known: {sorted(BASELINE_DEFAULTS)}")
    if "dense" not in a.methods:
        log("note: without dense runs the targets cannot be evaluated")

    cache = Cache(os.path.join(out_dir, "quality_cache"))

    def method_args(task: str, method: str) -> dict[str, Any]:
        if method == "hf_sparse":
            return hf_args[task]
        if method in BASELINES:
            keep = ["budget_schedule_start", "budget_schedule_end", "fix_masks_at"]
            keep += {"movement": ["movement_score_lr"], "magnitude": ["magnitude_every"]}.get(method, [])
            return {k: baseline_args[k] for k in keep}
        return {}

    # the plan: seed by seed, so a stopped study has every method at its first seeds
    main_specs: list[RunSpec] = []
    for seed in seeds:
        for task in a.tasks:
            for method in a.methods:
                for sp in ([0.0] if method == "dense" else a.sparsities):
                    main_specs.append(RunSpec(task, method, sp, seed, steps[task], method_args(task, method)))
    ablation_variants = []
    if "cls" in a.tasks and not a.skip_ablations:
        base = hf_args["cls"]
        ablation_variants = [
            ("defaults of this study", {}),
            ("no informed start (scores from 1, cubic budget over the first half, fixed at 0.8)",
             {"importance_warmup": 0.0, "budget_schedule_start": 0.0, "budget_schedule_end": 0.5, "fix_masks_at": 0.8}),
            ("informed start only, no search (fixed at the end of the warm-up)",
             {"fix_masks_at": base.get("importance_warmup", 0.0), "forward_search_steps": 0}),
            ("weight_grad_samples=2", {"weight_grad_samples": 2, "mask_samples": max(2, base.get("mask_samples", 2))}),
            ("budget=units", {"budget": "units"}),
            ("plain VR-PGE (estimator=vrpge, mask_groups=1)", {"estimator": "vrpge", "mask_groups": 1}),
            ("longer search (fixed at 0.8)", {"fix_masks_at": 0.8}),
            ("shorter warm-up (0.1)", {"importance_warmup": 0.1, "budget_schedule_start": 0.1, "budget_schedule_end": 0.1}),
        ]
    ablation_specs = [RunSpec("cls", "hf_sparse", 0.5, seeds[0], steps["cls"], {**hf_args["cls"], **ov}, "ablation")
                      for _, ov in ablation_variants]
    equal_time = a.equal_time and "lm" in a.tasks and {"dense", "hf_sparse"} <= set(a.methods)

    # the estimate
    def estimate(spec: RunSpec) -> float:
        return spec.steps * STEP_SECONDS[spec.task][spec.method] + RUN_OVERHEAD_SECONDS[spec.task]

    unique: dict[str, RunSpec] = {}
    for spec in main_specs + ablation_specs:
        unique.setdefault(spec.key(settings), spec)
    todo = {k: s for k, s in unique.items() if cache.get(k) is None}
    est = sum(estimate(s) for s in todo.values()) + sum(SETUP_SECONDS[t] for t in a.tasks)
    if equal_time:  # same runs again with about the same wall-clock as dense
        est += len(seeds) * len(a.sparsities) * (steps["lm"] * STEP_SECONDS["lm"]["dense"] + RUN_OVERHEAD_SECONDS["lm"])
    if "cls" in a.tasks and not a.skip_estimator:
        est += max(points) * STEP_SECONDS["cls"]["dense"] + len(points) * 3 * 4 * pairs * FORWARD_SECONDS_CLS
    scale = "" if not a.quick else " (quick mode: the constants are for the full settings, so this over-estimates)"
    log(f"plan: {len(unique)} training runs ({len(unique) - len(todo)} cached) + "
        f"{len(seeds) * len(a.sparsities) if equal_time else 0} equal-time LM runs"
        f"{'' if a.skip_estimator or 'cls' not in a.tasks else ' + the estimator study'}; "
        f"estimated {est / 60:.0f} min on a quiet 2-core machine{scale}; output {out_dir}")
    if a.dry_run:
        for spec in unique.values():
            log(f"  {spec.label()}{'  (cached)' if spec.key(settings) not in todo else ''}")
        return {}

    import datasets
    import transformers

    from hf_sparse.hub import describe_hardware

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()

    wall = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="hf_sparse_quality_")
    tasks: dict[str, Any] = {}
    runs: list[dict] = []
    done_seconds = {"est": 0.0, "real": 0.0}

    warmed: set[str] = set()

    def get_task(name: str):
        if name not in tasks:
            t = time.perf_counter()
            tasks[name] = ClsTask(settings) if name == "cls" else LmTask(settings, cache.dir)
            log(f"{name}: data and tokenizer ready in {time.perf_counter() - t:.1f}s: {tasks[name].description}")
        return tasks[name]

    def warm_up(name: str):
        """A few untimed, unrecorded steps of dense and hf_sparse before the first timed run of a task: lazy imports,
        thread pools and allocator caches would otherwise land in the first run's time (and the equal-time steps)."""
        if name in warmed:
            return
        warmed.add(name)
        t = time.perf_counter()
        for method in ("dense", "hf_sparse"):
            execute(RunSpec(name, method, 0.5, 0, 3, method_args(name, method), "warm-up"), get_task(name), tmp)
        log(f"{name}: warm-up in {time.perf_counter() - t:.1f}s")

    def run(spec: RunSpec) -> dict:
        key = spec.key(settings)
        cached = cache.get(key)
        if cached is not None:
            log(f"cached  {spec.label()}: {cached['metric_name']} {cached['metric']:.4f}")
            result = dict(cached)
        else:
            task = get_task(spec.task)
            warm_up(spec.task)
            log(f"running {spec.label()} ...")
            t = time.perf_counter()
            result = execute(spec, task, tmp)
            took = time.perf_counter() - t
            cache.put(key, result)
            done_seconds["est"] += estimate(spec)
            done_seconds["real"] += took
            log(f"done    {spec.label()}: {result['metric_name']} {result['metric']:.4f}, "
                f"train {result['train_seconds']:.1f}s "
                f"({1e3 * result['step_seconds']:.0f} ms/step), FLOPs vs dense {result['flops_vs_dense']:.2f}, "
                f"total {took:.1f}s")
        result["tag"] = spec.tag
        runs.append(result)
        return result

    equal_time_steps: dict[str, dict[str, Any]] = {}
    equal_specs_done = False

    def maybe_equal_time():
        nonlocal equal_specs_done
        if not equal_time or equal_specs_done:
            return
        first = [r for r in runs if r["task"] == "lm" and r["seed"] == seeds[0] and r["tag"] == "main"]
        dense = next((r for r in first if r["method"] == "dense"), None)
        sparse = {r["sparsity"]: r for r in first if r["method"] == "hf_sparse"}
        if dense is None or any(sp not in sparse for sp in a.sparsities):
            return
        equal_specs_done = True
        for sp in a.sparsities:
            n = max(1, int(round(steps["lm"] * dense["step_seconds"] / sparse[sp]["step_seconds"])))
            equal_time_steps[f"{sp:g}"] = {"steps": n, "dense_step": dense["step_seconds"],
                                           "sparse_step": sparse[sp]["step_seconds"]}
            log(f"equal time at {sp:.0%}: dense {1e3 * dense['step_seconds']:.0f} ms/step, hf_sparse "
                f"{1e3 * sparse[sp]['step_seconds']:.0f} ms/step -> hf_sparse gets {n} steps")

    # main runs, seed by seed; the equal-time runs of a seed follow its main runs
    for seed in seeds:
        for spec in [s for s in main_specs if s.seed == seed]:
            run(spec)
            maybe_equal_time()
            if done_seconds["est"] > 0:
                left = sum(estimate(s) for k, s in todo.items() if cache.get(k) is None)
                ratio = done_seconds["real"] / done_seconds["est"]
                log(f"progress: {len(runs)} runs; about {left * ratio / 60:.0f} min of main/ablation runs left "
                    f"(running at {ratio:.2f}x the estimate)")
        if equal_time_steps:
            for sp in a.sparsities:
                n = equal_time_steps[f"{sp:g}"]["steps"]
                run(RunSpec("lm", "hf_sparse", sp, seed, n, hf_args["lm"], "equal_time"))

    ablations = []
    for (variant, _), spec in zip(ablation_variants, ablation_specs):
        result = run(spec)
        ablations.append({"variant": variant, "args": spec.method_args, "result": result})

    study = None
    if "cls" in a.tasks and not a.skip_estimator:
        study = run_estimator_study(get_task("cls"), cache, points, pairs, a.estimator_layer, settings.cls_batch)

    shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(runs)
    targets = compute_targets(summary, a.sparsities)
    meta = {
        "command": "python benchmarks/quality.py " + " ".join(shlex.quote(x) for x in raw_argv),
        "hardware": describe_hardware(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_seconds": time.perf_counter() - wall, "quick": a.quick, "seeds": seeds, "steps": steps,
        "sparsities": a.sparsities, "methods": a.methods, "tasks": a.tasks, "hf_sparse_args": hf_args,
        "baseline_args": baseline_args, "settings": dataclasses.asdict(settings), "equal_time_steps": equal_time_steps,
        "descriptions": {name: t.description for name, t in tasks.items()},
        "majority_class_accuracy": tasks["cls"].majority if "cls" in tasks else None,
    }
    results = {"meta": meta, "summary": summary, "targets": targets, "runs": runs, "estimator": study,
               "ablations": ablations}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True, default=float)
    path = write_report(out_dir, meta, summary, targets, study, ablations, runs)
    log(f"wrote {path}, {os.path.join(out_dir, 'results.json')} and plots in {os.path.join(out_dir, 'img')} "
        f"in {(time.perf_counter() - wall) / 60:.1f} min")
    for t in targets:
        log(f"target: {t['status']:<13} {t['target']}: {t['detail']}")
    return results


if __name__ == "__main__":
    main()
