"""Forward-only unit importance (activation x weight, as Wanda-sp and FLAP read it) and the *spread* start of the
keep probabilities that `prune_model` searches from.

Why activation x weight: a unit's contribution to its consumer's output is the unit's input activation times its
weight column(s); the norm of that contribution, ||X_j|| * ||W[:, j]|| summed over the unit's columns, ranks units
from forwards alone (no gradient, no stored activations).

Why spread: the score-function gradient of a unit at exactly 0 or 1 is 0 (its mask never varies, so it is never
searched again), and a ramp with a certain band (the trainer's Taylor start) leaves most units there. The spread
start (as in Gao et al., 2025) is a sigmoid of the z-scored log importance, shifted so the expected kept cost is the
budget and clamped into [margin, 1 - margin]: every unit is drawn both ways some of the time, the most important
most often.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .budget import project_to_budget
from .layers import MaskedWeightLinear, SparseLinear
from .structure import SparseStructure


class ActivationImportance:
    """Per unit, sum over its consumer columns of ||X_col||_2 * ||W[:, col]||_2 over the forwards run inside
    `track()` (X: every token of every batch). Element-wise groups: |W_ij| * ||X_j||, per weight."""

    def __init__(self, model: nn.Module, structure: SparseStructure | None = None):
        self.structure = structure or SparseStructure(model)
        self._layers = [m for m in model.modules() if isinstance(m, SparseLinear)
                        and (isinstance(m, MaskedWeightLinear) or m.role == "in")]
        self._sq = {id(layer): None for layer in self._layers}  # sum of x^2 per input feature
        self.forwards = 0

    @contextmanager
    def track(self):
        handles = [layer.register_forward_pre_hook(self._hook) for layer in self._layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def _hook(self, layer: SparseLinear, args):
        x = args[0]
        if x.shape[-1] != layer.in_features:  # a gathered input (not every unit computed): nothing to read
            return
        sq = x.detach().float().reshape(-1, x.shape[-1]).pow(2).sum(0).double()
        key = id(layer)
        self._sq[key] = sq if self._sq[key] is None else self._sq[key] + sq

    @torch.no_grad()
    def flat(self) -> torch.Tensor:
        """The importance of every unit in the structure's flat order (float64, on the structure's device)."""
        out = {id(g): torch.zeros(g.num_units, dtype=torch.float64, device=g.mask.device) for g in self.structure}
        for layer in self._layers:
            sq = self._sq[id(layer)]
            if sq is None:
                continue
            x_norm = sq.sqrt().to(layer.weight.device)
            w = layer.weight.detach().double()
            w = w.t() if layer.transposed else w  # [out, in]
            g = layer.group
            if isinstance(layer, MaskedWeightLinear):  # one unit per stored weight, in the stored layout (the mask's)
                stored = layer.weight.detach().double().abs()
                per_unit = (stored * (x_norm[:, None] if layer.transposed else x_norm[None, :])).reshape(-1)
            else:
                per_col = w.pow(2).sum(0).sqrt() * x_norm
                per_unit = per_col.view(g.num_units, layer.width).sum(1)
            out[id(g)] += per_unit.to(out[id(g)].device)
        return torch.cat([out[id(g)] for g in self.structure])


def spread_logits(importance: torch.Tensor, costs: torch.Tensor, group_sizes: list[int] | None = None,
                  temperature: float = 1.0) -> torch.Tensor:
    """`temperature` x the z-scored log(importance / cost) within each group (`group_sizes`; one group if None),
    float64 on the CPU: every group gets the same spread, so the metric's scale never moves budget between groups."""
    c = costs.detach().double().cpu()
    ratio = importance.detach().double().cpu() / c.clamp(min=1e-12)
    sizes = list(group_sizes) if group_sizes is not None else [c.numel()]
    if sum(sizes) != c.numel():
        raise ValueError(f"group_sizes add up to {sum(sizes)} units, the importance has {c.numel()}")
    # a dead unit (importance 0: a never-active neuron, zero weights) ties with its group's weakest live unit: at
    # log(1e-30) one such outlier inflated the group's spread and flattened every live unit's start (2 dead of 64
    # neurons: the live ones started between 0.48 and 0.55 instead of 0.02 and 0.98)
    parts = []
    for part in torch.split(ratio, sizes):
        positive = part[part > 0]
        parts.append(part.clamp(min=float(positive.min()) if positive.numel() else 1.0))
    logs = torch.cat(parts).log()
    z = torch.empty_like(logs)
    for part, idx in zip(torch.split(logs, sizes), torch.split(torch.arange(c.numel()), sizes)):
        std = part.std() if part.numel() > 1 else torch.zeros((), dtype=part.dtype)
        z[idx] = (part - part.mean()) / std.clamp(min=1e-12) if float(std) > 0 else torch.zeros_like(part)
    return z * temperature


def spread_scores(
    importance: torch.Tensor, costs: torch.Tensor, budget: float, group_sizes: list[int] | None = None,
    margin: float = 0.02, temperature: float = 1.0,
) -> torch.Tensor:
    """Keep probabilities from an importance per unit, none at 0 or 1.

    z = `spread_logits` (the z-scored log(importance / cost) within each group, times `temperature`), so every group
    starts with the same spread and the search, not the metric's scale, moves budget between layers;
    s = sigmoid(z + b) with one shift b for all units so that sum(cost * s) = budget, then clamped
    into [margin, 1 - margin] by the exact projection. The top-K of s is the top-K of z.
    """
    c = costs.detach().double().cpu()
    z = spread_logits(importance, costs, group_sizes, temperature)

    def spent(b: float) -> float:
        return float((c * torch.sigmoid(z + b)).sum())

    lo, hi = -60.0, 60.0
    for _ in range(80):  # sum(c * sigmoid(z + b)) grows with b: bisection for the budget
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) < budget else (lo, mid)
    s = torch.sigmoid(z + (lo + hi) / 2).float()
    c32 = costs.detach().float().cpu()
    return project_to_budget(s, c32, budget, weights=c32, margin=margin).to(costs.device)  # one shift for all units
