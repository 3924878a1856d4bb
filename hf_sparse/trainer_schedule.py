"""`ScheduleMixin`: which kind of step a `SparseTrainer` step is (dense warm-up, search, fixed mask), the budget
at each step, and the warning of a run that ends before its mask is fixed. It reads the trainer's arguments, its
state (`max_steps`, `global_step`) and whether it has an informed start (`_importance`)."""

from __future__ import annotations

from transformers.utils import logging

from .budget import cubic_budget

logger = logging.get_logger("hf_sparse.trainer")


class ScheduleMixin:
    def _fraction_step(self, fraction: float) -> int:
        return int(round(fraction * self.state.max_steps))

    def budget_at(self, step: int) -> float:
        a = self.args
        return cubic_budget(
            step, self._total_budget, self._target_budget,
            self._fraction_step(a.budget_schedule_start), self._fraction_step(a.budget_schedule_end),
        )

    def in_importance_warmup(self, step: int | None = None) -> bool:
        step = self.state.global_step if step is None else step
        return self._importance is not None and step < self.importance_warmup_steps()

    def importance_warmup_steps(self) -> int:
        """Dense warm-up steps of the informed start: a positive importance_warmup is at least one step (a
        fraction that rounds to 0 steps of a short run would otherwise skip the informed start silently)."""
        if self._importance is None:
            return 0
        return max(1, self._fraction_step(self.args.importance_warmup))

    def fix_step(self, max_steps: int | None = None) -> int:
        """The step at which the mask is fixed (of a run of `max_steps`, default this run's); never before the
        informed start: a warm-up rounded up to one step moves the fixing with it."""
        total = self.state.max_steps if max_steps is None else max_steps
        fix = int(round(self.args.fix_masks_at * total))
        if self._importance is None:
            return fix
        return max(fix, max(1, int(round(self.args.importance_warmup * total))))

    def is_fixed(self, step: int | None = None) -> bool:
        step = self.state.global_step if step is None else step
        if self._fixed_from_start:
            return True
        return self.args.fix_masks_at < 1.0 and step >= self.fix_step()

    def _warn_if_unfixed(self) -> None:
        """A run that ends before its mask is fixed (too few steps for the schedule) says so."""
        if self.args.fix_masks_at < 1.0 and not all(bool(g.fixed) for g in self.structure):
            logger.warning(
                f"SparseTrainer: the run ended at step {self.state.global_step}, before its mask is fixed (step "
                f"{self.fix_step()}: fix_masks_at={self.args.fix_masks_at} of {self.state.max_steps} steps), so the "
                "model's structure is not fixed (masks_fixed is False). Train for more steps, or fix the current "
                "top-K mask with hf_sparse.fix_masks(model)"
            )
