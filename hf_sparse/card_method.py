"""How a model's structure was chosen, in the model card's terms: the kind of run (a search, the forward-only search
of `prune_model`, a Taylor mask, a given mask...), its name, tags and step counts (`structure_method`). The card's
words for each kind are in templates/model_card.md."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_ESTIMATOR_NAMES = {"vrpge": ("VR-PGE", "vr-pge"), "disarm": ("DisARM", "disarm")}


def schedule_plan(args: Any) -> dict[str, Any] | None:
    """The step kinds the schedule of the training arguments plans (fractions of training), if they have one."""
    get = args.get if isinstance(args, Mapping) else lambda k: getattr(args, k, None)
    w, fix = get("importance_warmup"), get("fix_masks_at")
    return None if args is None or w is None or fix is None else {
        "importance_warmup_steps": w, "search_steps": max(fix - w, 0.0), "fixed_steps": 1.0 - fix, "planned": True,
        "estimator": get("estimator"), "forward_search_steps": get("forward_search_steps") or 0,
        "forward_search": get("forward_search")}


def structure_method(run: Mapping[str, Any] | str | None, score_init: str | None = None) -> dict[str, Any]:
    """How the structure was chosen, for the card: its `kind` (search, forward_only, taylor, taylor_forward_search, given, initial,
    warmup_only, no_steps, stated, unknown), `name`, `tags`, step-count `rows` and their `source`. `run`: what
    `SparseTrainer.structure_run()` returns, a dict with its keys (`importance_warmup_steps`, `search_steps`,
    `fixed_steps`, `estimator`, ...), a string naming the method, or None. Only a search tags the estimator."""
    if run is None or isinstance(run, str):
        tags = [t for k, t in (("vr-pge", "vr-pge"), ("vrpge", "vr-pge"), ("disarm", "disarm"),
                               ("taylor", "taylor-importance")) if run and k in run.lower()]
        return {"kind": "unknown" if run is None else "stated", "name": "not recorded" if run is None else _cell(run),
                "tags": list(dict.fromkeys(tags)), "rows": [], "source": ""}
    if not isinstance(run, Mapping):
        raise TypeError(f"structure_run must be a dict of step counts, a string or None, got {type(run).__name__}")
    planned = bool(run.get("planned"))
    warmup, search, fixed = (float(run.get(f"{k}_steps") or 0) for k in ("importance_warmup", "search", "fixed"))
    estimator, tag = _ESTIMATOR_NAMES.get(str(run.get("estimator") or "vrpge"), (str(run.get("estimator")), None))
    score_init = run.get("score_init", score_init)
    kind, tags = "no_steps", []
    pruned = run.get("mask_from") if run.get("fixed_from_start") else None
    if run.get("forward_only") or (isinstance(pruned, Mapping) and pruned.get("forward_only")):
        return _forward_only(run if run.get("forward_only") else pruned, estimator, tag,
                             recovery_steps=int(run.get("fixed_steps") or 0) if pruned else 0)
    if run.get("fixed_from_start"):
        kind, name = "given", "a mask fixed before training"
    elif search > 0:
        kind, tags = "search", [t for t in (tag, "taylor-importance" if warmup else None) if t]
        name = f"the {estimator} search" + (", after an informed start from the Taylor importance" if warmup else "")
    elif warmup > 0 and fixed > 0 and int(run.get("forward_search_steps") or 0) > 0:
        # the forward-only search's estimator is VR-PGE whatever `estimator` (the training-time search's) says
        estimator, tag = _ESTIMATOR_NAMES["vrpge"]
        kind, tags = "taylor_forward_search", ["taylor-importance", tag, "forward-only-search"]
        what = ("of each group's share of the budget (the Taylor ranking kept inside each group)"
                if str(run.get("forward_search")).startswith("allocation") else "of the keep probabilities")
        goal = (", scored by the distance of the last hidden states from the dense model's"
                if run.get("forward_search_objective") == "hidden" else "")
        name = (f"the Taylor importance read in a dense warm-up, then {int(run['forward_search_steps'])} steps of a "
                f"forward-only {estimator} search {what} on the weights of that moment{goal}; its top-K mask fixed")
    elif warmup > 0 and fixed > 0:
        kind, tags = "taylor", ["taylor-importance"]
        name = "the Taylor importance read in a dense warm-up, then the top-K mask fixed without a search"
    elif warmup > 0:
        kind, name = "warmup_only", "none: the run ended in its dense warm-up"
    elif fixed > 0:
        kind, name = "initial", f"the top-K of the initial scores (score_init={score_init!r}), fixed from the start"
        tags = ["magnitude-pruning"] if score_init == "magnitude" else []
    else:
        name = "none: no training step was recorded"
    count = (lambda n: f"{100 * n:.0f}% of the steps") if planned else (lambda n: f"{int(n):,}")
    rows = [("dense warm-up (every unit trained; Taylor importance read from the backward)", count(warmup)),
            (f"search (masks sampled from the keep probabilities; {estimator} updates of them)", count(search)),
            ("fixed mask (the kept units trained alone)", count(fixed))]
    if kind == "taylor_forward_search":  # inside the warm-up's last step
        rows.insert(1, ("forward-only search at the end of the warm-up (masked forwards, weights frozen)",
                        f"{int(run['forward_search_steps']):,}"))
    if int(run.get("warmup_extension_steps") or 0) and not planned:
        rows.insert(1, ("... of which past importance_warmup (the loss was still at its starting level)",
                        f"{int(run['warmup_extension_steps']):,}"))
    if run.get("train_flops_vs_dense") is not None and not planned:
        rows.append(("training FLOPs against dense (matmul proxy)", f"{float(run['train_flops_vs_dense']):.2f}"))
    source = ("planned by the training arguments (the trainer's step counts were not available)" if planned
              else f"counted by {run['recorded_by']} during training" if run.get("recorded_by")
              else "as stated by the caller")
    return {"kind": kind, "name": name, "tags": tags, "rows": rows, "source": source, "estimator": estimator,
            "updates": int(run.get("structure_updates", search) or 0), "skipped": int(run.get("skipped_updates") or 0),
            "warmed_up": warmup > 0, "fixed": fixed > 0, "counted": not planned and bool(run.get("recorded_by")),
            "forward_search_steps": int(run.get("forward_search_steps") or 0),
            "allocation": {"allocation": "pairs", "allocation_sampled": "sampled"}.get(str(run.get("forward_search")))}


def _cell(text: str) -> str:
    """A string as one markdown table cell / line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


