"""`hf-sparse prune`: `prune_model` from the command line, on local files (offline) or a Hub dataset/model path.

    hf-sparse prune --model PATH --train_file train.csv --text_column text --label_column label \
        --sparsity 0.5 --output_dir out --export shrink

The model's task comes from its config (`architectures`: a sequence classifier learns from --label_column, a
causal LM from the text itself); `--task` overrides it. The output folder gets the export, its model card and
`prune_result.json` (the log, the losses of the start and final masks, forward passes, peak memory).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

TASKS = ("auto", "sequence_classification", "causal_lm")


@dataclass
class PruneArguments:
    model: str = field(metadata={"help": "a local folder or a Hub id of a trained Transformers model"})
    output_dir: str = field(metadata={"help": "where the pruned model, its card and prune_result.json go"})
    train_file: str | None = field(default=None, metadata={"help": "local .csv/.tsv/.json/.jsonl/.txt examples"})
    dataset_name: str | None = field(default=None, metadata={"help": "a Hub dataset instead of --train_file"})
    dataset_config: str | None = field(default=None, metadata={"help": "the Hub dataset's configuration"})
    split: str = field(default="train", metadata={"help": "the Hub dataset's split"})
    text_column: str = field(default="text", metadata={"help": "the text column"})
    text_pair_column: str | None = field(default=None, metadata={"help": "a second text column (pairs)"})
    label_column: str = field(default="label", metadata={"help": "the label column (sequence classification)"})
    task: str = field(default="auto", metadata={"help": f"one of {TASKS}; auto: from the model's config"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (truncated)"})
    sparsity: float = field(default=0.5, metadata={"help": "fraction of the heads' and neurons' parameters removed"})
    steps: int = field(default=300, metadata={"help": "structure updates (each: --num_samples masked forwards)"})
    batch_size: int = field(default=16, metadata={"help": "examples per forward"})
    num_samples: int = field(default=4, metadata={"help": "masks sampled per step (>= 2)"})
    learning_rate: float = field(default=0.02, metadata={"help": "Adam's learning rate on the keep probabilities"})
    calibration_batches: int = field(default=8, metadata={"help": "dense forwards that read the start"})
    seed: int = field(default=0, metadata={"help": "the masks' and the batches' seed"})
    export: str = field(default="shrink", metadata={"help": "plain, shrink or sparse (hf_sparse.export_model)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an existing --output_dir"})


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    (a,) = HfArgumentParser(PruneArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(a)
    return 0


def _check(a: PruneArguments) -> None:
    from .recipe_utils import EXPORTS

    if (a.train_file is None) == (a.dataset_name is None):
        raise ValueError("hf-sparse prune: give exactly one of --train_file (a local file) and --dataset_name")
    if a.task not in TASKS:
        raise ValueError(f"hf-sparse prune: --task must be one of {TASKS}, got {a.task!r}")
    if a.export not in EXPORTS:
        raise ValueError(f"hf-sparse prune: --export must be one of {EXPORTS}, got {a.export!r}")
    if os.path.exists(a.output_dir) and os.listdir(a.output_dir) and not a.overwrite_output_dir:
        raise ValueError(f"hf-sparse prune: --output_dir {a.output_dir} is not empty; choose another folder or pass "
                         "--overwrite_output_dir")


def _task_of(a: PruneArguments, model_config) -> str:
    if a.task != "auto":
        return a.task
    names = list(getattr(model_config, "architectures", None) or [])
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "sequence_classification"
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return "causal_lm"
    raise ValueError(f"hf-sparse prune: the model's config names architectures {names}; say what it does with "
                     f"--task sequence_classification or --task causal_lm")


def _load_examples(a: PruneArguments):
    import datasets

    if a.train_file is not None:
        from .recipe_utils import load_local_files

        formats = ("csv", "tsv", "json", "jsonl", "txt")
        return load_local_files(a.train_file, formats=formats)["train"]
    return datasets.load_dataset(a.dataset_name, a.dataset_config, split=a.split)


def _tokenized(a: PruneArguments, examples, tokenizer, task: str, model_config):
    columns = examples.column_names
    for flag, name in (("--text_column", a.text_column), ("--text_pair_column", a.text_pair_column)) + (
            (("--label_column", a.label_column),) if task == "sequence_classification" else ()):
        if name is not None and name not in columns:
            raise ValueError(f"hf-sparse prune: {flag} {name!r} is not a column of the data; its columns are "
                             f"{columns}")
    label2id = dict(getattr(model_config, "label2id", None) or {})
    num_labels = int(getattr(model_config, "num_labels", 0) or 0)
    remap = _class_label_map(examples, a.label_column, label2id) if task == "sequence_classification" else None

    def encode(batch):
        texts = [str(t) for t in batch[a.text_column]]
        pairs = [str(t) for t in batch[a.text_pair_column]] if a.text_pair_column else None
        out = tokenizer(texts, pairs, truncation=True, max_length=a.max_length)
        if task == "sequence_classification":
            out["labels"] = [_label(remap[v] if remap else v, label2id, a.label_column, num_labels)
                             for v in batch[a.label_column]]
        return out

    return examples.map(encode, batched=True, remove_columns=columns)


def _class_label_map(examples, column: str, label2id: dict) -> dict[int, int] | None:
    """Dataset class ids -> the model's, by name, when the data's `ClassLabel` names the classes and the model's
    config does too: the same names may come in another order (a dataset's [entailment, neutral, contradiction]
    against a model's {0: contradiction, ...}), and ids taken as they are would train on the wrong labels."""
    feature = getattr(examples, "features", {}).get(column)
    names = list(getattr(feature, "names", None) or [])
    custom = {k.lower(): v for k, v in label2id.items() if not k.upper().startswith("LABEL_")}
    if not names or not custom:
        return None
    missing = [n for n in names if n.lower() not in custom]
    if missing:
        raise ValueError(f"hf-sparse prune: the data's classes {names} are not all among the model's labels "
                         f"{sorted(label2id)} (config.label2id): {missing} have no match; relabel the data")
    return {i: int(custom[n.lower()]) for i, n in enumerate(names)}


def _label(value, label2id: dict, column: str, num_labels: int) -> int | float:
    if num_labels == 1:  # a regression head
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"hf-sparse prune: the model has one output (regression); --label_column {column!r} "
                             f"holds {value!r}, not a number") from None
    if isinstance(value, str) and value in label2id:  # a label name (even one made of digits)
        return int(label2id[value])
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (
            isinstance(value, str) and not value.lstrip("-").isdigit()):
        raise ValueError(f"hf-sparse prune: label {value!r} in --label_column {column!r} is neither a class id nor one "
                         f"of the model's labels {sorted(label2id)} (config.label2id)")
    label = int(value)
    if num_labels and not 0 <= label < num_labels:
        raise ValueError(f"hf-sparse prune: label {label} in --label_column {column!r} is not a class id of a model "
                         f"with {num_labels} labels (0 to {num_labels - 1})")
    return label


