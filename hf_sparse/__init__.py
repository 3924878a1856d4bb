"""hf_sparse: learned sparse training with sparse forward and backward passes for Hugging Face Transformers."""

from .architectures import ARCHITECTURES, ArchitectureSpec
from .budget import cubic_budget, project_to_budget
from .config import SparseConfig
from .estimator import disarm_gradient, score_function, vrpge_gradient
from .layers import MaskedWeightLinear, SparseLinear
from .patching import get_sparse_config, is_sparsified, sparsify_model, unit_magnitudes, unsparsify_model
from .report import SparsityReport, sparsity_report
from .structure import SparseStructure, UnitGroup, sample_masks, topk_mask

__version__ = "0.1.0"

# The Trainer costs seconds to import: load it only when asked for.
_LAZY = {"SparseTrainer": ".trainer", "SparseTrainingArguments": ".training_args"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(
    [
        "ARCHITECTURES",
        "ArchitectureSpec",
        "MaskedWeightLinear",
        "SparseConfig",
        "SparseLinear",
        "SparseStructure",
        "SparseTrainer",
        "SparseTrainingArguments",
        "SparsityReport",
        "UnitGroup",
        "cubic_budget",
        "disarm_gradient",
        "get_sparse_config",
        "is_sparsified",
        "project_to_budget",
        "sample_masks",
        "score_function",
        "sparsify_model",
        "sparsity_report",
        "topk_mask",
        "unit_magnitudes",
        "unsparsify_model",
        "vrpge_gradient",
    ]
)
