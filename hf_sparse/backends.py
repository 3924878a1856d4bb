"""Set-ups of the Trainer's distributed engines that hf_sparse cannot train correctly, refused before the first
step with the fix (DeepSpeed stepping inside backward; a model sharded by the caller outside an FSDP set-up)."""

from __future__ import annotations

from torch import nn


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
