#!/usr/bin/env python
"""Dense vs sparse training-step benchmark (issue 6): prints the markdown table of docs/benchmarks.md.

    python benchmarks/train_step.py                                   # MiniLM, BERT-base, Llama-shaped; CPU
    python benchmarks/train_step.py --model minilm --threads 2        # one model
    python benchmarks/train_step.py --device cuda --bf16              # on a GPU (see train_step_gpu.sh)

The same code is the `hf-sparse bench` console command (hf_sparse/bench.py), which also takes any local
path or Hub id: `hf-sparse bench --model path/to/model --batch_size 4 --seq_len 512`.
"""

import sys

from hf_sparse.bench import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = ["--model", "minilm", "--model", "bert-base", "--model", "llama"] + argv
    sys.exit(main(argv))