def run(a: PruneArguments):
    """Load, prune, export and card one model as `a` says; returns the `PruneResult`."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorWithPadding,
    )

    from .config import SparseConfig
    from .export import export_model
    from .hub import save_model_card
    from .prune import prune_model

    _check(a)
    config = SparseConfig(sparsity=a.sparsity)  # checks the value before anything is loaded
    model_config = AutoConfig.from_pretrained(a.model)
    task = _task_of(a, model_config)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"hf-sparse prune: the tokenizer of {a.model} has neither a pad nor an eos token, so "
                             "batches cannot be padded; add one (tokenizer.add_special_tokens) and save it first")
        tokenizer.pad_token = tokenizer.eos_token
    examples = _tokenized(a, _load_examples(a), tokenizer, task, model_config)
    if task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(a.model)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(a.model)
        collator = DataCollatorWithPadding(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:  # GPT-2 / Llama classifiers find the last token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    model, result = prune_model(model, examples, config, steps=a.steps, batch_size=a.batch_size,
                                data_collator=collator, num_samples=a.num_samples, learning_rate=a.learning_rate,
                                calibration_batches=a.calibration_batches, seed=a.seed, return_result=True)
    out = export_model(model, a.output_dir, export=a.export, overwrite=a.overwrite_output_dir)
    tokenizer.save_pretrained(out)
    save_model_card(model, out, base_model=a.model, export=a.export, dataset=a.dataset_name)
    with open(os.path.join(out, "prune_result.json"), "w", encoding="utf-8") as f:
        json.dump({**result.to_dict(), "arguments": vars(a)}, f, indent=1)
    logging.getLogger("hf_sparse.prune").info(
        "hf-sparse prune: %s written to %s (loss of the kept units on the calibration batches %.4f, dense %.4f)",
        a.export, out, result.final_topk_loss, result.dense_loss)
    return result
