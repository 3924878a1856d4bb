"""The global budget: exact Euclidean projection (against brute-force solvers), the cubic schedule, the
deterministic top-K mask and reproducible Bernoulli / antithetic sampling."""

from __future__ import annotations

import pytest
import torch

import hf_sparse as hs
from hf_sparse.structure import mask_seed


def _reference_projection(z: torch.Tensor, c: torch.Tensor, budget: float, w: torch.Tensor | None = None):
    """Slow exact reference: f(lam) = sum c clamp(z - lam c / w, 0, 1) is piecewise linear and non-increasing;
    evaluate it at every breakpoint, find the segment that crosses the budget and interpolate (float64)."""
    z, c = z.double(), c.double()
    shift = c if w is None else c / w.double()
    clamped = z.clamp(0, 1)
    if float((c * clamped).sum()) <= budget:
        return clamped

    def f(lam):
        return float((c * (z - lam * shift).clamp(0, 1)).sum())

    points = sorted({0.0} | {float(v) for v in torch.cat([(z - 1) / shift, z / shift]) if v > 0})
    for lo, hi in zip(points, points[1:]):
        f_lo, f_hi = f(lo), f(hi)
        if f_lo >= budget >= f_hi:
            lam = hi if f_lo == f_hi else lo + (f_lo - budget) * (hi - lo) / (f_lo - f_hi)
            return (z - lam * shift).clamp(0, 1)
    raise AssertionError("no crossing found")


def _random_problem(gen, n):
    costs = torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * 8)  # 1 .. 3000
    z = torch.rand(n, generator=gen, dtype=torch.float64) * 2.2 - 0.6  # values < 0 and > 1
    z[0] = z[0].abs() + 0.05  # at least one unit inside, so the budget is > 0 and binds
    full = float((costs * z.clamp(0, 1)).sum())
    budget = full * float(torch.rand((), generator=gen, dtype=torch.float64) * 0.9 + 0.02)
    return z, costs, budget


@pytest.mark.parametrize("n", [1, 2, 7, 60, 500])
@pytest.mark.parametrize("weighted", [False, True])
def test_projection_matches_reference(n, weighted):
    gen = torch.Generator().manual_seed(n)
    for trial in range(10):
        z, c, budget = _random_problem(gen, n)
        w = c if weighted and trial % 2 else (torch.rand(n, generator=gen, dtype=torch.float64) + 0.1 if weighted else None)
        s = hs.project_to_budget(z, c, budget, weights=w) if weighted else hs.project_to_budget(z, c, budget)
        ref = _reference_projection(z, c, budget, w)
        torch.testing.assert_close(s, ref, rtol=0, atol=1e-9)
        spent = float((c * s).sum())
        assert spent <= budget * (1 + 1e-12)
        assert abs(spent - budget) / budget <= 1e-6
        assert float(s.min()) >= 0 and float(s.max()) <= 1


def test_projection_float32_meets_budget():
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        z, c, budget = _random_problem(gen, 300)
        s = hs.project_to_budget(z.float(), c.float(), budget)
        assert s.dtype == torch.float32
        spent = float((c.float().double() * s.double()).sum())
        assert abs(spent - budget) / budget <= 1e-6


