"""When does a structure task start to be learned? The dense MiniLM run of `benchmarks/structure_tasks.py`
(250 steps, batch 32, AdamW 5e-5) with the training loss logged at every step and the test accuracy every 50,
printed as means over windows of 20 steps every 10 (the window the defaults' `warmup_loss_drop` reads in a
250-step run: docs/method.md §11).

    python benchmarks/warmup_curves.py --runs swap_where:0 swap_where:1 swap_where:2 word_swap:0 word_replace:0
Each run's log history is written to --out as TASK_SEED.json (a rerun skips what is there)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # structure_tasks.py, next to this file
    sys.path.insert(0, HERE)


def dense_curve(task: str, seed: int, steps: int = 250) -> list[dict]:
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from structure_tasks import task_model

    tokenizer, data, model = task_model(task, seed)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=32, per_device_eval_batch_size=128,
        learning_rate=5e-5, warmup_steps=0.1, weight_decay=0.01, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, seed=seed, use_cpu=True, eval_strategy="steps", eval_steps=50)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=accuracy)
    trainer.train()
    return trainer.state.log_history


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="TASK:SEED ..., e.g. swap_where:0 word_swap:0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "..", "docs", "structure_tasks", "curves"))
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    print("| run | training loss, mean of steps [s, s + 20) for s = 0, 10, 20, ... | test accuracy at 50/100/150/200/250 |")
    print("|---|---|---|")
    for spec in a.runs:
        task, seed = spec.split(":")
        path = os.path.join(a.out, f"{task}_{seed}.json")
        if not os.path.exists(path):
            with open(path, "w") as f:
                json.dump(dense_curve(task, int(seed)), f)
        with open(path) as f:
            history = json.load(f)
        losses = [float(h["loss"]) for h in history if "loss" in h]
        means = [statistics.mean(losses[i:i + 20]) for i in range(0, len(losses) - 19, 10)]
        accs = [float(h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
        print(f"| {spec} | {' '.join(f'{m:.3f}' for m in means)} | {' '.join(f'{x:.3f}' for x in accs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
