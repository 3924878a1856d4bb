"""What the recipes (recipes/*.py) share: argument parsing, the dense comparison run, and the end of a run
(export, model card, results.json, the summary table, the push). Kept out of the scripts so that each script
holds only what is particular to its task."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import HfArgumentParser, Trainer

from .backends import CpuFsdpMixin
from .export import export_model, fix_masks
from .hub import push_sparse_to_hub, save_model_card
from .report import sparsity_report
from .training_args import SparseTrainingArguments

EXPORTS = ("plain", "shrink", "sparse")


# local file extension -> (datasets builder, its extra arguments)
LOCAL_FORMATS = {"csv": ("csv", {}), "tsv": ("csv", {"delimiter": "\t"}), "json": ("json", {}),
                 "jsonl": ("json", {}), "txt": ("text", {})}
# what a file of each format holds, for the fix of a file with no examples
LOCAL_LAYOUTS = {"csv": "a header line (e.g. text,label) then one row per example",
                 "tsv": "a header line (e.g. text<TAB>label) then one row per example",
                 "json": "one JSON object per line, or one JSON list of objects", "jsonl": "one JSON object per line",
                 "txt": "one example per line"}


def load_local_files(train_file: str, validation_file: str | None = None, formats: tuple[str, ...] = ("csv", "tsv", "json", "jsonl")):
    """`datasets.load_dataset` over local files, with errors that name the flag, the file and the fix (a missing
    file or an unknown extension ended in a raw traceback from deep inside `datasets`)."""
    import datasets

    files = {"train": train_file}
    if validation_file:
        files["validation"] = validation_file
    extensions = set()
    for split, path in files.items():
        flag = _flag(split)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
        extension = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
        if extension not in formats:
            raise ValueError(f"{flag} {path}: files ending in .{extension or '(none)'} are not read; use one of "
                             f"{', '.join('.' + f for f in formats)}")
        _check_has_examples(flag, path, extension)
        extensions.add(extension)
    if len({(LOCAL_FORMATS[e][0], tuple(LOCAL_FORMATS[e][1].items())) for e in extensions}) > 1:
        raise ValueError(f"--train_file and --validation_file must have the same format, got {sorted(extensions)}")
    extension = extensions.pop()
    builder, kwargs = LOCAL_FORMATS[extension]
    try:
        return datasets.load_dataset(builder, data_files=files, **kwargs)
    except Exception as e:  # `datasets` names neither the flag nor the file: find the line that broke
        for split, path in files.items() if builder == "json" else ():
            bad = _first_invalid_json_line(path)
            if bad is not None:
                number, message, line = bad
                raise ValueError(
                    f"{_flag(split)} {path}: line {number} is not valid JSON ({message}): {line.strip()[:80]!r}; "
                    f"fix or remove that line (a .{extension} file holds {LOCAL_LAYOUTS[extension]})"
                ) from e
        raise


def _flag(split: str) -> str:
    return f"--{split if split == 'validation' else 'train'}_file"


def _check_has_examples(flag: str, path: str, extension: str) -> None:
    """Refuse a file with no examples before `datasets` reads it: an empty (or blank) file ended in a bare
    `StopIteration` or `DatasetGenerationError`, a header-only csv in `Instruction "train" corresponds to no data`.
    Reads only up to the second non-blank line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = (line for line in f if line.strip())
        header = next(lines, None)
        if header is None:
            raise ValueError(f"{flag} {path} is empty; give it {LOCAL_LAYOUTS[extension]}")
        if extension in ("csv", "tsv") and next(lines, None) is None:
            raise ValueError(
                f"{flag} {path} has a header row ({header.strip().replace(chr(9), '<TAB>')}) but no data rows; add "
                "one row per example below the header"
            )


