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


def unit_rows(units: torch.Tensor, width: int, segments: int = 1, segment_size: int = 0) -> torch.Tensor:
    """Rows (or columns) of a weight that `units` span, each unit `width` contiguous rows, repeated over
    `segments` fused blocks of `segment_size` rows (e.g. a fused gate_up projection)."""
    rows = (units[:, None] * width + torch.arange(width, device=units.device)).reshape(-1)
    if segments > 1:
        rows = torch.cat([rows + s * segment_size for s in range(segments)])
    return rows


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
        # The kept counts a uniform-layers mask may give this group (None: any); set where the family's config
        # cannot express every count (LlamaConfig refuses a head count that does not divide hidden_size).
        self.admissible_counts: list[int] | None = None
        self._refresh()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, units={self.num_units}, kept={self.num_kept}, compute={self.compute}"

    # --- mask -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        if mask.shape != (self.num_units,):
            raise ValueError(f"mask for a group of {self.num_units} units has shape {tuple(mask.shape)}")
        if torch.equal(self.mask, mask.to(self.mask.device, self.mask.dtype)):
            return  # the same mask (every fixed-phase step): keep the kept indices and their caches
        self.mask.copy_(mask)
        self._refresh()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # a loaded mask must refresh the kept indices
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "fixed" in missing_keys:  # a checkpoint from before the flag existed: not fixed
            missing_keys.remove(prefix + "fixed")
        self._refresh()

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the mask: recompute indices there
        # The structure state stays float32 whatever the model's dtype (model.to(torch.bfloat16), .half()):
        # bf16 scores and costs would round, and the budget projection would drift. Only the device follows.
        kept = {name: self._buffers[name] for name in ("scores", "mask", "params_per_unit")}
        out = super()._apply(fn, *args, **kwargs)
        for name, before in kept.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:
                self._buffers[name] = before.to(moved.device)
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
            self._index_cache[key] = idx = unit_rows(self.kept, width, segments, segment_size)
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

    def kinds(self) -> list[str]:
        return [g.kind for g in self.groups]

    def admissible_counts(self) -> dict[str, list[int]] | None:
        """Per kind, the kept counts every group of that kind admits (`UnitGroup.admissible_counts`); None: any."""
        out: dict[str, set[int]] = {}
        for g in self.groups:
            if g.admissible_counts is not None:
                counts = set(g.admissible_counts)
                out[g.kind] = out[g.kind] & counts if g.kind in out else counts
        return {kind: sorted(counts) for kind, counts in out.items()} or None

    def topk_mask(self, costs: torch.Tensor, budget: float, uniform: bool = False) -> torch.Tensor:
        """`topk_mask` of the current scores, ties spread over the groups (never towards whole layers).
        `uniform=True` (`SparseConfig.uniform_layers`): every group of a kind keeps the same number of units."""
        if uniform:
            return topk_mask(self.scores(), costs, budget, group_sizes=self.sizes, group_kinds=self.kinds(),
                             admissible_counts=self.admissible_counts())
        return topk_mask(self.scores(), costs, budget, group_sizes=self.sizes)

    def kept_counts(self, mask: torch.Tensor | None = None) -> dict[str, list[int]]:
        """Per kind, the kept units of each group (in module order) under `mask` (default: the current masks)."""
        parts = self.split(mask) if mask is not None else [g.mask for g in self.groups]
        out: dict[str, list[int]] = {}
        for g, m in zip(self.groups, parts):
            out.setdefault(g.kind, []).append(int(m.sum()))
        return out

    def smallest_uniform_level(self, costs: torch.Tensor) -> float:
        """The cost of the cheapest thing a uniform-layers mask can keep: one admissible count of one kind in
        every group of that kind (`topk_mask` with `group_kinds`). A smaller budget keeps nothing."""
        levels = _uniform_levels(torch.zeros(self.num_units), costs, self.sizes, self.kinds(), self.admissible_counts())
        firsts = [float(c[0]) for _, _, _, c in levels[0] if c.numel()]
        return min(firsts) if firsts else float("inf")

    def scores_tied(self) -> bool:
        """True while every score is equal (nothing learned yet): a top-K of them would be decided by ties."""
        s = self.scores()
        return bool((s == s[0]).all())

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


def _descending_order(scores: torch.Tensor, group_sizes: list[int] | None) -> torch.Tensor:
    """Units by descending score; ties by relative position in their group (or by index), then by index."""
    n, device = scores.numel(), scores.device
    if group_sizes is None:
        return torch.argsort(-scores.double(), stable=True)
    if sum(group_sizes) != n:
        raise ValueError(f"group_sizes add up to {sum(group_sizes)} units, the scores have {n}")
    position = torch.cat([(torch.arange(s, dtype=torch.float64) + 0.5) / s for s in group_sizes]).to(device)
    s32 = scores.float()
    if bool(((s32 >= 0) & torch.isfinite(s32)).all()) and max(group_sizes) < (1 << 20):
        # one sort of an int64 key: the bits of a non-negative float32 sort like its value (< 2^31), the
        # position in its group quantised to 21 bits below them (distinct inside a group of < 2^20 units)
        bits = s32.view(torch.int32).long()
        key = (-bits) * (1 << 21) + (position * (1 << 21)).long()
        return torch.argsort(key, stable=True)
    by_position = torch.argsort(position, stable=True)
    return by_position[torch.argsort(-scores.double()[by_position], stable=True)]


