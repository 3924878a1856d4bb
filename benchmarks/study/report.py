"""From the runs to the study's outputs: the summary per task and method (mean and standard deviation over
seeds), the targets of issue 7 (MET / MISSED / NOT EVALUATED), the Markdown tables, the plots and results.md."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import numpy as np

from .common import BASELINES, METHODS, TASKS
from .estimators import ESTIMATOR_FORWARDS, ESTIMATOR_LABELS, ESTIMATORS


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """task -> 'method@sparsity[@equal_time]' -> mean/std of metric, times, FLOPs."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["tag"] not in ("main", "equal_time"):
            continue
        groups.setdefault((r["task"], r["method"], r["sparsity"], r["tag"]), []).append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (task, method, sparsity, tag), rs in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        m, sd = mean_std([r["metric"] for r in rs])
        name = f"{method}@{sparsity:g}" + ("@equal_time" if tag == "equal_time" else "")
        out.setdefault(task, {})[name] = {
            "task": task, "method": method, "sparsity": sparsity, "tag": tag, "n": len(rs),
            "seeds": sorted(r["seed"] for r in rs), "metric_mean": m, "metric_std": sd,
            "steps": statistics.fmean(r["steps"] for r in rs),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in rs),
            "step_seconds": statistics.fmean(r["step_seconds"] for r in rs),
            "flops_vs_dense": statistics.fmean(r["flops_vs_dense"] for r in rs),
            "param_sparsity": statistics.fmean(r["param_sparsity"] for r in rs),
        }
    return out


def _order(key: tuple) -> tuple:
    task, method, sparsity, tag = key
    return (TASKS.index(task), sparsity, tag != "main", METHODS.index(method))


def compute_targets(summary: dict, sparsities: list[float]) -> list[dict[str, Any]]:
    """Each target of issue 7 with MET / MISSED / NOT EVALUATED and the numbers that decided it."""
    targets = []
    cls = summary.get("cls", {})
    dense = cls.get("dense@0")

    def acc(name):
        row = cls.get(name)
        return None if row is None else row["metric_mean"]

    for sparsity, tolerance, need_baselines in ((0.5, 0.01, True), (0.75, 0.03, False)):
        name = f"Classification at {sparsity:.0%} sparsity: accuracy within {tolerance * 100:.0f} point(s) of dense" + (
            " and above every baseline" if need_baselines else "")
        hf = acc(f"hf_sparse@{sparsity:g}")
        if dense is None or hf is None:
            targets.append({"target": name, "status": "NOT EVALUATED", "detail": "dense or hf_sparse runs missing"})
            continue
        d = dense["metric_mean"]
        ok = hf >= d - tolerance - 1e-12
        detail = (f"hf_sparse {hf:.4f} vs dense {d:.4f} (difference {100 * (hf - d):+.2f} points, "
                  f"allowed -{100 * tolerance:.0f})")
        if need_baselines:
            found = {b: acc(f"{b}@{sparsity:g}") for b in BASELINES}
            found = {b: v for b, v in found.items() if v is not None}
            missing = [b for b in BASELINES if b not in found]
            beats = all(hf > v for v in found.values())
            ok = ok and beats and not missing
            detail += "; baselines " + (", ".join(f"{b} {v:.4f}" for b, v in found.items()) or "none")
            if missing:
                detail += f"; not run: {', '.join(missing)} (target not fully evaluated)"
        targets.append({"target": name, "status": "MET" if ok else "MISSED", "detail": detail})

    lm = summary.get("lm", {})
    dense = lm.get("dense@0")
    for sparsity in sparsities:
        name = (f"Causal LM at {sparsity:.0%} sparsity: validation perplexity at equal wall-clock time no worse "
                "than dense")
        eq = lm.get(f"hf_sparse@{sparsity:g}@equal_time")
        if dense is None or eq is None:
            targets.append({"target": name, "status": "NOT EVALUATED",
                            "detail": "dense or equal-time hf_sparse runs missing (--no-equal_time?)"})
            continue
        d, h = dense["metric_mean"], eq["metric_mean"]
        same = lm.get(f"hf_sparse@{sparsity:g}")
        detail = (f"hf_sparse {h:.2f} in {eq['steps']:.0f} steps / {eq['train_seconds']:.0f}s vs dense {d:.2f} in "
                  f"{dense['steps']:.0f} steps / {dense['train_seconds']:.0f}s")
        if same is not None:
            detail += f" (hf_sparse at equal steps: {same['metric_mean']:.2f})"
        targets.append({"target": name, "status": "MET" if h <= d else "MISSED", "detail": detail})
    return targets


