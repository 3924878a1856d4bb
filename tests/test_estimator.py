"""The structure-gradient estimators are unbiased for what they claim: exact enumeration of every mask (and
every region of the antithetic uniform) on a 3-unit problem, plus fixed-seed Monte Carlo within a few
standard errors."""

from __future__ import annotations

import itertools

import pytest
import torch

import hf_sparse as hs

N_UNITS = 3
SCORES = torch.tensor([0.3, 0.55, 0.8], dtype=torch.float64)
ALL_MASKS = torch.tensor(list(itertools.product([0.0, 1.0], repeat=N_UNITS)), dtype=torch.float64)  # [8, 3]
# An arbitrary loss table over the 8 masks (non-additive, so the units interact)
LOSS_TABLE = torch.tensor([1.7, 0.4, -0.3, 0.9, 1.1, -0.8, 0.25, 0.6], dtype=torch.float64)
MC_DRAWS = 200_000
SIGMAS = 4.5  # tolerance of the Monte Carlo checks in standard errors (fixed seeds: deterministic)


def _loss(masks: torch.Tensor) -> torch.Tensor:
    """L(m) for masks [..., 3] by table lookup."""
    idx = (masks.round().long() * torch.tensor([4, 2, 1])).sum(-1)
    return LOSS_TABLE[idx]


def _prob(masks: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.prod(torch.where(masks > 0.5, s, 1 - s), dim=-1)


def _true_gradient(s: torch.Tensor = SCORES) -> torch.Tensor:
    """dE[L]/ds by autograd through the exact expectation sum_m p(m|s) L(m) (float64)."""
    s = s.clone().requires_grad_(True)
    expected = (_prob(ALL_MASKS, s) * _loss(ALL_MASKS)).sum()
    (grad,) = torch.autograd.grad(expected, s)
    return grad


def _target(kind: str, s: torch.Tensor = SCORES) -> torch.Tensor:
    g = _true_gradient(s)
    return g if kind == "exact" else g * (s * (1 - s)).sqrt()


def test_true_gradient_by_hand():
    # dE/ds_u = E[L | m_u = 1] - E[L | m_u = 0]
    for u in range(N_UNITS):
        rest = [v for v in range(N_UNITS) if v != u]
        total = 0.0
        for m in ALL_MASKS:
            p_rest = _prob(m[rest], SCORES[rest])
            total += float(p_rest * _loss(m)) * (1 if m[u] == 1 else -1)
        assert abs(total - float(_true_gradient()[u])) < 1e-12


@pytest.mark.parametrize("kind", ["exact", "fisher"])
def test_vrpge_exact_enumeration_two_samples(kind):
    s32 = SCORES.float()
    mean = torch.zeros(N_UNITS, dtype=torch.float64)
    for m1, m2 in itertools.product(ALL_MASKS, repeat=2):
        masks = torch.stack([m1, m2]).float()
        losses = _loss(torch.stack([m1, m2])).float()
        weight = _prob(m1, SCORES) * _prob(m2, SCORES)
        mean += weight * hs.vrpge_gradient(losses, masks, s32, score_function=kind).double()
    torch.testing.assert_close(mean, _target(kind), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["exact", "fisher"])
def test_vrpge_exact_enumeration_three_samples(kind):
    """The general-K form 1/(K-1) sum_k (L_k - mean L) g(m_k), K = 3: all 512 triples."""
    triples = torch.tensor(list(itertools.product(range(8), repeat=3)))
    masks = ALL_MASKS[triples]  # [512, 3, n]
    losses = _loss(masks)  # [512, 3]
    weights = _prob(masks, SCORES).prod(-1)  # [512]
    grads = torch.vmap(lambda l, m: hs.vrpge_gradient(l, m, SCORES.float(), score_function=kind))(
        losses.float(), masks.float())
    mean = (weights[:, None] * grads.double()).sum(0)
    torch.testing.assert_close(mean, _target(kind), rtol=0, atol=1e-6)


def _mc_check(samples: torch.Tensor, target: torch.Tensor):
    samples = samples.double()
    mean = samples.mean(0)
    se = samples.std(0) / samples.shape[0] ** 0.5
    assert torch.all(se > 0)
    z = (mean - target).abs() / se
    assert torch.all(z < SIGMAS), f"MC mean {mean.tolist()} vs exact {target.tolist()}: {z.tolist()} standard errors"
    # the check has power: the standard error is small against the signal
    assert torch.all(se < 0.05 * target.abs().max())


@pytest.mark.parametrize("kind", ["exact", "fisher"])
def test_vrpge_monte_carlo(kind):
    s = SCORES.float()
    # one call of sample_masks draws MC_DRAWS independent pairs: the scores tiled MC_DRAWS times
    masks = hs.sample_masks(s.repeat(MC_DRAWS), 2, seed=1234, step=0).view(2, MC_DRAWS, N_UNITS).transpose(0, 1)
    losses = _loss(masks).float()
    grads = torch.vmap(lambda l, m: hs.vrpge_gradient(l, m, s, score_function=kind))(losses, masks)
    _mc_check(grads, _target(kind))
    # sanity of the draws themselves: Bernoulli(s) marginals
    freq = masks.double().mean((0, 1))
    assert torch.all((freq - SCORES).abs() < 4.5 * (SCORES * (1 - SCORES) / (2 * MC_DRAWS)).sqrt())


def _antithetic_regions(s: torch.Tensor):
    """Per unit, the three intervals of u with constant (m1, m2) = ([u < s], [1 - u < s]): lengths and pairs."""
    regions = []
    for su in s.tolist():
        a, b = min(su, 1 - su), max(su, 1 - su)
        cuts = [(0.0, a), (a, b), (b, 1.0)]
        regions.append([(hi - lo, float((lo + hi) / 2 < su), float(1 - (lo + hi) / 2 < su)) for lo, hi in cuts])
    return regions


@pytest.mark.parametrize("kind", ["exact", "fisher"])
def test_disarm_exact_over_uniform_regions(kind):
    s32 = SCORES.float()
    mean = torch.zeros(N_UNITS, dtype=torch.float64)
    total_weight = 0.0
    for combo in itertools.product(*_antithetic_regions(SCORES)):
        weight = 1.0
        for length, _, _ in combo:
            weight *= length
        if weight == 0:
            continue
        m1 = torch.tensor([c[1] for c in combo], dtype=torch.float64)
        m2 = torch.tensor([c[2] for c in combo], dtype=torch.float64)
        losses = _loss(torch.stack([m1, m2])).float()
        mean += weight * hs.disarm_gradient(losses, torch.stack([m1, m2]).float(), s32, score_function=kind).double()
        total_weight += weight
    assert abs(total_weight - 1.0) < 1e-12
    torch.testing.assert_close(mean, _target(kind), rtol=0, atol=1e-6)


def test_vrpge_is_biased_under_antithetic_masks():
    """The exact check has power: plain VR-PGE fed coupled (antithetic) masks is NOT unbiased."""
    mean = torch.zeros(N_UNITS, dtype=torch.float64)
    for combo in itertools.product(*_antithetic_regions(SCORES)):
        weight = float(torch.tensor([c[0] for c in combo]).prod())
        masks = torch.tensor([[c[1] for c in combo], [c[2] for c in combo]], dtype=torch.float64)
        mean += weight * hs.vrpge_gradient(_loss(masks).float(), masks.float(), SCORES.float(), "exact").double()
    assert (mean - _target("exact")).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["exact", "fisher"])
