"""The `hf-sparse` console command: `hf-sparse bench ...` and `hf-sparse prune ...` (each takes `--help`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hf-sparse bench [--model NAME_OR_PATH] [--batch_size N] [--seq_len N] ...\n"
              "       hf-sparse prune --model PATH --train_file FILE --sparsity 0.5 --output_dir OUT ...\n\n"
              "  bench   time dense vs sparse training steps on your model and shapes\n"
              "  prune   prune a trained model from forward passes only (hf_sparse.prune_model) and export it")
        return 0
    if argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[0] == "prune":
        from .prune_cli import main as prune_main

        return prune_main(argv[1:])
    print(f"hf-sparse: unknown command {argv[0]!r}; try 'hf-sparse --help'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