def _fmt_metric(row: dict, task: str) -> str:
    digits = 4 if task == "cls" else 2
    if row["n"] > 1:
        return f"{row['metric_mean']:.{digits}f} ± {row['metric_std']:.{digits}f} (n={row['n']})"
    return f"{row['metric_mean']:.{digits}f} (n=1)"


def method_table(task: str, rows: dict[str, dict]) -> str:
    metric = "accuracy" if task == "cls" else "validation perplexity"
    lines = [f"| method | sparsity | steps | {metric} (mean ± std over seeds) | train time (s) | step (ms) | "
             "training FLOPs vs dense | params removed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows.values():
        method = row["method"] + (" (equal time)" if row["tag"] == "equal_time" else "")
        sparsity = "—" if row["method"] == "dense" else f"{row['sparsity']:.0%}"
        lines.append(
            f"| {method} | {sparsity} | {row['steps']:.0f} | {_fmt_metric(row, task)} | {row['train_seconds']:.0f} | "
            f"{1e3 * row['step_seconds']:.0f} | {row['flops_vs_dense']:.2f} | {row['param_sparsity']:.3f} |"
        )
    return "\n".join(lines)


def plot_task(task: str, rows: dict[str, dict], path: str, chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows.values())
    labels = [("dense" if r["method"] == "dense" else f"{r['method']}\n{r['sparsity']:.0%}")
              + ("\n(equal time)" if r["tag"] == "equal_time" else "") for r in rows]
    colors = {"dense": "tab:gray", "hf_sparse": "tab:blue", "random": "tab:orange", "magnitude": "tab:green",
              "movement": "tab:red"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.2))
    x = np.arange(len(rows))
    bars = ax.bar(x, [r["metric_mean"] for r in rows], yerr=[r["metric_std"] for r in rows], capsize=4,
                  color=[colors.get(r["method"], "tab:purple") for r in rows])
    for bar, r in zip(bars, rows):
        if r["tag"] == "equal_time":
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is not None:
        ax.axhline(dense["metric_mean"], color="black", lw=0.8, ls="--", label="dense mean")
    if chance is not None:
        ax.axhline(chance, color="tab:brown", lw=0.8, ls=":", label="majority class")
    if dense is not None or chance is not None:
        ax.legend(loc="best")
    values = [r["metric_mean"] for r in rows] + ([chance] if chance is not None else [])
    lo, hi = min(values), max(values)
    pad = max(0.02 * abs(hi), (hi - lo) * 0.6 + max(r["metric_std"] for r in rows))
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("test accuracy" if task == "cls" else "validation perplexity (lower is better)")
    seeds = max(r["n"] for r in rows)
    what = "Genre classification, MiniLM fine-tuning" if task == "cls" else "Causal LM, small Llama from scratch"
    ax.set_title(what
                 + f" (mean ± std over {seeds} seed{'s' if seeds > 1 else ''})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


ESTIMATOR_SETTINGS = {
    "uniform_0.5": "s = 0.5 for every unit, one fixed batch",
    "spread": "s ~ U(0.05, 0.95), one fixed batch",
    "spread_new_batches": "s ~ U(0.05, 0.95), a new batch per pair",
}


def plot_estimator(study: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["scores"] for r in study["records"]))
    fig, axes = plt.subplots(len(settings), 2, figsize=(10, 3.4 * len(settings)), squeeze=False)
    styles = {"vrpge": ("tab:blue", "o"), "disarm": ("tab:green", "s"), "reinforce": ("tab:red", "^"),
              "reinforce_baseline": ("tab:orange", "v")}
    for i, setting in enumerate(settings):
        recs = sorted((r for r in study["records"] if r["scores"] == setting), key=lambda r: r["step"])
        steps = [r["step"] for r in recs]
        for j, sf in enumerate(("fisher", "exact")):
            ax = axes[i][j]
            for est in ESTIMATORS:
                color, marker = styles[est]
                ax.plot(steps, [r[sf][est]["variance_sum"] for r in recs], color=color, marker=marker,
                        label=ESTIMATOR_LABELS[est])
                if ESTIMATOR_FORWARDS[est] != 2:
                    ax.plot(steps, [r[sf][est]["variance_sum_at_2_forwards"] for r in recs], color=color, ls=":", lw=1)
            ax.set_yscale("log")
            ax.set_xlabel("fine-tuning step")
            ax.set_ylabel("variance, summed over units")
            ax.set_title(f"score function '{sf}'; {ESTIMATOR_SETTINGS.get(setting, setting)}", fontsize=9)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Structure-gradient variance, MiniLM layer {study['layer']} MLP neurons ({study['units']} units; "
                 f"{study['pairs']}-{2 * study['pairs']} estimates per point, batches of {study['batch_size']})\n"
                 "dotted: REINFORCE averaged over 2 draws (2 forwards, like VR-PGE and DisARM)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def estimator_verdicts(study: dict) -> list[str]:
    """The paper's two claims, checked on the records: VR-PGE's variance is lower than REINFORCE's, and bounded."""
    out = []
    for sf in ("fisher", "exact"):
        for base in ("reinforce", "reinforce_baseline"):
            ratios = [r[sf]["vrpge"]["variance_sum"] / max(r[sf][base]["variance_sum_at_2_forwards"], 1e-300)
                      for r in study["records"]]
            lower = sum(x < 1 for x in ratios)
            name = "plain REINFORCE (1 sample)" if base == "reinforce" else "REINFORCE with a moving-average baseline"
            out.append(
                f"`{sf}`: VR-PGE's variance is below that of {name} at equal forwards at {lower} of "
                f"{len(ratios)} points (ratio VR-PGE / REINFORCE {min(ratios):.3g} to {max(ratios):.3g})")
        for setting in dict.fromkeys(r["scores"] for r in study["records"]):
            vals = [r[sf]["vrpge"]["variance_sum"] for r in study["records"] if r["scores"] == setting]
            out.append(f"`{sf}`, {ESTIMATOR_SETTINGS.get(setting, setting)}: VR-PGE's variance over training "
                       f"{min(vals):.3g} to {max(vals):.3g} (max / min {max(vals) / max(min(vals), 1e-300):.2g})")
    return out


def estimator_section(study: dict) -> str:
    lines = [
        f"Layer {study['layer']}'s MLP neurons of the MiniLM (`{study['group']}`, {study['units']} units; every other "
        "unit kept) during plain dense fine-tuning of the classification task (AdamW, the classification learning "
        f"rate, batch {study['batch_size']}), measured at steps {', '.join(map(str, study['points']))}. At each point, "
        f"in eval mode (no dropout), {2 * study['pairs']} independent masks and {study['pairs']} antithetic pairs are "
        "evaluated with `torch.no_grad()`, the two masks of a pair on the same batch: either one fixed batch for every "
        "pair (the masks are the only noise) or a new batch per pair (as in training). VR-PGE gives "
        f"{study['pairs']} estimates (one per independent pair), DisARM {study['pairs']} (one per antithetic pair), "
        f"REINFORCE {2 * study['pairs']} (one per mask), REINFORCE with an exponential moving-average baseline (0.9, "
        "warmed on the first 4 losses, updated after each draw) the rest. The variance is the per-unit sample variance "
        "across estimates, summed over units. VR-PGE and DisARM cost 2 forwards an estimate, REINFORCE 1: the columns "
        "*at 2 fwd* divide REINFORCE's variance by 2 (the mean of two draws), the comparison at equal cost. The "
        "`fisher` and `exact` score functions estimate different targets (fisher = sqrt(s(1-s)) x exact), so compare "
        "estimators within a score function; at s = 0.5 exact is 2 x fisher for every mask (variance x 4). With one "
        "fixed batch the moving-average baseline sees the same weights and data at every draw, its most favourable "
        "case.",
        "",
        "![estimator variance](img/estimator_variance.png)",
        "",
    ]
    lines += [f"- {v}" for v in estimator_verdicts(study)]
    lines += [
        "",
        "| step | setting | score fn | VR-PGE | DisARM | REINFORCE | REINFORCE + baseline | REINFORCE at 2 fwd | "
        "REINFORCE + baseline at 2 fwd | lowest at equal forwards |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    short = {"vrpge": "VR-PGE", "disarm": "DisARM", "reinforce": "REINFORCE",
             "reinforce_baseline": "REINFORCE + baseline"}
    for r in sorted(study["records"], key=lambda r: (list(ESTIMATOR_SETTINGS).index(r["scores"])
                                                      if r["scores"] in ESTIMATOR_SETTINGS else 99, r["step"])):
        for sf in ("fisher", "exact"):
            v = {e: r[sf][e]["variance_sum"] for e in ESTIMATORS}
            v2 = {e: r[sf][e]["variance_sum_at_2_forwards"] for e in ESTIMATORS}
            lines.append(
                f"| {r['step']} | {ESTIMATOR_SETTINGS.get(r['scores'], r['scores'])} | {sf} | {v['vrpge']:.3g} | "
                f"{v['disarm']:.3g} | {v['reinforce']:.3g} | {v['reinforce_baseline']:.3g} | {v2['reinforce']:.3g} | "
                f"{v2['reinforce_baseline']:.3g} | {short[min(v2, key=v2.get)]} |"
            )
    lines += ["", f"Forward passes in the study: {sum(r['forwards'] for r in study['records'])} "
              f"({study['seconds']:.0f}s including the fine-tuning)."]
    return "\n".join(lines)


def ablation_table(rows: list[dict]) -> str:
    lines = ["| variant | weight_grad_samples | budget | schedule end | fix_masks_at | accuracy | params removed | "
             "train time (s) | training FLOPs vs dense |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        r, a = row["result"], row["args"]
        lines.append(
            f"| {row['variant']} | {a.get('weight_grad_samples', 1)} | {a.get('budget', 'params')} | "
            f"{a.get('budget_schedule_end')} | {a.get('fix_masks_at')} | {r['metric']:.4f} | "
            f"{r['param_sparsity']:.3f} | "
            f"{r['train_seconds']:.0f} | {r['flops_vs_dense']:.2f} |"
        )
    return "\n".join(lines)


def write_report(out_dir: str, meta: dict, summary: dict, targets: list[dict], study: dict | None,
                 ablations: list[dict], runs: list[dict]) -> str:
    img = os.path.join(out_dir, "img")
    os.makedirs(img, exist_ok=True)
    for task, rows in summary.items():
        if rows:
            plot_task(task, rows, os.path.join(img, f"quality_{task}.png"),
                      chance=meta.get("majority_class_accuracy") if task == "cls" else None)
    if study is not None:
        plot_estimator(study, os.path.join(img, "estimator_variance.png"))

    md = ["# Quality study: does hf_sparse learn good masks?", ""]
    if meta["quick"]:
        md += ["> **Quick mode** (`--quick`): a few steps on a handful of examples and a tiny model. These numbers "
               "only show that the study runs; they say nothing about quality.", ""]
    md += [
        "Produced by `benchmarks/quality.py` (issue 7). Command:", "", "```", meta["command"], "```", "",
        f"- Machine: {meta['hardware']}",
        f"- Date: {meta['finished']}; total wall-clock of this invocation {meta['wall_seconds'] / 60:.1f} min "
        "(cached runs not counted)",
        f"- Seeds: {meta['seeds']}; sparsities: {', '.join(f'{s:.0%}' for s in meta['sparsities'])} of the prunable "
        "parameters (MLP neurons + attention heads, one global budget in parameters)",
        f"- hf_sparse arguments: cls `{json.dumps(meta['hf_sparse_args'].get('cls', {}), sort_keys=True)}`; "
        f"lm `{json.dumps(meta['hf_sparse_args'].get('lm', {}), sort_keys=True)}`",
        f"- Baselines' arguments: `{json.dumps(meta['baseline_args'], sort_keys=True)}`",
        "- Training FLOPs vs dense: the matmul-parameter proxy of `SparseTrainer` (a dense step = 1; hf_sparse = its "
        "two forwards and one backward at the masks' kept share; random / magnitude = one forward and backward at the "
        "mask's share; dense and movement = 1, their backward being dense). Train time is wall-clock of "
        "`trainer.train()` on this machine.",
        "- Raw numbers: `results.json`; per-run cache: `quality_cache/`.", "",
        "## Targets (issue 7)", "",
        "Computed by the script from the results above; \"points\" are accuracy percentage points; means over "
        "seeds.", "",
        "| target | status | numbers |", "|---|---|---|",
    ]
    md += [f"| {t['target']} | **{t['status']}** | {t['detail']} |" for t in targets]
    md += [""]
    if "cls" in summary:
        md += ["## Classification", "", meta["descriptions"].get("cls", ""), "", method_table("cls", summary["cls"]),
               "", "![classification](img/quality_cls.png)", ""]
    if "lm" in summary:
        eq = meta.get("equal_time_steps", {})
        md += ["## Causal language modelling", "", meta["descriptions"].get("lm", ""), ""]
        if eq:
            md += ["Equal-time runs: hf_sparse's max_steps = dense steps x dense step time / hf_sparse step time, both "
                   "measured on the first seed: " + ", ".join(
                       f"{float(k):.0%} -> {v['steps']} steps (dense {1e3 * v['dense_step']:.0f} ms/step, hf_sparse "
                       f"{1e3 * v['sparse_step']:.0f} ms/step)" for k, v in eq.items()) + ".", ""]
        md += [method_table("lm", summary["lm"]), "", "![causal LM](img/quality_lm.png)", ""]
    if study is not None:
        md += ["## Estimator study", "", estimator_section(study), ""]
    if ablations:
        md += ["## Ablations (classification, 50% sparsity, one seed)", "",
               f"hf_sparse on the classification task, seed {ablations[0]['result']['seed']}, each row one change from "
               "the first (the schedule rows: how long the dense warm-up and the search last).", "",
               ablation_table(ablations), ""]
    md += ["## Runs", "",
           f"{len(runs)} runs (all seeds, equal-time and ablation runs); every number is in `results.json`.", ""]
    path = os.path.join(out_dir, "results.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return path
