"""Serving what hf_sparse exports: the shrunk model outside PyTorch (ONNX Runtime), and what serving costs.

- `export_onnx(model_or_folder, out_dir)`: any folder `load_sparse_model` loads (a shrunk export, a plain one,
  a sparse checkpoint, which is shrunk first) or a model in memory, written as `out_dir/model.onnx` with its
  config and tokenizer files, then run in ONNX Runtime and compared with the PyTorch model (on the traced
  shape and on a second, padded one: a value the tracer froze shows up there). A mismatch raises and leaves
  nothing written.
- `onnx_session(out_dir)` / `run_onnx(session, inputs)`: load and run it (inputs as a tokenizer returns them).
- `count_parameters`, `weights_files`, `interleaved_latency`, `compare_serving`: the numbers the recipes
  report beside accuracy -- parameters, bytes on disk and the median CPU latency of models timed in turn.

The exporter is `torch.onnx.export`, of the model `load_sparse_model` builds: Optimum's exporter cannot
take a shrunk folder (its per-layer sizes are in `hf_sparse_shapes`, which only hf_sparse reads), and
optimum-onnx 0.1 needs transformers < 4.58. The graph computes the full-sequence forward: logits (or the
last hidden state of a base model) from `input_ids`, `attention_mask` (and `token_type_ids` where the model
takes them), batch size and sequence length dynamic, no key/value cache.

    python -m hf_sparse.serving outputs/text_classification/shrunk outputs/text_classification/onnx
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .folders import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, atomic_folder, weights_paths
from .model_state import contains_lora, get_sparse_config, is_sparsified

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
ONNX_INFO_NAME = "hf_sparse_onnx.json"  # what was exported and how well it matched PyTorch
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")  # in this order, those the model's forward takes
# files of a model folder a server needs beside the graph (the weights are in the graph)
_SERVING_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                  "chat_template.jinja", "chat_template.json")
INSTALL_HINT = "pip install 'hf-sparse[onnx]' (onnxruntime, onnx and onnxscript)"

__all__ = ["ONNX_NAME", "compare_serving", "count_parameters", "export_onnx", "interleaved_latency",
           "onnx_session", "run_onnx", "weights_files"]


# --- ONNX export ------------------------------------------------------------------------------------------
class _Forward(nn.Module):
    """The model with positional tensor inputs and one tensor output (what the ONNX graph computes)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], output: str, use_cache: bool):
        super().__init__()
        self.model, self.names, self.output, self.use_cache = model, names, output, use_cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        kwargs = {n: given[n] for n in self.names}
        if self.use_cache:
            kwargs["use_cache"] = False
        return self.model(**kwargs, return_dict=True)[self.output]


def _servable(model_or_folder) -> tuple[nn.Module, str | None]:
    """(a plain or shrunk model, the folder it came from or None). A sparsified model is shrunk on a copy
    (element-wise sparsity, which cannot be shrunk, is exported with its zeros)."""
    folder = None
    if isinstance(model_or_folder, (str, os.PathLike)):
        from .export import load_sparse_model

        folder = os.fspath(model_or_folder)
        model = load_sparse_model(folder)
    elif isinstance(model_or_folder, nn.Module):
        model = model_or_folder
    else:
        raise TypeError(f"export_onnx takes a model folder or a model, got {type(model_or_folder).__name__}")
    if contains_lora(model):
        raise ValueError("export_onnx: merge the LoRA adapters first with hf_sparse.merge_lora_sparse(model)")
    if is_sparsified(model):
        from .masks import masks_fixed
        from .patching import unsparsify_model

        if not masks_fixed(model):
            logger.warning("hf_sparse.export_onnx: the mask is not fixed; exporting the current one (call fix_masks)")
        model = unsparsify_model(copy.deepcopy(model), shrink=not get_sparse_config(model).uses_weights)
    return model, folder


def _input_names(model: nn.Module) -> tuple[str, ...]:
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        raise ValueError(
            f"export_onnx exports text models (a forward that takes input_ids); {type(model).__name__}.forward takes "
            f"{list(params)[:6]}"
        )
    return tuple(n for n in INPUT_NAMES if n in params)


