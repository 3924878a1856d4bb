"""The pruning baselines the study compares hf_sparse with: the random baseline's mask (`random_units_mask`) and
the two gradual pruning trainers, magnitude and movement pruning of units (`baseline_trainers()`). Both trainers
are `SparseTrainer` subclasses that choose the masks themselves (set with `structure.set_masks`) and train the
weights with `SparseTrainer.weight_step`: one forward and backward on those masks, no structure update.

The trainers are built by a function because importing the Trainer costs seconds. From another benchmark script
(benchmarks/structure_tasks.py does this), with the benchmarks folder on sys.path:

    from study.baselines import baseline_trainers, random_units_mask

    MagnitudePruningTrainer, MovementPruningTrainer = baseline_trainers()
    trainer = MagnitudePruningTrainer(model=model, args=args, mask_every=1, ...)  # model sparsified, compute="gather"
    trainer = MovementPruningTrainer(model=model, args=args, score_lr=1e-2, ...)  # model sparsified, compute="mask"
    structure.set_masks(random_units_mask(structure, sparsity, seed))

`args` is a `SparseTrainingArguments` (its budget_schedule_start / end and fix_masks_at are the pruning schedule).
"""

from __future__ import annotations

import torch


def baseline_trainers():
    """Built lazily: importing the Trainer costs seconds."""
    from hf_sparse import SparseTrainer, topk_mask, unit_magnitudes

    class MagnitudePruningTrainer(SparseTrainer):
        """Gradual magnitude pruning of units: top-K of the per-unit L2 norms filling the cubic budget, one forward
        and one backward on the kept units per step (no structure estimator); the last mask is fixed at fix_masks_at."""

        def __init__(self, *args, mask_every: int = 1, **kwargs):
            super().__init__(*args, **kwargs)
            self.mask_every = max(1, int(mask_every))
            self._magnitude_mask: torch.Tensor | None = None
            self._frozen = False

        def _magnitude_topk(self, budget: float) -> torch.Tensor:
            return topk_mask(unit_magnitudes(self.model, self.structure), self._costs, budget)

        def topk_mask(self) -> torch.Tensor:  # evaluation, logs and the fixed phase use the magnitude mask
            return self._magnitude_mask if self._magnitude_mask is not None else super().topk_mask()

        def _structure_learned(self) -> bool:  # the magnitudes are the structure; the scores never move
            return self._magnitude_mask is not None

        def training_step(self, model, inputs, num_items_in_batch=None):
            step = self.state.global_step
            if self.is_fixed(step):
                if not self._frozen:  # the last mask, at the target budget exactly
                    self._magnitude_mask = self._magnitude_topk(self._target_budget)
                    self._frozen = True
                return super().training_step(model, inputs, num_items_in_batch)
            if self._magnitude_mask is None or step % self.mask_every == 0:
                self._magnitude_mask = self._magnitude_topk(self.budget_at(step))
            self.structure.set_masks(self._magnitude_mask)
            self._record_flops(self._forward_share(self._magnitude_mask) * 3.0)
            # the plain Trainer step: one forward and one backward, no structure update
            return self.weight_step(model, inputs, num_items_in_batch)

    class MovementPruningTrainer(SparseTrainer):
        """Movement pruning of units with straight-through scores (the model is sparsified with compute="mask"):
        hard = global top-K of the scores filling the cubic budget, mask = hard + s - s.detach(); the scores are an
        AdamW group of their own (no weight decay); after fix_masks_at the hard mask is fixed."""

        def __init__(self, *args, score_lr: float = 1e-2, **kwargs):
            super().__init__(*args, **kwargs)
            self.score_lr = score_lr
            gen = torch.Generator().manual_seed(int(self.args.seed))
            self._ste_scores: list[torch.Tensor] = []
            for g in self.structure:
                if g.compute != "mask":
                    raise ValueError("MovementPruningTrainer needs a model sparsified with compute='mask'")
                # tiny random scores: ties between equal scores break at random, not by unit index
                s = (1e-3 * torch.rand(g.num_units, generator=gen)).to(g.mask.device).requires_grad_(True)
                self._ste_scores.append(s)
                g._ste_scores, g._ste_hard, g._ste_frozen = s, torch.ones_like(g.mask), False

                def expanded(width, segments=1, g=g):
                    m = g._ste_hard if g._ste_frozen else g._ste_hard + g._ste_scores - g._ste_scores.detach()
                    m = m.repeat_interleave(width) if width > 1 else m
                    return m.repeat(segments) if segments > 1 else m

                g.expanded_mask = expanded
            self._frozen = False

        def _flat_scores(self) -> torch.Tensor:
            return torch.cat([s.detach().reshape(-1) for s in self._ste_scores])

        def _apply_hard(self, hard: torch.Tensor, frozen: bool = False) -> None:
            self.structure.set_masks(hard)
            for g, h in zip(self.structure, self.structure.split(hard.to(self.structure.device))):
                g._ste_hard = h.clone()
                g._ste_frozen = frozen
                g.all_kept = False  # always multiply: the scores get their gradient even while all units are kept

        def topk_mask(self) -> torch.Tensor:
            if self._frozen:
                return self.structure.masks().clone()
            return topk_mask(self._flat_scores(), self._costs, self._target_budget)

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if not any(p is self._ste_scores[0] for group in optimizer.param_groups for p in group["params"]):
                optimizer.add_param_group({"params": self._ste_scores, "lr": self.score_lr, "weight_decay": 0.0})
            return optimizer

        def training_step(self, model, inputs, num_items_in_batch=None):
            step = self.state.global_step
            for s in self._ste_scores:  # not model parameters: model.zero_grad() does not reach them
                s.grad = None
            if self.is_fixed(step):
                if not self._frozen:
                    self._apply_hard(topk_mask(self._flat_scores(), self._costs, self._target_budget), frozen=True)
                    self._frozen = True
                    for s in self._ste_scores:
                        s.requires_grad_(False)
            else:
                self._apply_hard(topk_mask(self._flat_scores(), self._costs, self.budget_at(step)))
            self._record_flops(3.0)  # dense compute, dense backward
            return self.weight_step(model, inputs, num_items_in_batch)

        def _set_eval_mask(self):  # evaluation: the hard top-K mask at the target (the STE term is exactly 0)
            self._apply_hard(self.topk_mask(), frozen=self._frozen)
            self._step_mask_step = -1

    return MagnitudePruningTrainer, MovementPruningTrainer


def random_units_mask(structure, sparsity: float, seed: int) -> torch.Tensor:
    """The random baseline's mask: units in a seeded random order, kept while they fit the parameter budget."""
    from hf_sparse import topk_mask

    costs = structure.costs("params")
    gen = torch.Generator().manual_seed(10_000 + seed)
    return topk_mask(torch.rand(structure.num_units, generator=gen), costs, (1.0 - sparsity) * float(costs.double().sum()))
