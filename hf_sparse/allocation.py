"""The allocation search: the policy gradient decides how much of the one global budget each group (one layer's
heads, one layer's neurons) keeps; which units a group keeps stays with the importance's ranking inside it.

Why not one score per unit: at unit level the search has a few hundred scalar losses for thousands of units
(MiniLM: 9,288), while the Taylor importance reads a derivative per unit from every backward of the warm-up, and
the unit-level search did not beat it (docs/structure_tasks.md). What the importance cannot do is compare groups:
its scale differs from layer to layer (one global ranking empties whole layers), so the default ranks within each
layer and every layer keeps the same share. A loss can compare groups, and a group's share is one number: the
same losses that are noise for 9,288 units are signal for 12 (2 per layer).

Unit u of group g ranks by `z_u + b_g`, z the importance's within-group logits (`spread_logits`), b_g the group's
learned offset; the mask kept at the end is the top-K of that ranking filling the budget: each group keeps its
learned share, its best units first. Two estimators of the offsets' gradient (`search_allocation`'s `policy`):
"shares" (the defaults') draws Gaussian perturbations e of the offsets and compares the top-K masks at b + e and
b - e on the same batch; "sampled" draws every unit from `s_u = clamp(sigmoid(z_u + b_g - shift), margin,
1 - margin)` (`shift` puts the expected cost on the budget) and sums the per-unit VR-PGE estimates over each
group. Both run forward passes only, with Adam and cosine decay on the offsets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from .structure import SparseStructure, kept_by_kind, sample_masks, score_stats


class GroupAllocation:
    """Keep probabilities from within-group logits `z` and one learned offset per group, on the budget."""

    def __init__(self, z: torch.Tensor, costs: torch.Tensor, sizes: list[int], budget: float, margin: float,
                 shared: list[int] | None = None):
        """`shared[g]`: which offset group g uses (None: one each). `SparseConfig.uniform_layers` shares one per
        kind: every layer keeps the same count, so only the split between heads and neurons is learned."""
        if not (sum(sizes) == z.numel() == costs.numel()):
            raise ValueError(f"GroupAllocation: group sizes add up to {sum(sizes)} units, z has {z.numel()}, the "
                             f"costs {costs.numel()}")
        total = float(costs.detach().double().sum())
        if not margin * total < budget < (1.0 - margin) * total:
            raise ValueError(f"GroupAllocation: a budget of {budget / total:.4g} of the cost cannot be met with every "
                             f"keep probability in [{margin}, {1 - margin}]: choose a sparsity in "
                             f"({margin}, {1 - margin}) or a smaller margin")
        self.z = z.detach().double().cpu()
        self.costs = costs.detach().double().cpu()
        if shared is not None and (len(shared) != len(sizes) or sorted(set(shared)) != list(range(len(set(shared))))):
            raise ValueError(f"GroupAllocation: shared must give each of the {len(sizes)} groups an offset index "
                             f"0..n-1 (each index used), got {shared}")
        index = torch.arange(len(sizes)) if shared is None else torch.tensor(shared)
        self.group = torch.repeat_interleave(index, torch.tensor(sizes))  # the offset of each unit
        self.offsets = torch.zeros(int(index.max()) + 1, dtype=torch.float64)
        self.budget, self.margin = float(budget), float(margin)
        self.shift = self._shift()

    def _probabilities(self, shift: float) -> torch.Tensor:
        return torch.sigmoid(self.z + self.offsets[self.group] - shift).clamp(self.margin, 1.0 - self.margin)

    def _shift(self) -> float:
        lo, hi = -80.0, 80.0
        for _ in range(90):  # the expected cost falls as the shift grows: bisection for the budget
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float((self.costs * self._probabilities(mid)).sum()) > self.budget else (lo, mid)
        return (lo + hi) / 2

    def probabilities(self) -> torch.Tensor:
        return self._probabilities(self.shift)

    def ranking_scores(self) -> torch.Tensor:
        """The unclamped probabilities: the same expected shares, and no ties at the bounds (a tie there would
        be broken by position, not by the importance)."""
        return torch.sigmoid(self.z + self.offsets[self.group] - self.shift)

    def step_offsets(self, new_offsets: torch.Tensor) -> None:
        # only differences between groups matter: the offsets are re-centred, the shift puts the cost back on budget
        self.offsets = (new_offsets.detach().double().cpu() - new_offsets.detach().double().mean())
        self.shift = self._shift()

    def group_gradient(self, losses: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """VR-PGE of dE[L]/d offset_g *on the budget*. Per unit, sum_k (L_k - mean L)(m_k - s) / (K - 1) estimates
        dE[L]/d logit (the score function of a Bernoulli in its logit is m - s); G_g sums it over the group's
        units not held at a bound (there the clamp makes the derivative 0). The first sample is subtracted as in
        `vrpge_gradient`: a unit drawn alike in every sample gets exactly 0.

        The shift is solved again after every step, so raising b_g by d also raises the shift by w_g d, with
        w_g = D_g / sum D and D_g = sum over g's free units of c s (1 - s) (what one logit of g costs): every
        logit moves by -w_g d. The gradient along the budget is therefore G_g - w_g sum_h G_h. Without the
        correction every group, whose every unit lowers the loss, is pushed up alike and the re-centring cancels
        the push: what is left follows each group's noise, not its loss per unit of cost."""
        k = losses.numel()
        if k < 2:
            raise ValueError(f"allocation search: VR-PGE needs at least 2 sampled masks a step, got {k}")
        adv = (losses.double() - losses.double().mean()).cpu()
        m = masks.double().cpu()
        per_unit = (adv[:, None] * (m - m[:1])).sum(0) / (k - 1)
        raw = self.ranking_scores()
        free = ((raw > self.margin) & (raw < 1.0 - self.margin)).double()
        g = torch.zeros_like(self.offsets).index_add_(0, self.group, per_unit * free)
        d = torch.zeros_like(self.offsets).index_add_(0, self.group, self.costs * raw * (1.0 - raw) * free)
        w = d / d.sum().clamp(min=1e-300)
        return g - w * g.sum()

    def kept_shares(self, structure: SparseStructure, mask: torch.Tensor | None = None) -> list[dict]:
        """`kept_shares` of the expected mask (the probabilities), or of `mask`."""
        return kept_shares(structure, self.costs, self.probabilities() if mask is None else mask)


