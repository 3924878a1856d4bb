"""`ImportanceMixin`: the informed start of `SparseTrainer` (`importance_warmup`): dense steps whose backward also
records each unit's Taylor gate derivative (`hf_sparse.importance`), then the keep probabilities started from the
accumulated importance, projected onto the budget."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .importance import TaylorImportance, scores_from_importance

logger = logging.get_logger("hf_sparse.trainer")


class ImportanceMixin:
    def _init_importance(self, model: nn.Module, args) -> None:
        """The state this part owns: the importance accumulator, when the run has an informed start."""
        self._importance: TaylorImportance | None = None
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
            if not self.in_importance_warmup(step + 1):
                self._informed_start(step + 1)
        return loss

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

