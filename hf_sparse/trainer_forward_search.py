"""`ForwardSearchMixin`: `forward_search_steps` steps of `prune_model`'s forward-only VR-PGE search at the end of the
dense warm-up, on the weights of that moment, choosing the mask the trainer then uses (issue 22's lever).

Why here and not during training: two causes made the training-time search lose accuracy (docs/structure_tasks.md):
the weights trained on sampled masks, and a noisy estimate of a moving objective. Frozen weights give the search a
fixed objective, and the weights never see a sampled mask.
"""

from __future__ import annotations

import logging

import torch

from .forward_importance import spread_scores
from .prune import MARGIN, SAMPLES, TEMPERATURE, search_scores
from .prune_data import endless

logger = logging.getLogger("hf_sparse.trainer")


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

        try:
            log = search_scores(model, structure, endless(self.get_train_dataloader()), costs, budget, steps=steps,
                                seed=self.args.seed, loss_fn=loss_fn, log_every=max(1, steps // 5), reduce=reduce)
        finally:
            model.train(was_training)
        share = self._forward_share(self.topk_mask())  # the mask the search hands on (uniform_layers too)
        self._sparse_state["flops_ratio_sum"] += steps * SAMPLES * share / 3.0  # forwards only: 1/3 of a step
        self._sparse_state["forward_search_steps"] = self._sparse_state.get("forward_search_steps", 0) + steps
        if log:
            logger.info("SparseTrainer: forward-only search of %d steps at step %d: sampled loss %.4f -> %.4f, "
                        "mask entropy %.3f", steps, step, log[0]["loss"], log[-1]["loss"], log[-1]["mask_entropy"])

    def _plain_loss(self, model, inputs):
        """`transformers.Trainer`'s loss of a batch: no distillation term, no mask-group scaling, and none of a
        subclass's per-forward bookkeeping (TRL's SFTTrainer counts tokens and metrics in its compute_loss)."""
        from transformers import Trainer

        return Trainer.compute_loss(self, model, inputs)