def topk_mask(
    scores: torch.Tensor, costs: torch.Tensor, budget: float, group_sizes: list[int] | None = None,
    group_kinds: list[str] | None = None, admissible_counts: dict[str, list[int]] | None = None,
) -> torch.Tensor:
    """The deterministic mask: units by descending score, kept while they fit in `budget`, then any smaller
    unit that still fits (greedy, in that order), so the budget is filled as exactly as the costs allow.

    With `group_kinds` (each group's kind, beside `group_sizes`): the uniform-layers mask, in which every group
    of a kind keeps the same number of units (its top-n by score), see `uniform_topk_mask`.

    Ties: with `group_sizes` (the units of each group, in flat order) a tie is broken by the unit's relative
    position inside its group, so equal scores spread the budget over every group instead of keeping the
    first groups whole and emptying the last ones (tied all-ones scores at 50%: every group keeps ~half).
    Without it, by index. Vectorised: each pass takes the longest run of candidates that fits; the greedy
    fill needs at most one pass per distinct unit cost, so it stays cheap at 7B scale (~350k units).
    """
    if group_kinds is not None:
        if group_sizes is None:
            raise ValueError("topk_mask: group_kinds needs group_sizes (the units of each group)")
        return uniform_topk_mask(scores, costs, budget, group_sizes, group_kinds, admissible_counts)
    n = scores.numel()
    device = scores.device
    order = _descending_order(scores.detach(), group_sizes)
    c = costs.detach().double().to(device)[order]
    tol = 1e-9 * max(float(budget), 1.0)
    take = torch.zeros(n, dtype=torch.bool, device=device)
    left = float(budget)
    start = 0
    while start < n:
        rest = c[start:]
        cand = ((rest <= left + tol) & ~take[start:]).nonzero().squeeze(1) + start
        if cand.numel() == 0:
            break
        cum = torch.cumsum(c[cand], 0)
        fits = int((cum <= left + tol).sum())  # a prefix: the cumulative cost only grows
        if fits:
            take[cand[:fits]] = True
            left -= float(cum[fits - 1])
        if fits == cand.numel():
            break
        start = int(cand[fits]) + 1  # that unit no longer fits, and `left` only shrinks: skip it for good
    mask = torch.zeros(n, dtype=torch.float32, device=device)
    mask[order[take]] = 1.0
    return mask


# --- uniform layers -------------------------------------------------------------------------------------------
def _uniform_levels(scores: torch.Tensor, costs: torch.Tensor, group_sizes: list[int], group_kinds: list[str],
                    admissible_counts: dict[str, list[int]] | None):
    """The levels of a uniform-layers mask. A level of a kind raises the kept count of every group of that kind
    from one admissible count to the next (by default: by one unit), adding each group's next best units.

    Returns ([(kind, counts, level scores, level costs)], per-group descending orders). A level's score is the
    mean score of the units it adds, made non-increasing along the kind (a running minimum) so that the levels of
    a kind are always taken as a prefix; its cost, the sum of their costs.
    """
    if len(group_sizes) != len(group_kinds):
        raise ValueError(f"{len(group_kinds)} group kinds for {len(group_sizes)} groups")
    if sum(group_sizes) != scores.numel():
        raise ValueError(f"group_sizes add up to {sum(group_sizes)} units, the scores have {scores.numel()}")
    s_parts = torch.split(scores.detach().double().cpu(), group_sizes)
    c_parts = torch.split(costs.detach().double().cpu(), group_sizes)
    orders = [torch.argsort(-s, stable=True) for s in s_parts]  # within a group, ties by index
    levels = []
    for kind in dict.fromkeys(group_kinds):
        members = [i for i, k in enumerate(group_kinds) if k == kind]
        depth = max(group_sizes[i] for i in members)
        if depth == 0:
            continue
        row_s = torch.zeros(depth, dtype=torch.float64)  # sums over the groups of their r-th best unit
        row_c = torch.zeros(depth, dtype=torch.float64)
        row_n = torch.zeros(depth, dtype=torch.float64)
        for i in members:
            n = group_sizes[i]
            row_s[:n] += s_parts[i][orders[i]]
            row_c[:n] += c_parts[i][orders[i]]
            row_n[:n] += 1
        allowed = (admissible_counts or {}).get(kind)
        if allowed is not None:
            counts = sorted({int(k) for k in allowed if 0 < int(k) <= depth})
        else:
            counts = list(range(1, depth + 1))
        if not counts:
            continue
        ends = torch.tensor(counts)
        starts = torch.tensor([0] + counts[:-1])
        zero = torch.zeros(1, dtype=torch.float64)
        cs, cc, cn = (torch.cat([zero, torch.cumsum(x, 0)]) for x in (row_s, row_c, row_n))
        level_s = (cs[ends] - cs[starts]) / (cn[ends] - cn[starts])
        level_c = cc[ends] - cc[starts]
        level_s = torch.cummin(level_s, 0).values
        levels.append((kind, counts, level_s, level_c))
    return levels, orders


