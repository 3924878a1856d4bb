"""hf_sparse: learned sparse training with sparse forward and backward passes for Hugging Face Transformers."""

from .architectures import ARCHITECTURES, ArchitectureSpec
from .budget import cubic_budget, project_to_budget
from .config import SparseConfig
from .estimator import disarm_gradient, score_function, vrpge_gradient
from .export import (
    export_model,
    fix_masks,
    load_sparse_model,
    masks_fixed,
    merge_lora_sparse,
    save_sparse_pretrained,
    shrink_model,
)
from .hub import HubOfflineError, describe_hardware, push_sparse_to_hub, render_model_card, save_model_card
from .layers import MaskedWeightLinear, SparseLinear
from .prune import PruneResult, prune_model
from .patching import get_sparse_config, is_sparsified, sparsify_model, unit_magnitudes, unsparsify_model
from .report import SparsityReport, sparsity_report
from .structure import SparseStructure, UnitGroup, sample_masks, topk_mask

__version__ = "0.2.0"

# The Trainer costs seconds to import: load it only when asked for.
_LAZY = {"SparseTrainer": ".trainer", "SparseTrainingArguments": ".training_args", "SparseTrainingMixin": ".trainer",
         "StructureArguments": ".training_args", "sparse_args_class": ".training_args",
         "sparse_trainer_class": ".trainer_classes", "export_onnx": ".serving"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(
    [
        "ARCHITECTURES",
        "ArchitectureSpec",
        "HubOfflineError",
        "MaskedWeightLinear",
        "SparseConfig",
        "SparseLinear",
        "SparseStructure",
        "SparseTrainer",
        "SparseTrainingArguments",
        "SparseTrainingMixin",
        "StructureArguments",
        "SparsityReport",
        "UnitGroup",
        "cubic_budget",
        "describe_hardware",
        "disarm_gradient",
        "export_model",
        "export_onnx",
        "fix_masks",
        "get_sparse_config",
        "is_sparsified",
        "load_sparse_model",
        "masks_fixed",
        "merge_lora_sparse",
        "project_to_budget",
        "prune_model",
        "PruneResult",
        "push_sparse_to_hub",
        "render_model_card",
        "sample_masks",
        "save_model_card",
        "save_sparse_pretrained",
        "score_function",
        "shrink_model",
        "sparse_args_class",
        "sparse_trainer_class",
        "sparsify_model",
        "sparsity_report",
        "topk_mask",
        "unit_magnitudes",
        "unsparsify_model",
        "vrpge_gradient",
    ]
)