def test_projection_is_the_minimiser_by_grid_search():
    """n = 2: a fine grid over the feasible set finds no closer point than the projection."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 1, 801, dtype=torch.float64)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    for _ in range(5):
        z, c, budget = _random_problem(gen, 2)
        s = hs.project_to_budget(z, c, budget)
        feasible = c[0] * a + c[1] * b <= budget
        dist = (a - z[0]) ** 2 + (b - z[1]) ** 2
        best = float(dist[feasible].min())
        ours = float(((s - z) ** 2).sum())
        assert ours <= best + 1e-12
        assert ours >= best - 2 * (1 / 800) * 3  # the grid's best is within a cell of ours


def test_projection_when_the_budget_does_not_bind():
    z = torch.tensor([-0.5, 0.3, 1.7, 0.9])
    c = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = hs.project_to_budget(z, c, budget=100.0)
    assert torch.equal(s, z.clamp(0, 1))
    s = hs.project_to_budget(z, c, budget=float((c * z.clamp(0, 1)).sum()))  # exactly at the budget
    assert torch.equal(s, z.clamp(0, 1))


def test_projection_edge_cases():
    z = torch.tensor([0.5, 0.9, 2.0])
    c = torch.tensor([1.0, 1.0, 2.0])
    assert torch.all(hs.project_to_budget(z, c, 0.0) == 0)
    # unit costs: s = clamp(z - lam): lam = 0.7 gives 0 + 0.2 + 1 ... check against reference
    torch.testing.assert_close(hs.project_to_budget(z, torch.ones(3), 1.5).double(),
                               _reference_projection(z, torch.ones(3), 1.5), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="budget"):
        hs.project_to_budget(z, c, -1.0)
    with pytest.raises(ValueError, match="cost"):
        hs.project_to_budget(z, torch.tensor([1.0, 0.0, 1.0]), 1.0)


def test_projection_by_hand():
    # unit costs, z = (0.9, 0.6, 0.1), K = 1: s = z - lam with lam = 0.25 -> (0.65, 0.35, 0)
    s = hs.project_to_budget(torch.tensor([0.9, 0.6, 0.1], dtype=torch.float64), torch.ones(3, dtype=torch.float64), 1.0)
    torch.testing.assert_close(s, torch.tensor([0.65, 0.35, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_cubic_budget():
    total, final = 1000.0, 250.0
    assert hs.cubic_budget(0, total, final, 10, 110) == total
    assert hs.cubic_budget(10, total, final, 10, 110) == total
    assert hs.cubic_budget(110, total, final, 10, 110) == final
    assert hs.cubic_budget(10_000, total, final, 10, 110) == final
    assert hs.cubic_budget(60, total, final, 10, 110) == pytest.approx(final + (total - final) * 0.125)
    values = [hs.cubic_budget(t, total, final, 10, 110) for t in range(0, 130)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    # fast early, slow late
    assert values[20] - values[30] > values[100] - values[110]
    # degenerate schedule: a step at start_step
    assert hs.cubic_budget(4, total, final, 5, 5) == total and hs.cubic_budget(5, total, final, 5, 5) == final


# --- top-K ----------------------------------------------------------------------------------------------


def test_topk_equal_costs_picks_highest_scores():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.5, 0.3])
    mask = hs.topk_mask(scores, torch.ones(6), 3.0)
    assert mask.tolist() == [0, 1, 1, 1, 0, 0]  # ties: lower index first
    mask = hs.topk_mask(scores, torch.ones(6), 3.9)
    assert mask.sum() == 3
    assert hs.topk_mask(scores, torch.ones(6), 0.0).sum() == 0
    assert hs.topk_mask(scores, torch.ones(6), 100.0).sum() == 6


def test_topk_fills_the_budget_with_mixed_costs():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = 40
        scores = torch.rand(n, generator=gen)
        costs = torch.randint(1, 50, (n,), generator=gen).double()
        budget = float(torch.randint(0, int(costs.sum()) + 10, (), generator=gen))
        mask = hs.topk_mask(scores, costs, budget).bool()
        spent = float(costs[mask].sum())
        assert spent <= budget
        left = budget - spent
        if (~mask).any():
            assert left < float(costs[~mask].min()), "a unit that still fits was left out"
        # in descending score order, every unit before the first one left out is kept
        order = torch.argsort(scores, descending=True, stable=True)
        kept_in_order = mask[order]
        if not kept_in_order.all():
            first_out = int((~kept_in_order).nonzero()[0])
            assert kept_in_order[:first_out].all()
            # and that unit did not fit after the ones before it
            assert float(costs[order[: first_out + 1]].sum()) > budget


def test_topk_head_and_neurons():
    # a head worth 10 neurons with the highest score, then neurons: the budget of 12 takes the head and 2 neurons
    scores = torch.tensor([0.99, 0.9, 0.8, 0.7, 0.6])
    costs = torch.tensor([10.0, 1.0, 1.0, 1.0, 1.0])
    assert hs.topk_mask(scores, costs, 12.0).tolist() == [1, 1, 1, 0, 0]
    # a budget of 9: the head does not fit, all four neurons do
    assert hs.topk_mask(scores, costs, 9.0).tolist() == [0, 1, 1, 1, 1]


# --- sampling -------------------------------------------------------------------------------------------


def test_sample_masks_reproducible_and_varying():
    s = torch.rand(500, generator=torch.Generator().manual_seed(0))
    a = hs.sample_masks(s, 2, seed=7, step=3)
    assert a.shape == (2, 500) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a, hs.sample_masks(s, 2, seed=7, step=3))
    assert not torch.equal(a, hs.sample_masks(s, 2, seed=7, step=4))
    assert not torch.equal(a, hs.sample_masks(s, 2, seed=8, step=3))
    assert not torch.equal(a[0], a[1])
    # sample k depends on (seed, step, k) only
    assert torch.equal(hs.sample_masks(s, 3, seed=7, step=3)[:2], a)
    # the global RNG plays no part
    torch.manual_seed(123)
    b = hs.sample_masks(s, 2, seed=7, step=3)
    assert torch.equal(a, b)
    # certain units
    assert torch.all(hs.sample_masks(torch.ones(50), 4, 0, 0) == 1)
    assert torch.all(hs.sample_masks(torch.zeros(50), 4, 0, 0) == 0)


def test_sample_masks_marginals():
    s = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.95])
    draws = torch.cat([hs.sample_masks(s.repeat(4000), 2, seed=1, step=t).view(-1, 5) for t in range(5)])
    n = draws.shape[0]
    freq = draws.double().mean(0)
    assert torch.all((freq - s.double()).abs() < 4.5 * (s.double() * (1 - s.double()) / n).sqrt())


def test_antithetic_pairs():
    s = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    pairs = hs.sample_masks(s, 2, seed=11, step=5, antithetic=True)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(mask_seed(11, 5, 0)))
    assert torch.equal(pairs[0], (u < s).float())
    assert torch.equal(pairs[1], ((1 - u) < s).float())
    # implementation-free consequences of m1 = [u < s], m2 = [1 - u < s]
    low, high = s < 0.5, s > 0.5
    assert not torch.any((pairs[0] == 1) & (pairs[1] == 1) & low)
    assert not torch.any((pairs[0] == 0) & (pairs[1] == 0) & high)
    assert torch.equal(pairs, hs.sample_masks(s, 2, seed=11, step=5, antithetic=True))
    assert not torch.equal(pairs, hs.sample_masks(s, 2, seed=11, step=6, antithetic=True))
    four = hs.sample_masks(s, 4, seed=11, step=5, antithetic=True)
    assert torch.equal(four[:2], pairs) and not torch.equal(four[2], four[0])


def test_projection_with_a_margin_is_the_minimiser_inside_the_margin():
    """margin m: a fine grid over {m <= s <= 1 - m, c.s <= budget} finds no closer point; nothing at 0 or 1."""
    gen = torch.Generator().manual_seed(1)
    m = 0.1
    grid = torch.linspace(m, 1 - m, 801, dtype=torch.float64)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    checked = 0
    for _ in range(20):
        z, c, budget = _random_problem(gen, 2)
        if float(c.sum()) * m > budget:
            continue
        s = hs.project_to_budget(z, c, budget, margin=m)
        assert float(s.min()) >= m - 1e-12 and float(s.max()) <= 1 - m + 1e-12
        assert float((c * s).sum()) <= budget * (1 + 1e-9)
        feasible = c[0] * a + c[1] * b <= budget
        dist = (a - z[0]) ** 2 + (b - z[1]) ** 2
        best = float(dist[feasible].min())
        ours = float(((s - z) ** 2).sum())
        assert best - 2 * (1 / 800) * 3 <= ours <= best + 1e-12
        checked += 1
    assert checked >= 5
    with pytest.raises(ValueError, match="margin"):
        hs.project_to_budget(torch.ones(4), torch.ones(4), budget=0.1, margin=0.1)  # 4 x 0.1 > 0.1


def test_pooling_mixes_each_groups_mean_into_its_units():
    from hf_sparse.estimator import pool_by_group

    delta = torch.tensor([1.0, 3.0, -2.0, 0.0, 2.0])
    torch.testing.assert_close(pool_by_group(delta, [2, 3], 0.0), delta)
    torch.testing.assert_close(pool_by_group(delta, [2, 3], 1.0), torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(pool_by_group(delta, [2, 3], 0.5), torch.tensor([1.5, 2.5, -1.0, 0.0, 1.0]))
