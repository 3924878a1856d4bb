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
from .dropped import DROPPED_WEIGHTS_NAME, restore_dropped, unit_slices
from .model_state import parent_module
from .structure import SparseStructure

logger = logging.getLogger("hf_sparse.export")

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# the metadata key under which a weights file records the SparseConfig it was saved with
CONFIG_STAMP_KEY = "hf_sparse_config"
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


def weights_paths(directory: str) -> list[str]:
    """The safetensors file(s) of a saved folder: model.safetensors, or the shards its index names; clear errors."""
    single = os.path.join(directory, WEIGHTS_NAME)
    index = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                return sorted({os.path.join(directory, v) for v in json.load(f)["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index} is corrupt ({e})") from e
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {directory}: the weights file is missing")


def read_weights(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a folder's safetensors file(s) and the first file's metadata; clear errors."""
    from safetensors import SafetensorError, safe_open

    files = weights_paths(directory)
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
        recovered = interrupted_save(os.path.abspath(directory))
        if recovered is not None:
            raise FileNotFoundError(
                f"{directory} is not a folder: a save into it was killed between its two renames, and the complete "
                f"model is in {recovered}. Rename that folder to {directory} (the next save into {directory} does it)"
            )
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
    """Early refusal (before any writing) of a non-empty folder that is not a model checkpoint, and of a path
    under a file (`os.makedirs` said only `[Errno 17] File exists`, naming neither the target nor the fix)."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target} exists and is not a folder")
    ancestor = os.path.dirname(os.path.abspath(target))
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise NotADirectoryError(
            f"cannot write {target}: {ancestor} is a file, not a folder; choose a folder path (one whose existing "
            "parts are all folders)"
        )
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


def _dead_leftovers(target: str) -> dict[str, list[str]]:
    """{".tmp-" / ".old-": [paths]} that saves of `target` by processes no longer running left beside it (a kill
    skips every cleanup), newest first."""
    parent, base = os.path.dirname(target), os.path.basename(target)
    found: dict[str, list[str]] = {".tmp-": [], ".old-": []}
    if not os.path.isdir(parent):
        return found
    for entry in os.listdir(parent):
        for kind in found:
            prefix = f".{base}{kind}"
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                found[kind].append(os.path.join(parent, entry))
    for paths in found.values():
        paths.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    return found


def interrupted_save(target: str) -> str | None:
    """Where the last complete save of a missing `target` lies, if a save was killed between its two renames
    (target moved aside to `.old-`, the finished new folder `.tmp-` not yet moved in): that `.tmp-` folder (it
    was complete before the first rename), else the `.old-` one."""
    if os.path.exists(target):
        return None
    left = _dead_leftovers(target)
    if not left[".old-"]:
        return None  # a kill before the renames: the target never existed, the .tmp- folder is incomplete
    for tmp in left[".tmp-"]:
        pid = os.path.basename(tmp).split(".tmp-", 1)[1].split("-", 1)[0]
        if any(os.path.basename(old).split(".old-", 1)[1].startswith(f"{pid}-") for old in left[".old-"]):
            return tmp
    return left[".old-"][0]


def _remove_stale_temporaries(target: str) -> None:
    """Clean up what saves of `target` killed midway left beside it. A save killed between its two renames left
    the target missing and the model in its temporaries: the complete one is moved back into place first (and
    said so); every other leftover is removed, each named in a warning."""
    recovered = interrupted_save(target)
    if recovered is not None:
        os.rename(recovered, target)
        logger.warning("hf_sparse: %s was missing: a save killed between its two renames had left it in %s; moved it "
                       "back into place", target, os.path.basename(recovered))
    for paths in _dead_leftovers(target).values():
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("hf_sparse: removed %s, left incomplete or superseded by a save that was killed", path)


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


def write_dropped(folder: str, dropped: dict[str, torch.Tensor], config=None) -> None:
    """The dropped units' values; `config` (the SparseConfig they were split by) is recorded in the file's
    metadata, so a load can tell an edited sparse_config.json from the one saved with them."""
    from safetensors.torch import save_file

    path = os.path.join(folder, DROPPED_WEIGHTS_NAME)
    if dropped:
        metadata = {"format": "pt", "hf_sparse": "dropped units' weights, restored by load_sparse_model"}
        if config is not None:
            metadata[CONFIG_STAMP_KEY] = config.to_json_string()
        save_file({k: v.detach().cpu().contiguous() for k, v in dropped.items()}, path, metadata=metadata)
    elif os.path.exists(path):
        os.remove(path)  # a folder saved over must not keep another mask's dropped values


def _file_metadata(path: str) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is corrupt or truncated and cannot be read ({e}); re-save the model") from e


def check_config_stamp(folder: str) -> None:
    """Refuse a `sparse_config.json` that differs from the config its weights were saved with (recorded in the
    metadata of the dropped values and of save_sparse_pretrained's weights): an edited target would otherwise
    load silently into a model whose masks were chosen for another one."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return
    for source in (DROPPED_WEIGHTS_NAME, WEIGHTS_NAME):
        stamp = _file_metadata(os.path.join(folder, source)).get(CONFIG_STAMP_KEY)
        if stamp is None:
            continue
        saved = json.loads(stamp)
        with open(path, encoding="utf-8") as f:
            current = json.load(f)
        changed = {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
                   if saved.get(k) != current.get(k)}
        if changed:
            shown = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"{path} differs from the config its weights were saved with ({shown}); the file was edited or "
                f"copied from another save, and its masks were chosen for the saved values. Restore those values; to "
                "go on at another target, load the folder as saved and change it in code "
                "(hf_sparse.get_sparse_config(model).sparsity = ..., then train on or call hf_sparse.fix_masks)"
            )
        return


def saved_dropped_units(folder: str) -> int:
    """How many units the masks saved in `folder`'s weights drop (read from the mask entries only)."""
    from safetensors import safe_open

    try:
        files = weights_paths(folder)
    except FileNotFoundError:
        return 0  # an engine's own files (FSDP shards, DeepSpeed): the Trainer loads those itself
    dropped = 0
    for path in files:
        if not os.path.isfile(path):
            continue
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            for key in keys:
                if key.endswith(".mask") and key[: -len("mask")] + "scores" in keys:
                    dropped += int((f.get_tensor(key) == 0).sum())
    return dropped


def missing_dropped_message(folder: str, dropped_units: int) -> str:
    return (
        f"{folder} has no {DROPPED_WEIGHTS_NAME}, but its masks drop {dropped_units} units: their weights would come "
        "back as zeros, not as saved. Copy the file back from the original save. To use the sparse model as it "
        "computes (dropped units are zeros in its weights file), load it with plain from_pretrained"
    )


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
    """Put back the dropped entries saved in `folder` (after its masks were loaded); False if nothing is dropped.
    Refuses an edited sparse_config.json and a missing dropped-values file where the masks drop units."""
    check_config_stamp(folder)
    dropped = read_dropped(folder)
    if dropped is None:
        structure = SparseStructure(model)
        units = int((structure.masks() == 0).sum())
        if units and next(unit_slices(model, structure), None) is not None:
            raise ValueError(missing_dropped_message(folder, units))
        return False
    restore_dropped(model, dropped, os.path.join(folder, DROPPED_WEIGHTS_NAME))
    return True
