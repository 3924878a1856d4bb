"""`prune_model`: learn which heads and neurons of a *trained* model to keep from forward passes only.

The policy-gradient estimator (VR-PGE) needs the losses of sampled masks and nothing else: no backward through the
model, no weight gradients, no optimizer state for the weights, no activations stored for a backward. So a model
is pruned at the memory of inference, which no chain-rule method (Taylor, movement, L0) can do. Each step draws
`num_samples` masks from the keep probabilities, runs the same batch through each (gathered: a dropped unit costs
nothing), turns the loss differences into the VR-PGE gradient of the expected loss, takes an Adam step on the
scores and projects them back onto the global budget (heads and neurons of every layer in one budget). The start is
the forward-only activation x weight importance, spread so that no unit sits at 0 or 1 (`forward_importance.py`).
At the end the top-K mask is fixed: the model is an ordinary sparsified model (`export_model`, `shrink_model`, the
card and `push_sparse_to_hub` take it as it is).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .budget import check_keeps_a_unit, project_to_budget
from .config import SparseConfig
from .estimator import pool_by_group, vrpge_gradient
from .forward_importance import ActivationImportance, spread_scores
from .masks import fix_masks, masks_fixed
from .model_state import STRUCTURE_RUN_ATTR, get_sparse_config, is_sparsified
from .patching import sparsify_model, unsparsify_model
from .prune_data import batches
from .structure import SparseStructure, check_keeps_a_level, kept_by_kind, sample_masks, score_stats

logger = logging.getLogger("hf_sparse.prune")

STARTS = ("activation", "magnitude", "uniform")
# The search's defaults, shared with SparseTrainer's `forward_search_steps` (docs/prune.md: where they came from)
SAMPLES, LEARNING_RATE, TEMPERATURE, MARGIN = 4, 0.02, 3.0, 0.02


@dataclass
class PruneResult:
    """What `prune_model` measured: the log rows (every `log_every` steps), the losses of the start's and the
    final top-K masks on the calibration batches, the forward passes run and the peak memory of the process."""

    steps: int
    forward_passes: int
    seconds: float
    dense_loss: float | None
    start_topk_loss: float | None
    final_topk_loss: float | None
    peak_memory_bytes: int | None
    log: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune_model(
    model: nn.Module,
    dataset: Any,
    config: SparseConfig | None = None,
    *,
    steps: int = 300,
    batch_size: int = 16,
    data_collator: Callable | None = None,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    num_samples: int = SAMPLES,
    learning_rate: float = LEARNING_RATE,
    calibration_batches: int = 8,
    start: str = "activation",
    score_margin: float = MARGIN,
    pooling: float = 0.0,
    temperature: float = TEMPERATURE,
    lr_decay: str = "cosine",
    seed: int = 0,
    log_every: int = 10,
    progress: bool = True,
    return_result: bool = False,
):
    """Prune a trained model to `config.sparsity` from forward passes only; returns the model, sparsified with its
    mask fixed (and a `PruneResult` with `return_result=True`).

    model: a Transformers model of a family in the architecture table (or already `sparsify_model`-ed, masks not
        fixed). Its weights are never changed; every forward runs under `torch.no_grad()` in eval mode.
    dataset: a `datasets.Dataset` / torch dataset of examples (batched by `data_collator`, default
        `transformers.default_data_collator`; columns the model's forward does not take are dropped) or an
        iterable of ready batches (dicts). The model must return a loss for a batch (labels included), or give
        `loss_fn(model, batch) -> scalar tensor`.
    config: the `SparseConfig` (sparsity, granularity, budget); None: the model's own if it is sparsified, else the
        defaults (50% of the heads' and neurons' parameters).
    steps: structure updates; each runs `num_samples` (>= 2) masked forwards of one batch of `batch_size`. 300:
        of the two step counts of the study (100, 300) the better or tied on every task, held-out ones included
        (docs/prune.md).
    calibration_batches: dense forwards that read the activation x weight start (and the dense loss), taken from
        the same data; `start="magnitude"` uses the weight norms, `"uniform"` the kept fraction everywhere.
    learning_rate: Adam's on the keep probabilities (betas 0.5, 0.999, as Gao et al. 2025), decayed by `lr_decay`.
    Defaults (batch 16, 4 samples, learning rate 0.02 with cosine decay, temperature 3, margin 0.02): the best
        of the settings tried on one task and seed (word_swap, seed 0; docs/prune.md), the other tasks and seeds
        held out of that choice.
    score_margin: the keep probabilities stay in [margin, 1 - margin] until the mask is fixed (0: the plain
        projection, where a unit at 0 or 1 is never searched again).
    pooling: share of each group's mean gradient mixed into its units' (`estimator.pool_by_group`).
    lr_decay: "cosine" (to 0 over `steps`) or "constant".
    temperature: how sharp the start is (`spread_scores`): 1 spreads the z-scored importance over the sigmoid's
        range; higher values start the samples closer to the start's top-K mask, so that a loss difference is
        spread over fewer varying units (3: the start's calibration loss improved 0.590 -> 0.548 in 100 steps on
        word_swap at 30%, against 0.581 at 1).
    """
    _check_arguments(steps, batch_size, num_samples, learning_rate, calibration_batches, start, score_margin,
                     pooling, log_every)
    if start == "uniform" and steps == 0:
        raise ValueError("prune_model: start='uniform' with steps=0 would fix a mask chosen by ties (every unit "
                         "starts alike); search (steps > 0) or start from 'activation' or 'magnitude'")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"prune_model: seed must be an integer, got {seed!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"prune_model: temperature must be a number > 0, got {temperature!r}")
    if lr_decay not in ("cosine", "constant"):
        raise ValueError(f"prune_model: lr_decay must be 'cosine' or 'constant', got {lr_decay!r}")
    patched_here = not is_sparsified(model)
    originals = dict(model.named_modules())
    if patched_here:
        sparsify_model(model, config if config is not None else SparseConfig())
    else:
        if masks_fixed(model):
            raise ValueError("prune_model: this model's mask is already fixed (hf_sparse.fix_masks ran); start from "
                             "the unsparsified model, or call hf_sparse.unsparsify_model(model) first")
        if config is not None and config != get_sparse_config(model):
            raise ValueError(
                f"prune_model: the model is already sparsified with {get_sparse_config(model)}, which differs from "
                f"config={config}; pass config=None to keep the model's, or unsparsify it first")
    structure = SparseStructure(model)
    before = (structure.scores().clone(), structure.masks().clone())
    was_training = model.training
    try:
        result = _prune(model, structure, dataset, get_sparse_config(model), steps, batch_size, data_collator,
                        loss_fn, num_samples, learning_rate, calibration_batches, start, score_margin, pooling,
                        temperature, lr_decay, seed, log_every, progress)
    except BaseException:
        # nothing half-done: the model leaves as it came (unpatched, or with its scores and masks as they were)
        structure.set_masks(torch.ones(structure.num_units))
        if patched_here:
            unsparsify_model(model)
            _put_back(model, originals)
        else:
            structure.set_scores(before[0])
            structure.set_masks(before[1])
        raise
    finally:
        model.train(was_training)
    setattr(model, STRUCTURE_RUN_ATTR, {
        "forward_only": True, "search_steps": result.steps, "forward_passes": result.forward_passes,
        "estimator": "vrpge", "start": start, "num_samples": num_samples, "budget": get_sparse_config(model).budget,
        "recorded_by": "hf_sparse.prune_model"})
    return (model, result) if return_result else model


def _put_back(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put the very module objects the model had before patching back in place (they still hold the same, unchanged
    parameters), so a failed run leaves no trace, not even an attribute of a rebuilt layer."""
    from .model_state import parent_module

    for name, module in list(model.named_modules()):
        old = originals.get(name)
        if name and old is not None and old is not module and type(old) is type(module):
            parent, child = parent_module(model, name)
            setattr(parent, child, old)


def _check_arguments(steps, batch_size, num_samples, learning_rate, calibration_batches, start, score_margin,
                     pooling, log_every) -> None:
    def whole(name, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"prune_model: {name} must be an integer >= {low}, got {value!r}")

    whole("steps", steps, 0)
    whole("batch_size", batch_size, 1)
    whole("num_samples", num_samples, 2)
    whole("calibration_batches", calibration_batches, 1 if start == "activation" else 0)
    whole("log_every", log_every, 1)
    if start not in STARTS:
        raise ValueError(f"prune_model: start must be one of {STARTS}, got {start!r}")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"prune_model: learning_rate must be a number > 0, got {learning_rate!r}")
    if not (isinstance(score_margin, (int, float)) and 0.0 <= score_margin < 0.5):
        raise ValueError(f"prune_model: score_margin must be in [0, 0.5), got {score_margin!r}")
    if not (isinstance(pooling, (int, float)) and 0.0 <= pooling <= 1.0):
        raise ValueError(f"prune_model: pooling must be in [0, 1], got {pooling!r}")


