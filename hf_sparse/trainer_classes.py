"""`sparse_trainer_class`: hf_sparse's structure learning on any `Trainer` subclass (TRL's `SFTTrainer` first):
the `SparseTrainingMixin` put before the base trainer in the bases, its arguments the base's config class with
the structure options added (`sparse_args_class`)."""

from __future__ import annotations

from transformers import Trainer, TrainingArguments

from .trainer import SparseTrainingMixin
from .training_args import sparse_args_class

# TRL trainers whose loss is not a function of the batch the structure update can run several masks on: they
# prepare (generate, or pair with a reference model's outputs) inside the step
_REFUSED = {
    "GRPOTrainer": "it generates completions while preparing each batch, and the structure update prepares a batch "
                   "once per mask",
    "RLOOTrainer": "it generates completions while preparing each batch",
    "PPOTrainer": "its step is its own loop (rollouts, value model), not Trainer.training_step",
    "OnlineDPOTrainer": "it generates completions while preparing each batch",
    "DPOTrainer": "its loss pairs every batch with a reference model's log-probabilities computed once per batch; "
                  "composing it with several masks per step is not tested",
}


def sparse_trainer_class(trainer_class: type, args_class: type | None = None) -> type:
    """The structure-learning version of a `Trainer` subclass: `sparse_trainer_class(SFTTrainer)` is a trainer that
    takes the same arguments as `SFTTrainer` plus `sparse_config=` (and `teacher_model=`), and whose `args` are
    `SFTConfig` with the structure options of `SparseTrainingArguments` added (`sparse_args_class(SFTConfig)`; a
    plain `SFTConfig` is converted with the structure defaults). The same for any base: the structure options are
    always fields of `args`. `args_class`: the base's config class, if its `__init__` does not annotate `args`.

        SparseSFTTrainer = hf_sparse.sparse_trainer_class(SFTTrainer)
        args = hf_sparse.sparse_args_class(SFTConfig)(output_dir="out", fix_masks_at=0.5, max_steps=100)
        SparseSFTTrainer(model, args=args, train_dataset=data, sparse_config=SparseConfig(sparsity=0.5)).train()

    Trainers that prepare batches by generating (GRPO, RLOO, online DPO), PPO, and DPO are refused by name.
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"sparse_trainer_class needs a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, SparseTrainingMixin):
        return trainer_class
    for base in trainer_class.__mro__:
        if base.__name__ in _REFUSED and base.__module__.startswith("trl"):
            raise ValueError(
                f"sparse_trainer_class({trainer_class.__name__}): not supported, {_REFUSED[base.__name__]}. Supported: "
                "Trainer and SFTTrainer (and subclasses whose step is Trainer.training_step on a prepared batch). "
                "Sparsify and fix a mask first (hf_sparse.fix_masks) to train a fixed sparse model under it"
            )
    config_class = args_class or _args_class_of(trainer_class)
    return type(f"Sparse{trainer_class.__name__}", (SparseTrainingMixin, trainer_class), {
        "__module__": __name__, "__doc__": f"{trainer_class.__name__} with hf_sparse's structure learning "
        f"(hf_sparse.sparse_trainer_class); args: sparse_args_class({config_class.__name__}).",
        "sparse_args_class": sparse_args_class(config_class),
    })


def _args_class_of(trainer_class: type) -> type:
    """The config class a trainer's `__init__` annotates `args` with (the first TrainingArguments subclass in it)."""
    import typing

    try:
        hint = typing.get_type_hints(trainer_class.__init__).get("args")
    except Exception:  # unresolvable annotations: fall back to the plain arguments
        hint = None
    for candidate in typing.get_args(hint) or ((hint,) if hint is not None else ()):
        if isinstance(candidate, type) and issubclass(candidate, TrainingArguments):
            return candidate
    return TrainingArguments
