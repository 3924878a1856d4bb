"""What `SparseTrainer` logs: the training FLOPs proxy (matmul parameters computed, relative to dense) and the
structure's state (loss difference of the two masks, entropy of the keep probabilities, scores at 0 and 1, the
budget, the sparsity the steps computed), averaged between two training logs; and what kind of step ran, counted
for the model card (`structure_run`).

`sparse/sparsity` is the sparsity of what the steps since the last log computed (cost-weighted as the budget
counts it, averaged over the steps): 0 for a dense warm-up step, the mean over a search step's sampled masks, the
fixed mask's sparsity after it. The target is `sparse/target_sparsity`; `sparse/expected_sparsity` is the one the
keep probabilities imply."""

from __future__ import annotations

import torch
from torch import nn

from .layers import SparseLinear, is_supported_linear
from .model_state import STRUCTURE_RUN_ATTR
from .structure import SparseStructure


def matmul_params(model: nn.Module, structure: SparseStructure) -> tuple[float, float]:
    """(all matmul weights of the model, the prunable ones): the FLOPs proxy of the logs."""
    total = 0.0
    for m in model.modules():
        if isinstance(m, SparseLinear) or is_supported_linear(m):
            total += m.weight.numel()
    prunable = float(structure.params_per_unit().double().sum())
    return max(total, prunable), prunable


# The kinds of step, in the order a run goes through them, and their counters in `_sparse_state`.
STEP_KINDS = ("importance_warmup", "search", "fixed")


