"""What `SparseTrainer` writes for `save_model`, checkpoints and `push_to_hub`, and how it reads them back.

A folder written by a Trainer path is a sparse checkpoint: `model.safetensors` with the dropped units' entries
as explicit zeros (so plain `from_pretrained` computes exactly the sparse model), the scores and masks,
`sparse_config.json` (so `load_sparse_model` rebuilds the trainable sparse model), and, when some units are
dropped, `hf_sparse_dropped.safetensors` with the dropped entries' real values (so resuming, or training on
after `load_sparse_model`, continues from the same weights bit for bit). A checkpoint folder also holds the
structure optimizer, the scores and the importance (`sparse_structure_state.pt`) and, with the warm-up teacher,
that teacher's weights: a resumed run goes on exactly.

`CheckpointMixin` is the part of `SparseTrainer` that writes and reads these folders.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from transformers.utils import logging

from .config import CONFIG_NAME, SparseConfig
from .distill import frozen_copy
from .dropped import DROPPED_WEIGHTS_NAME, split_dropped
from .folders import (
    check_config_stamp,
    missing_dropped_message,
    restore_from_folder,
    saved_dropped_units,
    write_dropped,
)
from .model_state import STRUCTURE_RUN_ATTR, get_sparse_config, is_sparsified
from .warmup_loss import WarmupLoss

from accelerate.utils.constants import FSDP_MODEL_NAME  # "pytorch_model_fsdp": the FSDP model file / folder

logger = logging.get_logger(__name__)

STRUCTURE_STATE_NAME = "sparse_structure_state.pt"
TEACHER_STATE_NAME = "hf_sparse_warmup_teacher.pt"


def save_trainer_model(save, model: nn.Module, output_dir: str, state_dict: dict | None, should_save: bool) -> None:
    """Run the Trainer's `_save` (`save(output_dir, state_dict)`) with the dropped entries zeroed, then add the
    sparse config and the dropped values. `model` is the unwrapped sparsified model."""
    if not is_sparsified(model):
        save(output_dir, state_dict)
        return
    if state_dict is None:
        state_dict = model.state_dict()
    zeroed, dropped = split_dropped(model, state_dict)
    save(output_dir, zeroed)
    if should_save:
        os.makedirs(output_dir, exist_ok=True)
        config = get_sparse_config(model)
        config.save_pretrained(output_dir)
        write_dropped(output_dir, dropped, config)


@contextlib.contextmanager
def outside_zero3():
    """Build models as plain modules while a DeepSpeed ZeRO-3 run is set up: Transformers otherwise constructs
    every model inside `deepspeed.zero.Init`, whose partitioning is a collective, and a model built on the main
    process alone would wait forever for the other ranks."""
    from transformers.integrations import deepspeed as hf_deepspeed

    # the object Transformers asks: the Trainer's own config (deepspeed=...) or Accelerate's (accelerate launch
    # with a DeepSpeed config), held by a module-level weak reference; only an active one is switched off and back
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def checkpoint_steps(checkpoint: str) -> tuple[int, int]:
    """(global_step, max_steps) of a Trainer checkpoint, from its trainer_state.json."""
    from transformers.trainer_callback import TrainerState

    path = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(path):
        raise ValueError(f"{checkpoint} has no trainer_state.json: it is not a Trainer checkpoint")
    state = TrainerState.load_from_json(path)
    return int(state.global_step), int(state.max_steps)


def sparse_files(folder: str) -> list[str]:
    """The hf_sparse files of a saved folder that must travel with its model files."""
    return [name for name in (CONFIG_NAME, DROPPED_WEIGHTS_NAME) if os.path.isfile(os.path.join(folder, name))]


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


class CheckpointMixin:
    """`SparseTrainer`'s save, load and push paths (a mixin before `Trainer` in its bases)."""

    def push_to_hub(
        self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
        revision: str | None = None, export: str = "plain", **card_kwargs,
    ):
        """Export the trained sparse model (`export`: "plain", "shrink" or "sparse"), render its model card
        (sparsity per layer, these training arguments, `card_kwargs` such as eval_results or speed) and upload
        both to `args.hub_model_id` (default: the output folder's name). Unlike `Trainer.push_to_hub` it
        uploads the export, not the checkpoint folder. Offline it raises `HubOfflineError` naming the folder. The
        mask is fixed in memory if it was not (what was uploaded); a push that fails leaves the model as it was."""
        from .export import fix_masks, masks_fixed
        from .hub import push_sparse_to_hub

        if not self.is_world_process_zero():
            return None
        model = self.accelerator.unwrap_model(self.model)
        structure = self.structure
        # what fix_masks changes, to put back if the push fails: the model stays the one training left
        before = (structure.scores().clone(), structure.masks().clone(), [g.fixed.clone() for g in structure])
        if not masks_fixed(model):
            fix_masks(model)
        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        card_kwargs.setdefault("training_args", self.args)
        try:
            return push_sparse_to_hub(
                model, repo_id, export=export, token=token or self.args.hub_token, private=self.args.hub_private_repo,
                commit_message=commit_message, revision=revision, tokenizer=self.processing_class, **card_kwargs,
            )
        except BaseException:
            scores, masks, fixed = before
            structure.set_scores(scores)
            structure.set_masks(masks)
            for g, flag in zip(structure, fixed):
                g.fixed.copy_(flag)
            raise

    def unsharded_model(self) -> nn.Module | None:
        """The trained sparse model whole, to export or inspect: the unwrapped model, or, under FSDP (weights
        sharded over the ranks), a copy gathered by `save_model` into a temporary sparse checkpoint and read back
        by `load_sparse_model` on the main process, bit for bit with the evaluation mask set; the same under
        DeepSpeed (ZeRO-3 partitions the weights; its config needs `stage3_gather_16bit_weights_on_model_save`).
        Under FSDP or DeepSpeed every rank must call it (the gathering is a collective); ranks other than the main
        one get None."""
        model = self.accelerator.unwrap_model(self.model)
        if not (getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)):
            return model
        import tempfile

        from .export import load_sparse_model

        self._check_gatherable()  # on every rank, before any collective
        with tempfile.TemporaryDirectory(prefix="hf_sparse_gathered_") as folder:
            self.save_model(folder, _internal_call=True)  # (internal: no push_to_hub of a temporary folder)
            self.accelerator.wait_for_everyone()
            if not self.args.should_save:
                return None
            with outside_zero3():
                loaded = load_sparse_model(folder)
            loaded.__dict__[STRUCTURE_RUN_ATTR] = self.structure_run()  # what ran, for its model card
            return loaded

    def _check_gatherable(self) -> None:
        """`save_model` writes one whole model only with a full state dict: refuse, naming the setting, where it
        would write shards (FSDP's SHARDED_STATE_DICT) or nothing (ZeRO-3 without gathering the weights on save)."""
        if getattr(self, "is_fsdp_enabled", False):
            kind = str(self.accelerator.state.fsdp_plugin.state_dict_type)
            if "FULL_STATE_DICT" not in kind:
                raise ValueError(
                    f"unsharded_model needs FSDP to save full state dicts, this run uses {kind}: set "
                    "fsdp_config={'state_dict_type': 'FULL_STATE_DICT'} (fsdp_state_dict_type: FULL_STATE_DICT in the "
                    "accelerate config), or export from a checkpoint after merging its shards"
                )
        if getattr(self, "is_deepspeed_enabled", False):
            zero = self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
                raise ValueError(
                    "unsharded_model under ZeRO-3 needs the weights gathered on save: set "
                    "zero_optimization.stage3_gather_16bit_weights_on_model_save to true in the DeepSpeed config "
                    "(zero3_save_16bit_model: true in the accelerate config)"
                )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # in the fixed phase the dropped units' weights are set aside and zeroed in the live model (they cost
        # nothing there); every save writes their real values (each rank its own block before FSDP gathers)
        with self._frozen_units.restored():
            super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """What `save_model`, every checkpoint and `push_to_hub` write: a sparse checkpoint of the model with the
        mask evaluation uses (top-K, or dense before any structure is learned). `load_sparse_model(folder)` gives
        back the trainable sparse model bit for bit; plain `from_pretrained(folder)` the same sparse model with
        its dropped units as explicit zeros (see `hf_sparse.trainer_checkpoint`)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        masks = self.structure.masks().clone()
        self._publish_structure_run()  # the card of a checkpoint says what ran up to it
        learned = self._structure_learned() and not self.in_importance_warmup()
        self.structure.set_masks(self.topk_mask() if learned else torch.ones(self.structure.num_units))
        try:
            save_trainer_model(super()._save, model, output_dir, state_dict, self.args.should_save)
        finally:
            self.structure.set_masks(masks)  # the step in progress (if any) keeps its own masks
        if self.args.should_save and is_peft(model):
            logger.warning(
                f"SparseTrainer: {output_dir} holds PEFT adapters and {CONFIG_NAME}; PEFT's own loader puts the "
                "adapters on the dense base. To use the sparse model, merge with hf_sparse.merge_lora_sparse(model) "
                "and export it (hf_sparse.export_model)"
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self._engine_loaded_every_weight(resume_from_checkpoint):
            restore_from_folder(self.accelerator.unwrap_model(model if model is not None else self.model),
                                resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._frozen_units.unsettle()  # the set-aside values belong to the current mask, not the best model's
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best and not self._engine_loaded_every_weight(best):
            restore_from_folder(self.accelerator.unwrap_model(self.model), best)

    def _engine_loaded_every_weight(self, folder: str) -> bool:
        """Under FSDP or DeepSpeed the Trainer loads the model from the engine's own files (`pytorch_model_fsdp*`,
        DeepSpeed's `global_step*/`), written from the live weights, dropped units included: nothing is left to
        restore (the masks there are the training step's, not the evaluation mask the dropped values were split
        by, and ZeRO-3's parameters are empty placeholders outside a forward)."""
        if getattr(self, "is_deepspeed_enabled", False):
            return True  # the Trainer resumes and loads the best model through deepspeed_load_checkpoint only
        if not getattr(self, "is_fsdp_enabled", False) or not os.path.isdir(folder):
            return False
        return any(name.startswith(FSDP_MODEL_NAME) for name in os.listdir(folder))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # the Trainer copies config and weights from the checkpoint into output_dir, then uploads output_dir:
        # the sparse config and the dropped values must go with them, or the Hub copy loads as another model
        if self.is_world_process_zero() and os.path.isdir(checkpoint_folder):
            import shutil

            for name in sparse_files(checkpoint_folder):
                os.makedirs(self.args.output_dir, exist_ok=True)
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save and self.structure_optimizer is not None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(
                {
                    "structure_optimizer": self.structure_optimizer.state_dict(),
                    "sparse_state": dict(self._sparse_state),
                    "scores": self.structure.scores().cpu(),
                    "importance": self._importance.state_dict() if self._importance is not None else None,
                    "warmup_loss": self._warmup_loss.state_dict() if self._warmup_loss is not None else None,
                    "sparse_config": self.sparse_config.to_dict(),
                },
                os.path.join(folder, STRUCTURE_STATE_NAME),
            )
            if self._distiller is not None and self.args.distill_from == "warmup" and self._distiller.teacher is not None:
                # the warm-up teacher exists nowhere else: a resumed run needs it to go on distilling
                torch.save(self._distiller.teacher.state_dict(), os.path.join(folder, TEACHER_STATE_NAME))

    def _check_resume(self, checkpoint: str) -> None:
        """Refuse, before anything is loaded, a checkpoint that would resume as another run: saved with another
        SparseConfig, its sparse_config.json edited, its dropped values or (before the mask is fixed) its
        structure state missing. Each is checked whatever else the folder lacks."""
        if not os.path.isdir(checkpoint):
            return  # the Trainer names a missing checkpoint itself
        if os.path.isfile(os.path.join(checkpoint, CONFIG_NAME)):
            saved = SparseConfig.from_pretrained(checkpoint).to_dict()
            ours = self.sparse_config.to_dict()
            if saved != ours:
                changed = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {ours.get(k)!r}"
                                    for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k))
                raise ValueError(
                    f"{checkpoint} was trained with another SparseConfig ({changed}); resume with the checkpoint's "
                    f"own config (its {CONFIG_NAME}), or start a new run for the new one"
                )
        check_config_stamp(checkpoint)
        if (not self._engine_loaded_every_weight(checkpoint)
                and not os.path.isfile(os.path.join(checkpoint, DROPPED_WEIGHTS_NAME))):
            units = saved_dropped_units(checkpoint)
            if units:
                raise ValueError(missing_dropped_message(checkpoint, units))
        if not os.path.isfile(os.path.join(checkpoint, STRUCTURE_STATE_NAME)):
            step, max_steps = checkpoint_steps(checkpoint)
            # the warm-up may have been extended (by how much is in the missing file): the latest fixing counts
            planned = self.fix_step(max_steps)
            fix = planned + self.max_warmup_extension(max_steps)
            if not self._fixed_from_start and (self.args.fix_masks_at >= 1.0 or step < fix):
                when = f"is not fixed yet (fixed at step {fix})" if fix == planned else (
                    f"may not be fixed yet (planned at step {planned}, at step {fix} at the latest)")
                raise ValueError(
                    f"{checkpoint} has no {STRUCTURE_STATE_NAME}, and at its step ({step}) the mask {when}: the "
                    "structure optimizer's state and the accumulated importance would start afresh, and the run "
                    f"would go on to another structure than the uninterrupted one. Copy {STRUCTURE_STATE_NAME} back, "
                    "or resume from a complete checkpoint"
                )
            logger.warning(f"{checkpoint} has no {STRUCTURE_STATE_NAME}; the mask is fixed at that step, so only the "
                           "sparse/ running counters (FLOPs ratio, skipped updates) start afresh")

    def _load_structure_state(self, checkpoint: str):
        path = os.path.join(checkpoint, STRUCTURE_STATE_NAME)
        if not os.path.isfile(path):
            return  # allowed by _check_resume: the mask is fixed at that step
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or corrupt: torch raises several kinds
            raise ValueError(
                f"{path} is corrupt or truncated and cannot be read ({type(e).__name__}: {e}). Resume from an earlier "
                f"checkpoint (or, for a checkpoint whose mask is already fixed, delete {STRUCTURE_STATE_NAME}: only "
                "running counters are lost)"
            ) from e
        if not isinstance(state, dict) or "sparse_config" not in state:
            raise ValueError(f"{path} is not a SparseTrainer structure state; resume from a SparseTrainer checkpoint")
        if state["sparse_config"] != self.sparse_config.to_dict():
            raise ValueError(
                f"{checkpoint} was trained with SparseConfig {state['sparse_config']}, this run uses "
                f"{self.sparse_config.to_dict()}; resume with the same config"
            )
        self.structure_optimizer.load_state_dict(state["structure_optimizer"])
        self._sparse_state.update(state["sparse_state"])
        # the model weights file holds the scores too; this copy guards against a weights-only reload
        self.structure.set_scores(state["scores"].to(self.structure.device))
        if self._importance is not None and state.get("importance") is not None:
            self._importance.load_state_dict(state["importance"])
        if state.get("warmup_loss") is not None:
            self._warmup_loss = WarmupLoss.from_state_dict(state["warmup_loss"])
        teacher_path = os.path.join(checkpoint, TEACHER_STATE_NAME)
        if self._distiller is not None and self.args.distill_from == "warmup" and os.path.isfile(teacher_path):
            teacher = frozen_copy(self.accelerator.unwrap_model(self.model))
            teacher.load_state_dict(torch.load(teacher_path, map_location=self.args.device, weights_only=True))
            self._distiller.teacher = teacher