@functools.cache
def _takes_use_cache(cls: type) -> bool:
    """Whether a model class's forward takes `use_cache` (read once per class, not at every masked forward)."""
    return "use_cache" in inspect.signature(cls.forward).parameters


def _loss(model: nn.Module, batch: dict, loss_fn: Callable | None) -> float:
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if "use_cache" not in batch and _takes_use_cache(type(model)):
            batch = dict(batch, use_cache=False)  # a causal LM would build a key/value cache it never reads
        loss = getattr(model(**batch), "loss", None)
        if loss is None:
            raise ValueError(f"prune_model: {type(model).__name__} returned no loss for a batch with keys "
                             f"{sorted(batch)}: include the labels, or pass loss_fn=lambda model, batch: ...")
    return float(loss)


@torch.no_grad()
def _prune(model, structure: SparseStructure, dataset, config: SparseConfig, steps, batch_size, data_collator,
           loss_fn, num_samples, learning_rate, calibration_batches, start, margin, pooling, temperature,
           lr_decay, seed, log_every, progress) -> PruneResult:
    t0 = time.perf_counter()
    release = heap_release(next(model.parameters()).device)
    model.eval()  # no dropout: the masks of one step see the same function of the same batch
    costs = structure.costs(config.budget)
    check_keeps_a_unit(costs, config.sparsity, what="prune_model: SparseConfig.sparsity")
    if config.uniform_layers:
        check_keeps_a_level(structure, costs, config.sparsity, what="prune_model: SparseConfig.sparsity")
    if 1.0 - config.sparsity < margin:
        raise ValueError(f"prune_model: score_margin={margin} keeps every unit with probability >= {margin}, more "
                         f"than the budget's kept fraction {1.0 - config.sparsity:.4g}; lower score_margin")
    budget = (1.0 - config.sparsity) * float(costs.double().sum())
    calibration, stream = batches(model, dataset, batch_size, data_collator, seed, calibration_batches)
    forwards = 0
    structure.set_masks(torch.ones(structure.num_units))
    reader = ActivationImportance(model, structure)
    dense_losses = []
    with reader.track():
        for batch in calibration:
            dense_losses.append(_loss(model, batch, loss_fn))
            release()
            forwards += 1
    dense_loss = sum(dense_losses) / len(dense_losses) if dense_losses else None
    if start == "activation":
        importance = reader.flat()
    elif start == "magnitude":
        from .patching import unit_magnitudes

        importance = unit_magnitudes(model, structure).double() * structure.params_per_unit().double().sqrt()
    else:
        importance = torch.ones(structure.num_units, dtype=torch.float64)
    scores = spread_scores(importance, costs, budget, structure.sizes, margin=margin, temperature=temperature)
    scores = scores.to(structure.device)
    structure.set_scores(scores)

    def topk_loss() -> float | None:
        if not calibration:
            return None
        structure.set_masks(structure.topk_mask(costs, budget, uniform=config.uniform_layers))  # fix_masks' mask
        total = 0.0
        for b in calibration:
            total += _loss(model, b, loss_fn)
            release()
        return total / len(calibration)

    start_loss = topk_loss()
    forwards += len(calibration)
    logger.info("hf_sparse.prune_model: %d units, %d steps x %d masked forwards, start=%s; dense loss %s, "
                "start top-K loss %s", structure.num_units, steps, num_samples, start, _fmt(dense_loss),
                _fmt(start_loss))

    bar = _progress(steps, progress)
    try:
        log = search_scores(model, structure, stream, costs, budget, steps=steps, num_samples=num_samples,
                            learning_rate=learning_rate, lr_decay=lr_decay, margin=margin, pooling=pooling, seed=seed,
                            loss_fn=loss_fn, log_every=log_every, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    forwards += steps * num_samples

    final_loss = topk_loss()
    forwards += len(calibration)
    fix_masks(model, sparsity=config.sparsity)
    peak = _peak_memory(next(model.parameters()).device)
    logger.info("hf_sparse.prune_model: final top-K loss %s (start's %s), %d forward passes, %.1f s",
                _fmt(final_loss), _fmt(start_loss), forwards, time.perf_counter() - t0)
    return PruneResult(steps=steps, forward_passes=forwards, seconds=time.perf_counter() - t0, dense_loss=dense_loss,
                       start_topk_loss=start_loss, final_topk_loss=final_loss, peak_memory_bytes=peak, log=log)


def search_scores(model, structure: SparseStructure, stream: Iterator[dict], costs: torch.Tensor, budget: float, *,
                  steps: int, num_samples: int = SAMPLES, learning_rate: float = LEARNING_RATE,
                  lr_decay: str = "cosine", margin: float = MARGIN, pooling: float = 0.0, seed: int = 0,
                  loss_fn: Callable | None = None, log_every: int = 10, bar=None,
                  reduce: Callable | None = None) -> list[dict[str, float]]:
    """The forward-only search from the structure's current scores: per step, `num_samples` masks of the scores,
    one batch of `stream` through each, the VR-PGE gradient, an Adam step (betas 0.5, 0.999, as Gao et al. 2025),
    the projection onto the budget. `reduce` averages a step's losses over data-parallel ranks. Returns the log
    rows; the scores are left on the structure."""
    param = torch.nn.Parameter(structure.scores().clone())
    optimizer = torch.optim.Adam([param], lr=learning_rate, betas=(0.5, 0.999))
    # cosine decay to 0 (as Gao et al.): Adam moves every unit by ~lr a step whatever its signal, so at a constant
    # rate the units the losses cannot tell apart random-walk and a longer search ends worse (measured: 300 steps
    # below 100 on word_swap); decayed, the total movement is bounded and the last steps only refine
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / max(steps, 1))) if lr_decay == "cosine" else 1.0)
    release = heap_release(structure.device)
    log: list[dict[str, float]] = []
    window: list[tuple[float, float]] = []
    for step in range(steps):
        batch = next(stream)
        s = structure.scores()
        masks = sample_masks(s, num_samples, seed, step)
        losses = []
        for m in masks:
            structure.set_masks(m)
            losses.append(_loss(model, batch, loss_fn))
            release()
        losses_t = torch.tensor(losses, dtype=torch.float32, device=structure.device)
        if reduce is not None:  # data-parallel ranks: the mean over every rank's batch (the masks are the same)
            losses_t = reduce(losses_t)
            losses = losses_t.tolist()
        if not bool(torch.isfinite(losses_t).all()):
            raise FloatingPointError(f"prune_model: step {step} gave non-finite losses {losses}; the model does not "
                                     "run in this precision on these masks (try float32)")
        delta = vrpge_gradient(losses_t, masks, s, "fisher")
        delta = pool_by_group(delta, structure.sizes, pooling)
        param.grad = delta.to(param.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        projected = _onto_budget(param.detach(), costs, budget, margin)
        param.data.copy_(projected)
        structure.set_scores(projected)
        window.append((sum(losses) / len(losses), max(losses) - min(losses)))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {"step": step + 1, "loss": sum(w[0] for w in window) / len(window),
                   "loss_difference": sum(w[1] for w in window) / len(window), **score_stats(projected, margin)}
            row.update(kept_by_kind(structure, costs, projected))
            log.append(row)
            window = []
            logger.info("hf_sparse.prune_model: step %d/%d loss %.4f loss difference %.4f entropy %.3f at bounds %.3f",
                        row["step"], steps, row["loss"], row["loss_difference"], row["mask_entropy"],
                        row["share_at_bounds"])
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", entropy=f"{row['mask_entropy']:.3f}")
        if bar is not None:
            bar.update(1)
    return log


def _onto_budget(z: torch.Tensor, costs: torch.Tensor, budget: float, margin: float) -> torch.Tensor:
    """The projection onto the budget as an equality: above it, `project_to_budget` (one shift down for every
    unit); below it, one shift up of those projected scores until the expected kept cost is the budget again (a
    heuristic, not the Euclidean projection: a unit Adam pushed under the margin comes back off it with the rest).
    Why: the capped simplex only bounds the kept cost from above, and noise in the estimate walks units off the
    margins inward, so the expected kept share drifted to 0.61 of a 0.70 budget on MiniLM in 300 steps: the sampled
    masks were sparser than the mask that will be fixed, and their losses measured the wrong operating point."""
    projected = project_to_budget(z, costs, budget, weights=costs, margin=margin)
    c = costs.double()
    if float((c * projected.double()).sum()) >= budget * (1 - 1e-9):
        return projected
    lo, hi = 0.0, 1.0
    for _ in range(60):  # the kept cost of clamp(s + b) grows with b: bisection for the budget
        mid = (lo + hi) / 2
        spent = float((c * (projected.double() + mid).clamp(margin, 1 - margin)).sum())
        lo, hi = (mid, hi) if spent < budget else (lo, mid)
    return (projected + lo).clamp(margin, 1 - margin).to(z.dtype)


def heap_release(device: torch.device) -> Callable[[], None]:
    """On CPU under glibc: hand the freed heap back after each masked forward. Every sampled mask has its own kept
    sizes, so every forward frees and allocates blocks of new shapes, and glibc keeps the freed ones mapped: the
    process grew by ~50 MiB a forward on MiniLM at batch 32 x 128 (917 MiB over inference after 46 forwards), with
    no tensor alive. `malloc_trim(0)` keeps it at inference's size for ~3 ms a forward."""
    if device.type != "cpu":
        return lambda: None
    try:
        import ctypes
        import ctypes.util

        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return lambda: None
    return lambda: trim(0) and None


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="hf_sparse.prune_model", unit="step")


def _peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except (ImportError, OSError):  # pragma: no cover
        return None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
