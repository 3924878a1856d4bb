"""Model cards and pushing to the Hugging Face Hub.

`render_model_card` fills `templates/model_card.md` (shipped inside the package) with numbers taken from the
model: the sparsity report per layer, the sparse config, how the structure was chosen (what `SparseTrainer`
recorded, or what the caller says: `structure_run`), and whatever the caller measured (training arguments,
evaluation results, speed vs dense with the hardware). `push_sparse_to_hub` exports the model (plain, shrunk or
still-trainable sparse), writes the card as README.md and uploads the folder. The card names the structure
method that ran: `vr-pge` only where search steps updated the keep probabilities with it (`structure_method`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import re
import shutil
import tempfile
from importlib import resources
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .export import EXPORTS, export_model, masks_fixed
from .card_method import schedule_plan, structure_method
from .model_state import STRUCTURE_RUN_ATTR
from .patching import get_sparse_config, is_sparsified
from .report import SparsityReport, sparsity_report

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "model_card.md"
CITATION = """@inproceedings{zhou2021efficient,
  title         = {Efficient Neural Network Training via Forward and Backward Propagation Sparsification},
  author        = {Zhou, Xiao and Zhang, Weizhong and Chen, Zonghao and Diao, Shizhe and Zhang, Tong},
  booktitle     = {Advances in Neural Information Processing Systems (NeurIPS)},
  volume        = {34},
  year          = {2021},
  eprint        = {2111.05685},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG}
}"""
# Training arguments always shown (when present), beside those that differ from their defaults.
_KEY_TRAINING_ARGS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps", "seed",
    # SparseTrainingArguments: the structure search
    "structure_learning_rate", "estimator", "mask_samples", "score_function", "importance_warmup", "warmup_loss_drop",
    "warmup_extend_until",
    "budget_schedule_start", "budget_schedule_end", "fix_masks_at",
)
# Never shown: secrets and local paths.
_HIDDEN_ARG = re.compile(r"(token|password|secret|_dir$|^output_dir$|^logging_dir$|^hub_|push_to_hub|report_to)")
_GRANULARITY = {"neuron": "MLP neurons", "head": "attention heads (key/value groups under GQA)",
                "weight": "single weights"}


class HubOfflineError(ConnectionError):
    """The push needs the network; the exported folder is kept so it can be uploaded later."""

    def __init__(self, message: str, folder: str):
        super().__init__(message)
        self.folder = folder


def describe_hardware() -> str:
    """One line: the GPU (if torch sees one) or the CPU model, and torch's thread count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (CPU, torch {torch.__version__})"