def kept_shares(structure: SparseStructure, costs: torch.Tensor, mask: torch.Tensor) -> list[dict]:
    """Per group: its kind, layer index among its kind, and the share of its cost that `mask` (or expected
    keep probabilities) keeps."""
    s, costs = mask.detach().double().cpu(), costs.detach().double().cpu()
    out, seen = [], {}
    for g, c, p in zip(structure.groups, torch.split(costs, structure.sizes), torch.split(s, structure.sizes)):
        layer = seen.get(g.kind, 0)
        seen[g.kind] = layer + 1
        out.append({"kind": g.kind, "layer": layer, "kept": float((c * p).sum() / c.sum())})
    return out


def search_allocation(
    structure: SparseStructure, allocation: GroupAllocation, stream: Iterator[dict],
    loss_of: Callable[[dict], float], *, steps: int, num_samples: int, learning_rate: float, seed: int = 0,
    log_every: int = 10, reduce: Callable | None = None, after_forward: Callable[[], None] = lambda: None,
    policy: str = "sampled", mask_of: Callable[[torch.Tensor], torch.Tensor] | None = None, sigma: float = 1.0,
) -> list[dict]:
    """`steps` structure updates of the group offsets (forward only); the structure is left with the final keep
    probabilities as its scores. `loss_of(batch)` runs the model on the structure's current masks; `reduce`
    averages a step's losses over data-parallel ranks (the masks are the same on every rank).

    `policy="sampled"`: each mask draws every unit from its keep probability (VR-PGE per unit, summed per group).
    `policy="shares"`: each pair of masks draws one Gaussian perturbation e of the offsets (std `sigma`) and keeps
    the top-K (`mask_of(scores)`) at offsets + e and at offsets - e: the two masks differ only in how many units
    each group keeps, never in which of its ranked units, and both see the same batch, so their loss difference
    is the allocation's alone; the gradient is the antithetic score-function estimate (L+ - L-) e / (2 sigma^2)."""
    if num_samples < 2 or (policy == "shares" and num_samples % 2):
        raise ValueError(f"allocation search: num_samples must be >= 2 (and even for policy 'shares': antithetic "
                         f"pairs), got {num_samples}")
    if policy not in ("sampled", "shares") or (policy == "shares" and mask_of is None):
        raise ValueError(f"allocation search: policy must be 'sampled' or 'shares' (with mask_of), got {policy!r}")
    offsets = torch.nn.Parameter(allocation.offsets.clone())
    optimizer = torch.optim.Adam([offsets], lr=learning_rate, betas=(0.5, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / max(steps, 1))))  # bounded total movement
    log: list[dict] = []
    for step in range(steps):
        batch = next(stream)
        if policy == "shares":
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)  # the same draws on every rank
            eps = torch.randn(num_samples // 2, allocation.offsets.numel(), generator=gen, dtype=torch.float64)
            eps = sigma * (eps - eps.mean(1, keepdim=True))
            z = allocation.z
            masks = torch.stack([mask_of(torch.sigmoid(z + (allocation.offsets + sign * e)[allocation.group]).float())
                                 .float().cpu() for e in eps for sign in (1.0, -1.0)])
        else:
            masks = sample_masks(allocation.probabilities().float(), num_samples, seed, step)
        losses = []
        for m in masks:
            structure.set_masks(m.to(structure.device))
            losses.append(loss_of(batch))
            after_forward()
        losses_t = torch.tensor(losses, dtype=torch.float64)
        if reduce is not None:
            losses_t = reduce(losses_t).double().cpu()
        if not bool(torch.isfinite(losses_t).all()):
            raise FloatingPointError(f"allocation search: step {step} gave non-finite losses {losses_t.tolist()}")
        if policy == "shares":
            diff = losses_t[0::2] - losses_t[1::2]
            offsets.grad = (diff[:, None] * eps).mean(0) / (2.0 * sigma ** 2)
        else:
            offsets.grad = allocation.group_gradient(losses_t, masks)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        allocation.step_offsets(offsets.detach())
        with torch.no_grad():
            offsets.copy_(allocation.offsets)
        if step % log_every == 0 or step == steps - 1:
            # the rows of prune_model's search: the step's masks' mean loss and spread, and of the keep
            # probabilities the offsets define (what "sampled" draws from; under "shares" how sharp the ranking is
            # at the budget's edge) the entropy, share at the margins and expected share of each kind's cost
            p = allocation.probabilities()
            log.append({"step": step + 1, "loss": float(losses_t.mean()),
                        "loss_difference": float(losses_t.max() - losses_t.min()),
                        **score_stats(p, allocation.margin),
                        **kept_by_kind(structure, allocation.costs, p)})
    structure.set_scores(allocation.ranking_scores().float().to(structure.device))
    return log
