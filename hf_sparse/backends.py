"""The Trainer's distributed engines as hf_sparse needs them: set-ups it cannot train correctly, refused before the
first step with the fix (DeepSpeed stepping inside backward; a model sharded by the caller outside an FSDP set-up),
and FSDP2 on CPU processes, which Accelerate would otherwise drop silently."""

from __future__ import annotations

import os

from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


def fsdp_on_cpu(accelerator, args) -> bool:
    """Turn on the FSDP the user configured when Accelerate resolved CPU processes to plain data parallel.

    Accelerate only selects FSDP for accelerator devices: with CPU processes (gloo) it keeps the plugin out of its
    state, and the Trainer then wraps the model in DDP with no word said. FSDP2 (`fully_shard`) itself runs on CPU
    processes over gloo, and Accelerate's FSDP2 preparation, state-dict gathering and checkpoint code is
    device-agnostic, so the configured plugin is put back into the state: the run shards as it would on GPUs.
    Returns True when it did. FSDP1 is refused (not supported on CPU processes here)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or getattr(state, "fsdp_plugin", None) is not None:
        return False
    if args.fsdp_plugin_args is not None:
        plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate launch with an FSDP config
        plugin = FullyShardedDataParallelPlugin()
    else:
        return False
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP version {plugin.fsdp_version} was configured on CPU processes; hf_sparse shards CPU processes with "
            "FSDP2 only. Set fsdp_config={'version': 2} (--fsdp_config '{\"version\": 2}', or fsdp_version: 2 in the "
            "accelerate config), or train with plain data parallel (recipes/accelerate/cpu_2proc.yaml)"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    # as Accelerate does when it selects FSDP itself: every later AcceleratorState() copies the partial state's type
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    logger.info("SparseTrainer: FSDP2 on CPU processes (gloo): Accelerate selects FSDP for accelerators only; the "
                "configured plugin is used")
    return True


def refuse_deepspeed_several_backwards(args, deepspeed_enabled: bool) -> None:
    """DeepSpeed steps its engine inside `backward` when gradients sync: a second backward (weight_grad_samples
    = 2) or one backward per chunk (mask_groups > 1) would step the weights several times per optimizer step,
    and a forward after that backward would be taken on updated weights."""
    if deepspeed_enabled and (args.weight_grad_samples > 1 or args.mask_groups > 1):
        raise ValueError(
            f"DeepSpeed steps the optimizer inside backward, so weight_grad_samples={args.weight_grad_samples} and "
            f"mask_groups={args.mask_groups} would update the weights more than once per step and take the structure "
            "losses on different weights. With DeepSpeed use --weight_grad_samples 1 --mask_groups 1 (the "
            "no-grad forwards then run before the one backward, on the same weights)"
        )


def refuse_deepspeed_search(args, deepspeed_enabled: bool, searches: bool) -> None:
    """In a search step the units a mask leaves out get no gradient and must not move (docs/method.md §2.8). Under
    DeepSpeed the weight optimizer steps DeepSpeed's own flat fp32 partitions and copies them back over the model's
    weights, so hf_sparse cannot hold those units still: AdamW's decay and momentum would move them, a bias against
    uncertain units. The dense warm-up and the fixed phase (the defaults) are unaffected."""
    if deepspeed_enabled and searches:
        raise ValueError(
            f"this schedule searches (importance_warmup={args.importance_warmup}, fix_masks_at={args.fix_masks_at}), "
            "and under DeepSpeed the units a search step leaves out would still be moved by the optimizer (it steps "
            "DeepSpeed's own fp32 partitions). Under DeepSpeed use a schedule without a search, e.g. the defaults "
            "(fix_masks_at equal to importance_warmup), or search under DDP or FSDP (recipes/accelerate/)"
        )


def refuse_presharded(model: nn.Module, args) -> None:
    """A model sharded by the caller (FSDP2 `fully_shard`: DTensor weights) outside the Trainer's own FSDP set-up
    would be wrapped in DDP, whose first broadcast fails on DTensors deep inside torch: say so up front."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return
    if getattr(args, "fsdp", None) or not any(isinstance(p, DTensor) for p in model.parameters()):
        return
    raise ValueError(
        "the model's weights are already sharded (FSDP2 fully_shard: DTensor parameters), but the Trainer is not set "
        "up for FSDP and would wrap the model in DDP, which cannot broadcast DTensors. Pass the unsharded model and "
        "launch with an FSDP config (accelerate launch --config_file recipes/accelerate/fsdp.yaml, on GPUs), or "
        "train it unsharded (DDP: recipes/accelerate/cpu_2proc.yaml)"
    )


def refuse_sharded_warmup_teacher(args, engine: str | None) -> None:
    """The warm-up teacher is a frozen copy of the model at the end of the warm-up; a model whose weights are
    sharded (FSDP, DeepSpeed ZeRO-3) cannot be copied that way (FSDP refuses deepcopy; ZeRO-3's parameters are empty
    placeholders), and a whole copy on every rank would defeat the sharding."""
    if engine is not None and getattr(args, "distill_from", "none") == "warmup":
        raise ValueError(
            f"distill_from='warmup' copies the model at the end of the warm-up as the teacher, which {engine} cannot "
            f"do (its weights are sharded). Under {engine} pass a teacher yourself (teacher_model=..., "
            "distill_from='model'), or train without distillation (the default)"
        )


def check_fsdp_arguments(args, plugin) -> None:
    """The Trainer's own FSDP checks, for a run whose FSDP was turned on after the Trainer made them."""
    if plugin.activation_checkpointing and args.activation_checkpointing:
        raise ValueError(
            "`fsdp_config['activation_checkpointing']` (FSDP's own activation checkpointing) and the "
            "`activation_checkpointing` training argument can't both be set to True. Use FSDP's activation "
            "checkpointing when using FSDP."
        )
    if args.save_only_model and args.load_best_model_at_end:
        raise ValueError("FSDP can't be used with `save_only_model` along with `load_best_model_at_end`.")


class CpuFsdpMixin:
    """For any `Trainer` (a mixin before it in the bases): FSDP2 as configured, on CPU processes too."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if fsdp_on_cpu(self.accelerator, self.args):
            self.is_fsdp_enabled = True
            check_fsdp_arguments(self.args, self.accelerator.state.fsdp_plugin)


class EnginesMixin(CpuFsdpMixin):
    """`SparseTrainer`'s part that meets the Trainer's distributed engines (a mixin before `Trainer` in its bases):
    FSDP2 kept on CPU processes, and the refusals of set-ups it cannot train correctly."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        refuse_sharded_warmup_teacher(self.args, self.sharding_engine())

    def sharding_engine(self) -> str | None:
        """"FSDP" or "DeepSpeed ZeRO-3" when the weights are sharded over the ranks; None otherwise."""
        if self.is_fsdp_enabled:
            return "FSDP"
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
            return "DeepSpeed ZeRO-3"
        return None

    def _check_backend(self) -> None:
        """Before the first step (the schedule needs max_steps): what DeepSpeed cannot do."""
        deepspeed = getattr(self, "is_deepspeed_enabled", False)
        refuse_deepspeed_several_backwards(self.args, deepspeed)
        refuse_deepspeed_search(self.args, deepspeed, self._searches())

    def _searches(self) -> bool:
        """True when some step of this run searches (neither the dense warm-up nor the fixed phase)."""
        first = self.importance_warmup_steps()  # the first step after the dense warm-up
        return not self._fixed_from_start and first < self.state.max_steps and not self.is_fixed(first)
