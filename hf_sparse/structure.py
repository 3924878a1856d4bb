"""Unit groups (the structure parameters of one MLP's neurons, one attention's heads or one layer's
weights) and `SparseStructure`, the model-wide flat view used for sampling, the estimator and the budget.

A group owns its keep probabilities `scores` and the current 0/1 `mask` (persistent buffers, so they are
in every state dict and checkpoint). The layers of the group read the kept indices from it.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

GROUP_KINDS = ("neuron", "head", "weight")


class UnitGroup(nn.Module):
    def __init__(self, kind: str, num_units: int, unit_cost: torch.Tensor | float, compute: str = "gather"):
        super().__init__()
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown unit kind {kind!r}")
        self.kind = kind
        self.num_units = num_units
        self.compute = compute
        # A buffer, not a Parameter: no weight optimizer, DDP reducer, FSDP/ZeRO sharding or PEFT freezing
        # ever touches it; the trainer's own Adam updates it from the estimator.
        self.register_buffer("scores", torch.ones(num_units))
        self.register_buffer("mask", torch.ones(num_units))
        # True once `hf_sparse.fix_masks` froze the mask: a state-dict entry, so it survives checkpoints.
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("params_per_unit", torch.as_tensor(unit_cost, dtype=torch.float32).expand(num_units).clone(), persistent=False)
        # Attention modules whose reshape attributes follow the number of computed heads: (module, attr, width).
        self._head_attrs: list[tuple[nn.Module, str, int]] = []
        self._index_cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self._refresh()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, units={self.num_units}, kept={self.num_kept}, compute={self.compute}"

    # --- mask -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        if mask.shape != (self.num_units,):
            raise ValueError(f"mask for a group of {self.num_units} units has shape {tuple(mask.shape)}")
        self.mask.copy_(mask)
        self._refresh()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # a loaded mask must refresh the kept indices
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "fixed" in missing_keys:  # a checkpoint from before the flag existed: not fixed
            missing_keys.remove(prefix + "fixed")
        self._refresh()

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the mask: recompute indices there
        out = super()._apply(fn, *args, **kwargs)
        self._refresh()
        return out

    @torch.no_grad()
    def _refresh(self) -> None:
        kept = self.mask.nonzero().squeeze(1)
        self.num_kept = int(kept.numel())
        self.all_kept = self.num_kept == self.num_units
        # Nothing kept: compute one unit and zero it in the consuming layer, so every shape stays valid
        # (a reshape to (-1, head_dim) of an empty tensor is ambiguous) and the output is still exactly 0.
        self.none_kept = self.num_kept == 0
        self.kept = kept if not self.none_kept else torch.zeros(1, dtype=torch.long, device=self.mask.device)
        self._index_cache = {}
        computed = self.num_kept if not self.none_kept else 1
        for module, attr, width in self._head_attrs:
            setattr(module, attr, (computed if self.compute == "gather" and not self.all_kept else self.num_units) * width)

    def index(self, width: int, segments: int = 1, segment_size: int = 0) -> torch.Tensor:
        """Row (out members) or column (in members) indices of the computed units of a member in which each
        unit spans `width` contiguous rows, repeated over `segments` fused blocks of `segment_size`."""
        key = (width, segments, segment_size)
        idx = self._index_cache.get(key)
        if idx is None:
            rows = (self.kept[:, None] * width + torch.arange(width, device=self.kept.device)).reshape(-1)
            if segments > 1:
                rows = torch.cat([rows + s * segment_size for s in range(segments)])
            self._index_cache[key] = idx = rows
        return idx

    def expanded_mask(self, width: int, segments: int = 1) -> torch.Tensor:
        m = self.mask.repeat_interleave(width) if width > 1 else self.mask
        return m.repeat(segments) if segments > 1 else m

    @property
    def gathers(self) -> bool:
        """True when this step computes only the kept units (gather compute and something dropped)."""
        return self.compute == "gather" and not self.all_kept

    def track_head_attr(self, module: nn.Module, attr: str, width: int) -> None:
        self._head_attrs.append((module, attr, width))
        self._refresh()

    def restore_head_attrs(self) -> None:
        for module, attr, width in self._head_attrs:
            setattr(module, attr, self.num_units * width)


class SparseStructure:
    """All unit groups of a model in module order, seen as one flat vector of units."""

    def __init__(self, model: nn.Module):
        self.names: list[str] = []
        self.groups: list[UnitGroup] = []
        for name, module in model.named_modules():
            if isinstance(module, UnitGroup):
                self.names.append(name)
                self.groups.append(module)
        if not self.groups:
            raise ValueError("the model has no hf_sparse unit groups: call hf_sparse.sparsify_model(model, config) first")
        self.sizes = [g.num_units for g in self.groups]
        self.num_units = sum(self.sizes)

    def __iter__(self) -> Iterator[UnitGroup]:
        return iter(self.groups)

    @property
    def device(self) -> torch.device:
        return self.groups[0].scores.device

    def scores(self) -> torch.Tensor:
        return torch.cat([g.scores.detach().reshape(-1) for g in self.groups])

    def masks(self) -> torch.Tensor:
        return torch.cat([g.mask.reshape(-1) for g in self.groups])

    def params_per_unit(self) -> torch.Tensor:
        return torch.cat([g.params_per_unit for g in self.groups])

    def costs(self, budget: str = "params") -> torch.Tensor:
        per_unit = self.params_per_unit()
        return per_unit if budget == "params" else torch.ones_like(per_unit)

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(flat, self.sizes)

    @torch.no_grad()
    def set_scores(self, flat: torch.Tensor) -> None:
        for g, s in zip(self.groups, self.split(flat)):
            g.scores.copy_(s)

    @torch.no_grad()
    def set_masks(self, flat: torch.Tensor) -> None:
        for g, m in zip(self.groups, self.split(flat.to(self.device, torch.float32))):
            g.set_mask(m)

    def total_budget(self, budget: str = "params") -> float:
        return float(self.costs(budget).double().sum())

    def kept_budget(self, budget: str = "params") -> float:
        return float((self.costs(budget).double() * self.masks().double()).sum())


def mask_seed(seed: int, step: int, sample: int) -> int:
    """A generator seed from (seed, step, sample): every data-parallel rank draws the same masks."""
    h = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB) % (1 << 64)
    h ^= h >> 31
    return h % (1 << 63)


def sample_masks(
    scores: torch.Tensor, num_samples: int, seed: int, step: int, antithetic: bool = False
) -> torch.Tensor:
    """`num_samples` Bernoulli(scores) masks, `[num_samples, n]`, reproducible from (seed, step, sample).

    `antithetic=True` draws pairs from one uniform u: m1 = [u < s], m2 = [1 - u < s] (for DisARM).
    Uniforms are drawn on the CPU so that every device and rank gets the same bits.
    """
    n = scores.numel()
    s = scores.detach().float().cpu()
    rows = []
    for k in range(num_samples if not antithetic else (num_samples + 1) // 2):
        gen = torch.Generator().manual_seed(mask_seed(seed, step, k))
        u = torch.rand(n, generator=gen)
        rows.append((u < s).float())
        if antithetic:
            rows.append(((1 - u) < s).float())
    return torch.stack(rows[:num_samples]).to(scores.device)


def topk_mask(scores: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
    """The deterministic mask: units by descending score (ties: lower index first), kept while they fit in
    `budget`, then any smaller unit that still fits, so the budget is filled as exactly as the costs allow."""
    order = torch.argsort(-scores.detach().double(), stable=True)
    c = costs.detach().double()[order]
    cum = torch.cumsum(c, 0)
    take = cum <= budget * (1 + 1e-9)
    spent = float(cum[take][-1]) if bool(take.any()) else 0.0
    # greedy fill: units that did not fit in order may still fit in what is left (e.g. a neuron after a head)
    left = budget - spent
    rest = ((~take) & (c <= left + 1e-9 * max(budget, 1.0))).nonzero().squeeze(1)
    if rest.numel():
        for i in rest.tolist():
            if c[i] <= left + 1e-9 * max(budget, 1.0):
                take[i] = True
                left -= float(c[i])
                if left <= 0:
                    break
    mask = torch.zeros_like(scores, dtype=torch.float32)
    mask[order[take]] = 1.0
    return mask
