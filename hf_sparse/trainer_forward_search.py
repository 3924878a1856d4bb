"""`ForwardSearchMixin`: `forward_search_steps` steps of a forward-only VR-PGE search at the end of the dense warm-up,
on the weights of that moment, choosing the mask the trainer then uses: by default the allocation search
(`hf_sparse/allocation.py`: each layer's share of the budget), or `prune_model`'s search per unit.

Why here and not during training: two causes made the training-time search lose accuracy (docs/structure_tasks.md):
the weights trained on sampled masks, and a noisy estimate of a moving objective. Frozen weights give the search a
fixed objective, and the weights never see a sampled mask.
"""

from __future__ import annotations

import logging

import torch

from .allocation import GroupAllocation, kept_shares, search_allocation
from .forward_importance import spread_logits, spread_scores
from .prune import LEARNING_RATE, MARGIN, SAMPLES, TEMPERATURE, heap_release, search_scores
from .prune_data import endless

logger = logging.getLogger("hf_sparse.trainer")

# Adam on the group offsets (logit units; the within-group logits spread over about +-6): "allocation" (the
# default) 16 steps at 0.2, "allocation_sampled" 50 steps at 0.05 (docs/structure_tasks.md)
ALLOCATION_LR = {"allocation": 0.2, "allocation_sampled": 0.05}
ALLOCATION_SIGMA = 1.0  # std of the shares policy's offset perturbations: about 13% of a group's units


