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

    def planned_warmup_steps(self, max_steps: int | None = None) -> int:
        """The dense warm-up as importance_warmup plans it, in steps of a run of `max_steps` (default this run's):
        at least one (a fraction that rounds to 0 steps of a short run would otherwise skip the informed start
        silently); 0 without an informed start."""
        if self._importance is None:
            return 0
        total = self.state.max_steps if max_steps is None else max_steps
        return max(1, int(round(self.args.importance_warmup * total)))

    def importance_warmup_steps(self) -> int:
        """Dense warm-up steps of the informed start: the planned ones plus the steps it was extended by while the
        loss was still at its starting level (`warmup_extension`)."""
        return self.planned_warmup_steps() + self.warmup_extension()  # (0 and 0 without an informed start)

    def warmup_extension(self) -> int:
        """Steps the dense warm-up went on past importance_warmup (warmup_loss_drop); the fixing moves with it."""
        return int(self._sparse_state.get("warmup_extension_steps", 0))

    def warmup_loss_window(self, max_steps: int | None = None) -> int:
        """Steps in each of the two windows the warm-up's loss levels are read over (a sixth of the planned
        warm-up); 0 where the extension is off: no warm-up, warmup_loss_drop 0, or a warm-up under 12 steps (a
        level of one step is one batch's noise)."""
        if self.args.warmup_loss_drop <= 0:
            return 0
        window = self.planned_warmup_steps(max_steps) // 6
        return window if window >= 2 else 0

    def max_warmup_extension(self, max_steps: int | None = None) -> int:
        """The most steps the warm-up may be extended by (0 where the extension is off)."""
        if not self.warmup_loss_window(max_steps):
            return 0
        return max(0, self.latest_warmup_step(max_steps) - self.planned_warmup_steps(max_steps))

    def latest_warmup_step(self, max_steps: int | None = None) -> int:
        """The step the warm-up's extension may not pass: warmup_extend_until of the run, less the planned
        steps between the warm-up's end and the fixing (both move together)."""
        total = self.state.max_steps if max_steps is None else max_steps
        a = self.args
        planned_warmup = self.planned_warmup_steps(max_steps)
        gap = max(0, int(round(a.fix_masks_at * total)) - planned_warmup) if a.fix_masks_at < 1.0 else 0
        return max(planned_warmup, int(round(a.warmup_extend_until * total)) - gap)

    def fix_step(self, max_steps: int | None = None) -> int:
        """The step at which the mask is fixed (of a run of `max_steps`, default this run's, whose warm-up
        extension it includes; as planned for another); never before the informed start: a warm-up rounded up
        to one step, or extended, moves the fixing with it."""
        total = self.state.max_steps if max_steps is None else max_steps
        fix = int(round(self.args.fix_masks_at * total))
        if self._importance is None:
            return fix
        extension = self.warmup_extension() if max_steps is None else 0
        return max(fix, self.planned_warmup_steps(max_steps)) + extension

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
                f"{self.fix_step()}: fix_masks_at={self.args.fix_masks_at} of {self.state.max_steps} steps"
                f"{f', moved {self.warmup_extension()} steps by the extended warm-up' if self.warmup_extension() else ''}), so the "
                "model's structure is not fixed (masks_fixed is False). Train for more steps, or fix the current "
                "top-K mask with hf_sparse.fix_masks(model)"
            )
