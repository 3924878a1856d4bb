"""The cost model at Llama-7B / 13B / 70B shapes, computed from their configs (not measured): training FLOPs per
token and memory, dense against hf_sparse's search and fixed phases at kept fractions 0.5 and 0.25, so a user
on a GPU cluster can see what to expect before running.

    python benchmarks/scale_on_paper.py                     # the table of docs/benchmarks.md
    python benchmarks/scale_on_paper.py --seq 8192 --kept 0.5 0.25 0.1

The model (docs/method.md §6), per token, with rho the kept fraction of every prunable block (heads and MLP
neurons; the budget in parameters keeps it equal for both at the target):
  forward FLOPs   2 x (unprunable matmul params + rho x prunable params) + attention scores 4 x seq x q_width x rho
                  per layer (QK^T and AV, counted over all seq keys: no halving for the causal mask)
  training FLOPs  dense 3 x forward(1); search 2 x forward(rho) + 2 x forward(rho) (two forwards, one backward);
                  fixed 3 x forward(rho)
  weights         bf16, every parameter (the dropped ones stay allocated while training; `export="shrink"` drops
                  them afterwards)
  optimizer       AdamW in mixed precision: fp32 master + two fp32 moments = 12 bytes per parameter, for every
                  parameter (units not computed keep their state: hf_sparse freezes it, it does not free it)
  gradients       bf16, full size (the gathered layers scatter the kept rows into the full gradient)
  activations     bf16, saved for the backward by the one backpropagated forward (the no-grad forwards of the
                  search keep nothing): per layer and token 6 x hidden (norms, residuals, projection inputs) +
                  rho x (q_width + 2 kv_width + q_width) (q, k, v, attention output) + rho x 3 x intermediate
                  (gate, up, their product), without activation checkpointing or attention-score storage
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def prunable(self) -> int:
        """Attention (q, k, v, o) and MLP (gate, up, down) weights of every layer: what hf_sparse can drop."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.layers * (self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate)

    def unprunable_matmul(self) -> int:
        return self.vocab * self.hidden  # the LM head (the embedding is a lookup, no FLOPs)

    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.prunable() + 2 * self.vocab * self.hidden + norms


SHAPES = (
    Shape("Llama-7B", 4096, 11008, 32, 32, 32),
    Shape("Llama-13B", 5120, 13824, 40, 40, 40),
    Shape("Llama-70B (GQA 8)", 8192, 28672, 80, 64, 8),
)


def forward_flops(s: Shape, rho: float, seq: int) -> float:
    attention = s.layers * 4 * seq * s.heads * s.head_dim * rho
    return 2 * (s.unprunable_matmul() + rho * s.prunable()) + attention


def training_flops(s: Shape, phase: str, rho: float, seq: int) -> float:
    if phase == "dense":
        return 3 * forward_flops(s, 1.0, seq)
    if phase == "search":
        return 4 * forward_flops(s, rho, seq)
    return 3 * forward_flops(s, rho, seq)


def activation_bytes_per_token(s: Shape, rho: float) -> float:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = 6 * s.hidden + rho * (2 * q + 2 * kv) + rho * 3 * s.intermediate
    return 2 * s.layers * per_layer


def table(seq: int, kept: list[float], tokens: int) -> str:
    lines = [f"Cost model per token at sequence {seq}; activations for {tokens:,} tokens in flight (e.g. batch "
             f"{tokens // seq} x {seq}); memory in GiB.", "",
             "| model | params | phase | kept | training TFLOPs / token | vs dense | weights | optimizer | grads |"
             " activations | total |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in SHAPES:
        n = s.params()
        dense = training_flops(s, "dense", 1.0, seq)
        weights, optimizer, grads = 2 * n / GIB, 12 * n / GIB, 2 * n / GIB
        rows = [("dense", 1.0)] + [(p, r) for r in kept for p in ("search", "fixed")]
        for phase, rho in rows:
            f = training_flops(s, phase, rho, seq)
            act = activation_bytes_per_token(s, rho) * tokens / GIB
            total = weights + optimizer + grads + act
            lines.append(f"| {s.name} | {n / 1e9:.1f}B | {phase} | {rho:g} | {f / 1e12:.3f} | {f / dense:.2f} | "
                         f"{weights:.0f} | {optimizer:.0f} | {grads:.0f} | {act:.0f} | {total:.0f} |")
    lines += ["", "Unprunable share of the dense forward FLOPs (the LM head; Amdahl's u before framework overhead): " +
              ", ".join(f"{s.name} {2 * s.unprunable_matmul() / forward_flops(s, 1.0, seq):.3f}" for s in SHAPES)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--tokens", type=int, default=8 * 4096, help="tokens per device in one micro-batch")
    a = p.parse_args(argv)
    print(table(a.seq, a.kept, a.tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
