"""`ForwardSearchMixin`: `forward_search_steps` steps of `prune_model`'s forward-only VR-PGE search at the end of the
dense warm-up, on the weights of that moment, choosing the mask the trainer then uses (issue 22's lever).

Why here and not during training: two causes made the training-time search lose accuracy (docs/structure_tasks.md):
the weights trained on sampled masks, and a noisy estimate of a moving objective. Frozen weights give the search a
fixed objective, and the weights never see a sampled mask.
"""

from __future__ import annotations

import logging
import math

import torch

from .forward_importance import spread_scores
from .prune import heap_release, search_scores

logger = logging.getLogger("hf_sparse.trainer")

SAMPLES, LEARNING_RATE, TEMPERATURE, MARGIN = 4, 0.02, 3.0, 0.02  # prune_model's defaults (docs/prune.md)


class ForwardSearchMixin:
    @torch.no_grad()
    def _forward_search(self, importance: torch.Tensor, step: int) -> None:
        """Scores spread from `importance`, then the forward-only search over fresh training batches; every rank
        draws the same masks and averages its losses with the others', so the scores stay identical."""
        steps = int(self.args.forward_search_steps)
        structure, costs = self.structure, self._costs
        budget = self.budget_at(step)
        scores = spread_scores(importance, costs.cpu(), budget, structure.sizes, margin=MARGIN,
                               temperature=TEMPERATURE).to(structure.device)
        structure.set_scores(scores)
        model = self.model_wrapped if getattr(self, "model_wrapped", None) is not None else self.model
        was_training = model.training
        model.eval()

        def loss_fn(m, batch):
            return self._plain_loss(m, self._prepare_inputs(batch))

        reduce = None
        if self.accelerator.num_processes > 1:
            def reduce(t):
                return self.accelerator.reduce(t.to(self.args.device), reduction="mean").to(t.device)

        param = torch.nn.Parameter(scores.clone())
        optimizer = torch.optim.Adam([param], lr=LEARNING_RATE, betas=(0.5, 0.999))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / max(steps, 1))))
        try:
            log = search_scores(model, structure, _endless(self.get_train_dataloader()), costs, budget, steps, SAMPLES,
                          MARGIN, 0.0, self.args.seed, loss_fn, max(1, steps // 5), None,
                          heap_release(structure.device), param, optimizer, schedule, reduce=reduce)
        finally:
            model.train(was_training)
        share = self._forward_share(structure.topk_mask(costs, budget))
        self._sparse_state["flops_ratio_sum"] += steps * SAMPLES * share / 3.0  # forwards only: 1/3 of a step
        self._sparse_state["forward_search_steps"] = self._sparse_state.get("forward_search_steps", 0) + steps
        if log:
            logger.info("SparseTrainer: forward-only search of %d steps at step %d: sampled loss %.4f -> %.4f, "
                        "mask entropy %.3f", steps, step, log[0]["loss"], log[-1]["loss"], log[-1]["mask_entropy"])

    def _plain_loss(self, model, inputs):
        """The base trainer's loss of a batch (no distillation term, no mask-group scaling)."""
        from transformers import Trainer

        return Trainer.compute_loss(self, model, inputs)


def _endless(loader):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("forward_search_steps: the training dataloader is empty")
