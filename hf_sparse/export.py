"""From a trained sparse model to a checkpoint anyone can use.

- `fix_masks`: freeze the deterministic mask (top-K by score filling the budget, or the best of a few
  Bernoulli draws as in the reference code) and mark the structure fixed.
- `shrink_model` (`unsparsify_model(model, shrink=True)`): remove dropped neurons and heads physically.
  Per-layer sizes go into `config.hf_sparse_shapes` (config.json), and `load_sparse_model` rebuilds them.
- `save_sparse_pretrained` / `load_sparse_model`: a still-trainable sparse model (weights, scores, masks,
  `sparse_config.json`), bit-identical on reload; `load_sparse_model` also loads shrunk and plain exports.
- `export_model`: write any of the three formats without touching the model in memory.
- `merge_lora_sparse`: merge PEFT LoRA adapters into a sparsified base so the merged model stays sparse.

Every folder is written to a temporary folder beside the target and renamed into place, so a failure never
leaves a folder that looks complete; a folder holding a different model is only replaced with
`overwrite=True`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .config import CONFIG_NAME, SparseConfig
from .layers import Conv1D, MaskedWeightLinear, SparseLinear
from .patching import CONFIG_ATTR, _lora_parts, get_sparse_config, is_sparsified, sparsify_model, unsparsify_model
from .dropped import DROPPED_WEIGHTS_NAME, split_dropped
from .structure import SparseStructure, UnitGroup, sample_masks, unit_rows
from .trainer_checkpoint import restore_from_folder, write_dropped

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHAPES_KEY = "hf_sparse_shapes"  # the attribute of the Transformers config (a field of config.json)
SHAPES_VERSION = 1
SPARSE_FORMAT = "hf_sparse.sparse"
EXPORTS = ("plain", "shrink", "sparse")
FIX_METHODS = ("topk", "sample")
# Keys of config.json that differ between two saves of the same model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")
# Files a model export owns: replacing a folder never carries these over from the old contents.
_MODEL_FILE_PREFIXES = ("model", "pytorch_model", "adapter_model")
_MODEL_FILES = ("config.json", "generation_config.json", CONFIG_NAME, "adapter_config.json", DROPPED_WEIGHTS_NAME)


# --- fixing the mask ----------------------------------------------------------------------------------
def masks_fixed(model: nn.Module) -> bool:
    """True when `fix_masks` froze the mask of every unit group (the flag is saved with the state dict)."""
    groups = [m for m in model.modules() if isinstance(m, UnitGroup)]
    return bool(groups) and all(bool(g.fixed) for g in groups)


@torch.no_grad()
def fix_masks(
    model: nn.Module,
    method: str = "topk",
    num_draws: int = 10,
    score_fn: Callable[[nn.Module], float] | None = None,
    seed: int = 0,
    sparsity: float | None = None,
) -> torch.Tensor:
    """Freeze the final mask and mark the structure fixed; returns the flat mask.

    method="topk" (the default): units by descending score, kept while they fit in the budget
    `(1 - sparsity) * total cost` (costs as `SparseConfig.budget` says) -- deterministic and reproducible.
    method="sample": the reference code's rule: draw `num_draws` Bernoulli(scores) masks (from `seed`) and
    keep the one with the highest `score_fn(model)` (called with that mask set, under `torch.no_grad()`;
    e.g. minus the loss on a few training batches). Sampled masks meet the budget only in expectation.
    `sparsity` overrides the config's target for "topk".
    """
    if not is_sparsified(model):
        raise ValueError("fix_masks needs a sparsified model: call hf_sparse.sparsify_model(model, config) first")
    if method not in FIX_METHODS:
        raise ValueError(f"fix_masks: method must be one of {FIX_METHODS}, got {method!r}")
    config = get_sparse_config(model)
    structure = SparseStructure(model)
    if method == "topk":
        if score_fn is not None:
            raise ValueError("fix_masks: score_fn is only used by method='sample'; drop it or pass method='sample'")
        if sparsity is None:
            sparsity = config.sparsity
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"fix_masks: sparsity must be a number in [0, 1), got {sparsity!r}")
        scores = structure.scores()
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("fix_masks: some keep probabilities are not finite (NaN/inf); the structure training "
                             "diverged. Train again with a lower structure_learning_rate; nothing was fixed")
        if structure.scores_tied():
            raise ValueError(
                "fix_masks: the scores were never trained (every keep probability is equal), so a top-K mask would "
                "be chosen by ties. Train with SparseTrainer first, start from an informed guess "
                "(SparseConfig(score_init='magnitude')), or set the scores yourself (SparseStructure.set_scores)"
            )
        costs = structure.costs(config.budget)
        mask = structure.topk_mask(costs, (1.0 - float(sparsity)) * float(costs.double().sum()))
    else:
        if score_fn is None or not callable(score_fn):
            raise ValueError(
                "fix_masks(method='sample') needs score_fn: a callable score_fn(model) -> float, higher is better "
                "(e.g. minus the loss on a few batches); it is called once per draw with that mask set"
            )
        if sparsity is not None:
            raise ValueError("fix_masks: sparsity only applies to method='topk' (sampled masks follow the scores)")
        if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
            raise ValueError(f"fix_masks: num_draws must be an integer >= 1, got {num_draws!r}")
        if not isinstance(seed, int):
            raise ValueError(f"fix_masks: seed must be an integer, got {seed!r}")
        draws = sample_masks(structure.scores(), num_draws, seed, step=0)
        best, best_value = None, -math.inf
        for k, draw in enumerate(draws):
            structure.set_masks(draw)
            value = float(score_fn(model))
            logger.info("hf_sparse.fix_masks: draw %d of %d: score %.6g", k + 1, num_draws, value)
            if math.isnan(value):  # a diverged draw never wins
                value = -math.inf
            if best is None or value > best_value:
                best, best_value = draw, value
        mask = best
    structure.set_masks(mask)
    for g in structure:
        g.fixed.fill_(True)
    return structure.masks().clone()


# --- shrinking ----------------------------------------------------------------------------------------
class ZeroInputConv1D(Conv1D):
    """A GPT-2 `Conv1D` with no input features (every consumed unit removed): its output is the bias.
    `Conv1D.forward` reshapes with `view(-1, 0)`, which torch rejects for an empty tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.nf) + self.bias.to(x.dtype)


