#!/usr/bin/env python
"""Pretraining at a horizon where size pays (issue 22, item 5): does hf_sparse beat a dense model of its kept
size at equal training FLOPs?

The quality study's LM (docs/quality.md) stops at 300 steps of the 1.1M-token Shakespeare corpus, where a
smaller dense model learns faster per FLOP than the full one: a sparse run cannot be worth its search there.
This study trains the same small Llama (hidden 128, 4 layers, 4 query / 2 key-value heads, MLP 344, BPE of 2048
tokens, blocks of 64, batch 16, lr 1e-3 with 6% warm-up and linear decay) on the Python sources of the installed
torch (`hf_sparse.tasks.load_code_corpus`, ~35M characters, 11.5M tokens: the runs at hf_sparse's FLOPs see no block
twice, the kept-size model at dense's FLOPs 1.13 epochs; the BPE is trained on the first 4M characters of the
training files in path order) and compares, per seed:

  dense           the full model, N steps (plain Trainer)
  hf_sparse       SparseTrainer with the causal-LM recipe's schedule (10% dense warm-up with Taylor importance,
                  VR-PGE search until 30%, then the fixed top-K mask), N steps; F = its training FLOPs
  small@sparse    a dense model of the kept size (hf_sparse's per-layer head and neuron counts of the same seed,
                  plain Linear layers from `shrink_model`, fresh initialisation) trained with a plain Trainer for
                  F / (its FLOPs per step) steps: equal training FLOPs with hf_sparse
  random@sparse   the full model with random units fixed from step 0 at the same sparsity, equal FLOPs with
                  hf_sparse
  small@dense     the kept-size model at dense's FLOPs (N / its FLOPs share steps): is the horizon long enough
                  that the full model beats a smaller one at equal compute?

FLOPs are the trainer's proxy (`sparse/train_flops_vs_dense`: the matmul weights, the LM head included; a search
step counts its extra forwards). The runs take two worker processes of one thread each (no time is compared).

    python benchmarks/pretrain_horizon.py --steps 8000 --seeds 0 1 2      # writes docs/pretrain_horizon/ (~110 min)
    python benchmarks/pretrain_horizon.py --curve --steps 6000            # dense vs small, constant lr, eval every 500

Every run is kept as JSON under --out/runs (a rerun skips finished runs); the tokenizer and blocks under --data.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shlex
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(vocab=2048, tokenizer_chars=4_000_000, block=64, hidden=128, layers=4, heads=4, kv_heads=2,
                intermediate=344, lr=1e-3, batch=16, warmup=0.06, eval_blocks=256, sparsity=0.5)
# the causal-LM recipe's arguments (recipes/causal_lm.py from scratch; everything else the library's defaults)
HF_SPARSE_ARGS = {"structure_learning_rate": 0.1, "importance_warmup": 0.1, "budget_schedule_start": 0.1,
                  "budget_schedule_end": 0.1, "fix_masks_at": 0.3}


def log(msg: str) -> None:
    print(f"[horizon {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# data and models
# ----------------------------------------------------------------------------------------------------------
def load_blocks(cache: str, package: str = "torch"):
    """(tokenizer, blocks): the BPE trained on the first characters of the training files, the corpus packed in
    blocks; both saved under `cache` so that every worker and every rerun reads the same."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    from hf_sparse.tasks import group_texts, train_bpe_tokenizer
    from hf_sparse.tasks.code import load_code_corpus

    s = SETTINGS
    tok_dir, blocks_dir = os.path.join(cache, "tokenizer"), os.path.join(cache, "blocks")
    marker = os.path.join(cache, "package.txt")
    built = None
    if os.path.isfile(marker):
        with open(marker) as f:
            built = f.read().strip()
    if built not in (None, package):
        raise SystemExit(f"--data {cache} holds the blocks of {built!r}, not {package!r}: pass another --data folder")
    if not os.path.isdir(blocks_dir):
        raw = load_code_corpus(package)
        texts, n = [], 0
        for t in raw["train"]["text"]:
            texts.append(t)
            n += len(t)
            if n >= s["tokenizer_chars"]:
                break
        tok = train_bpe_tokenizer(texts, vocab_size=s["vocab"], save_dir=tok_dir)
        blocks = group_texts(raw, tok, s["block"])
        n_val = len(blocks["validation"])  # evenly spaced blocks over the held-out files
        idx = sorted({round(i) for i in np.linspace(0, n_val - 1, s["eval_blocks"])})
        blocks["validation"] = blocks["validation"].select(idx)
        blocks["train"] = blocks["train"].shuffle(seed=0).flatten_indices()  # files mixed: no run reads one package first
        blocks.save_to_disk(blocks_dir + ".tmp")
        os.replace(blocks_dir + ".tmp", blocks_dir)
        with open(marker, "w") as f:
            f.write(package)
    return AutoTokenizer.from_pretrained(tok_dir), datasets.load_from_disk(blocks_dir)


