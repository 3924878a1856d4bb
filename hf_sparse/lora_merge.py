"""`merge_lora_sparse`: merge PEFT LoRA adapters into a sparsified base so that the merged model stays exactly
as sparse (dropped units zeroed in the base and in the adapters before PEFT's merge)."""

from __future__ import annotations

import torch
from torch import nn

from .masks import fix_masks, masks_fixed
from .model_state import contains_lora, get_sparse_config, is_sparsified
from .patching import sparsify_model, unsparsify_model
from .shrink import shrink_model
from .structure import SparseStructure


@torch.no_grad()
def merge_lora_sparse(model: nn.Module, shrink: bool = False, adapter_names: list[str] | None = None,
                      safe_merge: bool = False) -> nn.Module:
    """Merge the LoRA adapters of a sparsified PEFT model so that the merged model is exactly as sparse:
    fixes the top-K mask if it is not fixed, zeroes the dropped units in the base layers and in the adapters
    (lora_B rows of producers, lora_A columns of consumers, so B @ A is zero there too), then runs PEFT's
    `merge_and_unload`. Returns the plain merged model (`shrink=True`: with the dropped units removed)."""
    if not is_sparsified(model):
        raise ValueError("merge_lora_sparse needs a sparsified PEFT model (sparsify_model(peft_model, config))")
    if not hasattr(model, "merge_and_unload") or not contains_lora(model):
        raise ValueError("merge_lora_sparse needs a PEFT LoRA model (peft.get_peft_model(..., LoraConfig(...)))")
    for name, cfg in getattr(model, "peft_config", {}).items():
        if getattr(cfg, "use_dora", False):
            raise ValueError(
                f"adapter {name!r} uses DoRA: its per-row magnitude rescaling does not keep zero rows exactly; "
                "merge_lora_sparse supports plain LoRA"
            )
    config = get_sparse_config(model)
    if not masks_fixed(model):
        fix_masks(model)
    structure = SparseStructure(model)
    saved = {_strip_peft(n): (g.mask.clone(), g.scores.clone()) for n, g in zip(structure.names, structure.groups)}
    unsparsify_model(model)
    merged = model.merge_and_unload(adapter_names=adapter_names, safe_merge=safe_merge)
    if not shrink:
        return merged
    sparsify_model(merged, config)
    rebuilt = SparseStructure(merged)
    if sorted(rebuilt.names) != sorted(saved):
        raise RuntimeError("merge_lora_sparse: the merged model's unit groups differ from the adapter model's")
    for name, g in zip(rebuilt.names, rebuilt.groups):
        g.set_mask(saved[name][0])
        g.scores.copy_(saved[name][1])
        g.fixed.fill_(True)
    return shrink_model(merged)


def _strip_peft(name: str) -> str:
    prefix = "base_model.model."
    return name[len(prefix):] if name.startswith(prefix) else name
