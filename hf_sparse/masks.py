"""Freezing the final mask: `fix_masks` (deterministic top-K filling the budget, or the best of a few Bernoulli
draws as in the reference code) and `masks_fixed`."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn

from .budget import check_keeps_a_unit
from .model_state import get_sparse_config, is_sparsified
from .structure import SparseStructure, UnitGroup, check_keeps_a_level, sample_masks

logger = logging.getLogger("hf_sparse.export")

FIX_METHODS = ("topk", "sample")


def masks_fixed(model: nn.Module) -> bool:
    """True when `fix_masks` froze the mask of every unit group (the flag is saved with the state dict)."""
    groups = [m for m in model.modules() if isinstance(m, UnitGroup)]
    return bool(groups) and all(bool(g.fixed) for g in groups)


@torch.no_grad()
def fix_masks(
    model: nn.Module,
    method: str = "topk",
    num_draws: int = 10,
    score_fn: Callable[[nn.Module], float] | None = None,
    seed: int = 0,
    sparsity: float | None = None,
) -> torch.Tensor:
    """Freeze the final mask and mark the structure fixed; returns the flat mask.

    method="topk" (the default): units by descending score, kept while they fit in the budget
    `(1 - sparsity) * total cost` (costs as `SparseConfig.budget` says) -- deterministic and reproducible.
    method="sample": the reference code's rule: draw `num_draws` Bernoulli(scores) masks (from `seed`) and
    keep the one with the highest `score_fn(model)` (called with that mask set, under `torch.no_grad()`;
    e.g. minus the loss on a few training batches). Sampled masks meet the budget only in expectation.
    `sparsity` overrides the config's target for "topk".
    With `SparseConfig.uniform_layers`, "topk" keeps the same number of units of each kind in every layer
    (`hf_sparse.structure.uniform_topk_mask`) and "sample" is refused (its draws differ between layers).
    """
    if not is_sparsified(model):
        raise ValueError("fix_masks needs a sparsified model: call hf_sparse.sparsify_model(model, config) first")
    if method not in FIX_METHODS:
        raise ValueError(f"fix_masks: method must be one of {FIX_METHODS}, got {method!r}")
    config = get_sparse_config(model)
    structure = SparseStructure(model)
    if method == "topk":
        if score_fn is not None:
            raise ValueError("fix_masks: score_fn is only used by method='sample'; drop it or pass method='sample'")
        if sparsity is None:
            sparsity = config.sparsity
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"fix_masks: sparsity must be a number in [0, 1), got {sparsity!r}")
        scores = structure.scores()
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("fix_masks: some keep probabilities are not finite (NaN/inf); the structure training "
                             "diverged. Train again with a lower structure_learning_rate; nothing was fixed")
        if structure.scores_tied():
            raise ValueError(
                "fix_masks: the scores were never trained (every keep probability is equal), so a top-K mask would "
                "be chosen by ties. Train with SparseTrainer first, start from an informed guess "
                "(SparseConfig(score_init='magnitude')), or set the scores yourself (SparseStructure.set_scores)"
            )
        costs = structure.costs(config.budget)
        check_keeps_a_unit(costs, sparsity, what="fix_masks: sparsity")
        if config.uniform_layers:
            check_keeps_a_level(structure, costs, sparsity, what="fix_masks: sparsity")
        mask = structure.topk_mask(costs, (1.0 - float(sparsity)) * float(costs.double().sum()),
                                   uniform=config.uniform_layers)
        if config.uniform_layers:
            logger.info("hf_sparse.fix_masks: uniform layers: %s", ", ".join(
                f"{max(counts)} {kind}s kept in each of {len(counts)} layers"
                for kind, counts in structure.kept_counts(mask).items()))
    else:
        if config.uniform_layers:
            raise ValueError(
                "fix_masks(method='sample') draws every unit on its own, so the layers would keep different numbers "
                "of units; with SparseConfig.uniform_layers=True use method='topk' (the default)"
            )
        if score_fn is None or not callable(score_fn):
            raise ValueError(
                "fix_masks(method='sample') needs score_fn: a callable score_fn(model) -> float, higher is better "
                "(e.g. minus the loss on a few batches); it is called once per draw with that mask set"
            )
        if sparsity is not None:
            raise ValueError("fix_masks: sparsity only applies to method='topk' (sampled masks follow the scores)")
        if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
            raise ValueError(f"fix_masks: num_draws must be an integer >= 1, got {num_draws!r}")
        if not isinstance(seed, int):
            raise ValueError(f"fix_masks: seed must be an integer, got {seed!r}")
        draws = sample_masks(structure.scores(), num_draws, seed, step=0)
        best, best_value = None, -math.inf
        for k, draw in enumerate(draws):
            structure.set_masks(draw)
            value = float(score_fn(model))
            logger.info("hf_sparse.fix_masks: draw %d of %d: score %.6g", k + 1, num_draws, value)
            if math.isnan(value):  # a diverged draw never wins
                value = -math.inf
            if best is None or value > best_value:
                best, best_value = draw, value
        mask = best
    structure.set_masks(mask)
    for g in structure:
        g.fixed.fill_(True)
    return structure.masks().clone()
