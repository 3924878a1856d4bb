"""From a trained sparse model to a checkpoint anyone can use (the jobs live in their own modules; this one
ties them together and keeps their public names importable from `hf_sparse.export`):

- `fix_masks` (`hf_sparse.masks`): freeze the deterministic mask and mark the structure fixed.
- `shrink_model` (`hf_sparse.shrink`): remove dropped neurons and heads physically.
- `save_sparse_pretrained` / `load_sparse_model` (here): a still-trainable sparse model (weights, scores, masks,
  `sparse_config.json`), bit-identical on reload; `load_sparse_model` also loads shrunk and plain exports.
- `export_model` (here): write any of the three formats without touching the model in memory.
- `merge_lora_sparse` (`hf_sparse.lora_merge`): merge LoRA adapters so the merged model stays sparse.
- files and atomic folders: `hf_sparse.folders`.

Every folder is written to a temporary folder beside the target and renamed into place, so a failure never
leaves a folder that looks complete; a folder holding a different model is only replaced with
`overwrite=True`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os

import torch
from torch import nn

from .config import CONFIG_NAME, SparseConfig
from .dropped import split_dropped
from .folders import (
    CONFIG_STAMP_KEY,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    assign_state,
    atomic_folder,
    build_empty,
    check_target,
    load_config,
    read_weights,
    weights_paths,
    resolve_class,
    restore_from_folder,
    save_config_files,
    write_dropped,
    write_safetensors,
)
from .lora_merge import merge_lora_sparse
from .masks import FIX_METHODS, fix_masks, masks_fixed
from .model_state import CONFIG_ATTR, contains_lora, get_sparse_config, is_sparsified
from .patching import sparsify_model, unsparsify_model
from .shrink import SHAPES_KEY, SHAPES_VERSION, NoHeadsAttention, ZeroInputConv1D, apply_shapes, shrink_model
from .structure import SparseStructure

logger = logging.getLogger(__name__)

SPARSE_FORMAT = "hf_sparse.sparse"
EXPORTS = ("plain", "shrink", "sparse")

__all__ = [  # the public names of this module (some live in the modules it was split into)
    "EXPORTS", "FIX_METHODS", "SHAPES_KEY", "SHAPES_VERSION", "WEIGHTS_NAME", "WEIGHTS_INDEX_NAME",
    "NoHeadsAttention", "ZeroInputConv1D", "apply_shapes", "export_model", "fix_masks", "load_sparse_model",
    "masks_fixed", "merge_lora_sparse", "save_sparse_pretrained", "shrink_model",
]


# --- the trainable sparse checkpoint ------------------------------------------------------------------
def save_sparse_pretrained(model: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False) -> str:
    """Save a still-trainable sparse model: `model.safetensors` (weights, scores, masks, the fixed flag; a
    shared tensor such as tied embeddings once), `config.json` and `sparse_config.json`. Reload it with
    `load_sparse_model(save_directory)`: every tensor comes back bit-identical. Returns the folder."""
    if not is_sparsified(model):
        raise ValueError(
            "save_sparse_pretrained needs a sparsified model; a plain or shrunk model saves with "
            "model.save_pretrained(path) (or hf_sparse.export_model)"
        )
    if contains_lora(model):
        raise ValueError(
            "save_sparse_pretrained does not save PEFT models; merge the adapters with "
            "hf_sparse.merge_lora_sparse(model) and export the merged model, or save the adapters with PEFT"
        )
    if getattr(model, "config", None) is None:
        raise ValueError("save_sparse_pretrained needs a Transformers model (with a .config)")
    config = get_sparse_config(model)
    structure = SparseStructure(model)
    with atomic_folder(os.fspath(save_directory), overwrite) as tmp:
        groups = {name: g.num_units for name, g in zip(structure.names, structure.groups)}
        # dropped entries as explicit zeros (plain from_pretrained then computes the sparse model), their values
        # apart (load_sparse_model puts them back: training can go on from the same weights)
        state, dropped = split_dropped(model, model.state_dict())
        write_safetensors(
            model, os.path.join(tmp, WEIGHTS_NAME),
            {"hf_sparse_format": SPARSE_FORMAT, "hf_sparse_groups": json.dumps(groups),
             CONFIG_STAMP_KEY: config.to_json_string()}, state=state,
        )
        write_dropped(tmp, dropped, config)
        save_config_files(model, tmp)
        config.save_pretrained(tmp)
    return os.path.abspath(os.fspath(save_directory))


def load_sparse_model(
    directory: str | os.PathLike, model_class=None, *, attn_implementation: str | None = None
) -> nn.Module:
    """Load what hf_sparse exported, offline and without `trust_remote_code`:

    - a sparse checkpoint (`sparse_config.json` present): the sparsified, trainable model, bit-identical;
    - a shrunk export (`hf_sparse_shapes` in config.json): the model rebuilt with its per-layer sizes;
    - a plain export: the same as `model_class.from_pretrained(directory)`.

    `model_class` (a Transformers model class or Auto class) defaults to `config.architectures[0]`;
    `attn_implementation` ("eager", "sdpa", ...) as in `from_pretrained`. The model is returned in eval mode,
    on the CPU.
    """
    directory = os.fspath(directory)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    model_config = load_config(directory)
    cls = resolve_class(model_config, model_class)
    _check_model_class(cls, model_config, directory)
    sparse_path = os.path.join(directory, CONFIG_NAME)
    shapes = getattr(model_config, SHAPES_KEY, None)
    if os.path.isfile(sparse_path):
        sparse_config = SparseConfig.from_pretrained(directory)
        tensors, metadata = read_weights(directory)
        model = build_empty(cls, model_config, kwargs)
        if shapes is not None:  # a shrunk model sparsified again
            apply_shapes(model, shapes)
        else:
            _check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                          {k: tuple(v.shape) for k, v in tensors.items()}, directory)
        try:  # the scores are loaded below: skip computing an initial value from uninitialised weights
            sparsify_model(model, dataclasses.replace(sparse_config, score_init="ones"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{sparse_path} does not fit the model in {directory}: {e}") from e
        setattr(model, CONFIG_ATTR, sparse_config)
        structure = SparseStructure(model)
        built = {name: g.num_units for name, g in zip(structure.names, structure.groups)}
        saved = json.loads(metadata.get("hf_sparse_groups", "null") or "null")
        if saved is not None and saved != built:
            diff = sorted(set(saved.items()) ^ set(built.items()))[:6]
            raise ValueError(
                f"{sparse_path} does not fit the weights in {directory}: the unit groups it builds differ from the "
                f"saved ones (group, units) {diff}; was sparse_config.json edited or copied from another model?"
            )
        assign_state(model, tensors, f"the model that {CONFIG_NAME} describes", directory)
        restore_from_folder(model, directory)
    elif shapes is not None:
        tensors, _ = read_weights(directory)
        model = build_empty(cls, model_config, kwargs)
        apply_shapes(model, shapes)
        assign_state(model, tensors, f"the layer sizes in config.json ({SHAPES_KEY})", directory)
    else:
        try:
            model = cls.from_pretrained(directory, **kwargs)
        except (RuntimeError, ValueError):  # Transformers' message names no cause: check for a lost shapes key
            _check_shapes(_meta_shapes(cls, model_config, kwargs), _saved_shapes(directory), directory)
            raise
    return model.eval()


def _check_model_class(cls, model_config, directory: str) -> None:
    """Refuse a concrete `model_class` of another model type: building it failed deep in its `__init__`
    (`AttributeError: type_vocab_size`), and `from_pretrained` even loaded a randomly initialised model."""
    expected = getattr(cls, "config_class", None)  # Auto classes have none: they dispatch on the config
    if not isinstance(expected, type) or isinstance(model_config, expected):
        return
    model_type = getattr(model_config, "model_type", None)
    built = getattr(model_config, "architectures", None) or []
    auto = _auto_class_for(cls, model_type)
    raise ValueError(
        f"model_class={cls.__name__} expects a {expected.__name__} (model_type "
        f"{getattr(expected, 'model_type', None)!r}), but {os.path.join(directory, 'config.json')} holds a "
        f"{type(model_config).__name__} (model_type {model_type!r}). Omit model_class"
        + (f" to build {built[0]}" if built else "")
        + f", or pass a class for {model_type!r} models"
        + (f", e.g. transformers.{auto[0]} (it builds {auto[1]})" if auto else
           ", e.g. an Auto class such as transformers.AutoModelForCausalLM")
    )


def _auto_class_for(cls, model_type) -> tuple[str, str] | None:
    """(the Auto class of `cls`'s head, the class it builds for `model_type`), by name: nothing is imported."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover
        return None
    for auto, mapping in (
        ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
        ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
        ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
        ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
        ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
        ("AutoModel", "MODEL_MAPPING_NAMES"),
    ):
        names = getattr(modeling_auto, mapping, {})
        if model_type in names and any(cls.__name__ in ((n,) if isinstance(n, str) else n) for n in names.values()):
            return auto, str(names[model_type])
    return None


def _saved_shapes(directory: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers of a folder (no tensor is read); {} if there are none."""
    from safetensors import safe_open

    try:
        shapes = {}
        for path in weights_paths(directory):
            with safe_open(path, framework="pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        return shapes
    except Exception:  # noqa: BLE001 - unreadable weights: the loader's own error says so
        return {}


def _meta_shapes(cls, model_config, kwargs: dict) -> dict[str, tuple[int, ...]]:
    """The tensor shapes config.json builds, from a model on the meta device (no memory); {} if it fails."""
    try:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in build_empty(cls, model_config, kwargs).state_dict().items()}
    except Exception:  # noqa: BLE001 - a diagnosis never hides the loader's own error
        return {}


def _check_shapes(built: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]], directory: str) -> None:
    """Refuse saved weights whose shapes differ from the layers config.json builds (`built`), saying why:
    weights smaller than the layers are what a shrunk export whose config.json lost `hf_sparse_shapes` looks
    like (Transformers said only `ignore_mismatched_sizes`; nothing else in the folder tells it apart from an
    edited config.json, so the message names both)."""
    differ = [(k, saved[k], built[k]) for k in saved if k in built and tuple(saved[k]) != built[k]]
    if not differ:
        return
    key, file_shape, config_shape = differ[0]
    example = (f"{key}: {list(file_shape)} in the file, {list(config_shape)} from config.json; "
               f"{len(differ)} tensor(s) differ")
    path = os.path.join(directory, "config.json")
    if all(len(a) == len(b) and all(x <= y for x, y in zip(a, b)) for _, a, b in differ):
        raise ValueError(
            f"{path} does not fit the weights in {directory}: its layers are larger than the saved ones ({example}). "
            f"This is a shrunk export (export='shrink', or a sparse checkpoint of a shrunk model) whose config.json "
            f"lost `{SHAPES_KEY}`, its per-layer sizes. Fix: re-export the model (hf_sparse.export_model(model, "
            f"folder, export='shrink'), or save_sparse_pretrained), or restore the `{SHAPES_KEY}` key in config.json "
            "from the original export; if config.json was edited or copied from another model, put the saved one back"
        )
    raise ValueError(
        f"{path} does not fit the weights in {directory} ({example}); was config.json edited or copied from "
        "another model? Put back the config.json saved with these weights"
    )


# --- export in one call -------------------------------------------------------------------------------
def export_model(
    model: nn.Module, save_directory: str | os.PathLike, export: str = "plain", overwrite: bool = False
) -> str:
    """Write `model` in one of three forms without changing it in memory (plain and shrink work on a copy):

    - "plain": `unsparsify_model` -- the original classes, dropped units zeroed; loads with
      `AutoModel*.from_pretrained` anywhere;
    - "shrink": `unsparsify_model(shrink=True)` -- dropped units removed; loads with `load_sparse_model`;
    - "sparse": `save_sparse_pretrained` -- scores and masks kept, to continue training.

    The masks are used as they are: call `fix_masks(model)` first. Returns the folder.
    """
    if export not in EXPORTS:
        raise ValueError(f"export must be one of {EXPORTS}, got {export!r}")
    if export == "sparse":
        return save_sparse_pretrained(model, save_directory, overwrite=overwrite)
    if not is_sparsified(model):
        raise ValueError("export_model needs a sparsified model (call hf_sparse.sparsify_model first)")
    if not masks_fixed(model):
        logger.warning("hf_sparse.export_model: the mask is not fixed; exporting the current one (call fix_masks)")
    if contains_lora(model):
        raise ValueError("export_model: merge the LoRA adapters first with hf_sparse.merge_lora_sparse(model)")
    check_target(os.path.abspath(os.fspath(save_directory)), overwrite)
    out = unsparsify_model(copy.deepcopy(model), shrink=export == "shrink")
    with atomic_folder(os.fspath(save_directory), overwrite) as tmp:
        out.save_pretrained(tmp)
    return os.path.abspath(os.fspath(save_directory))