class NoHeadsAttention(nn.Module):
    """Stands in for an attention module whose heads were all removed: the attention adds nothing, so its
    output is the output projection's bias (or, where the projection lives outside, an empty tensor that the
    outer output layer turns into its bias). It keeps the original submodules (zero-sized), so state-dict
    keys do not change, and hands an empty key/value to the cache so the cache length stays right."""

    def __init__(self, original: nn.Module, consumer: str | None, head_dim: int):
        super().__init__()
        for name, value in vars(original).items():  # layer_idx, is_causal, config, ...: read by some callers
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        for name, child in original.named_children():
            self.add_module(name, child)
        self.consumer = consumer
        self.removed_head_dim = head_dim
        self.original_class = type(original).__name__

    def extra_repr(self) -> str:
        return f"no heads left (was {self.original_class})"

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        x = hidden_states if hidden_states is not None else args[0]
        lead = x.shape[:-1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer_idx = getattr(self, "layer_idx", None)
        if cache is not None and hasattr(cache, "update") and layer_idx is not None and x.dim() == 3:
            empty = x.new_zeros(x.shape[0], 0, x.shape[1], self.removed_head_dim)
            with contextlib.suppress(Exception):  # a cache that cannot hold zero heads just stays unused
                cache.update(empty, empty.clone(), layer_idx)
        if self.consumer is None:
            return x.new_zeros(*lead, 0), None
        layer = self.get_submodule(self.consumer)
        out_features = layer.nf if isinstance(layer, Conv1D) else layer.out_features
        out = x.new_zeros(*lead, out_features)
        if getattr(layer, "bias", None) is not None:
            out = out + layer.bias.to(x.dtype)
        return out, None


def _new_layer(transposed: bool, in_features: int, out_features: int, bias: bool, device="meta") -> nn.Module:
    """A Linear / Conv1D of the given shape whose parameters are assigned after (on `device`, meta by default)."""
    with torch.device(device), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        if not transposed:
            return nn.Linear(in_features, out_features, bias=bias)
        cls = ZeroInputConv1D if in_features == 0 else Conv1D
        return cls(out_features, in_features)


def _shrunk_layer(layer: SparseLinear, kept: torch.Tensor) -> nn.Module:
    if layer.role == "out":
        idx = unit_rows(kept, layer.width, layer.segments, layer.segment_size)
        in_f, out_f = layer.in_features, int(idx.numel())
    else:
        idx = unit_rows(kept, layer.width, 1, 0)
        in_f, out_f = int(idx.numel()), layer.out_features
    new = _new_layer(layer.transposed, in_f, out_f, layer.bias is not None)
    dim = (1 if layer.transposed else 0) if layer.role == "out" else (0 if layer.transposed else 1)
    w = layer.weight.detach().index_select(dim, idx.to(layer.weight.device)).clone()
    new.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
    if layer.bias is not None:
        b = layer.bias.detach()
        b = b.index_select(0, idx.to(b.device)).clone() if layer.role == "out" else b.clone()
        new.bias = nn.Parameter(b, requires_grad=layer.bias.requires_grad)
    elif not layer.transposed:
        new.bias = None
    return new


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def _head_counts(kept_units: int, width_of_group: int, head_dim: int) -> dict[str, int]:
    """Head-count attributes an attention module may keep (set only where the module has them)."""
    query_heads = kept_units * (width_of_group // head_dim)
    return {"num_heads": query_heads, "num_attention_heads": query_heads, "num_key_value_heads": kept_units,
            "all_head_size": query_heads * head_dim}


@torch.no_grad()
def shrink_model(model: nn.Module) -> nn.Module:
    """Physically remove the dropped neurons and heads (by the current mask: call `fix_masks` first).

    Returns the model (changed in place) with plain `nn.Linear` / `Conv1D` layers of the kept sizes and the
    attention modules' head counts adjusted. The per-layer sizes are stored in `model.config.hf_sparse_shapes`,
    so `model.save_pretrained(path)` writes them to config.json and `hf_sparse.load_sparse_model(path)`
    rebuilds the model (plain `from_pretrained` would see the dense sizes and refuse the weights).
    """
    if not is_sparsified(model):
        raise ValueError("shrink_model needs a sparsified model: call hf_sparse.sparsify_model(model, config) first")
    config = get_sparse_config(model)
    if config.uses_weights:
        raise ValueError(
            "element-wise (granularity='weight') sparsity cannot be removed physically; export it with "
            "hf_sparse.unsparsify_model(model) (dropped weights zeroed) instead"
        )
    names = {id(m): n for n, m in model.named_modules()}
    members: dict[int, list[tuple[str, SparseLinear]]] = defaultdict(list)
    for name, module in model.named_modules():
        if isinstance(module, MaskedWeightLinear) or not isinstance(module, SparseLinear):
            continue
        if _is_lora_member(model, name):
            raise ValueError(
                f"{name} belongs to a PEFT LoRA layer; merge the adapters first with "
                "hf_sparse.merge_lora_sparse(model, shrink=True)"
            )
        members[id(module.group)].append((name, module))
    structure = SparseStructure(model)
    model_config = getattr(model, "config", None)
    if model_config is None:
        raise ValueError("shrink_model needs a Transformers model (with a .config to store the layer sizes in)")
    # a model shrunk before (and sparsified again) keeps the sizes of the layers this round leaves alone
    shapes = copy.deepcopy(getattr(model_config, SHAPES_KEY, None)) or {}
    shapes = {"version": SHAPES_VERSION, "modules": {}, "attributes": {}, "no_heads": {}, **shapes}
    plan = []  # compute everything first, then swap
    for group_name, group in zip(structure.names, structure.groups):
        kept = group.mask.nonzero().squeeze(1)
        layers = members[id(group)]
        if not layers:
            raise ValueError(f"unit group {group_name} has no layers")
        new_layers = [(name, layer, _shrunk_layer(layer, kept)) for name, layer in layers]
        attrs: dict[str, dict[str, int]] = defaultdict(dict)
        no_heads = None
        if group.kind == "head":
            out_layers = [(n, l) for n, l in layers if l.role == "out"]
            in_layers = [(n, l) for n, l in layers if l.role == "in"]
            for module, attr, width in group._head_attrs:
                attrs[names[id(module)]][attr] = int(kept.numel()) * width
            # the module that reshapes into heads: the parent of the producers (q/k/v or c_attn)
            attn_name = out_layers[0][0].rpartition(".")[0]
            attn = model.get_submodule(attn_name)
            head_dim = _head_dim(attn, model_config)
            group_width = max(l.width for _, l in out_layers)
            for attr, value in _head_counts(int(kept.numel()), group_width, head_dim).items():
                if attr in vars(attn) and attr not in attrs[attn_name] and isinstance(vars(attn)[attr], int):
                    attrs[attn_name][attr] = value
            if kept.numel() == 0:
                consumer = in_layers[0][0]
                inside = consumer.startswith(attn_name + ".")
                no_heads = (attn_name, consumer[len(attn_name) + 1:] if inside else None, head_dim)
        plan.append((group_name, group, new_layers, attrs, no_heads))

    for group_name, group, new_layers, attrs, no_heads in plan:
        for name, layer, new in new_layers:
            parent, child = _parent(model, name)
            setattr(parent, child, new)
            shapes["modules"][name] = {"in_features": _in_features(new), "out_features": _out_features(new)}
        group._head_attrs = []  # the attributes now follow the kept sizes, not the dense ones
        for module_name, values in attrs.items():
            module = model.get_submodule(module_name)
            for attr, value in values.items():
                setattr(module, attr, value)
            shapes["attributes"].setdefault(module_name, {}).update(values)
        if no_heads is not None:
            attn_name, consumer, head_dim = no_heads
            parent, child = _parent(model, attn_name)
            setattr(parent, child, NoHeadsAttention(model.get_submodule(attn_name), consumer, head_dim))
            shapes["no_heads"][attn_name] = {"consumer": consumer, "head_dim": head_dim}
        owner, attr = _parent(model, group_name)
        delattr(owner, attr)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    setattr(model_config, SHAPES_KEY, shapes)
    return model


def _head_dim(attn: nn.Module, model_config) -> int:
    for attr in ("head_dim", "attention_head_size"):
        value = vars(attn).get(attr)
        if isinstance(value, int):
            return value
    from .architectures import head_geometry

    return head_geometry(model_config).head_dim


def _in_features(layer: nn.Module) -> int:
    return layer.nx if isinstance(layer, Conv1D) else layer.in_features


def _out_features(layer: nn.Module) -> int:
    return layer.nf if isinstance(layer, Conv1D) else layer.out_features


def _is_lora_member(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if _lora_parts(model.get_submodule(".".join(parts[:i]))) is not None:
            return True
    return False


def apply_shapes(model: nn.Module, shapes: dict[str, Any]) -> nn.Module:
    """Resize a freshly built dense model to the per-layer sizes of a shrunk export (in place; the new layers'
    values are whatever their constructor gives until a state dict is loaded)."""
    if not isinstance(shapes, dict) or shapes.get("version") != SHAPES_VERSION:
        raise ValueError(
            f"config.{SHAPES_KEY} is malformed or of an unknown version (expected version {SHAPES_VERSION}): "
            f"{str(shapes)[:200]}"
        )
    try:
        for name, size in shapes["modules"].items():
            old = model.get_submodule(name)
            transposed = isinstance(old, Conv1D)
            if not (transposed or type(old) is nn.Linear):
                raise ValueError(f"{name} is a {type(old).__name__}, expected nn.Linear or Conv1D")
            parent, child = _parent(model, name)
            new = _new_layer(transposed, int(size["in_features"]), int(size["out_features"]), old.bias is not None,
                             device=old.weight.device)  # real tensors: the model may be sparsified before loading
            setattr(parent, child, new.to(old.weight.dtype))
        for name, values in shapes["attributes"].items():
            module = model.get_submodule(name)
            for attr, value in values.items():
                setattr(module, attr, value)
        for name, spec in shapes["no_heads"].items():
            parent, child = _parent(model, name)
            setattr(parent, child, NoHeadsAttention(model.get_submodule(name), spec["consumer"], int(spec["head_dim"])))
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(
            f"config.{SHAPES_KEY} does not fit this model ({type(e).__name__}: {e}); was the export made from "
            "another architecture?"
        ) from e
    return model


# --- files --------------------------------------------------------------------------------------------
def _tie_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that share one tensor (e.g. lm_head.weight and the input embeddings)."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_id[id(tensor)].append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _write_safetensors(model: nn.Module, path: str, metadata: dict[str, str],
                       state: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """The whole state dict (or `state`, the same keys), each shared tensor once; returns {dropped alias: kept
    name}."""
    from safetensors.torch import save_file

    state = dict(model.state_dict() if state is None else state)
    aliases = {}
    for names in _tie_groups(model):
        for alias in names[1:]:
            aliases[alias] = names[0]
            state.pop(alias)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    meta = dict(metadata, format="pt", hf_sparse_aliases=json.dumps(aliases, sort_keys=True))
    save_file(tensors, path, metadata=meta)
    return aliases


def _read_weights(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a folder's safetensors file(s) and the first file's metadata; clear errors."""
    from safetensors import SafetensorError, safe_open

    single = os.path.join(directory, WEIGHTS_NAME)
    index = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted({os.path.join(directory, v) for v in json.load(f)["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is corrupt ({e})") from e
    else:
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {directory}: the weights file is missing"
        )
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing (named in {WEIGHTS_INDEX_NAME})")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = metadata or dict(f.metadata() or {})
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{path} is corrupt or truncated and cannot be read ({e}); re-export the model") from e
    return tensors, metadata


def _load_config(directory: str):
    from transformers import AutoConfig

    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {directory}: is it a folder saved by hf_sparse or Transformers?")
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt") from e
    return AutoConfig.from_pretrained(directory)


def _resolve_class(model_config, model_class):
    if model_class is not None:
        return model_class
    import transformers

    for name in getattr(model_config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ValueError(
        "cannot tell which model class to build "
        f"(config.architectures={getattr(model_config, 'architectures', None)}); "
        "pass model_class=, e.g. transformers.AutoModelForCausalLM or the concrete class"
    )


def _build(model_class, model_config, kwargs: dict[str, Any]) -> nn.Module:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        no_init_weights = contextlib.nullcontext
    with no_init_weights():  # every tensor is assigned from the file afterwards
        if hasattr(model_class, "from_config"):  # Auto classes
            model = model_class.from_config(model_config, **kwargs)
        elif hasattr(model_class, "_from_config"):  # what the Auto classes call: honours dtype, attention
            model = model_class._from_config(model_config, **kwargs)
        else:
            model = model_class(model_config)
    if hasattr(model, "tie_weights"):  # no_init_weights skips the tying too
        model.tie_weights()
    return model


def _assign_state(model: nn.Module, tensors: dict[str, torch.Tensor], what: str, directory: str) -> None:
    """Assign the saved tensors (dtype and bits as saved), re-tie shared parameters, check that nothing is
    missing or left over."""
    ties = _tie_groups(model)
    tied_alias = {alias: names for names in ties for alias in names}
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the weights in {directory} do not fit {what}: {e}") from e
    missing = [k for k in result.missing_keys if not any(n in tensors for n in tied_alias.get(k, ()))]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the weights in {directory} do not fit {what}: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
            f"{' ...' if len(result.unexpected_keys) > 8 else ''}"
        )
    for names in ties:  # assign=True gave every name its own Parameter: share the saved one again
        source = next((n for n in names if n in tensors), names[0])
        owner, attr = _parent(model, source)
        tensor = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
        for alias in names:
            if alias == source:
                continue
            mod, a = _parent(model, alias)
            if a in mod._parameters:
                mod._parameters[a] = tensor
            else:
                mod._buffers[a] = tensor
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise ValueError(f"the weights in {directory} do not fit {what}: no values for {leftover[:8]}")


def _config_identity(directory: str) -> tuple[dict | None, dict | None]:
    def read(name):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            return {"<unreadable>": name}
        if isinstance(data, dict):
            for key in _VOLATILE_CONFIG_KEYS:
                data.pop(key, None)
        return data

    return read("config.json"), read(CONFIG_NAME)


def _owned_by_export(name: str) -> bool:
    return name in _MODEL_FILES or (
        name.startswith(_MODEL_FILE_PREFIXES) and name.endswith((".safetensors", ".bin", ".json"))
    )


def _check_target(target: str, overwrite: bool) -> None:
    """Early refusal (before any writing) of a non-empty folder that is not a model checkpoint."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target} exists and is not a folder")
    if overwrite or not os.path.isdir(target) or not os.listdir(target):
        return
    if not os.path.isfile(os.path.join(target, "config.json")):
        raise FileExistsError(
            f"{target} is not empty and holds no model (no config.json); refusing to replace it. Choose another "
            "folder, or pass overwrite=True to replace its contents"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(target: str) -> None:
    """Remove what saves of `target` killed midway left beside it (`.name.tmp-PID-*`, `.name.old-PID-*` of
    processes that no longer run): a kill skips every cleanup, and each left a model-sized folder."""
    parent, base = os.path.dirname(target), os.path.basename(target)
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        for kind in (".tmp-", ".old-"):
            prefix = f".{base}{kind}"
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
                logger.info("hf_sparse: removed %s, left by a save that was killed", entry)


@contextlib.contextmanager
def _atomic_folder(target: str, overwrite: bool) -> Iterator[str]:
    """Yields a temporary folder beside `target`; on success it replaces `target` by renames. An existing
    non-empty `target` is replaced only if it holds the same model (same config.json and sparse_config.json
    up to version fields) or `overwrite=True`; its files that are not model files (a tokenizer, a README)
    are carried over. On failure the temporary folder is removed and `target` is untouched."""
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    _check_target(target, overwrite)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(target)
    # the writer's pid in the name: a later save can tell a dead writer's leftovers from a live one's folder
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-{os.getpid()}-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(target) and os.listdir(target):
            if not overwrite and _config_identity(target) != _config_identity(tmp):
                raise FileExistsError(
                    f"{target} already holds a different model (its config.json / {CONFIG_NAME} differ from this "
                    "one's); nothing was written. Choose another folder, or pass overwrite=True to replace it"
                )
            written = set(os.listdir(tmp))
            for name in os.listdir(target):
                if name in written or _owned_by_export(name):
                    continue
                src, dst = os.path.join(target, name), os.path.join(tmp, name)
                if os.path.isdir(src):
                    shutil.copytree(src, dst, symlinks=True)
                else:
                    shutil.copy2(src, dst, follow_symlinks=False)
            old = os.path.join(parent, f".{os.path.basename(target)}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(target):
                os.rmdir(target)
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_config_files(model: nn.Module, folder: str) -> None:
    # as PreTrainedModel.save_pretrained does: record the class (to rebuild it) and the dtype
    model.config.architectures = [type(model).__name__]
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        model.config.dtype = str(dtype).split(".")[1]
    model.config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation_config is not None and callable(can_generate) and can_generate():
        generation_config.save_pretrained(folder)


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
    if _contains_lora(model):
        raise ValueError(
            "save_sparse_pretrained does not save PEFT models; merge the adapters with "
            "hf_sparse.merge_lora_sparse(model) and export the merged model, or save the adapters with PEFT"
        )
    if getattr(model, "config", None) is None:
        raise ValueError("save_sparse_pretrained needs a Transformers model (with a .config)")
    config = get_sparse_config(model)
    structure = SparseStructure(model)
    with _atomic_folder(os.fspath(save_directory), overwrite) as tmp:
        groups = {name: g.num_units for name, g in zip(structure.names, structure.groups)}
        # dropped entries as explicit zeros (plain from_pretrained then computes the sparse model), their values
        # apart (load_sparse_model puts them back: training can go on from the same weights)
        state, dropped = split_dropped(model, model.state_dict())
        _write_safetensors(
            model, os.path.join(tmp, WEIGHTS_NAME),
            {"hf_sparse_format": SPARSE_FORMAT, "hf_sparse_groups": json.dumps(groups)}, state=state,
        )
        write_dropped(tmp, dropped)
        _save_config_files(model, tmp)
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
    model_config = _load_config(directory)
    cls = _resolve_class(model_config, model_class)
    sparse_path = os.path.join(directory, CONFIG_NAME)
    shapes = getattr(model_config, SHAPES_KEY, None)
    if os.path.isfile(sparse_path):
        sparse_config = SparseConfig.from_pretrained(directory)
        tensors, metadata = _read_weights(directory)
        model = _build(cls, model_config, kwargs)
        if shapes is not None:  # a shrunk model sparsified again
            apply_shapes(model, shapes)
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
        _assign_state(model, tensors, f"the model that {CONFIG_NAME} describes", directory)
        restore_from_folder(model, directory)
    elif shapes is not None:
        tensors, _ = _read_weights(directory)
        model = _build(cls, model_config, kwargs)
        apply_shapes(model, shapes)
        _assign_state(model, tensors, f"the layer sizes in config.json ({SHAPES_KEY})", directory)
    else:
        model = cls.from_pretrained(directory, **kwargs)
    return model.eval()


def _contains_lora(model: nn.Module) -> bool:
    return any(_lora_parts(m) is not None for m in model.modules())


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
    if _contains_lora(model):
        raise ValueError("export_model: merge the LoRA adapters first with hf_sparse.merge_lora_sparse(model)")
    _check_target(os.path.abspath(os.fspath(save_directory)), overwrite)
    out = unsparsify_model(copy.deepcopy(model), shrink=export == "shrink")
    with _atomic_folder(os.fspath(save_directory), overwrite) as tmp:
        out.save_pretrained(tmp)
    return os.path.abspath(os.fspath(save_directory))


# --- PEFT ---------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_lora_sparse(model: nn.Module, shrink: bool = False, adapter_names: list[str] | None = None,
                      safe_merge: bool = False) -> nn.Module:
    """Merge the LoRA adapters of a sparsified PEFT model so that the merged model is exactly as sparse:
    fixes the top-K mask if it is not fixed, zeroes the dropped units in the base layers and in the adapters
    (lora_B rows of producers, lora_A columns of consumers, so B @ A is zero there too), then runs PEFT's
    `merge_and_unload`. Returns the plain merged model (`shrink=True`: with the dropped units removed)."""
    if not is_sparsified(model):
        raise ValueError("merge_lora_sparse needs a sparsified PEFT model (sparsify_model(peft_model, config))")
    if not hasattr(model, "merge_and_unload") or not _contains_lora(model):
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