def uniform_topk_mask(
    scores: torch.Tensor, costs: torch.Tensor, budget: float, group_sizes: list[int], group_kinds: list[str],
    admissible_counts: dict[str, list[int]] | None = None,
) -> torch.Tensor:
    """The deterministic mask of `SparseConfig.uniform_layers`: every group of a kind keeps the same number n of
    units, its n best by score (ties by index), and the total cost stays within `budget`.

    How n is chosen per kind: the levels of every kind (`_uniform_levels`: one more unit in every group of the
    kind, or the next admissible count) compete in one greedy top-K, as units do in the ordinary mask -- by
    descending mean score of the units they add, ties spread over the kinds by relative depth (level / levels of
    its kind), each kept while it fits; a level that no longer fits closes its kind (a count is a prefix), and
    the other kinds go on filling. So the split of the budget between heads and neurons follows the scores, and
    the budget is filled until no kind can grow by one more level. A group with fewer units than n keeps all.
    """
    device = scores.device
    levels, orders = _uniform_levels(scores, costs, group_sizes, group_kinds, admissible_counts)
    chosen = {kind: 0 for kind in group_kinds}
    if levels:
        flat_s = torch.cat([lv[2] for lv in levels])
        flat_c = torch.cat([lv[3] for lv in levels])
        kind_of = torch.cat([torch.full((lv[2].numel(),), i, dtype=torch.long) for i, lv in enumerate(levels)])
        order = _descending_order(flat_s, [lv[2].numel() for lv in levels])
        c, kinds = flat_c[order], kind_of[order]
        open_kinds = torch.ones(len(levels), dtype=torch.bool)
        take = torch.zeros(order.numel(), dtype=torch.bool)
        left = float(budget)
        tol = 1e-9 * max(float(budget), 1.0)
        while True:
            cand = (~take & open_kinds[kinds]).nonzero().squeeze(1)
            if cand.numel() == 0:
                break
            cum = torch.cumsum(c[cand], 0)
            fits = int((cum <= left + tol).sum())  # a prefix: every level costs > 0
            if fits:
                take[cand[:fits]] = True
                left -= float(cum[fits - 1])
            if fits == cand.numel():
                break
            open_kinds[kinds[cand[fits]]] = False  # its next level does not fit: the kind's count is final
        for i, (kind, counts, _, _) in enumerate(levels):
            taken = int((take & (kinds == i)).sum())
            chosen[kind] = counts[taken - 1] if taken else 0
    mask = torch.zeros(scores.numel(), dtype=torch.float32)
    start = 0
    for size, kind, order_g in zip(group_sizes, group_kinds, orders):
        mask[start + order_g[: min(chosen[kind], size)]] = 1.0
        start += size
    return mask.to(device)


def check_keeps_a_level(structure: SparseStructure, costs: torch.Tensor, sparsity: float,
                        what: str = "SparseConfig.sparsity") -> None:
    """Refuse a uniform-layers sparsity whose budget is smaller than the cheapest level (one unit, or the smallest
    admissible count, in every group of a kind): the uniform top-K mask would keep nothing."""
    total = float(costs.detach().double().sum())
    budget = (1.0 - float(sparsity)) * total
    smallest = structure.smallest_uniform_level(costs)
    if budget < smallest * (1 - 1e-9):
        raise ValueError(
            f"{what}={sparsity} leaves a budget of {budget:.6g} of the {total:.6g} prunable cost, less than keeping "
            f"the same smallest number of units in every layer ({smallest:.6g}; SparseConfig.uniform_layers=True): "
            f"every unit would be dropped. Use a sparsity of at most {1.0 - smallest / total:.6g}, or "
            "uniform_layers=False"
        )


def score_stats(s: torch.Tensor, margin: float) -> dict[str, float]:
    """A search's keep probabilities: their mean binary entropy (bits) and the share of them held at a margin."""
    p = s.double().clamp(1e-12, 1 - 1e-12)
    entropy = -(p * p.log2() + (1 - p) * (1 - p).log2())
    at_bounds = ((s <= margin + 1e-6) | (s >= 1 - margin - 1e-6)).double().mean()
    return {"mask_entropy": float(entropy.mean()), "share_at_bounds": float(at_bounds)}


def kept_by_kind(structure: SparseStructure, costs: torch.Tensor, s: torch.Tensor) -> dict[str, float]:
    """Expected kept share of each kind's cost (heads, neurons): how the search splits the one budget."""
    out: dict[str, float] = {}
    for kind in dict.fromkeys(structure.kinds()):
        sel = torch.cat([torch.full((n,), k == kind) for n, k in zip(structure.sizes, structure.kinds())])
        sel = sel.to(s.device)
        out[f"kept_{kind}"] = float((costs[sel].double() * s[sel].double()).sum() / costs[sel].double().sum())
    return out
