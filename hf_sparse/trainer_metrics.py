"""What `SparseTrainer` logs: the training FLOPs proxy (matmul parameters computed, relative to dense) and the
structure's state (loss difference of the two masks, entropy of the keep probabilities, scores at 0 and 1, the
budget, the top-K sparsity), averaged between two training logs."""

from __future__ import annotations

import torch
from torch import nn

from .layers import SparseLinear, is_supported_linear
from .structure import SparseStructure


def matmul_params(model: nn.Module, structure: SparseStructure) -> tuple[float, float]:
    """(all matmul weights of the model, the prunable ones): the FLOPs proxy of the logs."""
    total = 0.0
    for m in model.modules():
        if isinstance(m, SparseLinear) or is_supported_linear(m):
            total += m.weight.numel()
    prunable = float(structure.params_per_unit().double().sum())
    return max(total, prunable), prunable


class MetricsMixin:
    """`SparseTrainer`'s FLOPs accounting and structure logs (a mixin before `Trainer` in its bases)."""

    # --- metrics --------------------------------------------------------------------------------------
    def _forward_share(self, mask: torch.Tensor) -> float:
        """Matmul FLOPs of a forward with this mask relative to dense (the linear layers' parameters as proxy)."""
        kept = float((self._params_per_unit * mask.to(self._params_per_unit.device)).sum())
        return (self._dense_matmul_params - self._prunable_params + kept) / self._dense_matmul_params

    def _record_teacher_flops(self):
        """A teacher's dense forward per step: 1 of a dense step's 3 units, added to the step just recorded."""
        if self._distiller is not None and self._distiller.teacher is not None:
            self._sparse_state["flops_ratio_sum"] += 1.0 / 3.0

    def _record_flops(self, step_cost: float):
        self._sparse_state["flops_ratio_sum"] += step_cost / 3.0
        self._sparse_state["steps"] += 1

    def _add_metric(self, name: str, value: float):
        self._metrics.setdefault(name, []).append(float(value))

    def _log_structure(self, losses: torch.Tensor, scores: torch.Tensor, next_step: int):
        self._add_metric("sparse/loss_diff", float((losses[:, 0] - losses[:, 1]).mean()))
        s = scores.double().clamp(1e-12, 1 - 1e-12)
        entropy = -(s * s.log() + (1 - s) * (1 - s).log())
        self._add_metric("sparse/mask_entropy", float(entropy.mean()))
        self._add_metric("sparse/scores_at_0", float((scores <= 0).double().mean()))
        self._add_metric("sparse/scores_at_1", float((scores >= 1).double().mean()))
        self._add_metric("sparse/budget", self.budget_at(next_step) / self._total_budget)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the structure metrics averaged since the last one
            for name, values in self._metrics.items():
                if values:
                    logs[name] = sum(values) / len(values)
            self._metrics = {}
            scores = self.structure.scores().double()
            kept_topk = float((self._costs.double() * self.topk_mask().double()).sum())
            logs["sparse/sparsity"] = 1.0 - kept_topk / self._total_budget
            logs["sparse/expected_sparsity"] = 1.0 - float((self._costs.double() * scores).sum()) / self._total_budget
            logs["sparse/train_flops_vs_dense"] = self._sparse_state["flops_ratio_sum"] / max(self._sparse_state["steps"], 1)
            logs["sparse/skipped_updates"] = self._sparse_state["skipped_updates"]
            logs["sparse/fixed"] = float(self.is_fixed())
        super().log(logs, start_time)