def _first_invalid_json_line(path: str) -> tuple[int, str, str] | None:
    """(line number, error, line) where a .json / .jsonl file stops being valid JSON, else None. A file is one
    JSON document or JSON lines (as `datasets` reads it): lines when its first non-blank line parses alone."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as e:
        whole = e
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        json.loads(first)
    except json.JSONDecodeError:  # one document: its own error has the line
        return whole.lineno, whole.msg, lines[whole.lineno - 1] if whole.lineno <= len(lines) else ""
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                return number, e.msg, line
    return None


@dataclass
class RecipeArguments:
    compare_dense: bool = field(default=False, metadata={"help": "Also train the dense model with the same steps and compare."})
    export: str = field(default="plain", metadata={"help": "plain (loads anywhere), shrink (smaller, faster) or sparse (trainable)."})
    onnx: bool = field(default=False, metadata={
        "help": "Also write the shrunk model as ONNX (<output_dir>/onnx/model.onnx; the dense one to dense/onnx with "
                "--compare_dense), checked against PyTorch and timed with ONNX Runtime beside it "
                "(pip install 'hf-sparse[onnx]')."})
    latency_repeats: int = field(default=7, metadata={"help": "Repeats of the serving latency measurement (median)."})

    def __post_init__(self):
        if self.export not in EXPORTS:
            raise ValueError(f"--export must be one of {EXPORTS}, got {self.export!r}")
        if self.latency_repeats < 1:
            raise ValueError(f"--latency_repeats must be >= 1, got {self.latency_repeats}")


@dataclass
class RecipeTrainingArguments(SparseTrainingArguments):
    """The defaults every recipe shares; each recipe subclasses it with its own steps and learning rate."""

    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy (no, steps, epoch)."})
    use_cpu: bool = field(
        default=not torch.cuda.is_available(),  # a plain default: HfArgumentParser ignores factories of bools
        metadata={"help": "Train on the CPU (default when no GPU; needed for CPU data parallel)."},
    )
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP: every weight is used."})


def parse_args(dataclass_types: tuple, argv: list[str] | None = None):
    """`HfArgumentParser` over the recipe's dataclasses: a single .json/.yaml argument is a config file."""
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def timed_train(trainer) -> tuple[Any, dict[str, float], float]:
    """(TrainOutput, evaluation metrics, training seconds)."""
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    return out, trainer.evaluate(), seconds


def run_summary(metrics: dict[str, float], seconds: float, steps: int, metric_key: str, metric_value: float) -> dict:
    return {metric_key: metric_value, "eval_loss": metrics["eval_loss"], "train_seconds": seconds,
            "step_seconds": seconds / max(steps, 1)}


class DenseTrainer(CpuFsdpMixin, Trainer):
    """The plain `Trainer` of `--compare_dense`, on the engine the sparse run had (FSDP2 on CPU processes too)."""


def gather_sparse_run(trainer, results: dict):
    """Right after the sparse run, before anything builds new TrainingArguments (a dense baseline's arguments
    reset Accelerate's shared state): records the engine that trained (NO, MULTI_CPU / MULTI_GPU, FSDP or DEEPSPEED) and
    returns the model to export, gathered from the shards under FSDP / DeepSpeed (every rank takes part; ranks
    other than the main one get None)."""
    results["distributed_type"] = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
    return trainer.unsharded_model()


