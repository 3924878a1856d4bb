"""The global budget: exact projection onto the weighted capped simplex, and the cubic schedule.

`project_to_budget` solves  min ||s - z||^2  s.t.  0 <= s <= 1,  sum_u c_u s_u <= K
(docs/method.md §3). Its KKT solution is s = clamp(z - lambda * c, 0, 1) with lambda >= 0
the root of the monotone function f(lambda) = sum_u c_u clamp(z_u - lambda c_u, 0, 1) - K.
"""

from __future__ import annotations

import torch


def project_to_budget(
    z: torch.Tensor, costs: torch.Tensor, budget: float, iterations: int = 64, weights: torch.Tensor | None = None,
    margin: float = 0.0,
) -> torch.Tensor:
    """Euclidean projection of `z` onto `{m <= s <= 1 - m, sum(costs * s) <= budget}` (m = `margin`, default 0).

    With `weights`, the projection in the weighted metric `sum_u w_u (s_u - z_u)^2`: s = clamp(z - lambda c / w).
    `weights=costs` shifts every unit alike (a head worth 100 neurons is not pushed 100 times harder).
    `margin > 0` keeps every keep probability off 0 and 1, where a unit is drawn alike in every sample and the
    score-function gradient is exactly 0 (the search could never move it again); the budget must allow it
    (sum(costs) * margin <= budget).
    Bisection brackets lambda, then one exact step on the piecewise-linear f solves it to float64
    precision (the active set is fixed near the root). Returns a tensor of z's dtype and device.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if (costs <= 0).any():
        raise ValueError("every unit cost must be > 0")
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    z64, c64 = z.detach().double(), costs.detach().double()
    if weights is not None and (weights <= 0).any():
        raise ValueError("every projection weight must be > 0")
    lo_s, hi_s = float(margin), 1.0 - float(margin)
    if float(c64.sum()) * lo_s > budget * (1 + 1e-12):
        raise ValueError(f"margin={margin} keeps more than the budget ({float(c64.sum()) * lo_s:.6g} > {budget:.6g})")
    shift = c64 if weights is None else c64 / weights.detach().double()
    clamped = z64.clamp(lo_s, hi_s)
    if float((c64 * clamped).sum()) <= budget:
        return clamped.to(z.dtype)

    def spent(lam: torch.Tensor) -> torch.Tensor:
        return (c64 * (z64 - lam * shift).clamp(lo_s, hi_s)).sum()

    lo = torch.zeros((), dtype=torch.float64, device=z.device)
    hi = ((z64 - lo_s) / shift).max().clamp(min=0.0)  # at hi every s is at the lower bound: spent(hi) <= budget
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if spent(mid) > budget:
            lo = mid
        else:
            hi = mid
    # Exact step: on [lo, hi] the units strictly inside (lower, upper) are linear in lambda.
    lam = hi
    shifted = z64 - lam * shift
    inside = (shifted > lo_s) & (shifted < hi_s)
    if inside.any():
        at_top, at_bottom = shifted >= hi_s, shifted <= lo_s
        denom = (c64[inside] * shift[inside]).sum()
        exact = ((c64[inside] * z64[inside]).sum() + hi_s * c64[at_top].sum() + lo_s * c64[at_bottom].sum()
                 - budget) / denom
        if lo <= exact <= hi and spent(exact) <= budget * (1 + 1e-12):
            lam = exact
    return (z64 - lam * shift).clamp(lo_s, hi_s).to(z.dtype)


def cubic_budget(step: int, total: float, final: float, start_step: int, end_step: int) -> float:
    """Budget at `step`: `total` until `start_step`, then a cubic fall to `final` at `end_step` (ProbMask,
    movement pruning). Fast early, slow near the target, so the last units go while the weights adapt."""
    if end_step <= start_step:
        return final if step >= start_step else total
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return final + (total - final) * (1.0 - progress) ** 3


def check_keeps_a_unit(costs: torch.Tensor, sparsity: float, what: str = "SparseConfig.sparsity") -> None:
    """Refuse a sparsity whose budget is smaller than the cheapest unit: the top-K mask would keep nothing, and the
    model would compute none of its prunable heads and neurons."""
    c = costs.detach().double()
    total, smallest = float(c.sum()), float(c.min())
    budget = (1.0 - float(sparsity)) * total
    if budget < smallest * (1 - 1e-9):
        raise ValueError(
            f"{what}={sparsity} leaves a budget of {budget:.6g} of the {total:.6g} prunable cost, less than the "
            f"cheapest unit ({smallest:.6g}): every unit would be dropped. Use a sparsity of at most "
            f"{1.0 - smallest / total:.6g}"
        )
