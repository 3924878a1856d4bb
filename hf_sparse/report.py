"""sparsity_report: per group and in total, what is kept and what it costs relative to dense."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .layers import MaskedWeightLinear, SparseLinear, is_supported_linear
from .patching import get_sparse_config
from .structure import SparseStructure, topk_mask


@dataclass
class GroupReport:
    name: str
    kind: str
    units: int
    kept: int  # in the current mask (the fixed mask once fix_masks has run)
    kept_topk: int  # in the deterministic top-K mask at the target budget
    expected_kept: float  # sum of keep probabilities
    params: int
    params_kept: int  # by the current mask


@dataclass
class SparsityReport:
    groups: list[GroupReport] = field(default_factory=list)
    target_sparsity: float = 0.0
    prunable_params: int = 0
    prunable_params_kept: int = 0
    prunable_params_kept_topk: int = 0
    expected_params_kept: float = 0.0
    total_params: int = 0
    forward_flops_fraction: float = 1.0  # matmul FLOPs per token vs the dense model, by the current mask
    seq_len: int = 128
    uniform_layers: bool = False  # SparseConfig.uniform_layers: the top-K keeps the same count in every layer

    @property
    def sparsity(self) -> float:
        return 1.0 - self.prunable_params_kept / max(self.prunable_params, 1)

    @property
    def sparsity_topk(self) -> float:
        return 1.0 - self.prunable_params_kept_topk / max(self.prunable_params, 1)

    @property
    def expected_sparsity(self) -> float:
        return 1.0 - self.expected_params_kept / max(self.prunable_params, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(sparsity=self.sparsity, sparsity_topk=self.sparsity_topk, expected_sparsity=self.expected_sparsity)
        return d

    def __str__(self) -> str:
        lines = [f"{'group':<48} {'kind':<7} {'kept':>11} {'top-K':>7} {'E[kept]':>9} {'params kept':>17}"]
        for g in self.groups:
            lines.append(
                f"{g.name:<48} {g.kind:<7} {g.kept:>5}/{g.units:<5} {g.kept_topk:>7} {g.expected_kept:>9.1f} "
                f"{g.params_kept:>8}/{g.params:<8}"
            )
        lines.append(
            f"prunable parameters kept: {self.prunable_params_kept}/{self.prunable_params} "
            f"(sparsity {self.sparsity:.4f}; top-K {self.sparsity_topk:.4f}; expected {self.expected_sparsity:.4f}; "
            f"target {self.target_sparsity:.4f})"
        )
        lines.append(
            f"model parameters: {self.total_params}; forward matmul FLOPs vs dense at seq_len {self.seq_len}: "
            f"{self.forward_flops_fraction:.4f}"
        )
        if self.uniform_layers:
            lines.append("uniform layers: " + " | ".join(
                f"{kind}: {description}" for kind, description in self.uniform_counts().items()))
        return "\n".join(lines)

    def uniform_counts(self) -> dict[str, str]:
        """Per kind, what each layer keeps: "2 of 4 in every layer" when the current mask is uniform, else the
        list; the top-K mask at the target beside it when it differs (e.g. before `fix_masks`)."""
        out = {}
        for kind in dict.fromkeys(g.kind for g in self.groups):
            groups = [g for g in self.groups if g.kind == kind]
            units = max(g.units for g in groups)
            kept, topk = [g.kept for g in groups], [g.kept_topk for g in groups]
            text = (f"{kept[0]} of {units} in every layer" if len(set(kept)) == 1
                    else f"{kept} of {units} (not uniform: call fix_masks)")
            if topk != kept:
                text += f"; top-K {topk[0] if len(set(topk)) == 1 else topk}"
            out[kind] = text
        return out


@torch.no_grad()
def sparsity_report(model: nn.Module, seq_len: int = 128) -> SparsityReport:
    """Units and parameters kept per group (current mask, deterministic top-K at the target, expected under
    the scores) and the forward FLOPs fraction: every linear layer's 2*in*out per token, scaled by its kept
    share, plus the attention core (4 * seq_len * head width per token) of the sparsified attentions."""
    config = get_sparse_config(model)
    structure = SparseStructure(model)
    costs = structure.costs(config.budget)
    target = (1.0 - config.sparsity) * float(costs.double().sum())
    if config.uniform_layers:  # the mask fix_masks keeps: the same count in every layer
        topk = structure.split(structure.topk_mask(costs, target, uniform=True))
    else:
        topk = structure.split(topk_mask(structure.scores(), costs, target))
    report = SparsityReport(target_sparsity=config.sparsity, seq_len=seq_len, uniform_layers=config.uniform_layers)
    for name, g, tk in zip(structure.names, structure.groups, topk):
        ppu = g.params_per_unit.double()
        params, kept_p, tk_p = float(ppu.sum()), float((ppu * g.mask).sum()), float((ppu * tk).sum())
        report.groups.append(
            GroupReport(name, g.kind, g.num_units, int(g.mask.sum()), int(tk.sum()), float(g.scores.sum()),
                        round(params), round(kept_p))
        )
        report.prunable_params += round(params)
        report.prunable_params_kept += round(kept_p)
        report.prunable_params_kept_topk += round(tk_p)
        report.expected_params_kept += float((ppu * g.scores.double()).sum())
    report.total_params = sum(p.numel() for p in model.parameters())
    dense = kept = 0.0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            flops = 2.0 * module.in_features * module.out_features
            g = module.group
            share = float(g.mask.mean()) if not isinstance(module, MaskedWeightLinear) else 1.0
            dense += flops
            kept += flops * share
            if g.kind == "head" and module.role == "in":
                core = 4.0 * seq_len * module.in_features
                dense += core
                kept += core * share
        elif is_supported_linear(module):
            flops = 2.0 * module.weight.numel()
            dense += flops
            kept += flops
    report.forward_flops_fraction = kept / dense if dense else 1.0
    return report
