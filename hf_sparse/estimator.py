"""Structure-gradient estimators that need forward losses only (no backward through the masks).

Everything here is a pure tensor function: `losses[k]` is the loss of the model run with `masks[k]`,
`scores` the keep probabilities s. The returned gradient is for the expected loss E_{m~Bern(s)} L(m).
"""

from __future__ import annotations

import torch

SCORE_FUNCTIONS = ("fisher", "exact")


def score_function(masks: torch.Tensor, scores: torch.Tensor, kind: str = "fisher", eps: float = 1e-6) -> torch.Tensor:
    """g(m) = d log p(m|s) / ds  (`exact`), or that times sqrt(s(1-s))  (`fisher`, the reference code's).

    s is clamped into [eps, 1 - eps] inside g only; a unit whose s is exactly 0 or 1 and whose mask
    agrees with it gets g = 0 (it can only ever be drawn that way, so it carries no signal).
    """
    if kind not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {kind!r}")
    s = scores.clamp(eps, 1 - eps)
    centred = masks - s
    var = s * (1 - s)
    g = centred / var if kind == "exact" else centred / var.sqrt()
    certain = ((scores <= 0) & (masks == 0)) | ((scores >= 1) & (masks == 1))
    return torch.where(certain, torch.zeros_like(g), g)


def vrpge_gradient(
    losses: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, score_function: str = "fisher", eps: float = 1e-6
) -> torch.Tensor:
    """The variance-reduced policy gradient (VR-PGE) from K >= 2 independent masks.

    `delta = 1/(K-1) * sum_k (L_k - mean_j L_j) * g(m_k)`; for K = 2 it is `1/2 (L1 - L2)(g(m1) - g(m2))`.
    losses `[K]`, masks `[K, n]`, scores `[n]` -> gradient `[n]` (float32, scores' device).
    Unbiased for dE/ds (`exact`) or sqrt(s(1-s)) * dE/ds (`fisher`) when the masks are independent.
    """
    losses = torch.as_tensor(losses, dtype=torch.float32, device=scores.device).reshape(-1)
    if masks.dim() != 2 or masks.shape[0] != losses.numel() or masks.shape[1] != scores.numel():
        raise ValueError(f"expected masks [K, n] = [{losses.numel()}, {scores.numel()}], got {tuple(masks.shape)}")
    k = losses.numel()
    if k < 2:
        raise ValueError(f"VR-PGE needs at least 2 samples, got {k}")
    advantages = losses - losses.mean()
    g = _score(masks.float(), scores.float(), score_function, eps)
    # The advantages add up to 0 exactly only in exact arithmetic: in float32 their sum is a rounding error
    # (~1e-7 of the loss), and a unit drawn alike in every sample would get that error times g as its gradient,
    # which Adam scales up to a full step of random sign. Subtracting the first sample's g changes nothing in
    # exact arithmetic (sum_k a_k c = 0 for any c) and gives such a unit exactly 0: for K = 2 it is the
    # 1/2 (L1 - L2)(g(m1) - g(m2)) form itself.
    return (advantages[:, None] * (g - g[:1])).sum(0) / (k - 1)


def disarm_gradient(
    losses: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, score_function: str = "fisher", eps: float = 1e-6
) -> torch.Tensor:
    """DisARM (Dong, Mnih & Tucker 2020) for an antithetic pair m1 = [u < s], m2 = [1 - u < s].

    `1/2 (L1 - L2) (-1)^{m2} [m1 != m2] max(s, 1-s) / (s(1-s))`, times sqrt(s(1-s)) for `fisher`.
    Unbiased for the same target as `vrpge_gradient` with that score function, at lower variance.
    """
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")
    losses = torch.as_tensor(losses, dtype=torch.float32, device=scores.device).reshape(-1)
    if losses.numel() != 2 or masks.shape[0] != 2:
        raise ValueError("DisARM takes exactly one antithetic pair: losses [2], masks [2, n]")
    m1, m2 = masks[0].float(), masks[1].float()
    s = scores.float().clamp(eps, 1 - eps)
    var = s * (1 - s)
    weight = torch.maximum(s, 1 - s) / var
    if score_function == "fisher":
        weight = weight * var.sqrt()
    sign = 1.0 - 2.0 * m2
    return 0.5 * (losses[0] - losses[1]) * sign * (m1 != m2).float() * weight


def pool_by_group(delta: torch.Tensor, sizes: list[int], share: float) -> torch.Tensor:
    """`(1 - share) * delta + share * (the mean of delta over each unit's group)`, groups given by their sizes in
    flat order: the pooled part is the gradient of a shift of the whole group, averaged over its units (far less
    noisy than one unit's), so budget can move between groups before single units are told apart."""
    if share == 0.0:
        return delta
    means = torch.cat([part.mean().expand(part.numel()) for part in torch.split(delta, sizes)])
    return (1.0 - share) * delta + share * means


_score = score_function  # keep the public name free for the keyword argument above
