"""`ImportanceMixin`: the informed start of `SparseTrainer` (`importance_warmup`): dense steps whose backward also
records each unit's Taylor gate derivative (`hf_sparse.importance`), then the keep probabilities started from the
accumulated importance, projected onto the budget."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .importance import TaylorImportance, scores_from_importance
from .warmup_loss import WarmupLoss, still_at_start

logger = logging.get_logger("hf_sparse.trainer")


class ImportanceMixin:
    def _init_importance(self, model: nn.Module, args) -> None:
        """The state this part owns: the importance accumulator, when the run has an informed start."""
        self._importance: TaylorImportance | None = None
        self._warmup_loss: WarmupLoss | None = None  # made at the first warm-up step (its window needs max_steps)
        if args.importance_warmup > 0 and not self._fixed_from_start:
            self._importance = TaylorImportance(model, self.structure)

    def _importance_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch) -> torch.Tensor:
        """A dense step (every unit kept) whose backward also records each unit's gate derivative."""
        step = self.state.global_step
        if self._step_mask_step != step:
            self.structure.set_masks(torch.ones(self.structure.num_units))
            self._step_mask_step = step
            self._record_flops(3.0, kind="importance_warmup")
        with self._importance.track():
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self._warmup_loss_read(step):  # the step's loss: the sum over its micro-batches, as the Trainer logs it
            part = loss.detach().float()
            self._warmup_step_loss = part if self._warmup_step_loss is None else self._warmup_step_loss + part
        if self.accelerator.sync_gradients:
            reduce = None
            if self.accelerator.num_processes > 1:  # the derivatives of the whole step's batch, before squaring
                device = self.args.device

                def reduce(d):
                    return self.accelerator.reduce(d.to(device), reduction="mean").to(d.device)
            if self._importance.end_step(reduce):  # (the derivatives were reduced first: every rank agrees)
                self._note_finite()
            else:
                self._note_nonfinite(step, "the dense warm-up's gate derivatives")
            if self._warmup_step_loss is not None:
                self._record_warmup_loss(step, self._warmup_step_loss)
                self._warmup_step_loss = None
            if not self.in_importance_warmup(step + 1):
                if self._warmup_goes_on(step + 1):
                    self._sparse_state["warmup_extension_steps"] = self.warmup_extension() + 1
                else:
                    self._informed_start(step + 1)
        return loss

    def _warmup_loss_read(self, step: int) -> bool:
        """Whether this warm-up step's loss enters the levels: the first window's steps and those of the window
        before each decision (the planned end, then every extended step); the steps between are never read, so
        they are not collected (nor all-reduced)."""
        window = self.warmup_loss_window()
        return bool(window) and (step < window or step >= self.importance_warmup_steps() - window)

    def _record_warmup_loss(self, step: int, loss: torch.Tensor) -> None:
        """The step's loss, averaged over the ranks first: every rank holds the same levels (and the checkpoint
        the main process writes holds every rank's), so all decide alike, also after a resume."""
        if self.accelerator.num_processes > 1:
            loss = self.accelerator.reduce(loss.to(self.args.device), reduction="mean")
        if self._warmup_loss is None:  # (20 steps a window of the defaults' 125-step warm-up in a 250-step run)
            self._warmup_loss = WarmupLoss(self.warmup_loss_window(), start_step=step)
        value = float(loss)
        if math.isfinite(value):  # an overflowing step is left out of the levels (trainer_faults handles it)
            self._warmup_loss.add(value)

    def _warmup_goes_on(self, step: int) -> bool:
        """At the end of the planned warm-up, and after each step it was extended by: True while the training loss
        is still at its starting level (warmup_loss_drop) and the extension may go on (warmup_extend_until)."""
        a = self.args
        levels = self._warmup_loss
        # levels read from the run's first step only: a resume from a checkpoint written without them (before
        # they existed) has no starting level, and its latest steps would pass for one
        if not self.warmup_loss_window() or levels is None or levels.start_step != 0 or not levels.full():
            return False
        start, now = levels.levels()
        at_start = still_at_start(start, now, a.warmup_loss_drop)
        latest = self.latest_warmup_step()
        if step >= latest:
            if at_start:
                logger.warning(
                    f"SparseTrainer: the training loss is still at its starting level at step {step} ({now:.4g}, "
                    f"started at {start:.4g}), where the warm-up may last at the longest (warmup_extend_until="
                    f"{a.warmup_extend_until}, fix_masks_at={a.fix_masks_at}); the mask is read now, before the task is "
                    "learned. Train for more steps or with a higher learning rate, raise --warmup_extend_until, or "
                    "set --warmup_loss_drop 0 to read it at importance_warmup without this check"
                )
            return False
        if at_start and not self.warmup_extension():
            logger.warning(
                f"SparseTrainer: at step {step}, the end of the planned warm-up, the training loss is still at its "
                f"starting level ({now:.4g} over the last {levels.window} steps, {start:.4g} over the first; "
                f"warmup_loss_drop={a.warmup_loss_drop} asks for {(1 - a.warmup_loss_drop) * start:.4g}): the dense "
                f"warm-up goes on until it falls, at most to step {latest}, and the fixing moves with it"
            )
        elif not at_start and self.warmup_extension():
            logger.info(f"SparseTrainer: the training loss left its starting level ({now:.4g} against {start:.4g}); "
                        f"the warm-up ends at step {step}, {self.warmup_extension()} steps after the planned end")
        return at_start

    @torch.no_grad()
    def _informed_start(self, step: int) -> None:
        """Scores from the accumulated importance (identical on every rank: each step's derivatives were averaged
        over the ranks before they were squared), projected onto the step's budget."""
        if self._nonfinite_run or self._importance.steps == 0:
            # non-finite up to the last warm-up step: NaN weights never recover, and the mask would be fixed from
            # an importance that ranks nothing (one overflowing step earlier on is only left out)
            self._raise_diverged(step, f"{self._importance.nonfinite_steps} of the "
                                       f"{self._importance.nonfinite_steps + self._importance.steps} warm-up steps")
        importance = self._importance.flat().to(torch.float32)
        # uniform_layers ranks within each group whatever importance_ranking says (a global ranking empties layers)
        within = self.args.importance_ranking == "group" or self.sparse_config.uniform_layers
        sizes = [g.num_units for g in self.structure] if within else None
        scores = scores_from_importance(importance.to(self.structure.device), self._costs, self.budget_at(step),
                                        band=self.args.importance_band, group_sizes=sizes,
                                        explore=self.args.importance_explore)
        self.structure.set_scores(scores)
        if self._search_steps:
            self._forward_search(importance.to(self.structure.device), step)  # (trainer_forward_search.py)
            logger.info(f"SparseTrainer: informed start after {self._importance.steps} dense steps, then the "
                        f"forward-only search above chose the mask")
            return
        logger.info(
            f"SparseTrainer: informed start after {self._importance.steps} dense steps: "
            f"{float((scores >= 1).float().mean()):.1%} of units start kept, {float((scores <= 0).float().mean()):.1%} "
            f"dropped, the rest uncertain"
        )