def full_model(tok, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    s = SETTINGS
    set_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def small_model(tok, seed: int, kept: dict[str, list[int]]):
    """A dense model of the kept size: the first `kept[kind][layer]` units of each layer of a fresh full model,
    removed physically (`shrink_model`): plain Linear layers, the initialisation of a model of that size."""
    import torch

    import hf_sparse
    from hf_sparse import SparseConfig, SparseStructure

    model = full_model(tok, seed)
    hf_sparse.sparsify_model(model, SparseConfig(sparsity=SETTINGS["sparsity"]))
    structure = SparseStructure(model)
    by_kind = {kind: list(counts) for kind, counts in kept.items()}
    masks = []
    for g in structure:
        k = by_kind[g.kind].pop(0)
        masks.append((torch.arange(g.num_units) < k).float())
    structure.set_masks(torch.cat(masks))
    for g in structure:
        g.fixed.fill_(True)  # (not fix_masks: it would take the top-K of the untrained scores)
    return hf_sparse.shrink_model(model)


def layer_widths(model) -> dict[str, list[int]]:
    """Per layer, the key/value heads and MLP neurons a plain Llama computes (the kept-size model's shapes)."""
    head_dim = SETTINGS["hidden"] // SETTINGS["heads"]
    return {"head": [layer.self_attn.k_proj.out_features // head_dim for layer in model.model.layers],
            "neuron": [layer.mlp.up_proj.out_features for layer in model.model.layers]}


def matmul_weights(model) -> int:
    """The FLOPs proxy of the trainer: every Linear weight (the LM head included)."""
    import torch.nn as nn

    from hf_sparse.layers import SparseLinear

    total = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            total += int(m.weight.numel())  # (only the full model is counted this way: the proxy's denominator)
        elif type(m) is nn.Linear:
            total += int(m.weight.numel())
    return total


# ----------------------------------------------------------------------------------------------------------
# one run (in a worker process)
# ----------------------------------------------------------------------------------------------------------
def config_fields() -> set[str]:
    """SparseConfig's fields (the rest of hf_sparse's arguments are SparseTrainingArguments')."""
    import dataclasses

    from hf_sparse import SparseConfig

    return {f.name for f in dataclasses.fields(SparseConfig)}


def progress_callback(name: str):
    """One line on stderr per log of the run (the worker's Trainer prints nothing else)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            shown = {k: round(v, 3) for k, v in (logs or {}).items() if k in ("loss", "eval_loss")}
            if shown:
                log(f"{name} step {state.global_step}/{state.max_steps} {shown}")

    return Progress()


def run(spec: dict, data: str) -> dict:
    from transformers import Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    import hf_sparse
    from hf_sparse import SparseConfig, SparseStructure, SparseTrainer, SparseTrainingArguments

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from study.baselines import random_units_mask

    s, method, seed, steps = SETTINGS, spec["method"], spec["seed"], spec["steps"]
    tok, blocks = load_blocks(data, spec.get("package", "torch"))
    common = dict(output_dir=os.path.join(data, "tmp", spec["key"]), report_to=[], disable_tqdm=True, save_strategy="no",
                  max_steps=steps, logging_steps=max(1, steps // 10), seed=seed, data_seed=seed, use_cpu=True,
                  warmup_steps=s["warmup"], learning_rate=s["lr"], per_device_train_batch_size=s["batch"],
                  per_device_eval_batch_size=32, weight_decay=0.01, dataloader_num_workers=0)
    if spec.get("curve"):
        common.update(lr_scheduler_type="constant_with_warmup", eval_strategy="steps", eval_steps=spec["curve"])
    kwargs = dict(train_dataset=blocks["train"], eval_dataset=blocks["validation"], data_collator=default_data_collator,
                  processing_class=tok)
    full_weights = matmul_weights(full_model(tok, seed))
    share = 1.0
    if method in ("dense", "small"):
        model = full_model(tok, seed) if method == "dense" else small_model(tok, seed, spec["kept"])
        share = matmul_weights(model) / full_weights
        trainer = Trainer(model=model, args=TrainingArguments(**common), **kwargs)
    else:
        model = full_model(tok, seed)
        margs = {**HF_SPARSE_ARGS, **spec.get("hf_sparse_args", {})} if method == "hf_sparse" else {}
        fields = config_fields()
        config = SparseConfig(sparsity=s["sparsity"], **{"score_init": "budget", **{k: v for k, v in margs.items() if k in fields}})
        hf_sparse.sparsify_model(model, config)
        train_kw = {k: v for k, v in margs.items() if k not in fields}
        if method == "random":
            structure = SparseStructure(model)
            structure.set_masks(random_units_mask(structure, s["sparsity"], seed))
            for g in structure:
                g.fixed.fill_(True)  # trains only the kept units, from step 0
            train_kw = {"importance_warmup": 0.0}
        trainer = SparseTrainer(model=model, args=SparseTrainingArguments(**common, **train_kw), **kwargs)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress_callback(spec["key"]))
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    record = {**{k: v for k, v in spec.items() if k != "key"}, "steps": int(result.global_step),
              "perplexity": math.exp(min(metrics["eval_loss"], 50.0)), "eval_loss": float(metrics["eval_loss"]),
              "train_seconds": seconds, "flops_per_step": share, "params": sum(p.numel() for p in model.parameters())}
    if method == "small":
        record["widths"] = layer_widths(trainer.model)
    if isinstance(trainer, SparseTrainer):
        state = trainer._sparse_state
        record["flops_per_step"] = state["flops_ratio_sum"] / max(state["steps"], 1)
        record["kept"] = SparseStructure(trainer.model).kept_counts()
        record["fixed_share"] = trainer._forward_share(SparseStructure(trainer.model).masks())  # a fixed step's FLOPs
    record["train_flops"] = record["flops_per_step"] * record["steps"]  # in dense steps
    record["epochs"] = record["steps"] * s["batch"] / len(blocks["train"])  # > 1: some blocks seen twice
    record["curve"] = [(h["step"], math.exp(min(h["eval_loss"], 50.0))) for h in trainer.state.log_history if "eval_loss" in h]
    return record


# ----------------------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------------------
def cached_run(spec: dict, out: str, data: str) -> dict:
    path = os.path.join(out, "runs", spec["key"] + ".json")
    if os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
        # a kept run is reused only if it is the run asked for (a rerun of its hf_sparse run may ask another)
        asked = {"method": spec["method"], "seed": spec["seed"], "steps": spec["steps"], "kept": spec.get("kept"),
                 "package": spec.get("package", "torch"), "hf_sparse_args": spec.get("hf_sparse_args", {})}
        found = {"method": record["method"], "seed": record["seed"], "steps": record["steps"],
                 "kept": record.get("kept") if spec.get("kept") is not None else None,
                 "package": record.get("package", "torch"), "hf_sparse_args": record.get("hf_sparse_args", {})}
        if asked != found:
            raise SystemExit(f"{path} holds another run ({found}) than the one asked for ({asked}): delete it, "
                             "or choose another --out or --tag")
        return {**record, "name": spec["key"].split("__")[0]}
    log(f"run {spec['key']} ({spec['steps']} steps)")
    record = run(spec, data)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    log(f"done {spec['key']}: perplexity {record['perplexity']:.2f}, {record['train_seconds']:.0f} s")
    return {**record, "name": spec["key"].split("__")[0]}


def kept_run(out: str, key: str) -> dict | None:
    """A finished run's record, named by its key's first part, or None."""
    path = os.path.join(out, "runs", key + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return {**json.load(f), "name": key.split("__")[0]}


def uniform_kept() -> dict[str, list[int]]:
    """Every layer at (1 - sparsity) of its heads and neurons: the kept size of a uniform allocation."""
    keep = 1.0 - SETTINGS["sparsity"]
    return {"head": [round(SETTINGS["kv_heads"] * keep)] * SETTINGS["layers"],
            "neuron": [round(SETTINGS["intermediate"] * keep)] * SETTINGS["layers"]}


def random_kept(tok, seed: int) -> dict[str, list[int]]:
    """The per-layer counts of the random baseline's mask (its FLOPs per step)."""
    import hf_sparse
    from hf_sparse import SparseConfig, SparseStructure

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from study.baselines import random_units_mask

    model = full_model(tok, seed)
    hf_sparse.sparsify_model(model, SparseConfig(sparsity=SETTINGS["sparsity"]))
    structure = SparseStructure(model)
    return structure.kept_counts(random_units_mask(structure, SETTINGS["sparsity"], seed))


def equal_flops_steps(train_flops: float, tok, seed: int, kept) -> int:
    share = matmul_weights(small_model(tok, seed, kept)) / matmul_weights(full_model(tok, seed))
    return max(1, round(train_flops / share))


def equal_flops_specs(sparse: dict, tok, steps: int, package: str, tag: str) -> list[dict]:
    """The runs one seed's hf_sparse run asks for: the kept-size model at its training FLOPs; for the recipe's
    run (no tag) also random units at its FLOPs and the kept-size model at dense's (the horizon check)."""
    seed, kept = sparse["seed"], sparse["kept"]
    specs = [dict(key=f"small@sparse{tag}__{steps}__seed{seed}", method="small", seed=seed, kept=kept, package=package,
                  steps=equal_flops_steps(sparse["train_flops"], tok, seed, kept))]
    if not tag:
        specs += [dict(key=f"random@sparse__{steps}__seed{seed}", method="random", seed=seed, package=package,
                       steps=equal_flops_steps(sparse["train_flops"], tok, seed, random_kept(tok, seed))),
                  dict(key=f"small@dense__{steps}__seed{seed}", method="small", seed=seed, kept=kept, package=package,
                       steps=equal_flops_steps(float(steps), tok, seed, kept))]
    return specs


def one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # two workers on two cores: more runs an hour than one run on both


class InlineExecutor:
    """`--workers 0`: every run in this process, in order (the futures are done when submitted)."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))
        return future

    def map(self, fn, *iterables):
        return [fn(*args) for args in zip(*iterables)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8000, help="N: the dense and hf_sparse runs' steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--curve", action="store_true", help="dense vs the uniform kept-size model, constant lr, eval every 500")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "pretrain_horizon"))
    p.add_argument("--data", default=os.path.join(ROOT, "outputs", "pretrain_horizon_data"),
                   help="where the tokenizer and the packed blocks are kept (~150 MB, built once)")
    p.add_argument("--hf_sparse_args", default="{}", help="JSON: hf_sparse's arguments over the recipe's (with --tag)")
    p.add_argument("--tag", default="", help="names a variant's hf_sparse run and its kept-size run at equal FLOPs (dense is shared)")
    p.add_argument("--package", default="torch", help="the installed package whose Python sources are the corpus")
    p.add_argument("--report_only", action="store_true", help="write the report of the runs already kept; run none")
    p.add_argument("--workers", type=int, default=2, help="worker processes of one thread each; 0: in this process")
    a = p.parse_args(argv)
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    tok, blocks = load_blocks(a.data, a.package)
    log(f"{len(blocks['train'])} training blocks of {SETTINGS['block']} tokens, {len(blocks['validation'])} validation")
    # spawn, not fork: the parent has used the tokenizers library's threads, and a forked worker can deadlock
    pool = (ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread)
            if a.workers > 0 else InlineExecutor())
    if a.curve:
        specs = [dict(key=f"curve__{m}__{a.steps}__seed{seed}", method=m, seed=seed, steps=a.steps, curve=500,
                      kept=uniform_kept(), package=a.package) for seed in a.seeds for m in ("dense", "small")]
        records = list(pool.map(cached_run, specs, [a.out] * len(specs), [a.data] * len(specs)))
        print(json.dumps([{k: r[k] for k in ("method", "seed", "flops_per_step", "curve")} for r in records]))
        return
    # the dense runs and hf_sparse's first; each seed's equal-FLOPs runs as soon as its hf_sparse run is done
    tag = f"-{a.tag}" if a.tag else ""
    variant = json.loads(a.hf_sparse_args)
    if variant and not tag:
        raise SystemExit("--hf_sparse_args needs a --tag: the recipe's runs are kept under the untagged names")
    if set(variant) & config_fields() - {"score_init"}:  # the kept-size and random runs read the default units
        raise SystemExit(f"--hf_sparse_args: {sorted(set(variant) & config_fields() - {'score_init'})} change the units "
                         "the equal-FLOPs runs are built from; only SparseTrainingArguments and score_init vary here")
    pending = set() if a.report_only else {pool.submit(cached_run, dict(key=f"{m}{tag if m == 'hf_sparse' else ''}__{a.steps}__seed{seed}", method=m,
                                            seed=seed, steps=a.steps, package=a.package,
                                            **({"hf_sparse_args": variant} if m == "hf_sparse" and variant else {})),
                           a.out, a.data) for m in ("hf_sparse",) + (() if tag else ("dense",)) for seed in a.seeds}
    records = []
    for seed in a.seeds if tag else ():  # a variant runs no dense model: it reads the recipe's where they ran
        path = os.path.join(a.out, "runs", f"dense__{a.steps}__seed{seed}.json")
        if os.path.isfile(path):
            records.append(cached_run(dict(key=f"dense__{a.steps}__seed{seed}", method="dense", seed=seed,
                                           steps=a.steps, package=a.package), a.out, a.data))
    if a.report_only:  # what has run, no new run: a study stopped early still reports (rows need every seed)
        for key in [f"{m}__{a.steps}__seed{seed}" for m in (f"hf_sparse{tag}",) + (() if tag else ("dense",))
                    for seed in a.seeds]:
            record = kept_run(a.out, key)
            if record is None:
                continue
            records.append(record)
            if record["method"] == "hf_sparse":
                found = [kept_run(a.out, spec["key"]) for spec in equal_flops_specs(record, tok, a.steps, a.package, tag)]
                records += [r for r in found if r is not None]
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            record = future.result()
            records.append(record)
            if record["method"] == "hf_sparse":
                specs = equal_flops_specs(record, tok, a.steps, a.package, tag)
                pending |= {pool.submit(cached_run, spec, a.out, a.data) for spec in specs}
    if a.workers > 0:
        pool.shutdown()
    for r in records:
        r["name"] = r["name"].removesuffix(tag) if tag else r["name"]  # the report's rows
    records.sort(key=lambda r: (r["seed"], ORDER.index(r["name"])))
    # the command that runs (or reuses) these runs and writes this report: --report_only only skips missing runs
    given = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--report_only"]
    command = shlex.join(["python", "benchmarks/pretrain_horizon.py", *given])
    with open(os.path.join(a.out, f"results{tag}.json"), "w") as f:
        json.dump({"settings": SETTINGS, "hf_sparse_args": {**HF_SPARSE_ARGS, **variant}, "steps": a.steps, "package": a.package,
                   "command": command, "runs": records}, f, indent=1)
    text = report(records, a.steps, command, curves(a.out), {**HF_SPARSE_ARGS, **variant})
    with open(os.path.join(a.out, f"results{tag}.md"), "w") as f:
        f.write(text)
    print(text)
    return records


# ----------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------
ORDER = ("dense", "hf_sparse", "small@sparse", "random@sparse", "small@dense")
DESCRIBED = {"dense": "dense, full size", "hf_sparse": "hf_sparse (the arguments above)",
             "small@sparse": "dense of the kept size, at hf_sparse's FLOPs", "random@sparse": "random fixed units, at hf_sparse's FLOPs",
             "small@dense": "dense of the kept size, at dense's FLOPs"}


def mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{m:.2f} ± {sd:.2f}"


def report(records: list[dict], steps: int, command: str, curve: list[tuple] | None, hf_args: dict) -> str:
    """The study's tables; a row (a paired difference) over the seeds it has (both have), n given where it is not
    every seed of the hf_sparse runs."""
    by: dict[str, dict[int, dict]] = {}
    for r in records:
        by.setdefault(r["name"], {})[r["seed"]] = r
    if "hf_sparse" not in by:
        raise SystemExit("no hf_sparse run is kept under --out for these --steps / --seeds / --tag")
    seeds = sorted(by["hf_sparse"])

    def n_of(found: list) -> str:
        return "" if len(found) == len(seeds) else f" (n={len(found)})"

    lines = ["# Pretraining at a horizon where size pays (issue 22, item 5)", "",
             (f"Command: `{command}` ({len(seeds)} seeds; the runs in [runs/](runs/)). hf_sparse's arguments: "
              f"`{json.dumps(hf_args)}`."), "",
             "| run | steps | training FLOPs (dense steps) | validation perplexity | per seed |", "|---|---|---|---|---|"]
    for name in ORDER:
        rows = [by.get(name, {}).get(s) for s in seeds]
        rows = [r for r in rows if r is not None]
        if not rows:
            continue
        lines.append(f"| {DESCRIBED[name]}{n_of(rows)} | {sum(r['steps'] for r in rows) / len(rows):.0f} | "
                     f"{sum(r['train_flops'] for r in rows) / len(rows):.0f} | "
                     f"{mean_std([r['perplexity'] for r in rows])} | "
                     + ", ".join(f"{r['perplexity']:.2f}" for r in rows) + " |")
    lines += ["", "Paired differences (perplexity, per seed; negative: the first is better):", ""]
    verdicts = []
    for a, b, what in (("dense", "small@dense", "the horizon: full dense against the kept-size model at equal FLOPs"),
                       ("hf_sparse", "small@sparse", "hf_sparse against the kept-size model at equal FLOPs (the target)"),
                       ("random@sparse", "small@sparse", "random fixed units against the kept-size model at equal FLOPs"),
                       ("hf_sparse", "random@sparse", "hf_sparse against random fixed units at equal FLOPs"),
                       ("hf_sparse", "dense", "hf_sparse against full dense at equal steps")):
        common = [s for s in seeds if s in by.get(a, {}) and s in by.get(b, {})]
        if not common:
            continue
        diffs = [by[a][s]["perplexity"] - by[b][s]["perplexity"] for s in common]
        mean = sum(diffs) / len(diffs)
        lines.append(f"- {what}{n_of(common)}: {mean:+.2f} ({', '.join(f'{d:+.2f}' for d in diffs)})")
        verdicts.append((a, b, f"{mean:+.2f}{n_of(common)}", mean, diffs))
    target = next((v for v in verdicts if v[:2] == ("hf_sparse", "small@sparse")), None)
    horizon = next((v for v in verdicts if v[:2] == ("dense", "small@dense")), None)
    lines += ["", "| check | status |", "|---|---|"]
    if horizon is not None:
        lines.append(f"| the full dense model beats the kept-size one at equal FLOPs (the horizon is long enough) | "
                     f"{'yes' if max(horizon[4]) < 0 else 'no' if min(horizon[4]) > 0 else 'level: the seeds disagree'} "
                     f"({horizon[2]}) |")
    if target is not None:
        lines.append(f"| hf_sparse at or below the kept-size dense model at equal training FLOPs | "
                     f"{'MET' if target[3] <= 0 else 'MISSED'} ({target[2]}) |")
    if curve:
        share, rows = curve
        lines += ["", (f"The horizon probe (`--curve`: constant learning rate after the warm-up, seed 0; the kept-size "
                       f"model uniform, {share:.3f} of dense's FLOPs a step): validation perplexity by each model's own step, so "
                       f"at equal FLOPs the kept size's step s compares with dense's step {share:.3f} s"), "",
                  "| step | dense | kept size |", "|---|---|---|"]
        lines += [f"| {step} | {d:.2f} | {k:.2f} |" for step, d, k in rows]
    return "\n".join(lines) + "\n"


def curves(out: str) -> tuple[float, list[tuple]] | None:
    """The longest --curve probe (seed 0) that ran for both models: (the kept-size model's FLOPs share, rows of
    step, dense perplexity, kept-size perplexity), or None."""
    found: dict[int, dict[str, dict]] = {}
    for name in sorted(os.listdir(os.path.join(out, "runs"))):
        if name.startswith("curve__") and name.endswith("__seed0.json"):
            with open(os.path.join(out, "runs", name)) as f:
                r = json.load(f)
            found.setdefault(r["steps"], {})[r["method"]] = r
    both = [steps for steps, runs in found.items() if set(runs) == {"dense", "small"}]
    if not both:
        return None
    runs = found[max(both)]
    dense, small = dict(runs["dense"]["curve"]), dict(runs["small"]["curve"])
    return runs["small"]["flops_per_step"], [(step, dense[step], small[step]) for step in sorted(dense) if step in small]


if __name__ == "__main__":
    main()
