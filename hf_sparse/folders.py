"""Model folders on disk: safetensors reading and writing (each shared tensor once), config files, building an
empty model to assign saved tensors to, and atomic folders (written beside the target, renamed into place;
leftovers of killed saves removed)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections import defaultdict
from typing import Any, Iterator

import torch
from torch import nn

from .config import CONFIG_NAME
from .dropped import DROPPED_WEIGHTS_NAME, restore_dropped
from .model_state import parent_module

logger = logging.getLogger("hf_sparse.export")

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Keys of config.json that differ between two saves of the same model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")
# Files a model export owns: replacing a folder never carries these over from the old contents.
_MODEL_FILE_PREFIXES = ("model", "pytorch_model", "adapter_model")
_MODEL_FILES = ("config.json", "generation_config.json", CONFIG_NAME, "adapter_config.json", DROPPED_WEIGHTS_NAME)


def tie_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that share one tensor (e.g. lm_head.weight and the input embeddings)."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_id[id(tensor)].append(name)
    return [names for names in by_id.values() if len(names) > 1]


def write_safetensors(model: nn.Module, path: str, metadata: dict[str, str],
                       state: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """The whole state dict (or `state`, the same keys), each shared tensor once; returns {dropped alias: kept
    name}."""
    from safetensors.torch import save_file

    state = dict(model.state_dict() if state is None else state)
    aliases = {}
    for names in tie_groups(model):
        for alias in names[1:]:
            aliases[alias] = names[0]
            state.pop(alias)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    meta = dict(metadata, format="pt", hf_sparse_aliases=json.dumps(aliases, sort_keys=True))
    save_file(tensors, path, metadata=meta)
    return aliases


def read_weights(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def load_config(directory: str):
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


def resolve_class(model_config, model_class):
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


def build_empty(model_class, model_config, kwargs: dict[str, Any]) -> nn.Module:
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


def assign_state(model: nn.Module, tensors: dict[str, torch.Tensor], what: str, directory: str) -> None:
    """Assign the saved tensors (dtype and bits as saved), re-tie shared parameters, check that nothing is
    missing or left over."""
    ties = tie_groups(model)
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
        owner, attr = parent_module(model, source)
        tensor = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
        for alias in names:
            if alias == source:
                continue
            mod, a = parent_module(model, alias)
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


def check_target(target: str, overwrite: bool) -> None:
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
def atomic_folder(target: str, overwrite: bool) -> Iterator[str]:
    """Yields a temporary folder beside `target`; on success it replaces `target` by renames. An existing
    non-empty `target` is replaced only if it holds the same model (same config.json and sparse_config.json
    up to version fields) or `overwrite=True`; its files that are not model files (a tokenizer, a README)
    are carried over. On failure the temporary folder is removed and `target` is untouched."""
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    check_target(target, overwrite)
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


def save_config_files(model: nn.Module, folder: str) -> None:
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


def write_dropped(folder: str, dropped: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path = os.path.join(folder, DROPPED_WEIGHTS_NAME)
    if dropped:
        save_file({k: v.detach().cpu().contiguous() for k, v in dropped.items()}, path,
                  metadata={"format": "pt", "hf_sparse": "dropped units' weights, restored by load_sparse_model"})
    elif os.path.exists(path):
        os.remove(path)  # a folder saved over must not keep another mask's dropped values


def read_dropped(folder: str) -> dict[str, torch.Tensor] | None:
    path = os.path.join(folder, DROPPED_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is corrupt or truncated and cannot be read ({e}); re-save the model") from e


def restore_from_folder(model: nn.Module, folder: str) -> bool:
    """Put back the dropped entries saved in `folder` (after its masks were loaded); False if it has none."""
    dropped = read_dropped(folder)
    if dropped is None:
        return False
    restore_dropped(model, dropped, os.path.join(folder, DROPPED_WEIGHTS_NAME))
    return True