# --- rendering ----------------------------------------------------------------------------------------
def _percent(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _training_args_rows(training_args: Any) -> list[tuple[str, str]]:
    """Arguments that matter: the key ones and every one that differs from its default; never tokens or paths."""
    if training_args is None:
        return []
    if dataclasses.is_dataclass(training_args) and not isinstance(training_args, type):
        values = training_args.to_dict() if hasattr(training_args, "to_dict") else dataclasses.asdict(training_args)
        defaults = _default_args(training_args)
        chosen = {k: v for k, v in values.items()
                  if k in _KEY_TRAINING_ARGS or k not in defaults or _differs(v, defaults[k])}
    elif isinstance(training_args, Mapping):
        chosen = dict(training_args)
    else:
        raise TypeError(f"training_args must be TrainingArguments, a dataclass or a dict, got "
                        f"{type(training_args).__name__}")
    rows = []
    for key in sorted(chosen):
        if _HIDDEN_ARG.search(key):
            continue
        value = chosen[key]
        if hasattr(value, "value"):  # enums
            value = value.value
        rows.append((key, _fmt(value) if not isinstance(value, (list, dict)) else str(value)))
    return rows


def _default_args(training_args: Any) -> dict[str, Any]:
    """The values a default instance of the same class has after its own `__post_init__` normalisation."""
    try:
        kwargs = {"output_dir": training_args.output_dir} if hasattr(training_args, "output_dir") else {}
        default = type(training_args)(**kwargs)
        return default.to_dict() if hasattr(default, "to_dict") else dataclasses.asdict(default)
    except Exception:  # noqa: BLE001 - a class that needs more arguments: fall back to the field defaults
        defaults = {}
        for f in dataclasses.fields(training_args):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                defaults[f.name] = f.default_factory()  # type: ignore[misc]
        return defaults


def _differs(value: Any, default: Any) -> bool:
    if hasattr(default, "value"):
        default = default.value
    if hasattr(value, "value"):
        value = value.value
    try:
        return bool(value != default)
    except Exception:  # noqa: BLE001 - incomparable values are shown
        return True


def _speed_rows(speed: Any) -> list[dict[str, str]]:
    if speed is None:
        return []
    rows = [speed] if isinstance(speed, Mapping) else list(speed)
    out = []
    for row in rows:
        if not isinstance(row, Mapping) or "dense_ms" not in row or "sparse_ms" not in row:
            raise ValueError(
                "speed must be a dict (or a list of dicts) with 'dense_ms' and 'sparse_ms' (milliseconds per call) "
                f"and optionally 'setting' (what was timed); got {row!r}"
            )
        dense, sparse = float(row["dense_ms"]), float(row["sparse_ms"])
        if not (dense > 0 and sparse > 0):
            raise ValueError(f"speed: dense_ms and sparse_ms must be positive, got {row!r}")
        out.append({
            "setting": _fmt(row.get("setting", "forward pass")),
            "dense": f"{dense:.2f} ms", "sparse": f"{sparse:.2f} ms", "speedup": f"{dense / sparse:.2f}x",
        })
    return out


def _report_context(report: SparsityReport) -> dict[str, Any]:
    rows = []
    for g in report.groups:
        rows.append({
            "name": g.name.rpartition(".")[0] or g.name, "kind": g.kind, "kept": g.kept, "units": g.units,
            "params_kept": f"{g.params_kept:,}", "params": f"{g.params:,}",
            "percent": _percent(g.params_kept / g.params) if g.params else "-",
        })
    kept_units = sum(g.kept for g in report.groups)
    model_params_kept = report.total_params - report.prunable_params + report.prunable_params_kept
    return {
        "rows": rows,
        "sparsity": _percent(report.sparsity),
        "sparsity_percent": _percent(report.sparsity),
        "target_sparsity": _percent(report.target_sparsity),
        "prunable_params": f"{report.prunable_params:,}",
        "prunable_removed": f"{report.prunable_params - report.prunable_params_kept:,}",
        "kept_units": f"{kept_units:,}",
        "total_units": f"{sum(g.units for g in report.groups):,}",
        "model_params_kept": f"{model_params_kept:,}",
        "total_params": f"{report.total_params:,}",
        "flops_percent": _percent(report.forward_flops_fraction),
        "seq_len": report.seq_len,
    }


def _usage(export: str, class_name: str, repo_id: str | None) -> tuple[str, str]:
    repo = repo_id or "path/to/this/folder"
    if export == "plain":
        text = (
            "A plain Transformers checkpoint: the original module classes with the removed units' weights set to "
            "exactly zero. It loads anywhere, without hf_sparse."
        )
        usage = f'from transformers import {class_name}\n\nmodel = {class_name}.from_pretrained("{repo}")'
    elif export == "shrink":
        text = (
            "A shrunk checkpoint: the removed neurons and heads are physically gone, so the file is smaller and "
            "inference faster. The per-layer sizes are stored in `config.json` (`hf_sparse_shapes`); load it with "
            "`hf_sparse.load_sparse_model` (no `trust_remote_code`)."
        )
        usage = (
            "from huggingface_hub import snapshot_download\nimport hf_sparse\n\n"
            f'model = hf_sparse.load_sparse_model(snapshot_download("{repo}"))'
        )
    else:
        text = (
            "A trainable hf_sparse checkpoint: the dense weights, every unit's keep probability and the current "
            "mask (`sparse_config.json` says which units exist). Load it with `hf_sparse.load_sparse_model` to "
            "continue training or to export it."
        )
        usage = (
            "from huggingface_hub import snapshot_download\nimport hf_sparse\n\n"
            f'model = hf_sparse.load_sparse_model(snapshot_download("{repo}"))\n'
            "print(hf_sparse.sparsity_report(model))"
        )
    return text, usage


def render_model_card(
    model: nn.Module,
    base_model: str | None = None,
    *,
    training_args: Any = None,
    eval_results: Mapping[str, Any] | None = None,
    speed: Mapping[str, Any] | Iterable[Mapping[str, Any]] | None = None,
    hardware: str | None = None,
    export: str = "plain",
    repo_id: str | None = None,
    model_name: str | None = None,
    dataset: str | list[str] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    report: SparsityReport | None = None,
    structure_run: Mapping[str, Any] | str | None = None,
):
    """A `huggingface_hub.ModelCard` for a sparsified model (before export: the numbers come from it).

    Args:
        model: the sparsified model (after `fix_masks`), or any model with `report=` given.
        base_model: the Hub id the model was trained from (metadata `base_model` and a link).
        training_args: `TrainingArguments` (the key values and those that differ from the defaults; never
            tokens or paths) or a dict of what to show.
        eval_results: metric name -> value, shown as measured.
        speed: `{"setting", "dense_ms", "sparse_ms"}` or a list of such rows, e.g. from
            `benchmarks/inference_latency.py`; `hardware` says where it was measured (default: this machine).
        export: the checkpoint format the card describes ("plain", "shrink" or "sparse").
        repo_id: used in the usage snippet; model_name: the title (default: repo name or class name).
        dataset, license, language, tags: card metadata.
        report: a `SparsityReport` (default: `sparsity_report(model)`).
        structure_run: how the structure was chosen (see `structure_method`). Default: what `SparseTrainer`
            recorded on this model while training it, else the schedule of `training_args` (marked as planned).
    """
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    if export not in EXPORTS:
        raise ValueError(f"export must be one of {EXPORTS}, got {export!r}")
    if report is None:
        if not is_sparsified(model):
            raise ValueError(
                "render_model_card reads the sparsity from the model: pass the sparsified model (before "
                "unsparsify_model), or report=hf_sparse.sparsity_report(sparse_model)"
            )
        report = sparsity_report(model)
    sparse_config = get_sparse_config(model) if is_sparsified(model) else None
    granularity = sparse_config.granularity if sparse_config else sorted({g.kind for g in report.groups})
    budget = sparse_config.budget if sparse_config else "params"
    model_config = getattr(model, "config", None)
    class_name = type(model).__name__
    if model_name is None:
        model_name = repo_id.split("/")[-1] if repo_id else f"Sparse {class_name}"
    speed_rows = _speed_rows(speed)
    if speed_rows and hardware is None:
        hardware = describe_hardware()
    export_text, usage = _usage(export, class_name, repo_id)
    is_hub_id = (bool(base_model) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base_model) is not None
                 and not os.path.exists(base_model))  # a local folder named like a Hub id is not one
    fixed = masks_fixed(model) if is_sparsified(model) else True
    run = structure_run if structure_run is not None else getattr(model, STRUCTURE_RUN_ATTR, None)
    run = run if run is not None else schedule_plan(training_args)  # given, else recorded, else planned
    method = structure_method(run, sparse_config.score_init if sparse_config else None)
    card_data = ModelCardData(
        base_model=base_model if is_hub_id else None,
        library_name="transformers",
        license=license,
        language=language,
        datasets=[dataset] if isinstance(dataset, str) else dataset,
        tags=list(dict.fromkeys(["hf_sparse", "sparse", "pruning", *method["tags"], *(tags or [])])),
        model_name=model_name,
    )
    context = {
        "card_data": card_data.to_yaml(),
        "model_name": model_name,
        "base_model": base_model,
        "base_model_link": f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id else f"`{base_model}`",
        "model_type": getattr(model_config, "model_type", class_name),
        "report": _report_context(report),
        "granularity_text": ", ".join(_GRANULARITY.get(g, g) for g in granularity),
        "budget_text": (
            "kept parameters (a unit costs its parameter count; one global budget over all layers and unit kinds)"
            if budget == "params" else "kept units (every unit costs 1, as in the paper)"
        ),
        "mask_state": "fixed" if fixed else "not fixed: the current mask",
        "export_text": export_text,
        "usage": usage,
        "training_args": _training_args_rows(training_args),
        "eval_results": [(k, _fmt(v)) for k, v in (eval_results or {}).items()],
        "speed": speed_rows,
        "hardware": hardware,
        "method": method,
        "citation": CITATION,
    }
    template = resources.files("hf_sparse").joinpath("templates", TEMPLATE_NAME).read_text(encoding="utf-8")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    content = env.from_string(template).render(**context)
    content = re.sub(r"\n{3,}", "\n\n", content)
    return ModelCard(content)