_STARTS = {"activation": "each unit's activation x weight norm, read from a few dense forwards (as Wanda-sp)",
           "magnitude": "each unit's weight norm", "uniform": "the same keep probability for every unit"}


def _forward_only(run: Mapping[str, Any], estimator: str, tag: str | None, recovery_steps: int) -> dict[str, Any]:
    """`hf_sparse.prune_model`'s record (a search on frozen weights, forward passes only), and the steps of a
    `SparseTrainer` recovery run on its fixed mask, if one followed."""
    count = int(run.get("search_steps") or 0)
    rows = [("search (masks sampled from the keep probabilities; weights frozen, no backward)", f"{count:,}"),
            ("forward passes (calibration, samples and the final check)", f"{int(run.get('forward_passes') or 0):,}")]
    if recovery_steps:
        rows.append(("recovery (the kept units trained with the mask fixed)", f"{recovery_steps:,}"))
    budget = run.get("budget", "params")
    return {"kind": "forward_only", "name": f"the forward-only {estimator} search of hf_sparse.prune_model",
            "tags": [t for t in (tag if count else None, "forward-only-pruning") if t], "rows": rows,
            "source": f"counted by {run.get('recorded_by', 'hf_sparse.prune_model')}", "estimator": estimator,
            "updates": count, "skipped": 0, "warmed_up": False, "fixed": True, "counted": True,
            "start_text": _STARTS.get(str(run.get("start", "activation")), str(run.get("start"))),
            "samples": int(run.get("num_samples") or 0), "recovery_steps": recovery_steps,
            "budget_text": "kept parameters" if budget == "params" else "kept units"}