def test_disarm_monte_carlo_with_sample_masks(kind):
    s = SCORES.float()
    pairs = hs.sample_masks(s.repeat(MC_DRAWS), 2, seed=99, step=3, antithetic=True)
    masks = pairs.view(2, MC_DRAWS, N_UNITS).transpose(0, 1)  # [draws, 2, n]
    losses = _loss(masks).float()
    grads = torch.vmap(lambda l, m: hs.disarm_gradient(l, m, s, score_function=kind))(losses, masks)
    _mc_check(grads, _target(kind))


def test_disarm_has_lower_variance_on_the_toy():
    """Same number of forwards, lower variance (1.4-4x on such a toy, docs/method.md §2); exact second moments."""
    s32 = SCORES.float()
    target = _target("exact")
    var_disarm = torch.zeros(N_UNITS, dtype=torch.float64)
    for combo in itertools.product(*_antithetic_regions(SCORES)):
        weight = float(torch.tensor([c[0] for c in combo]).prod())
        masks = torch.tensor([[c[1] for c in combo], [c[2] for c in combo]], dtype=torch.float64)
        g = hs.disarm_gradient(_loss(masks).float(), masks.float(), s32, "exact").double()
        var_disarm += weight * (g - target) ** 2
    var_vrpge = torch.zeros(N_UNITS, dtype=torch.float64)
    for m1, m2 in itertools.product(ALL_MASKS, repeat=2):
        masks = torch.stack([m1, m2])
        g = hs.vrpge_gradient(_loss(masks).float(), masks.float(), s32, "exact").double()
        var_vrpge += _prob(m1, SCORES) * _prob(m2, SCORES) * (g - target) ** 2
    assert var_disarm.sum() < var_vrpge.sum()


# --- score function and argument checks -----------------------------------------------------------------


