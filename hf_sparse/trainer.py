"""SparseTrainer: the Trainer's AdamW weight update plus the VR-PGE structure update (docs/method.md §2).

One optimizer step, with masks drawn once per step from (seed, step, sample) so that every rank agrees:
  micro-batch i:  mask m1 -> forward + backward (weights);  mask m2.. -> no-grad forward(s), same dropout bits
  last micro-batch: losses averaged over micro-batches, all-reduced (mean) across ranks in float32
                    -> estimator -> Adam on s -> projection onto the scheduled budget
  then the Trainer steps AdamW on the weights as usual.
After `fix_masks_at`, the top-K mask is fixed and a step is a plain forward and backward on the kept units.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from .backends import EnginesMixin, refuse_presharded
from .base_counters import uncounted
from .batches import count_items, split_batch
from .budget import check_keeps_a_unit, project_to_budget
from .config import SparseConfig
from .distill import Distiller, check_teacher, distiller_from_args, frozen_copy
from .dropped import FrozenUnits
from .estimator import disarm_gradient, pool_by_group, vrpge_gradient
from .model_state import STRUCTURE_RUN_ATTR
from .patching import get_sparse_config, is_sparsified, sparsify_model, unsparsify_model
from .precision import upcast_heads
from .shared_dropout import SharedDropout, rng_state, set_rng_state
from .structure import SparseStructure, sample_masks
from .trainer_checkpoint import CheckpointMixin
from .trainer_faults import NONFINITE_UPDATES_TO_STOP, FaultsMixin
from .trainer_forward_search import ForwardSearchMixin
from .trainer_importance import ImportanceMixin
from .trainer_metrics import MetricsMixin
from .trainer_schedule import ScheduleMixin
from .training_args import SparseTrainingArguments, as_sparse_args

logger = logging.get_logger(__name__)


class SparseTrainingMixin(ScheduleMixin, FaultsMixin, ImportanceMixin, ForwardSearchMixin, CheckpointMixin, MetricsMixin, EnginesMixin):
    """The structure learning of `SparseTrainer`, before any `Trainer` subclass in the bases (`sparse_trainer_class`);
    its args: the base's config class plus the structure options (`sparse_args_class`)."""

    sparse_args_class: type = SparseTrainingArguments  # set per base trainer by sparse_trainer_class

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        sparse_config: SparseConfig | None = None,
        teacher_model: nn.Module | None = None,
        **kwargs: Any,
    ):
        name = type(self).__name__
        if model is None:
            raise ValueError(f"{name} needs a model (model_init is not supported: the structure lives in the model)")
        if isinstance(model, str):
            raise ValueError(
                f"{name} needs the model loaded (e.g. AutoModelForCausalLM.from_pretrained({model!r})): its layers are "
                "patched for structure learning before the trainer is built"
            )
        args = as_sparse_args(args, type(self).sparse_args_class)
        peft_config = kwargs.pop("peft_config", None)
        if peft_config is not None:  # TRL's way: LoRA first, then the sparse layers (the supported order)
            if is_sparsified(model):
                raise ValueError(f"{name}: peft_config with an already sparsified model; pass the plain model (LoRA goes "
                                 "on first, then the sparse layers) or apply get_peft_model before sparsify_model")
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        patched_here = not is_sparsified(model)
        if patched_here:
            sparsify_model(model, sparse_config if sparse_config is not None else SparseConfig())
        elif sparse_config is not None and sparse_config.to_dict() != get_sparse_config(model).to_dict():
            warnings.warn(f"{name}: the model is already sparsified; its own SparseConfig is used, not sparse_config")
        try:
            self._init_structure(model, args, teacher_model, kwargs)
        except BaseException:
            if patched_here:  # a refused trainer leaves the model as it was given
                unsparsify_model(model)
            raise

    def _init_structure(self, model: nn.Module, args, teacher_model, kwargs: dict) -> None:
        self.sparse_config = get_sparse_config(model)
        self.structure = SparseStructure(model)
        self._costs = self.structure.costs(self.sparse_config.budget)
        check_keeps_a_unit(self._costs, self.sparse_config.sparsity)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and args.world_size == 1:
            raise ValueError(
                f"{world} processes were launched but the Trainer would train each alone (TrainingArguments.parallel_mode="
                f"{args.parallel_mode}); on a machine without GPUs pass use_cpu=True (--use_cpu) so they form one "
                "data-parallel group over gloo"
            )
        check_teacher(args, teacher_model)
        refuse_presharded(model, args)
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False  # every weight is in the graph (gathered or masked)
        super().__init__(model=model, args=args, **kwargs)

        self._total_budget = float(self._costs.double().sum())
        self._target_budget = (1.0 - self.sparse_config.sparsity) * self._total_budget
        # A model whose mask was frozen by `fix_masks` (e.g. reloaded to train on) stays on that mask.
        self._fixed_from_start = all(bool(g.fixed) for g in self.structure)
        # how that mask was chosen, if it was recorded (prune_model's record), for the card of the recovery run
        self._mask_from = getattr(model, STRUCTURE_RUN_ATTR, None) if self._fixed_from_start else None
        self._initial_mask = self.structure.masks().clone()
        self._topk_cache: tuple | None = None
        self.structure_optimizer: torch.optim.Optimizer | None = None
        self._pending_structure_state: str | None = None
        self._reset_step_accumulators()
        self._init_metrics(model)
        self._note_finite()  # no run of non-finite losses yet (trainer_faults)
        self._loss_scale = 1.0
        self._init_importance(model, args)
        self._search_steps = 0 if self._fixed_from_start else self._planned_forward_search_steps()
        # units not computed in a step keep their weights and optimizer state (attached in create_optimizer)
        self._frozen_units = FrozenUnits(model, self.structure)
        self._dropout = SharedDropout(model)
        upcast_heads(model)
        self._distiller: Distiller | None = distiller_from_args(args, teacher_model)

    def topk_mask(self) -> torch.Tensor:
        """The deterministic mask: top-K scores filling the target budget (or the mask frozen before training)."""
        if self._fixed_from_start:
            return self._initial_mask
        # cached while the scores do not change (the whole fixed phase, and logs between updates): one call
        # sorts every unit (28 ms for a 7B-shaped model on one CPU thread, benchmarks/topk_cost.py)
        key = tuple((id(g.scores), g.scores._version) for g in self.structure)
        if self._topk_cache is None or self._topk_cache[0] != key:
            uniform = self.sparse_config.uniform_layers  # the same count of each kind in every layer
            self._topk_cache = (key, self.structure.topk_mask(self._costs, self._target_budget, uniform=uniform))
        return self._topk_cache[1]

    def _computed_units(self) -> torch.Tensor:
        """The units whose weights get a gradient in the current step (the others must not move)."""
        keep = self._frozen_units.keep
        return torch.ones(self.structure.num_units) if keep is None else keep

    def _structure_learned(self) -> bool:
        """False while every score is still equal: no structure has been learned (or informed) yet."""
        return self._fixed_from_start or not self.structure.scores_tied()

    # --- the step -------------------------------------------------------------------------------------
    def _reset_step_accumulators(self):
        self._step_masks: torch.Tensor | None = None
        self._step_mask_step = -1
        self._step_losses: torch.Tensor | None = None
        self._warmup_step_loss = None  # the dense warm-up's loss of the step in progress (its micro-batches)

    def _create_structure_optimizer(self):
        params = [g.scores for g in self.structure]
        self.structure_optimizer = torch.optim.Adam(
            params, lr=self.args.structure_learning_rate,
            betas=(self.args.structure_adam_beta1, self.args.structure_adam_beta2), weight_decay=0.0,
        )
        if self._pending_structure_state is not None:
            self._load_structure_state(self._pending_structure_state)
            self._pending_structure_state = None

    def _check_run(self) -> None:
        """Refuse, before the first step, settings that would train silently wrong."""
        self._check_backend()
        a = self.args
        if self._importance is not None and self._fraction_step(a.importance_warmup) == 0:
            logger.info(f"SparseTrainer: importance_warmup={a.importance_warmup} of {self.state.max_steps} steps rounds "
                        "to 0 steps; the informed start warms up for 1 step")

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        inner = optimizer
        while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
            inner = inner.optimizer  # AcceleratedOptimizer and similar wrappers
        # Under DeepSpeed the torch optimizer steps DeepSpeed's own flat fp32 partitions and DeepSpeed copies them
        # back over the weights afterwards: slices of the model's parameters mean nothing to it. Such runs have no
        # search phase (refused in _check_backend), and in the fixed phase units never computed again may drift.
        if isinstance(inner, torch.optim.Optimizer) and not self.is_deepspeed_enabled:
            self._frozen_units.attach(inner)
        return optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if self._distiller is not None:
            self._distiller.forget()  # a new micro-batch: its teacher outputs are computed once, on first use
        if self.structure_optimizer is None:
            self._check_run()
            self._create_structure_optimizer()
        step = self.state.global_step
        if (self._distiller is not None and self._distiller.teacher is None and self.args.distill_from == "warmup"
                and not self.in_importance_warmup(step)):
            # the dense weights after the last warm-up update, frozen: the teacher from here on
            self._distiller.teacher = frozen_copy(self.accelerator.unwrap_model(self.model))
        if self.is_fixed(step):
            if self._step_mask_step != step:  # the fixed top-K mask; scores no longer move
                if not self._structure_learned():
                    if self._nonfinite_since is not None:
                        self._raise_diverged(step, f"{self._sparse_state['skipped_updates']} structure updates skipped")
                    raise ValueError(
                        f"fix_masks_at={self.args.fix_masks_at} fixes the mask at step {step}, but every score is "
                        "still equal (nothing learned yet), so the mask would be chosen by ties. Set fix_masks_at "
                        "after the search (e.g. --fix_masks_at 0.8), start from an informed guess "
                        "(importance_warmup, or SparseConfig(score_init='magnitude')), check "
                        "structure_learning_rate, or fix a mask yourself with hf_sparse.fix_masks first"
                    )
                mask = self.topk_mask()
                self.structure.set_masks(mask)
                for g in self.structure:
                    g.fixed.fill_(True)
                self._frozen_units.keep = mask.clone()
                self._record_teacher_flops()
                settled = self._frozen_units.settled
                if not self.is_deepspeed_enabled and (settled is None or not torch.equal(settled, mask)):
                    self._frozen_units.settle(mask)  # (ZeRO-3's parameters are empty placeholders between steps)
                self._step_mask_step = step
                self._record_flops(self._forward_share(self.structure.masks()) * 3.0, kind="fixed")
            return super().training_step(model, inputs, num_items_in_batch)
        if self.in_importance_warmup(step):
            self._frozen_units.keep = None
            return self._importance_step(model, inputs, num_items_in_batch)

        a = self.args
        groups, samples = a.mask_groups, a.mask_samples
        if self._step_mask_step != step:
            # First micro-batch of this optimizer step: draw the masks, identical on every rank. Each chunk of
            # the batch gets its own set (groups x samples): more structure samples for the same FLOPs.
            flat = sample_masks(
                self.structure.scores(), groups * samples, a.seed, step, antithetic=a.estimator == "disarm"
            )
            self._step_masks = flat.view(groups, samples, -1)
            self._step_losses = torch.zeros(groups, samples, dtype=torch.float64)
            self._step_groups_used = torch.zeros(groups, dtype=torch.bool)
            self._frozen_units.keep = torch.zeros(self.structure.num_units, device=self.structure.device)
            self._step_mask_step = step
            shares = [[self._forward_share(m) for m in group] for group in self._step_masks]
            if a.search_weights == "topk":  # every sample forward only; the weights step on the top-K mask
                cost = sum(sum(s) for s in shares) / groups + 3.0 * self._forward_share(self.topk_mask())
            else:
                cost = sum(sum(s) + 2.0 * sum(s[: a.weight_grad_samples]) for s in shares) / groups
            self._record_flops(cost, kind="search")
            self._record_teacher_flops()

        chunks = split_batch(inputs, groups)  # fewer chunks than groups when the batch is smaller
        if len(chunks) == 1:
            shares, chunk_items = [1.0], num_items_in_batch  # exactly the Trainer's own step
        else:
            # Each chunk's mean loss weighted by its share of the items (label tokens, or examples), so the chunks
            # add up to the loss the Trainer's own step would take. num_items_in_batch is not passed on: many
            # models accept it and ignore it (BERT's sequence classification), and summing their chunk means would
            # multiply the loss by mask_groups. When the Trainer counted the items of the whole step (over its
            # micro-batches and, with average_tokens_across_devices, over every rank), the share is taken against
            # that count, scaled as the Trainer scales it, and the Trainer's division by the accumulation steps
            # is undone (the count already spans them).
            counts = [count_items(c, self._shifts_labels()) for c in chunks]
            if num_items_in_batch is not None:
                scale = self.current_gradient_accumulation_steps
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    scale *= self.accelerator.num_processes
                total_items = max(float(num_items_in_batch), 1e-12)
                shares = [c / total_items * scale for c in counts]
            else:
                shares = [c / max(sum(counts), 1e-12) for c in counts]
            chunk_items = None
        topk = self.topk_mask() if a.search_weights == "topk" else None
        self._backprop_samples = 0 if topk is not None else a.weight_grad_samples
        for g in range(len(chunks)):
            self._step_groups_used[g] = True
            computed = topk if topk is not None else self._step_masks[g, : a.weight_grad_samples].amax(0)
            self._frozen_units.keep = torch.maximum(self._frozen_units.keep, computed.to(self._frozen_units.keep.device))
        total = 0.0
        device = self.args.device
        # no-grad forwards first, then the backpropagated ones: every loss of this structure update is taken on
        # the same weights even where backward steps the optimizer (DeepSpeed)
        nb = self._backprop_samples
        order = list(range(nb, samples)) + list(range(nb)) + ([-1] if topk is not None else [])
        for g, chunk in enumerate(chunks):
            share = shares[g]
            base_seed = int(torch.randint(0, 2**62, (1,)))  # this chunk's dropout, from the global stream
            rng = rng_state(device)
            with self._dropout.active(base_seed):
                for k in order:
                    set_rng_state(rng, device)  # common random numbers: every mask's forward starts alike
                    self.structure.set_masks(topk if k < 0 else self._step_masks[g, k])
                    total = total + self._sample_step(model, chunk, chunk_items, g, k, share, len(chunks))
            set_rng_state(rng, device)
        if self.accelerator.sync_gradients:
            self._structure_step()
        return total

    def weight_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """One forward and backward on the masks as they are set now, with no structure update: the plain
        `training_step` of the base trainer. A pruning method that chooses its masks itself (see benchmarks/study) sets them
        with `structure.set_masks` and calls this."""
        return super(SparseTrainingMixin, self).training_step(model, inputs, num_items_in_batch)

    def _sample_step(self, model, chunk, chunk_items, g: int, k: int, share: float, num_chunks: int):
        """One mask's forward (and backward for the first weight_grad_samples masks, or for k = -1: the top-K mask
        of search_weights="topk", whose loss is no sample's); records a sample's loss."""
        if k >= self._backprop_samples:
            with torch.no_grad():
                self._step_losses[g, k] += float(self._forward_loss(model, chunk, chunk_items))
            return 0.0
        # the weight gradient is the mean over the backpropagated masks, summed over the chunks
        scale = share / max(self._backprop_samples, 1)
        self._loss_scale = scale
        sync = contextlib.nullcontext() if g == num_chunks - 1 else self.accelerator.no_sync(model)
        try:
            with sync:
                loss = super().training_step(model, chunk, chunk_items).detach().float()
        finally:
            self._loss_scale = 1.0
        if k >= 0:
            self._step_losses[g, k] += float(loss / scale)
        return loss

    def _shifts_labels(self) -> bool:
        return bool(getattr(self, "_loss_shifts_labels", False))  # set by the Trainer for causal-LM losses

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # scaled only while several masks or chunks share one weight gradient
        self._dropout.new_forward()
        distiller = self._distiller
        if distiller is not None and distiller.teacher is not None and model.training:
            if distiller.hidden_weight > 0:
                inputs = dict(inputs, output_hidden_states=True)
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            share = 1.0  # the teacher terms are per-item means: weigh them as the task loss was normalised
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                share = count_items(inputs, self._shifts_labels()) / max(float(num_items_in_batch), 1e-12)
                if self.args.average_tokens_across_devices and self.args.world_size > 1:
                    share *= self.accelerator.num_processes
            loss = distiller.loss(loss, outputs, inputs, share)
            out = (loss, outputs) if return_outputs else loss
        else:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        self._dropout.new_forward()  # a recomputation during backward (checkpointing) counts calls from 0 again
        if self._loss_scale == 1.0:
            return out
        if isinstance(out, tuple):
            return (out[0] * self._loss_scale,) + tuple(out[1:])
        return out * self._loss_scale

    def _forward_loss(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """The loss of a no-grad forward, normalised exactly as `Trainer.training_step` normalises it."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager(), uncounted(self):  # (not a training forward for the base's counters)
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        return loss.detach().float()

    @torch.no_grad()
    def _structure_step(self):
        a = self.args
        device = self.structure.device
        losses = self._step_losses.to(device=self.args.device, dtype=torch.float32)
        if self.accelerator.num_processes > 1:
            losses = self.accelerator.reduce(losses, reduction="mean")
        losses = losses.to(device)
        masks = self._step_masks.to(device)
        used = self._step_groups_used.to(device)  # a short last batch fills fewer chunks than mask_groups
        if not bool(used.all()):
            losses, masks = losses[used], masks[used]
        scores = self.structure.scores()
        step = self.state.global_step
        if not bool(torch.isfinite(losses).all()):
            self._sparse_state["skipped_updates"] += 1
            self._note_nonfinite(step, f"the loss {losses.flatten().tolist()}")
            if self._nonfinite_run >= NONFINITE_UPDATES_TO_STOP:
                self._raise_diverged(step, f"{self._nonfinite_run} structure updates in a row")
            delta = None
        else:
            self._note_finite()
            estimate = disarm_gradient if a.estimator == "disarm" else vrpge_gradient
            delta = torch.stack(
                [estimate(losses[g], masks[g], scores, a.score_function) for g in range(masks.shape[0])]
            ).mean(0)
            delta = pool_by_group(delta, self.structure.sizes, a.structure_pooling)
        if delta is not None:
            for g, d in zip(self.structure.groups, self.structure.split(delta)):
                g.scores.grad = d.to(g.scores.dtype).view_as(g.scores)
            self.structure_optimizer.step()
            self.structure_optimizer.zero_grad(set_to_none=True)
        # Projection onto the budget of the step that follows (also when the update was skipped).
        weights = self._costs if a.projection == "weighted" else None
        projected = project_to_budget(self.structure.scores(), self._costs, self.budget_at(step + 1), weights=weights,
                                      margin=a.score_margin)
        if not bool(torch.isfinite(projected).all()):
            raise RuntimeError(
                f"SparseTrainer: the structure update at step {step} made the keep probabilities non-finite "
                f"(structure_learning_rate={self.structure_optimizer.param_groups[0]['lr']}); nothing was exported. "
                "Lower --structure_learning_rate (e.g. 0.1) and train again"
            )
        self.structure.set_scores(projected)
        self._log_structure(losses, projected, step + 1)

    # --- evaluation -----------------------------------------------------------------------------------
    def _set_eval_mask(self):
        if self.in_importance_warmup() or not self._structure_learned():
            # no structure yet (dense warm-up, or every score still equal, e.g. evaluate() before train()): the
            # model is the dense model; a top-K of tied scores would be a mask chosen by ties
            mask = torch.ones(self.structure.num_units)
        elif self.is_fixed() or self.args.eval_mask == "topk":
            mask = self.topk_mask()
        elif self.args.eval_mask == "dense":
            mask = torch.ones(self.structure.num_units)
        else:
            mask = sample_masks(self.structure.scores(), 1, self.args.seed, 10**9 + self.state.global_step)[0]
        self.structure.set_masks(mask)
        self._step_mask_step = -1  # the next training step sets its own masks again

    def evaluate(self, *args, **kwargs):
        self._set_eval_mask()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self._set_eval_mask()
        return super().predict(*args, **kwargs)

    # --- train / checkpoints --------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, str):
            self._check_resume(resume_from_checkpoint)  # before anything is loaded into the model
            self._pending_structure_state = resume_from_checkpoint
        self.structure_optimizer = None
        self._reset_step_accumulators()
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            # the dropped units' weights, set aside while the mask was fixed, back in the model
            self._frozen_units.unsettle()
        self._warn_if_unfixed()
        self._publish_structure_run()
        # Leave the model with the deterministic mask: what evaluation saw and what export will keep.
        self.structure.set_masks(self.topk_mask())
        self._step_mask_step = -1
        return output


class SparseTrainer(SparseTrainingMixin, Trainer):
    """A [`Trainer`] that learns which neurons and heads to keep while it trains the weights.

    Args:
        model: a model already passed through `sparsify_model`, or a plain model plus `sparse_config`.
        args: [`SparseTrainingArguments`] (plain `TrainingArguments` are converted, with the defaults).
        sparse_config: how to sparsify a plain model (ignored with a warning if the model is sparsified).
        teacher_model: a teacher for knowledge distillation (`distill_from="model"`, set when it is given).
        Everything else is passed to [`Trainer`].

    `sparse_trainer_class(SFTTrainer)` is the same for another Trainer subclass (TRL's SFTTrainer).
    """
