"""Small facts about a model that every module asks: is it sparsified, its SparseConfig, LoRA layers, parents.

Kept apart so that patching, shrinking, exports and the trainer can all ask them without importing each
other (no import circle in hf_sparse/).
"""

from __future__ import annotations

from torch import nn

from .config import SparseConfig
from .structure import UnitGroup

CONFIG_ATTR = "hf_sparse_config"
# where SparseTrainer leaves what structure method ran (`structure_run()`), for the model card
STRUCTURE_RUN_ATTR = "hf_sparse_structure_run"


def is_sparsified(model: nn.Module) -> bool:
    return any(isinstance(m, UnitGroup) for m in model.modules())


def get_sparse_config(model: nn.Module) -> SparseConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("this model is not sparsified: call hf_sparse.sparsify_model(model, config) first")
    return config


def lora_parts(module: nn.Module):
    """(base_layer, lora_A dict, lora_B dict) of a PEFT LoRA layer, else None."""
    if hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B"):
        return module.base_layer, module.lora_A, module.lora_B
    return None


def contains_lora(model: nn.Module) -> bool:
    return any(lora_parts(m) is not None for m in model.modules())


def parent_module(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the module that owns `name`, the attribute name under it)."""
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child