class MetricsMixin:
    """`SparseTrainer`'s FLOPs accounting and structure logs (a mixin before `Trainer` in its bases)."""

    def _init_metrics(self, model: nn.Module) -> None:
        """The state this part reads: the FLOPs proxy's parameter counts, the running counters (saved with the
        structure state) and the structure metrics averaged between two logs (not `_metrics`: TRL's trainers
        keep theirs under that name)."""
        self._params_per_unit = self.structure.params_per_unit()
        self._dense_matmul_params, self._prunable_params = matmul_params(model, self.structure)
        self._sparse_state = {"skipped_updates": 0, "flops_ratio_sum": 0.0, "steps": 0, "structure_updates": 0,
                              **{f"{kind}_steps": 0 for kind in STEP_KINDS}}
        self._structure_metrics: dict[str, list[float]] = {}  # name -> [sum, count] since the last log

    # --- metrics --------------------------------------------------------------------------------------
    def _forward_share(self, mask: torch.Tensor) -> float:
        """Matmul FLOPs of a forward with this mask relative to dense (the linear layers' parameters as proxy)."""
        kept = float((self._params_per_unit * mask.to(self._params_per_unit.device)).sum())
        return (self._dense_matmul_params - self._prunable_params + kept) / self._dense_matmul_params

    def _record_teacher_flops(self):
        """A teacher's dense forward per step: 1 of a dense step's 3 units, added to the step just recorded."""
        if self._distiller is not None and self._distiller.teacher is not None:
            self._sparse_state["flops_ratio_sum"] += 1.0 / 3.0

    def _record_flops(self, step_cost: float, kind: str | None = None):
        """Once per optimizer step, when its masks are set: its FLOPs, its kind (`STEP_KINDS`; by default from the
        schedule, in the order the trainer's step tests it: fixed, then the dense warm-up, else a search step) and
        the sparsity it computes."""
        kind = self._step_kind() if kind is None else kind
        if kind not in STEP_KINDS:
            raise ValueError(f"step kind must be one of {STEP_KINDS}, got {kind!r}")
        self._sparse_state["flops_ratio_sum"] += step_cost / 3.0
        self._sparse_state["steps"] += 1
        self._sparse_state[f"{kind}_steps"] = self._sparse_state.get(f"{kind}_steps", 0) + 1
        self._add_metric("sparse/sparsity", self._computed_sparsity(kind))

    def _step_kind(self, step: int | None = None) -> str:
        if self.is_fixed(step):
            return "fixed"
        if self.in_importance_warmup(step):
            return "importance_warmup"
        return "search"

    def _sparsity_of(self, masks: torch.Tensor) -> float:
        """Mean sparsity of masks (..., units), weighted by the budget's unit costs."""
        costs = self._costs.double().to(masks.device)
        kept = (masks.double().reshape(-1, costs.numel()) * costs).sum(-1).mean()
        return 1.0 - float(kept) / self._total_budget

    def _computed_sparsity(self, kind: str) -> float:
        if kind == "importance_warmup":
            return 0.0  # every unit computed
        masks = getattr(self, "_step_masks", None) if kind == "search" else None
        return self._sparsity_of(self.structure.masks() if masks is None else masks)

    def structure_run(self) -> dict:
        """What ran so far, for the model card: optimizer steps of each kind (dense warm-up reading the Taylor
        importance, search with a policy-gradient update of the keep probabilities, fixed mask), the structure
        updates made (and skipped: non-finite losses), the estimator and the training FLOPs against dense.
        Saved with the structure state (the counters are in `_sparse_state`), so a resumed run counts on."""
        s, a = self._sparse_state, self.args
        return {
            "recorded_by": type(self).__name__,
            **{f"{kind}_steps": int(s.get(f"{kind}_steps", 0)) for kind in STEP_KINDS},
            "structure_updates": int(s.get("structure_updates", 0)),
            "forward_search_steps": int(s.get("forward_search_steps", 0)),
            "warmup_extension_steps": int(s.get("warmup_extension_steps", 0)),
            "forward_search": a.forward_search,
            "forward_search_objective": a.forward_search_objective,
            "skipped_updates": int(s.get("skipped_updates", 0)),
            "fixed_from_start": bool(self._fixed_from_start),
            "mask_from": getattr(self, "_mask_from", None),
            "estimator": a.estimator,
            "mask_samples": int(a.mask_samples),
            "importance_ranking": a.importance_ranking,
            "distill_from": a.distill_from,
            "score_init": self.sparse_config.score_init,
            "train_flops_vs_dense": s["flops_ratio_sum"] / max(s["steps"], 1),
        }

    def _publish_structure_run(self) -> None:
        """Leave `structure_run()` on the model (attribute `STRUCTURE_RUN_ATTR`), where `render_model_card` and
        `push_sparse_to_hub` find it without being told: at each log, each save and the end of `train()` (not per
        step)."""
        model = getattr(self, "model", None)
        if model is None:
            return
        unwrapped = self.accelerator.unwrap_model(model) if getattr(self, "accelerator", None) is not None else model
        for m in {id(model): model, id(unwrapped): unwrapped}.values():
            m.__dict__[STRUCTURE_RUN_ATTR] = self.structure_run()

    def _add_metric(self, name: str, value: float):
        # a running sum, not a list: a run that never logs keeps nothing per step
        acc = self._structure_metrics.setdefault(name, [0.0, 0])
        acc[0] += float(value)
        acc[1] += 1

    def _log_structure(self, losses: torch.Tensor, scores: torch.Tensor, next_step: int):
        """After each structure (policy-gradient) update of a search step, applied or skipped."""
        self._sparse_state["structure_updates"] = self._sparse_state.get("structure_updates", 0) + 1
        self._add_metric("sparse/loss_diff", float((losses[:, 0] - losses[:, 1]).mean()))
        s = scores.double().clamp(1e-12, 1 - 1e-12)
        entropy = -(s * s.log() + (1 - s) * (1 - s).log())
        self._add_metric("sparse/mask_entropy", float(entropy.mean()))
        self._add_metric("sparse/scores_at_0", float((scores <= 0).double().mean()))
        self._add_metric("sparse/scores_at_1", float((scores >= 1).double().mean()))
        self._add_metric("sparse/budget", self.budget_at(next_step) / self._total_budget)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the structure metrics averaged since the last one
            for name, (total, count) in self._structure_metrics.items():
                if count:
                    logs[name] = total / count
            self._structure_metrics = {}
            scores = self.structure.scores().double()
            if "sparse/sparsity" not in logs:  # no step recorded since the last log (e.g. right after a resume)
                dense = self.in_importance_warmup() and not self.is_fixed()
                logs["sparse/sparsity"] = 0.0 if dense else self._sparsity_of(self.structure.masks())
            logs["sparse/target_sparsity"] = float(self.sparse_config.sparsity)
            logs["sparse/expected_sparsity"] = 1.0 - float((self._costs.double() * scores).sum()) / self._total_budget
            logs["sparse/train_flops_vs_dense"] = self._sparse_state["flops_ratio_sum"] / max(self._sparse_state["steps"], 1)
            logs["sparse/skipped_updates"] = self._sparse_state["skipped_updates"]
            logs["sparse/fixed"] = float(self.is_fixed())
            self._publish_structure_run()
        super().log(logs, start_time)