def test_score_function_values():
    s = torch.tensor([0.25, 0.25, 0.5, 1.0, 0.0, 1.0, 0.0])
    m = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    exact = hs.score_function(m, s, "exact")
    fisher = hs.score_function(m, s, "fisher")
    # g = (m - s) / (s (1 - s)): 0.75 / 0.1875 = 4, -0.25 / 0.1875 = -4/3, 0.5 / 0.25 = 2
    torch.testing.assert_close(exact[:3], torch.tensor([4.0, -4.0 / 3.0, 2.0]))
    torch.testing.assert_close(fisher[:3], torch.tensor([0.75 / 0.1875**0.5, -0.25 / 0.1875**0.5, 1.0]))
    # certain units that agree with their mask carry no signal
    assert exact[3] == 0 and exact[4] == 0 and fisher[3] == 0 and fisher[4] == 0
    # a (numerically impossible) disagreement is finite thanks to the clamp
    assert torch.isfinite(exact[5:]).all() and (exact[5] < 0) and (exact[6] > 0)
    with pytest.raises(ValueError, match="score_function"):
        hs.score_function(m, s, "reinforce")


def test_vrpge_two_sample_formula_and_zero_when_dense():
    s = torch.tensor([0.2, 0.6, 0.9])
    masks = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    losses = torch.tensor([2.0, 0.5])
    for kind in ("exact", "fisher"):
        g = hs.score_function(masks, s, kind)
        expected = 0.5 * (losses[0] - losses[1]) * (g[0] - g[1])
        torch.testing.assert_close(hs.vrpge_gradient(losses, masks, s, kind), expected)
    # s = 1 everywhere: every mask is all ones and the gradient is exactly 0
    ones = torch.ones(3)
    assert torch.all(hs.vrpge_gradient(torch.tensor([1.0, 3.0]), torch.ones(2, 3), ones) == 0)
    # equal losses give no signal
    assert torch.all(hs.vrpge_gradient(torch.tensor([1.0, 1.0]), masks, s) == 0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_vrpge_gives_exactly_zero_to_units_drawn_alike_in_every_sample(k):
    """A unit with the same mask in every sample carries no signal: its estimate is exactly 0, whatever the
    float32 rounding of the advantages. (Their sum is ~1e-7, not 0; Adam would scale that up to a full step of
    random sign: what made an FSDP run and a one-process run on the same data part after 4 steps.)"""
    g = torch.Generator().manual_seed(0)
    n = 64
    s = torch.rand(n, generator=g) * 0.8 + 0.1
    masks = (torch.rand(k, n, generator=g) < s).float()
    masks[:, :16] = 1.0  # drawn kept in every sample
    masks[:, 16:32] = 0.0  # drawn dropped in every sample
    rounding_seen = False
    for trial in range(50):
        losses = 4.0 + torch.rand(k, generator=g) * 0.02  # losses near 4 differing by ~1e-2, as in training
        rounding_seen |= float((losses - losses.mean()).sum()) != 0.0
        for kind in ("exact", "fisher"):
            delta = hs.vrpge_gradient(losses, masks, s, kind)
            assert torch.all(delta[:32] == 0), (trial, kind, delta[:32].abs().max())
            assert torch.all(delta[32:][(masks[:, 32:] != masks[:1, 32:]).any(0)] != 0)
    assert rounding_seen  # the float32 advantages really did not add up to 0 in some trials


def test_disarm_formula():
    s = torch.tensor([0.2, 0.7, 0.5])
    masks = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    losses = torch.tensor([3.0, 1.0])
    # unit 0: m1 != m2, m2 = 0 -> +; weight max(s,1-s)/(s(1-s)) = 0.8/0.16 = 5 -> 0.5*2*5 = 5
    # unit 1: m1 == m2 -> 0; unit 2: m2 = 1 -> -, 0.5/0.25 = 2 -> -2
    torch.testing.assert_close(hs.disarm_gradient(losses, masks, s, "exact"), torch.tensor([5.0, 0.0, -2.0]))
    torch.testing.assert_close(hs.disarm_gradient(losses, masks, s, "fisher"),
                               torch.tensor([5.0 * 0.4, 0.0, -2.0 * 0.5]))


def test_estimator_argument_errors():
    s = torch.full((3,), 0.5)
    with pytest.raises(ValueError, match="at least 2"):
        hs.vrpge_gradient(torch.tensor([1.0]), torch.ones(1, 3), s)
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        hs.vrpge_gradient(torch.tensor([1.0, 2.0]), torch.ones(2, 4), s)
    with pytest.raises(ValueError, match="score_function"):
        hs.vrpge_gradient(torch.tensor([1.0, 2.0]), torch.ones(2, 3), s, score_function="plain")
    with pytest.raises(ValueError, match="antithetic pair"):
        hs.disarm_gradient(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3, 3), s)
    with pytest.raises(ValueError, match="score_function"):
        hs.disarm_gradient(torch.tensor([1.0, 2.0]), torch.ones(2, 3), s, score_function="plain")