class ForwardSearchMixin:
    def _planned_forward_search_steps(self) -> int:
        """The search steps this run will take (at construction): the arguments' (16 by default), or 0 where there
        is nothing to choose -- a sparsity whose budget no keep probability in [margin, 1 - margin] can meet (0.0,
        a dense control, or >= 0.98), or an allocation with a single share (one group, or one kind with
        uniform_layers) -- with a warning instead of a failure at the end of the warm-up."""
        steps = int(self.args.forward_search_steps or 0)
        if not steps:
            return 0
        sparsity = float(self.sparse_config.sparsity)
        if not MARGIN < sparsity < 1.0 - MARGIN:
            logger.warning("SparseTrainer: no forward-only search at sparsity %g: it keeps every probability in "
                           "[%g, %g], which cannot meet that budget; the Taylor mask is fixed instead "
                           "(forward_search_steps=0 says so without this warning)", sparsity, MARGIN, 1 - MARGIN)
            return 0
        shared = self._allocation_shared()
        offsets = len(set(shared)) if shared is not None else len(self.structure.groups)
        if self.args.forward_search.startswith("allocation") and offsets < 2:
            logger.warning("SparseTrainer: no forward-only allocation search: the model has a single share of the "
                           "budget to learn (one group, or one kind with uniform_layers); the Taylor mask is fixed "
                           "instead (forward_search_steps=0 says so without this warning)")
            return 0
        return steps

    def _allocation_shared(self) -> list[int] | None:
        """Which offset each group uses (None: one each): one per kind with uniform_layers (every layer keeps the
        same count, so only the split between heads and neurons is learned)."""
        if not self.sparse_config.uniform_layers:
            return None
        kinds = list(dict.fromkeys(g.kind for g in self.structure.groups))
        return [kinds.index(g.kind) for g in self.structure.groups]

    @torch.no_grad()
    def _forward_search(self, importance: torch.Tensor, step: int) -> None:
        """Scores spread from `importance`, then the forward-only search over fresh training batches; every rank
        draws the same masks and averages its losses with the others', so the scores stay identical."""
        steps = self._search_steps
        structure, costs = self.structure, self._costs
        budget = self.budget_at(step)
        model = self.model_wrapped if getattr(self, "model_wrapped", None) is not None else self.model
        was_training = model.training
        model.eval()

        def loss_fn(m, batch):
            return self._plain_loss(m, self._prepare_inputs(batch))

        if self.args.forward_search_objective == "hidden":
            loss_fn = self._hidden_match_loss()

        reduce = None
        if self.accelerator.num_processes > 1:
            def reduce(t):
                return self.accelerator.reduce(t.to(self.args.device), reduction="mean").to(t.device)

        lr = self.args.forward_search_lr or None
        try:
            if self.args.forward_search.startswith("allocation"):
                log = self._allocation_search(model, importance, budget, steps, lr, loss_fn, reduce)
            else:
                scores = spread_scores(importance, costs.cpu(), budget, structure.sizes, margin=MARGIN,
                                       temperature=TEMPERATURE).to(structure.device)
                structure.set_scores(scores)
                log = search_scores(model, structure, endless(self.get_train_dataloader()), costs, budget,
                                    steps=steps, seed=self.args.seed, loss_fn=loss_fn, log_every=max(1, steps // 5),
                                    reduce=reduce, learning_rate=lr or LEARNING_RATE)
        finally:
            model.train(was_training)
        share = self._forward_share(self.topk_mask())  # the mask the search hands on (uniform_layers too)
        self._sparse_state["flops_ratio_sum"] += steps * SAMPLES * share / 3.0  # forwards only: 1/3 of a step
        if self.args.forward_search_objective == "hidden":
            self._sparse_state["flops_ratio_sum"] += steps / 3.0  # the dense forward of each batch's target
        self._sparse_state["forward_search_steps"] = self._sparse_state.get("forward_search_steps", 0) + steps
        if log:
            self._log_forward_search(log, steps, step)

    def _log_forward_search(self, log: list[dict], steps: int, step: int) -> None:
        """The search's record, in the log and in the next training log's metrics (what a run shows in its
        TensorBoard / W&B): the masks' loss and its spread within a step, the entropy and share at the margins of
        the keep probabilities, the share of the budget the allocation moved between groups, and the share of
        each group's cost the fixed mask keeps (by kind and layer)."""
        first, last = log[0], log[-1]
        logger.info("SparseTrainer: forward-only search (%s) of %d steps at step %d: sampled loss %.4f -> %.4f, "
                    "loss difference between masks %.4f -> %.4f, mask entropy %.3f, share at the margins %.3f",
                    self.args.forward_search, steps, step, first["loss"], last["loss"], first["loss_difference"],
                    last["loss_difference"], last["mask_entropy"], last["share_at_bounds"])
        metrics = {"search_loss_start": first["loss"], "search_loss_end": last["loss"],
                   "search_loss_difference": last["loss_difference"], "search_mask_entropy": last["mask_entropy"],
                   "search_share_at_bounds": last["share_at_bounds"]}
        if "budget_moved" in last:  # the allocation search's
            metrics["search_budget_moved"] = last["budget_moved"]
        for share in kept_shares(self.structure, self._costs, self.topk_mask()):
            metrics[f"kept_{share['kind']}_{share['layer']}"] = share["kept"]
        for name, value in metrics.items():
            self._add_metric(f"sparse/{name}", value)

    def _allocation_search(self, model, importance, budget, steps, lr, loss_fn, reduce):
        structure = self.structure
        z = spread_logits(importance, self._costs.cpu(), structure.sizes, TEMPERATURE)
        allocation = GroupAllocation(z, self._costs.cpu(), structure.sizes, budget, MARGIN,
                                     shared=self._allocation_shared())
        uniform = self.sparse_config.uniform_layers

        def mask_of(scores):
            structure.set_scores(scores.to(structure.device))
            return structure.topk_mask(self._costs, budget, uniform=uniform)

        start = allocation.kept_shares(structure, mask_of(allocation.ranking_scores().float()))  # offsets all 0

        policy = "sampled" if self.args.forward_search == "allocation_sampled" else "shares"
        log = search_allocation(structure, allocation, endless(self.get_train_dataloader()),
                                lambda batch: float(loss_fn(model, batch)), steps=steps, num_samples=SAMPLES,
                                learning_rate=lr or ALLOCATION_LR[self.args.forward_search], seed=self.args.seed,
                                log_every=max(1, steps // 5), reduce=reduce,
                                after_forward=heap_release(structure.device), policy=policy, mask_of=mask_of,
                                sigma=ALLOCATION_SIGMA)
        final = allocation.kept_shares(structure, self.topk_mask())  # (the masks keep it: kept_counts, the card)
        # the share of the budget the search moved between groups, against the top-K of the importance alone
        cost = [float(c.double().sum()) for c in torch.split(self._costs.cpu(), structure.sizes)]
        gained = sum(max(0.0, (b["kept"] - a["kept"]) * c) for a, b, c in zip(start, final, cost))
        log[-1]["budget_moved"] = gained / max(sum(b["kept"] * c for b, c in zip(final, cost)), 1e-12)
        logger.info("SparseTrainer: allocation search: kept share per group (the importance's top-K -> the searched "
                    "top-K; %.1f%% of the budget moved): %s", 100 * log[-1]["budget_moved"],
                    ", ".join(f"{a['kind']}{a['layer']} {a['kept']:.2f}->{b['kept']:.2f}" for a, b in zip(start, final)))
        return log

    def _hidden_match_loss(self):
        """The search's objective "hidden": how far a masked forward moves the last hidden states from the dense
        model's on the same batch (squared error over the real tokens, relative to their squared norm). Task-free:
        early in a run the task loss is still near chance and cannot tell units apart, the dense function can."""
        structure, held = self.structure, {}

        def last_hidden(m, inputs):
            out = m(**{k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")},
                    output_hidden_states=True, return_dict=True)
            hidden = out.get("hidden_states") or out.get("decoder_hidden_states")
            if not hidden:
                raise ValueError(f"forward_search_objective='hidden': {type(m).__name__} returned no hidden states "
                                 "with output_hidden_states=True; use forward_search_objective='loss'")
            return hidden[-1].float()

        def loss_fn(m, batch):
            inputs = self._prepare_inputs(batch)
            if held.get("batch") is not batch:  # one dense forward per batch, shared by its sampled masks
                masks = structure.masks().clone()
                structure.set_masks(torch.ones_like(masks))
                held.update(batch=batch, target=last_hidden(m, inputs))
                structure.set_masks(masks)
            target = held["target"]
            keep = inputs.get("attention_mask")
            if keep is None or tuple(keep.shape) != tuple(target.shape[:2]):  # no 2-D padding mask: every token
                keep = torch.ones(target.shape[:2], device=target.device)
            keep = keep.float()
            err = ((last_hidden(m, inputs) - target).pow(2).sum(-1) * keep).sum()
            return err / (target.pow(2).sum(-1) * keep).sum().clamp(min=1e-12)

        return loss_fn

    def _plain_loss(self, model, inputs):
        """`transformers.Trainer`'s loss of a batch: no distillation term, no mask-group scaling, and none of a
        subclass's per-forward bookkeeping (TRL's SFTTrainer counts tokens and metrics in its compute_loss)."""
        from transformers import Trainer

        return Trainer.compute_loss(self, model, inputs)

