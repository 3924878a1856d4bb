"""SparseTrainingArguments: TrainingArguments plus the structure search (docs/method.md §2-§5)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from .estimator import SCORE_FUNCTIONS

ESTIMATORS = ("vrpge", "disarm")
EVAL_MASKS = ("topk", "sample", "dense")
PROJECTIONS = ("weighted", "euclidean")
SEARCH_WEIGHTS = ("sample", "topk")
DISTILL_FROM = ("none", "warmup", "model")
FORWARD_SEARCHES = ("allocation", "allocation_sampled", "units")
# The default length of the forward-only allocation search at the end of the warm-up (docs/structure_tasks.md,
# "The default run searches"): 16 steps of 4 masked forwards, 0.05 of a 250-step run's training FLOPs.
DEFAULT_FORWARD_SEARCH_STEPS = 16

# The paper's schedule (the search from a dense start, then a fixed phase): what the defaults were before the
# structure-sensitive tasks showed it ending at chance at 50% (docs/structure_tasks.md). Pass it to search:
# SparseTrainingArguments(..., **PAPER_SCHEDULE).
PAPER_SCHEDULE = {"importance_warmup": 0.0, "budget_schedule_start": 0.0, "budget_schedule_end": 0.5, "fix_masks_at": 0.8}


@dataclass
class StructureArguments:
    r"""
    The structure options of [`SparseTrainer`] (and of every `sparse_trainer_class(...)`), added to the base
    trainer's own config class: `SparseTrainingArguments` is `TrainingArguments` plus these,
    `sparse_args_class(SFTConfig)` is TRL's `SFTConfig` plus these. The same fields and defaults everywhere.

    The defaults (measured, docs/structure_tasks.md): the first half of training runs dense while each unit's
    Taylor importance is read from the ordinary backward; then a short forward-only policy-gradient search (16
    steps of 4 masked forwards: two pairs of masks that differ only in the groups' shares, on the weights of that
    moment, no backward) learns how the one global budget is split between the groups -- each layer's heads, each
    layer's MLP neurons -- with the Taylor ranking kept inside each group; its top-K mask is fixed, and the second
    half trains the kept units only. On the structure tasks (real MiniLM, 250 steps, 3 seeds) the Taylor mask alone
    kept 0.684 / 0.629 accuracy at 50% sparsity against dense 0.693 / 0.657, where the paper's schedule
    (`PAPER_SCHEDULE`: search from the dense model, fixed at 80%) ended at chance (0.504 / 0.507), as did random
    units; the allocation search ties the Taylor mask there (+0.3 / -0.3 points at 50%, +1.1 on a held-out task,
    inside the seeds' spread) for 64 masked forwards (0.05 of a 250-step run's training FLOPs; at equal compute
    the dense steps are worth more), and is what makes the layers compete for the one budget instead of each
    keeping the same share (`forward_search_steps=0`: the Taylor mask fixed at once). For pretraining from scratch
    use a short warm-up and a search (recipes/causal_lm.py: 0.1 / 0.1 / 0.1 / 0.3): the dense half keeps nothing
    there.

    Parameters:
        > Structure optimizer

        structure_learning_rate (`float`, defaults to `0.1`):
            Learning rate of Adam on the keep probabilities s (no weight decay).
        structure_adam_beta1 / structure_adam_beta2 (`float`, defaults to `0.9` / `0.999`):
            Adam betas of the structure optimizer.

        > Estimator

        estimator (`str`, defaults to `"vrpge"`):
            `"vrpge"`: independent masks, the paper's variance-reduced policy gradient; `"disarm"`: one
            antithetic pair with the DisARM estimator (unbiased, lower variance, same cost).
        mask_samples (`int`, defaults to `2`):
            Masks per optimizer step (K). Costs K forwards; the first is also backpropagated.
        mask_groups (`int`, defaults to `1`):
            Split each micro-batch into this many chunks, each with its own masks (and its own VR-PGE term):
            `mask_groups * mask_samples` structure samples per step for the FLOPs of `mask_samples`.
        weight_grad_samples (`int`, defaults to `1`):
            How many of the masks also get a backward for the weights (1 or 2; the reference code uses 2).
        score_function (`str`, defaults to `"fisher"`):
            `"fisher"` (the reference code's) or `"exact"` (the true score function).

        > Budget schedule

        budget_schedule_start / budget_schedule_end (`float`, defaults to `0.5` / `0.5`):
            The cubic budget falls from dense to the target between these fractions of training.
        fix_masks_at (`float`, defaults to `0.5`):
            Fraction of training after which the top-K mask is fixed and only the kept weights train
            (one forward and one backward per step). `1.0` searches until the end.
        importance_warmup (`float`, defaults to `0.5`):
            The informed start (`hf_sparse.importance`): this fraction of training runs dense while each unit's
            first-order Taylor importance (the squared derivative of the loss w.r.t. a gate on the unit,
            averaged over steps) is read off the ordinary backward; then the keep probabilities start from
            it, projected onto the budget, and the search refines them. The budget must reach its target by
            then (`budget_schedule_end <= importance_warmup`). `0`: off.
        warmup_loss_drop (`float`, defaults to `0.02`):
            A warm-up read before the task is learned ranks units by noise. If at the end of importance_warmup the
            training loss (the mean of the latest sixth of the warm-up's steps) has not fallen by this share below
            its starting level (the mean of the first sixth), the dense warm-up goes on, step by step, until it
            has, and the fixing moves with it (logged; `structure_run()["warmup_extension_steps"]`). A task
            learned early changes nothing; a warm-up under 12 steps is never extended (too few steps for a level).
            `0`: off (the warm-up ends at importance_warmup).
        warmup_extend_until (`float`, defaults to `0.8`):
            The latest fraction of training the extension may move the fixing to (the warm-up's end as far, less
            the planned steps between them); a loss still at its level there is warned about, and the mask read.
        importance_band (`float`, defaults to `0.25`):
            Share of the total cost left uncertain (0 < s < 1) at the informed start; the rest starts at 1 or 0.
        importance_explore (`float`, defaults to `0.0`):
            Mix this share of the uniform keep probability into the informed start (same budget), so that no
            unit starts at exactly 0 or 1, where the score-function gradient is 0 and the search cannot move it.
        forward_search_steps (`int`, defaults to `None`):
            With importance_warmup: at the end of the warm-up, this many steps of a forward-only VR-PGE search on
            the weights of that moment (frozen, eval mode, no backward; 4 masks a step on training batches), from
            the Taylor importance spread off 0 and 1, before the mask is used. `None`: 16 where the mask is fixed at
            the end of the warm-up (`fix_masks_at <= importance_warmup`: the defaults), else 0 (no warm-up, or a
            training-time search follows it). `0`: off (the Taylor ranking alone).
        forward_search (`str`, defaults to `"allocation"`):
            What the forward-only search learns. `"allocation"`: one share of the budget per group (a layer's
            heads, a layer's neurons; with `SparseConfig.uniform_layers` one per kind), the Taylor ranking kept
            inside each group (`hf_sparse/allocation.py`: 12 numbers on MiniLM instead of 9,288); each step draws
            pairs of masks whose groups keep more or fewer of their best units (a Gaussian perturbation of the
            shares and its opposite, on the same batch), so a pair's loss difference is the allocation's alone.
            `"allocation_sampled"`: the same shares, learned from masks that sample every unit. `"units"`: a keep
            probability per unit (`hf_sparse.prune_model`'s search).
        forward_search_objective (`str`, defaults to `"loss"`):
            What the forward-only search minimises: `"loss"`, the training loss of each sampled mask; `"hidden"`,
            how far each sampled mask moves the last hidden states from the dense model's on the same batch (one
            more dense forward a step).
        forward_search_lr (`float`, defaults to `0.0`):
            Adam's learning rate of the forward-only search; `0`: the search's own (0.2 for `"allocation"`, 0.05
            for `"allocation_sampled"`, 0.02 for `"units"`).
        importance_ranking (`str`, defaults to `"group"`):
            `"group"`: rank units within their own group (every layer starts near the kept fraction);
            `"global"`: one ranking over the model (early layers' larger derivatives then win).
        score_margin (`float`, defaults to `0.0`):
            While searching, the projection keeps every keep probability in [margin, 1 - margin]: a unit at 0 or 1
            is drawn alike in every sample, its policy-gradient term is exactly 0, and the search could never move
            it again.
        search_weights (`str`, defaults to `"sample"`):
            What the weights train on while searching: `"sample"` backpropagates the first sampled mask(s) (the
            paper's way: each weight step trains a random subnetwork); `"topk"` runs every sampled mask forward
            only and backpropagates the current top-K mask (the structure the run would keep), one more forward.
        structure_pooling (`float`, defaults to `0.0`):
            Mix this share of each group's (one layer's heads, or its neurons) mean structure gradient into its
            units' gradients: the budget moves between layers and kinds on a signal averaged over the group.
        projection (`str`, defaults to `"weighted"`):
            `"euclidean"`: the exact Euclidean projection (docs/method.md §3) (units with large costs move first);
            `"weighted"`: the projection in the metric weighted by unit cost (every unit moves alike).

        > Distillation (`hf_sparse.distill`)

        distill_from (`str`, defaults to `"none"`):
            `"warmup"`: the model's own dense weights at the end of the importance warm-up are a frozen teacher;
            `"model"`: the `teacher_model` passed to `SparseTrainer`. The loss of every mask's forward (and so the
            structure estimator's reward) becomes `(1 - alpha) task + alpha T^2 KL + hidden_weight MSE`.
        distill_alpha / distill_temperature / distill_hidden_weight (`float`, defaults to `0.5` / `2.0` / `0.0`):
            the weights and temperature of that loss.

        > Evaluation

        eval_mask (`str`, defaults to `"topk"`):
            The mask used by `evaluate`/`predict` while searching: the deterministic top-K mask at the
            target (what is exported), a Bernoulli sample, or the dense model.
    """

    structure_learning_rate: float = field(
        default=0.1, metadata={"help": "Adam learning rate of the keep probabilities (structure parameters)."}
    )
    structure_adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 of the structure optimizer."})
    structure_adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 of the structure optimizer."})
    estimator: str = field(
        default="vrpge", metadata={"help": "Structure gradient estimator.", "choices": list(ESTIMATORS)}
    )
    mask_samples: int = field(default=2, metadata={"help": "Masks (forward passes) per optimizer step, >= 2."})
    mask_groups: int = field(
        default=1,
        metadata={"help": "Split each micro-batch into this many chunks, each with its own masks: more structure "
                          "samples per step at the same FLOPs (lower-variance structure gradient)."},
    )
    weight_grad_samples: int = field(
        default=1, metadata={"help": "Masks that are also backpropagated for the weights (1 or 2)."}
    )
    score_function: str = field(
        default="fisher", metadata={"help": "Score function of the estimator.", "choices": list(SCORE_FUNCTIONS)}
    )
    budget_schedule_start: float = field(
        default=0.5, metadata={"help": "Fraction of training where the cubic budget schedule starts."}
    )
    budget_schedule_end: float = field(
        default=0.5, metadata={"help": "Fraction of training where the budget reaches the target sparsity."}
    )
    fix_masks_at: float = field(
        default=0.5,
        metadata={"help": "Fraction of training after which the top-K mask is fixed (weights-only phase). 1.0: never."},
    )
    importance_warmup: float = field(
        default=0.5,
        metadata={"help": "Fraction of training run dense at the start while each unit's first-order (Taylor) "
                          "importance is accumulated from the ordinary backward; at its end the keep probabilities "
                          "start from that importance, projected onto the budget, and the search refines them. "
                          "0: off (scores start as SparseConfig.score_init says)."},
    )
    warmup_loss_drop: float = field(
        default=0.02,
        metadata={"help": "With importance_warmup: while the training loss has not fallen by this share below its "
                          "starting level (the latest sixth of the warm-up's steps against the first), the dense "
                          "warm-up goes on past importance_warmup and the fixing moves with it, up to "
                          "warmup_extend_until. 0: off."},
    )
    warmup_extend_until: float = field(
        default=0.8,
        metadata={"help": "The latest fraction of training that extending the warm-up (warmup_loss_drop) may move "
                          "the fixing to."},
    )
    importance_band: float = field(
        default=0.25,
        metadata={"help": "With importance_warmup: the share of the total cost left uncertain (0 < p < 1) around "
                          "the budget's edge at the informed start; the rest starts kept (p=1) or dropped (p=0)."},
    )
    forward_search_steps: Optional[int] = field(
        default=None,
        metadata={"help": "With importance_warmup: steps of the forward-only VR-PGE search at the end of the warm-up "
                          f"(on the frozen weights of that moment), from the Taylor importance. Default: "
                          f"{DEFAULT_FORWARD_SEARCH_STEPS} where the mask is fixed at the end of the warm-up, else 0. 0: off."},
    )
    forward_search: str = field(
        default="allocation",
        metadata={"help": "What the forward-only search learns: 'allocation' (one share of the budget per group -- "
                          "a layer's heads, a layer's neurons -- with the Taylor ranking inside each group; pairs of "
                          "masks that differ only in the groups' shares), 'allocation_sampled' (the same shares "
                          "learned from masks that sample every unit) or 'units' (a keep probability per unit).",
                  "choices": list(FORWARD_SEARCHES)},
    )
    forward_search_objective: str = field(
        default="loss",
        metadata={"help": "What the forward-only search minimises: 'loss' (the training loss of the sampled masks) "
                          "or 'hidden' (the distance of their last hidden states from the dense model's).",
                  "choices": ["loss", "hidden"]},
    )
    forward_search_lr: float = field(
        default=0.0,
        metadata={"help": "Adam's learning rate of the forward-only search (0: the search's own default)."},
    )
    importance_explore: float = field(
        default=0.0,
        metadata={"help": "With importance_warmup: mix this share of the uniform keep probability into the informed "
                          "start, so no unit starts at exactly 0 or 1 (where its mask never varies and the search "
                          "cannot move it). Same budget."},
    )
    importance_ranking: str = field(
        default="group",
        metadata={"help": "With importance_warmup: rank units within their own group (layer), so every layer starts "
                          "near the kept fraction, or across the whole model.", "choices": ["group", "global"]},
    )
    distill_from: str = field(
        default="none",
        metadata={"help": "Knowledge distillation: 'none'; 'warmup' (the model's own dense weights at the end of the "
                          "importance warm-up, frozen, are the teacher: no extra run); 'model' (the teacher_model "
                          "passed to SparseTrainer, e.g. a dense model fine-tuned first).",
                  "choices": list(DISTILL_FROM)},
    )
    distill_alpha: float = field(
        default=0.5, metadata={"help": "Weight of the logit KL in (1 - alpha) * task loss + alpha * KL."}
    )
    distill_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the logit KL."})
    distill_hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight of the layer-wise hidden-state MSE to the teacher (0: off)."}
    )
    projection: str = field(
        default="weighted", metadata={"help": "Budget projection metric.", "choices": list(PROJECTIONS)}
    )
    score_margin: float = field(
        default=0.0,
        metadata={"help": "While searching, keep every keep probability in [margin, 1 - margin]: a unit at 0 or 1 is "
                          "drawn alike in every sample, its policy gradient is 0 and the search can never move it."},
    )
    search_weights: str = field(
        default="sample",
        metadata={"help": "What the weights train on while searching: 'sample' (the first sampled mask, the paper's "
                          "way) or 'topk' (the current top-K mask; every sampled mask runs forward only).",
                  "choices": list(SEARCH_WEIGHTS)},
    )
    structure_pooling: float = field(
        default=0.0,
        metadata={"help": "Mix this share of each group's (layer's heads / neurons) mean gradient into its units' "
                          "structure gradients: budget moves between layers and kinds on a pooled, less noisy signal."},
    )
    eval_mask: str = field(
        default="topk", metadata={"help": "Mask used for evaluation while searching.", "choices": list(EVAL_MASKS)}
    )

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the base config's own checks first (TrainingArguments, SFTConfig, ...)
            parent()
        self.check_structure_args()

    def __reduce__(self):
        # a class made by sparse_args_class exists only once made: pickled (the Trainer saves training_args.bin),
        # it is rebuilt from its base config class, which is importable
        base = getattr(type(self), "_hf_sparse_base", None)
        if base is None or _ARGS_CLASSES.get(base) is not type(self):
            return super().__reduce__()
        return _rebuild_args, (base, dict(self.__dict__))

    def check_structure_args(self) -> None:
        """Refuse nonsense structure options (each error names the option, the value and the fix)."""
        if not (self.structure_learning_rate > 0 and math.isfinite(self.structure_learning_rate)):
            raise ValueError(
                f"structure_learning_rate must be finite and > 0, got {self.structure_learning_rate}; e.g. --structure_learning_rate 0.1"
            )
        for name in ("structure_adam_beta1", "structure_adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        _choice("estimator", self.estimator, ESTIMATORS)
        _choice("score_function", self.score_function, SCORE_FUNCTIONS)
        _choice("projection", self.projection, PROJECTIONS)
        _choice("search_weights", self.search_weights, SEARCH_WEIGHTS)
        _choice("eval_mask", self.eval_mask, EVAL_MASKS)
        _choice("importance_ranking", self.importance_ranking, ("group", "global"))
        _choice("distill_from", self.distill_from, DISTILL_FROM)
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise ValueError(f"distill_temperature must be finite and > 0, got {self.distill_temperature}")
        if not (self.distill_hidden_weight >= 0 and math.isfinite(self.distill_hidden_weight)):
            raise ValueError(f"distill_hidden_weight must be finite and >= 0, got {self.distill_hidden_weight}")
        if self.distill_from == "warmup" and self.importance_warmup <= 0:
            raise ValueError(
                "distill_from='warmup' takes the teacher from the dense weights at the end of the importance warm-up: "
                "set importance_warmup > 0 (e.g. --importance_warmup 0.2), or pass a teacher_model with "
                "distill_from='model'"
            )
        if self.mask_samples < 2 or self.mask_samples > 64:
            raise ValueError(f"mask_samples must be in [2, 64] (each costs a forward pass), got {self.mask_samples}")
        if not 1 <= self.mask_groups <= 64:
            raise ValueError(f"mask_groups must be in [1, 64], got {self.mask_groups}")
        if self.mask_groups > getattr(self, "per_device_train_batch_size", self.mask_groups):
            raise ValueError(
                f"mask_groups={self.mask_groups} is larger than per_device_train_batch_size="
                f"{self.per_device_train_batch_size}: every chunk needs at least one example"
            )
        if self.estimator == "disarm" and self.mask_samples != 2:
            raise ValueError(f"estimator='disarm' uses exactly one antithetic pair: mask_samples must be 2, got {self.mask_samples}")
        if self.weight_grad_samples not in (1, 2) or self.weight_grad_samples > self.mask_samples:
            raise ValueError(
                f"weight_grad_samples must be 1 or 2 (and <= mask_samples={self.mask_samples}), got {self.weight_grad_samples}"
            )
        for name in ("budget_schedule_start", "budget_schedule_end", "fix_masks_at"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a fraction of training in [0, 1], got {getattr(self, name)}")
        if self.budget_schedule_end < self.budget_schedule_start:
            raise ValueError(
                f"budget_schedule_end={self.budget_schedule_end} is before budget_schedule_start="
                f"{self.budget_schedule_start}; the schedule must end after it starts"
            )
        if not 0.0 <= self.importance_warmup < 1.0:
            raise ValueError(f"importance_warmup is a fraction of training in [0, 1), got {self.importance_warmup}")
        if not 0.0 <= self.warmup_loss_drop < 1.0:
            raise ValueError(f"warmup_loss_drop is a share of the starting loss in [0, 1), got {self.warmup_loss_drop}; "
                             "e.g. --warmup_loss_drop 0.02, or 0 to end the warm-up at importance_warmup")
        if not 0.0 <= self.warmup_extend_until <= 1.0:
            raise ValueError(f"warmup_extend_until is a fraction of training in [0, 1], got {self.warmup_extend_until}")
        if not 0.0 < self.importance_band <= 1.0:
            raise ValueError(f"importance_band must be in (0, 1], got {self.importance_band}")
        if not 0.0 <= self.score_margin < 0.5:
            raise ValueError(f"score_margin must be in [0, 0.5), got {self.score_margin}; e.g. --score_margin 0.02")
        if not 0.0 <= self.structure_pooling <= 1.0:
            raise ValueError(f"structure_pooling must be in [0, 1], got {self.structure_pooling}")
        if self.forward_search_steps is None:
            # the default: search where the mask is fixed at the end of a warm-up; a schedule with a training-time
            # search after the warm-up (fix_masks_at later) already runs the policy gradient from the informed start
            fixed_at_warmup_end = 0 < self.importance_warmup and self.fix_masks_at <= self.importance_warmup
            self.forward_search_steps = DEFAULT_FORWARD_SEARCH_STEPS if fixed_at_warmup_end else 0
        if isinstance(self.forward_search_steps, bool) or not isinstance(self.forward_search_steps, int) \
                or self.forward_search_steps < 0:
            raise ValueError(f"forward_search_steps must be an integer >= 0, got {self.forward_search_steps!r}")
        if self.forward_search_steps and self.importance_warmup <= 0:
            raise ValueError("forward_search_steps searches from the Taylor importance of the warm-up: set "
                             "importance_warmup > 0 (e.g. --importance_warmup 0.5), or forward_search_steps 0")
        _choice("forward_search", self.forward_search, FORWARD_SEARCHES)
        _choice("forward_search_objective", self.forward_search_objective, ("loss", "hidden"))
        if not self.forward_search_steps and (self.forward_search_objective != "loss" or self.forward_search_lr):
            raise ValueError(f"forward_search_objective={self.forward_search_objective!r} and forward_search_lr="
                             f"{self.forward_search_lr} configure the forward-only search, which runs only with "
                             "forward_search_steps > 0 (e.g. --forward_search_steps 16)")
        if not (self.forward_search_lr >= 0 and math.isfinite(self.forward_search_lr)):
            raise ValueError(f"forward_search_lr must be a finite number >= 0, got {self.forward_search_lr!r}")
        if not 0.0 <= self.importance_explore < 1.0:
            raise ValueError(f"importance_explore must be in [0, 1), got {self.importance_explore}")
        if self.importance_warmup > 0 and self.budget_schedule_end > self.importance_warmup:
            raise ValueError(
                f"importance_warmup={self.importance_warmup} with budget_schedule_end={self.budget_schedule_end}: the "
                "informed start is projected onto the budget at the end of the warm-up, so the budget must have "
                "reached its target by then; set budget_schedule_start and budget_schedule_end <= importance_warmup "
                f"(e.g. --budget_schedule_start {self.importance_warmup} --budget_schedule_end {self.importance_warmup})"
            )
        if self.fix_masks_at < max(self.budget_schedule_end, self.importance_warmup):
            raise ValueError(
                f"fix_masks_at={self.fix_masks_at} is before budget_schedule_end={self.budget_schedule_end} or "
                f"importance_warmup={self.importance_warmup}: the mask would be fixed before the budget reaches the "
                "target or before the informed start; set fix_masks_at >= both"
            )


@dataclass
class SparseTrainingArguments(StructureArguments, TrainingArguments):
    __doc__ = ("[`TrainingArguments`] plus the arguments of the structure search of [`SparseTrainer`] "
               "(`StructureArguments`)." + StructureArguments.__doc__.split("The same fields and defaults everywhere.", 1)[1])


_ARGS_CLASSES: dict[type, type] = {TrainingArguments: SparseTrainingArguments}


def sparse_args_class(config_class: type) -> type:
    """`config_class` (a `TrainingArguments` subclass such as TRL's `SFTConfig`) with the structure options of
    `StructureArguments` added: the `args` of `sparse_trainer_class(...)` for that base trainer; works with
    `HfArgumentParser`. One class per base (cached); `sparse_args_class(TrainingArguments)` is
    `SparseTrainingArguments`."""
    if not (isinstance(config_class, type) and issubclass(config_class, TrainingArguments)):
        raise TypeError(f"sparse_args_class needs a TrainingArguments subclass, got {config_class!r}")
    if issubclass(config_class, StructureArguments):
        return config_class
    if config_class not in _ARGS_CLASSES:
        clash = sorted({f.name for f in dataclasses.fields(config_class)} & {f.name for f in dataclasses.fields(StructureArguments)})
        if clash:
            raise ValueError(f"{config_class.__name__} already has fields {clash} of hf_sparse's structure options; "
                             "they cannot be combined")
        made = type(f"Sparse{config_class.__name__}", (StructureArguments, config_class), {
            "__module__": __name__,
            "__doc__": f"{config_class.__name__} plus hf_sparse's structure options (StructureArguments).",
            "_hf_sparse_base": config_class,
        })
        _ARGS_CLASSES[config_class] = dataclass(made)
    return _ARGS_CLASSES[config_class]


def _rebuild_args(base: type, state: dict):
    args = sparse_args_class(base).__new__(sparse_args_class(base))
    args.__dict__.update(state)
    return args


def as_sparse_args(args, args_class: type):
    """`args` as an instance of `args_class` (a `sparse_args_class`): None gives the defaults; arguments of another
    class are converted with the same values, the structure options at their defaults (as TRL converts plain
    `TrainingArguments`); arguments already carrying structure options keep them."""
    if args is None:
        return args_class(output_dir="trainer_output")
    if isinstance(args, args_class):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be TrainingArguments (or {args_class.__name__}), got {type(args).__name__}")
    values = args.to_dict()
    for key in values:
        if key.endswith("_token"):  # to_dict hides every *_token field (hub_token; TRL's eos_token, pad_token)
            values[key] = getattr(args, key)
    values.pop("push_to_hub_token", None)
    known = {f.name for f in dataclasses.fields(args_class) if f.init}
    dropped = sorted(k for k in values if k not in known)
    if dropped:
        raise ValueError(
            f"args of class {type(args).__name__} have options {dropped[:8]} that {args_class.__name__} does not know: "
            f"pass {args_class.__name__}(...) (hf_sparse.sparse_args_class of the trainer's config class) instead"
        )
    return args_class(**{k: v for k, v in values.items() if k in known})


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