def finish_run(
    model, tokenizer, training_args, recipe: RecipeArguments, results: dict, metric_key: str,
    card_kwargs: dict[str, Any], speed_setting: str, push: bool, extra_rows: Callable[[dict], list[str]] | None = None,
    *, serving_batches: dict[str, dict[str, torch.Tensor]] | None = None, dense_dir: str | None = None,
) -> dict:
    """Fix the mask of `model` (from `gather_sparse_run`), export `model/` (with tokenizer and model card), write
    results.json, print the table and push when asked. Only the main process writes.

    With `serving_batches` (name -> a tokenized batch of the task, `serving_batches()`) or `--onnx`, the shrunk
    model is exported too (`model/` itself with `--export shrink`, else `shrunk/`); with `serving_batches` its
    parameters, weights on disk and CPU latency on each batch are measured beside the dense model saved in
    `dense_dir` (`save_dense_model`, from `--compare_dense`), into results["serving"] and a second table."""
    if model is None or not training_args.should_save:
        return results
    fix_masks(model)
    out_dir = os.path.join(training_args.output_dir, "model")
    export_model(model, out_dir, export=recipe.export, overwrite=True)
    tokenizer.save_pretrained(out_dir)
    if serving_batches is not None or recipe.onnx:
        serving = serve_exports(model, tokenizer, training_args.output_dir, recipe, out_dir, serving_batches, dense_dir)
        if serving is not None:
            results["serving"] = serving
    if "dense" in results:
        card_kwargs["speed"] = {"setting": speed_setting, "dense_ms": 1e3 * results["dense"]["step_seconds"],
                                "sparse_ms": 1e3 * results["sparse"]["step_seconds"]}
    card_kwargs.setdefault("report", sparsity_report(model))
    save_model_card(model, out_dir, export=recipe.export, training_args=training_args, **card_kwargs)
    with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(results, metric_key, extra_rows(results) if extra_rows else [])
    if results.get("serving", {}).get("models"):
        print_serving_table(results, metric_key)
    served = [p for p in results.get("serving", {}).get("exports", {}).values() if p != os.path.abspath(out_dir)]
    print(f"\nwrote {out_dir} (export={recipe.export}, card README.md), "
          + "".join(f"{p}, " for p in served) + os.path.join(training_args.output_dir, "results.json"))
    if push:
        repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
        push_sparse_to_hub(model, repo_id, export=recipe.export, token=training_args.hub_token,
                           private=training_args.hub_private_repo, tokenizer=tokenizer, training_args=training_args,
                           **card_kwargs)
    return results