def _example_inputs(model: nn.Module, names: tuple[str, ...], batch: int, seq: int, seed: int,
                    pad: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (a fixed seed) with a full attention mask, the last `pad` positions of row 0 masked."""
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, seq - pad:] = 0
    full = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {n: full[n] for n in names}


def _as_inputs(inputs: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if "input_ids" not in inputs:
        raise ValueError(f"inputs must hold input_ids (as a tokenizer returns them), got {sorted(inputs)}")
    ids = torch.as_tensor(inputs["input_ids"])
    if ids.dim() == 1:
        ids = ids[None]
    out = {"input_ids": ids}
    for name in names[1:]:
        value = inputs.get(name)
        if value is None:
            value = torch.ones_like(ids) if name == "attention_mask" else torch.zeros_like(ids)
        value = torch.as_tensor(value)
        out[name] = value[None] if value.dim() == 1 else value
    return out


def _export_graph(forward: _Forward, inputs: dict[str, torch.Tensor], path: str, names: tuple[str, ...], output: str,
                  token_level: bool, dynamo: bool, opset: int | None, large: bool) -> None:
    with warnings.catch_warnings():
        # the legacy exporter's deprecation notice and the tracer's notes on Python values it froze: the check
        # on a second, padded shape is what tells whether a frozen value matters
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(advanced indexing|legacy TorchScript|Constant folding).*")
        warnings.filterwarnings("ignore", message=".*axis name: .* will not be used.*")  # dynamo: one Dim per axis name
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(
                forward, (), path, kwargs=inputs, dynamo=True, input_names=list(names), output_names=[output],
                dynamic_shapes={n: {0: batch, 1: seq} for n in names}, opset_version=opset,
                external_data=large, verbose=False,
            )
        else:
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
            axes[output] = {0: "batch", 1: "sequence"} if token_level else {0: "batch"}
            torch.onnx.export(
                forward, (), path, kwargs=inputs, dynamo=False, input_names=list(names), output_names=[output],
                dynamic_axes=axes, opset_version=opset or 17, do_constant_folding=True,
            )


def _opset(path: str) -> int | None:
    """The ONNX opset the graph was written with (None without the onnx package)."""
    try:
        import onnx
    except ImportError:
        return None
    graph = onnx.load(path, load_external_data=False)
    return next((int(o.version) for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)


def _default_dynamo() -> bool:
    """torch's own default (the torch.export-based exporter) when its dependency onnxscript is installed; the
    TorchScript exporter otherwise (deprecated by torch, but it needs nothing else)."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"running an ONNX export needs onnxruntime: {INSTALL_HINT}") from e
    return onnxruntime


def onnx_session(folder_or_file: str | os.PathLike, threads: int | None = None, spinning: bool = True):
    """An `onnxruntime.InferenceSession` (CPU) of `folder/model.onnx` (or of an .onnx file); `threads` sets
    its intra-op threads (ONNX Runtime's default: one per core). `spinning=False` stops its idle threads from
    spinning: they slowed a PyTorch model run in turn with the session 2x (MiniLM, 2 cores)."""
    ort = _import_onnxruntime()
    path = os.fspath(folder_or_file)
    if os.path.isdir(path):
        path = os.path.join(path, ONNX_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no ONNX model; write one with hf_sparse.serving.export_onnx(folder, out_dir)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: Mapping[str, Any]):
    """The session's first output (a numpy array) for `inputs` (tensors, arrays or lists, as a tokenizer returns
    them): the inputs the graph takes are fed as int64, the others (e.g. token_type_ids of a model that ignores
    them) left out."""
    import numpy as np

    feed = {}
    for arg in session.get_inputs():
        if arg.name not in inputs:
            raise ValueError(f"the ONNX model takes {arg.name}, missing from the inputs ({sorted(inputs)})")
        value = inputs[arg.name]
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        feed[arg.name] = value.astype(np.int64)
    return session.run(None, feed)[0]


def _max_diff(session, forward: _Forward, inputs: dict[str, torch.Tensor]) -> float:
    with torch.inference_mode():
        expected = forward(**inputs).float().numpy()
    got = run_onnx(session, inputs)
    if got.shape != expected.shape:
        raise ValueError(f"the ONNX model's output has shape {got.shape}, PyTorch's {expected.shape}")
    return float(abs(got - expected).max()) if expected.size else 0.0


def export_onnx(
    model_or_folder: str | os.PathLike | nn.Module,
    out_dir: str | os.PathLike,
    *,
    inputs: Mapping[str, Any] | None = None,
    check: bool = True,
    atol: float = 1e-4,
    dynamo: bool | None = None,
    opset: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write a model as ONNX (`out_dir/model.onnx`) and check ONNX Runtime's outputs against PyTorch's.

    `model_or_folder`: a folder `hf_sparse.load_sparse_model` loads (a shrunk export -- the usual case --, a
    plain export, or a sparse checkpoint, which is shrunk first), or a model (a sparsified one is shrunk on a
    copy). The graph takes `input_ids`, `attention_mask` and, where the model's forward has them,
    `token_type_ids` (int64, batch and sequence dynamic) and returns `logits` (or `last_hidden_state` for a
    base model); no key/value cache (a causal LM scores whole sequences). Attentions with no head left and
    MLPs with no neuron left export (they compute their bias).

    `inputs` (optional, e.g. a tokenizer's output; sequences of 2 tokens or more) are traced and checked; random
    ids of shape 2 x 8 otherwise.
    With `check` (the default) ONNX Runtime runs those and a second, padded batch (3 x 5, the last two
    positions of row 0 masked) and any output further than `atol` from PyTorch's raises, leaving nothing
    written. `dynamo`: torch's torch.export-based exporter (needs onnxscript; default when it is installed)
    or the TorchScript one. `out_dir` also receives config.json, the source folder's tokenizer files and
    `hf_sparse_onnx.json` (inputs, output, exporter, opset, the measured differences). An existing `out_dir`
    holding another model is replaced only with `overwrite=True`. Returns the folder.
    """
    model, folder = _servable(model_or_folder)
    training = model.training
    try:
        return _export_onnx(model.eval(), folder, out_dir, inputs, check, atol, dynamo, opset, overwrite)
    finally:
        model.train(training)  # a model passed in keeps its mode


def _export_onnx(model: nn.Module, folder: str | None, out_dir, inputs, check: bool, atol: float,
                 dynamo: bool | None, opset: int | None, overwrite: bool) -> str:
    names = _input_names(model)
    config = getattr(model, "config", None)
    use_cache = "use_cache" in inspect.signature(model.forward).parameters
    trace_inputs = _as_inputs(inputs, names) if inputs is not None else _example_inputs(model, names, 2, 8, 0)
    if trace_inputs["input_ids"].shape[1] < 2:  # measured: torch.export refuses it, the TorchScript graph is wrong
        raise ValueError(
            f"export_onnx: the inputs to trace have shape {tuple(trace_inputs['input_ids'].shape)}; give sequences "
            "of at least 2 tokens (an exporter freezes a length of 1 into the graph)"
        )
    with torch.inference_mode():
        out = model(**trace_inputs, **({"use_cache": False} if use_cache else {}), return_dict=True)
    output = "logits" if getattr(out, "logits", None) is not None else "last_hidden_state"
    if getattr(out, output, None) is None:
        raise ValueError(f"export_onnx: {type(model).__name__} returns neither logits nor last_hidden_state")
    token_level = out[output].dim() >= 3
    forward = _Forward(model, names, output, use_cache).eval()
    dynamo = _default_dynamo() if dynamo is None else bool(dynamo)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30  # protobuf's 2 GB limit
    with atomic_folder(os.fspath(out_dir), overwrite) as tmp:
        path = os.path.join(tmp, ONNX_NAME)
        _export_graph(forward, trace_inputs, path, names, output, token_level, dynamo, opset, large)
        info: dict[str, Any] = {
            "inputs": list(names), "output": output, "exporter": "dynamo" if dynamo else "torchscript",
            "opset": _opset(path) or opset, "torch": torch.__version__, "source": folder,
        }
        if check:
            session = onnx_session(path)
            info["onnxruntime"] = _import_onnxruntime().__version__
            graph_inputs = [arg.name for arg in session.get_inputs()]
            info["graph_inputs"] = graph_inputs
            checks = {"traced": trace_inputs,
                      "padded 3x5": _example_inputs(model, names, 3, 5, 1, pad=2)}
            info["max_abs_diff"] = {k: _max_diff(session, forward, v) for k, v in checks.items()}
            info["atol"] = atol
            worst = max(info["max_abs_diff"].values())
            if not worst <= atol:
                raise ValueError(
                    f"export_onnx: ONNX Runtime's {output} differ from PyTorch's by up to {worst:.3g} (> atol {atol}) "
                    f"{info['max_abs_diff']}; nothing was written. Try the other exporter (dynamo={not dynamo})"
                )
            del session
        if config is not None:
            config.save_pretrained(tmp)
        if folder is not None:
            for name in sorted(os.listdir(folder)):
                src = os.path.join(folder, name)
                wanted = name.startswith("tokenizer") or name in _SERVING_FILES
                # config.json: the model's own (with hf_sparse_shapes when shrunk) is written above
                if wanted and name != "config.json" and os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))
        with open(os.path.join(tmp, ONNX_INFO_NAME), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
    logger.info("hf_sparse.export_onnx: wrote %s (%s exporter; max |ONNX Runtime - PyTorch| %s)",
                os.path.join(os.fspath(out_dir), ONNX_NAME), info["exporter"], info.get("max_abs_diff", "not checked"))
    return os.path.abspath(os.fspath(out_dir))


# --- what serving costs ----------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, a shared (tied) tensor once."""
    return sum(p.numel() for p in model.parameters())


def weights_files(folder: str | os.PathLike) -> list[str]:
    """The weights files (absolute paths) of a saved model folder: model.safetensors, or the shards its index
    names; or model.onnx with its external data, for an ONNX folder."""
    folder = os.path.abspath(os.fspath(folder))
    path = os.path.join(folder, ONNX_NAME)
    if os.path.isfile(path):
        data = path + ".data"  # the dynamo exporter's external weights (models over ~1.5 GB)
        return [path] + ([data] if os.path.isfile(data) else [])
    try:
        return weights_paths(folder)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} holds no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {ONNX_NAME}") from None


def interleaved_latency(runs: Mapping[str, Callable[[], Any]], repeats: int = 7, warmup: int = 1) -> dict[str, dict]:
    """Per name: the median wall-clock seconds of `runs[name]()` and every sample. The runs are timed in turn
    within every repeat (the order reversed every other repeat), so load from other processes on the machine
    hits them alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    order = list(runs)
    for _ in range(warmup):
        for name in order:
            runs[name]()
    samples: dict[str, list[float]] = {name: [] for name in order}
    for i in range(repeats):
        for name in order if i % 2 == 0 else reversed(order):
            start = time.perf_counter()
            runs[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "samples_s": s} for name, s in samples.items()}


def _torch_run(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return model(**batch)
    return run


def _onnx_run(session, batch: Mapping[str, torch.Tensor]) -> Callable[[], Any]:
    def run():
        return run_onnx(session, batch)
    return run


def compare_serving(
    folders: Mapping[str, str | os.PathLike],
    batches: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    onnx: Mapping[str, str | os.PathLike] | None = None,
    reference: str | None = None,
    repeats: int = 7,
    warmup: int = 1,
) -> dict[str, Any]:
    """Load each model folder (`load_sparse_model`: plain or shrunk) and, for `onnx`, each ONNX folder (ONNX
    Runtime, with torch's thread count, idle threads not spinning), and measure side by side: parameters, bytes
    of the weights files on disk, and the median CPU latency of one forward pass on each of `batches` (name ->
    tokenized batch), all models timed in turn. With `reference` (a name of `folders`), every other model gets `speedup`
    (reference latency / its latency) and the ratios of its parameters and bytes to the reference's.

    Returns {"models": {name: {"path", "runtime", "files", "params", "file_bytes", "latency_ms": {batch: ms},
    "latency_samples_ms"}}, "batches":
    {batch: {"batch_size", "seq_len"}}, "threads", "repeats", "warmup", "statistic"}; ONNX models have
    "params" None (the graph holds the same tensors as the model it was exported from).
    """
    from .export import load_sparse_model

    threads = torch.get_num_threads()
    models: dict[str, dict[str, Any]] = {}
    runs: dict[tuple[str, str], Callable[[], Any]] = {}
    for name, folder in folders.items():
        model = load_sparse_model(folder)
        files = weights_files(folder)
        models[name] = {"path": os.path.abspath(os.fspath(folder)), "runtime": "pytorch", "files": files,
                        "params": count_parameters(model), "file_bytes": sum(os.path.getsize(p) for p in files)}
        for batch_name, batch in batches.items():
            runs[(name, batch_name)] = _torch_run(model, batch)
    for name, folder in (onnx or {}).items():
        session = onnx_session(folder, threads=threads, spinning=False)  # spinning threads slow the others
        files = weights_files(folder)
        models[name] = {"path": os.path.abspath(os.fspath(folder)), "runtime": "onnxruntime", "files": files,
                        "params": None, "file_bytes": sum(os.path.getsize(p) for p in files)}
        for batch_name, batch in batches.items():
            runs[(name, batch_name)] = _onnx_run(session, batch)
    timings = {}
    for batch_name in batches:  # one batch shape at a time, every model in turn
        timed = interleaved_latency({name: runs[(name, batch_name)] for name in models}, repeats, warmup)
        for name, t in timed.items():
            timings[(name, batch_name)] = t
    for name, entry in models.items():
        entry["latency_ms"] = {b: 1e3 * timings[(name, b)]["median_s"] for b in batches}
        entry["latency_samples_ms"] = {b: [1e3 * s for s in timings[(name, b)]["samples_s"]] for b in batches}
    if reference is not None:
        if reference not in folders:
            raise ValueError(f"reference {reference!r} is not one of the model folders {sorted(folders)}")
        ref = models[reference]
        for name, entry in models.items():
            if name == reference:
                continue
            entry["speedup"] = {b: ref["latency_ms"][b] / entry["latency_ms"][b] for b in batches}
            entry["params_vs_reference"] = None if entry["params"] is None else entry["params"] / ref["params"]
            entry["file_bytes_vs_reference"] = entry["file_bytes"] / ref["file_bytes"]
    return {
        "models": models,
        "batches": {b: {"batch_size": int(v["input_ids"].shape[0]), "seq_len": int(v["input_ids"].shape[1])}
                    for b, v in batches.items()},
        "reference": reference, "threads": threads, "repeats": repeats, "warmup": warmup,
        "statistic": "median wall-clock time of one forward pass (inference mode, CPU), models timed in turn",
    }


def main(argv: list[str] | None = None) -> int:
    """python -m hf_sparse.serving FOLDER OUT_DIR [--overwrite] [--no-check] [--torchscript | --dynamo]"""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hf_sparse.serving",
        description="Export a model folder hf_sparse.load_sparse_model loads (a shrunk export, usually) to ONNX, "
                    "and check ONNX Runtime's outputs against PyTorch's.")
    parser.add_argument("folder", help="the model folder (export_model(model, folder, export='shrink'))")
    parser.add_argument("out_dir", help="where model.onnx, config.json and the tokenizer files go")
    parser.add_argument("--overwrite", action="store_true", help="replace out_dir if it holds another model")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime check")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest difference the check accepts")
    exporter = parser.add_mutually_exclusive_group()
    exporter.add_argument("--dynamo", dest="dynamo", action="store_true", default=None,
                          help="torch.export-based exporter (needs onnxscript; the default when installed)")
    exporter.add_argument("--torchscript", dest="dynamo", action="store_false", help="TorchScript-based exporter")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out = export_onnx(args.folder, args.out_dir, check=args.check, atol=args.atol, dynamo=args.dynamo,
                      overwrite=args.overwrite)
    with open(os.path.join(out, ONNX_INFO_NAME), encoding="utf-8") as f:
        info = json.load(f)
    print(f"wrote {os.path.join(out, ONNX_NAME)} ({os.path.getsize(os.path.join(out, ONNX_NAME)) / 1e6:.1f} MB, "
          f"{info['exporter']} exporter); inputs {info.get('graph_inputs', info['inputs'])} -> {info['output']}; "
          f"max |ONNX Runtime - PyTorch| {info.get('max_abs_diff', 'not checked')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
