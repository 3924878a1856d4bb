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

    def __post_init__(self):
        if self.export not in EXPORTS:
            raise ValueError(f"--export must be one of {EXPORTS}, got {self.export!r}")


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
) -> dict:
    """Fix the mask of `model` (from `gather_sparse_run`), export `model/` (with tokenizer and model card), write
    results.json, print the table and push when asked. Only the main process writes."""
    if model is None or not training_args.should_save:
        return results
    fix_masks(model)
    out_dir = os.path.join(training_args.output_dir, "model")
    export_model(model, out_dir, export=recipe.export, overwrite=True)
    tokenizer.save_pretrained(out_dir)
    if "dense" in results:
        card_kwargs["speed"] = {"setting": speed_setting, "dense_ms": 1e3 * results["dense"]["step_seconds"],
                                "sparse_ms": 1e3 * results["sparse"]["step_seconds"]}
    card_kwargs.setdefault("report", sparsity_report(model))
    save_model_card(model, out_dir, export=recipe.export, training_args=training_args, **card_kwargs)
    with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print_table(results, metric_key, extra_rows(results) if extra_rows else [])
    print(f"\nwrote {out_dir} (export={recipe.export}, card README.md) and "
          f"{os.path.join(training_args.output_dir, 'results.json')}")
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
