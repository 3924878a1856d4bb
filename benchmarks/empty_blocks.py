"""What an all-dropped block costs: one training step with every unit dropped (the unprunable floor u) and with
whole blocks dropped (every other layer's attention and MLP empty, the rest whole), with the stand-in unit
(`remove_skips`: one unit computed per empty group, as before) and with empty blocks skipped (the default).

    python benchmarks/empty_blocks.py                       # MiniLM 32 x 64 and the bench's Llama 4 x 128
    python benchmarks/empty_blocks.py --models minilm --repeats 3

Rows alternate within each repeat (dense, then each variant) and the fastest of the repeats is kept, so a slow
spell touches every row. The bound of a whole-block mask is 1 / (u + (1 - u) rho) with u the floor measured
with skipping and rho the kept fraction of the prunable parameters.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    import torch
    from transformers import Trainer

    from hf_sparse import SparseTrainer
    from hf_sparse.bench import _args, _prepare, _time_steps, build_model, make_batch, with_fixed_masks
    from hf_sparse.empty_blocks import remove_skips

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["minilm", "llama"])
    p.add_argument("--shapes", nargs="+", default=["32x64", "4x128"], help="batch x seq per model, in order")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    out_dir = tempfile.mkdtemp(prefix="hf_sparse_empty_")

    def masks_for(structure, variant):
        if variant.startswith("nothing"):
            return torch.zeros(structure.num_units)
        # whole blocks: the groups of even layers empty, of odd layers whole (a group name holds its layer index)
        parts = []
        for name, n in zip(structure.names, structure.sizes):
            layer = int(next(t for t in name.split(".") if t.isdigit()))
            parts.append(torch.full((n,), float(layer % 2)))
        return torch.cat(parts)

    def time_variant(model_name, batch, seq, variant):
        gc.collect()
        model, task = build_model(model_name)
        if variant == "dense":
            trainer = Trainer(model=model, args=_args(out_dir, dev, False))
            rho = 1.0
        else:
            structure = with_fixed_masks(model, lambda st: masks_for(st, variant))
            if variant.endswith("stand-in"):
                remove_skips(model)
            ppu = structure.params_per_unit()
            rho = float((ppu * structure.masks()).sum() / ppu.sum())
            trainer = SparseTrainer(model=model, args=_args(out_dir, dev, False))
        _prepare(trainer)
        median, _ = _time_steps(trainer, make_batch(model, task, batch, seq, dev), args.warmup, args.steps, dev, False)
        del trainer, model
        return median * 1e3, rho

    variants = ["dense", "nothing kept, stand-in", "nothing kept, skipped", "whole blocks, stand-in",
                "whole blocks, skipped"]
    for model_name, shape in zip(args.models, args.shapes):
        batch, seq = (int(v) for v in shape.split("x"))
        best: dict[str, float] = {}
        rhos: dict[str, float] = {}
        for r in range(args.repeats):
            for v in variants:
                ms, rho = time_variant(model_name, batch, seq, v)
                best[v] = min(best.get(v, float("inf")), ms)
                rhos[v] = rho
                print(f"  [{model_name} repeat {r}] {v:<24} {ms:8.1f} ms", file=sys.stderr, flush=True)
        dense = best["dense"]
        u = best["nothing kept, skipped"] / dense
        print(f"\n{model_name}, batch {batch} x {seq} (fastest of {args.repeats}, median of {args.steps} steps)\n")
        print("| step | kept | ms | vs dense | bound | of bound |")
        print("|---|---:|---:|---:|---:|---:|")
        for v in variants:
            speed = dense / best[v]
            bound = 1.0 / (u + (1 - u) * rhos[v]) if v.startswith("whole") else None
            cells = [v, f"{rhos[v]:.3f}", f"{best[v]:.1f}", f"{speed:.2f}x",
                     f"{bound:.2f}x" if bound else "", f"{speed / bound:.0%}" if bound else ""]
            print("| " + " | ".join(cells) + " |")
        print(f"\nunprunable share u: {best['nothing kept, stand-in'] / dense:.3f} with the stand-in, {u:.3f} skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