def print_table(results: dict, metric: str, extra_rows: list[str] = ()) -> None:
    """hf_sparse and (with --compare_dense) the dense Trainer side by side: what was kept and what was saved."""
    rows = [("hf_sparse", results["sparse"])] + ([("dense", results["dense"])] if "dense" in results else [])
    print(f"\n| model | {metric} | sparsity | train time (s) | step (s) | speed-up vs dense | train FLOPs vs dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        speed = f"{results['speedup_vs_dense']:.2f}x" if name == "hf_sparse" and "speedup_vs_dense" in results else ""
        flops = r.get("train_flops_vs_dense") if name == "hf_sparse" else 1.0
        flops_text = f"{flops:.2f}" if flops is not None else ""
        print(f"| {name} | {r[metric]:.4f} | {r.get('sparsity', 0.0):.3f} | {r['train_seconds']:.0f} | "
              f"{r['step_seconds']:.3f} | {speed} | {flops_text} |")
    for row in extra_rows:
        print(row)


# --- serving: the shrunk export beside the dense model (parameters, bytes on disk, CPU latency) ---------------
SERVING_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def serving_batches(dataset, tokenizer, sizes: tuple[int, ...] = (1, 32)) -> dict[str, dict[str, torch.Tensor]]:
    """The first `size` examples of `dataset` (the evaluation split: the task's own sequences), padded as the
    evaluation pads them, per size: {"batch_1": {...}, "batch_32": {...}} (a size larger than the split is cut
    to it and named by the size it got)."""
    from transformers import DataCollatorWithPadding

    collator = DataCollatorWithPadding(tokenizer)
    columns = [c for c in SERVING_COLUMNS if c in dataset.column_names]
    out = {}
    for size in sizes:
        n = min(int(size), len(dataset))
        if n < 1:
            raise ValueError("serving_batches: the evaluation split is empty")
        rows = dataset.select(range(n))
        batch = collator([{c: rows[i][c] for c in columns} for i in range(n)])
        out[f"batch_{n}"] = {c: batch[c] for c in columns if c in batch}
    return out


def save_dense_model(trainer, output_dir: str) -> str:
    """Save the `--compare_dense` model to `<output_dir>/dense/model` (every rank calls it: the Trainer gathers
    sharded weights) for the serving comparison. Returns the folder."""
    folder = os.path.join(output_dir, "dense", "model")
    trainer.save_model(folder)
    return folder


def serve_exports(model, tokenizer, output_dir: str, recipe: RecipeArguments, out_dir: str,
                  batches: dict[str, dict[str, torch.Tensor]] | None, dense_dir: str | None) -> dict | None:
    """The shrunk export (and with `--onnx` the ONNX graphs), then `hf_sparse.serving.compare_serving` on
    `batches`: the results' "serving" entry (None when nothing was measured)."""
    import logging

    from .model_state import get_sparse_config
    from .serving import compare_serving, export_onnx, onnx_session, run_onnx

    log = logging.getLogger("hf_sparse.recipes")
    if get_sparse_config(model).uses_weights:
        log.info("serving: element-wise (granularity='weight') sparsity cannot be shrunk; no shrunk export measured")
        return None
    shrunk_dir = out_dir if recipe.export == "shrink" else os.path.join(output_dir, "shrunk")
    if shrunk_dir != out_dir:
        export_model(model, shrunk_dir, export="shrink", overwrite=True)
        tokenizer.save_pretrained(shrunk_dir)
    folders = ({"dense": dense_dir} if dense_dir else {}) | {"shrunk": shrunk_dir}
    onnx_dirs = {}
    if recipe.onnx:
        if dense_dir:
            onnx_dirs["dense_onnx"] = export_onnx(dense_dir, os.path.join(output_dir, "dense", "onnx"), overwrite=True)
        onnx_dirs["shrunk_onnx"] = export_onnx(shrunk_dir, os.path.join(output_dir, "onnx"), overwrite=True)
    exports = {name: os.path.abspath(folder) for name, folder in {**folders, **onnx_dirs}.items()}
    if not batches:
        return {"models": {}, "exports": exports}
    serving = compare_serving(folders, batches, onnx=onnx_dirs, reference="dense" if dense_dir else None,
                              repeats=recipe.latency_repeats)
    serving["exports"] = exports
    if onnx_dirs:  # ONNX Runtime against PyTorch on the task's own largest batch
        from .export import load_sparse_model

        name, batch = max(batches.items(), key=lambda kv: kv[1]["input_ids"].shape[0])
        for key, folder in onnx_dirs.items():
            source = serving["models"][key.removesuffix("_onnx")]["path"]
            with torch.inference_mode():
                expected = load_sparse_model(source)(**batch).logits.numpy()
            got = run_onnx(onnx_session(folder), batch)
            serving["models"][key]["max_abs_diff_vs_pytorch"] = {name: float(abs(got - expected).max())}
    return serving


SERVING_LABELS = {"dense": "dense", "shrunk": "hf_sparse shrunk", "dense_onnx": "dense, ONNX Runtime",
                  "shrunk_onnx": "hf_sparse shrunk, ONNX Runtime"}


def print_serving_table(results: dict, metric: str) -> None:
    """Beside accuracy: parameters, weights on disk and median CPU latency per batch of every model served."""
    serving = results["serving"]
    batches = serving["batches"]
    heads = [f"{b['batch_size']} x {b['seq_len']} (ms)" for b in batches.values()]
    speed_heads = [f"speed-up {b['batch_size']} x {b['seq_len']}" for b in batches.values()]
    if not serving["reference"]:
        speed_heads = []
    threads = serving["threads"]
    print(f"\nserving on the CPU ({threads} thread{'s' if threads != 1 else ''}; batches of the evaluation split; "
          f"median of {serving['repeats']} forward passes, models timed in turn"
          + ("; speed-up: the dense PyTorch model's latency over the row's)" if speed_heads else ")"))
    print(f"| model | {metric} | params | weights on disk (MB) | " + " | ".join(heads + speed_heads) + " |")
    print("|---|" + "---:|" * (3 + len(heads) + len(speed_heads)))
    for key, entry in serving["models"].items():
        # the metric was evaluated in PyTorch: the ONNX rows leave it blank (their outputs' difference is recorded)
        run = {} if key.endswith("_onnx") else results.get("dense" if key.startswith("dense") else "sparse", {})
        value = f"{run[metric]:.4f}" if metric in run else ""
        params = f"{entry['params']:,}" if entry["params"] is not None else "(same tensors)"
        cells = [f"{entry['latency_ms'][b]:.1f}" for b in batches]
        if speed_heads:
            cells += [f"{entry['speedup'][b]:.2f}x" if "speedup" in entry else "" for b in batches]
        print(f"| {SERVING_LABELS.get(key, key)} | {value} | {params} | {entry['file_bytes'] / 1e6:.1f} | "
              + " | ".join(cells) + " |")