def save_model_card(model: nn.Module, save_directory: str | os.PathLike, **card_kwargs: Any) -> str:
    """Render the card (see `render_model_card`) and write it as `save_directory/README.md`; returns the path."""
    card = render_model_card(model, **card_kwargs)
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(os.fspath(save_directory), "README.md")
    card.save(path)
    return path


# --- push ---------------------------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _connection_errors() -> tuple[type[BaseException], ...]:
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    for name in ("httpx2", "httpx"):  # the HTTP client of huggingface_hub (its version decides which)
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    try:
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _offline_message(repo_id: str, folder: str, why: str) -> str:
    return (
        f"push_sparse_to_hub needs network access to the Hugging Face Hub, but {why}. Nothing was uploaded. "
        f"The exported model and its card are ready in {folder}; upload that folder once you are online with\n"
        f"    hf upload {repo_id} {folder} .\n"
        "(or HfApi().upload_folder(repo_id=..., folder_path=...)), or export it where you like with "
        "hf_sparse.export_model / hf_sparse.save_sparse_pretrained and upload it later."
    )


def push_sparse_to_hub(
    model: nn.Module,
    repo_id: str,
    export: str = "plain",
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tokenizer: Any = None,
    local_dir: str | os.PathLike | None = None,
    **card_kwargs: Any,
):
    """Export the model, write the card as README.md and upload the folder to `repo_id`.

    export: "plain" (loads with Transformers alone), "shrink" (dropped units removed; load with
    `hf_sparse.load_sparse_model`) or "sparse" (scores and masks, to continue training). The model in memory
    is not changed. `token`: as huggingface_hub takes it (None: the stored login or `HF_TOKEN`); it is never
    printed. `tokenizer` (optional) is saved beside the model. The export is staged in `local_dir` (kept) or
    a temporary folder (removed after a successful upload; kept, and named in the error, when offline).
    `card_kwargs` go to `render_model_card` (base_model, training_args, eval_results, speed, hardware, ...).
    Returns huggingface_hub's `CommitInfo`.
    """
    from huggingface_hub import HfApi

    if export not in EXPORTS:
        raise ValueError(f"export must be one of {EXPORTS}, got {export!r}")
    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise ValueError(f"repo_id must look like 'user/name' or 'name', got {repo_id!r}")
    if not is_sparsified(model):
        raise ValueError("push_sparse_to_hub needs the sparsified model (it exports it and reads its sparsity)")
    if not masks_fixed(model):
        logger.warning("hf_sparse: pushing a model whose mask is not fixed; call hf_sparse.fix_masks(model) first")
    card = render_model_card(model, export=export, repo_id=repo_id, **card_kwargs)
    staging = None
    if local_dir is None:
        staging = tempfile.mkdtemp(prefix="hf_sparse_push_")
        folder = os.path.join(staging, repo_id.split("/")[-1])
    else:
        folder = os.path.abspath(os.fspath(local_dir))
    export_model(model, folder, export=export, overwrite=local_dir is None)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    card.save(os.path.join(folder, "README.md"))

    if _offline():
        raise HubOfflineError(_offline_message(repo_id, folder, "HF_HUB_OFFLINE is set"), folder)
    api = HfApi()
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, token=token, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload sparse model ({export} export) with hf_sparse",
        )
    except _connection_errors() as e:
        raise HubOfflineError(
            _offline_message(repo_id, folder, f"the connection failed ({type(e).__name__})"), folder
        ) from e
    except Exception:
        logger.error("hf_sparse: the upload to %s failed; the export is kept in %s", repo_id, folder)
        raise
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    return info
