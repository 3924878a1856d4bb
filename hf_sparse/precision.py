"""Half-precision models and the structure update: the difference of two masks' losses must survive rounding."""

from __future__ import annotations

import torch
from torch import nn


def upcast_heads(model: nn.Module) -> None:
    """Logits in float32 under a bf16/fp16 model: a loss taken on half-precision logits (BERT's sequence
    classification computes it in the logits' dtype) rounds to ~3 significant digits, and the difference of two
    masks' losses, all the structure update sees, drowns in that rounding. Causal-LM losses upcast already."""
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if isinstance(out, nn.Module):
        heads.append(out)
    heads += [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("classifier", "score", "qa_outputs")]
    for head in {id(h): h for h in heads}.values():
        if not getattr(head, "_hf_sparse_upcast", False):
            head.register_forward_hook(_to_float32)
            head._hf_sparse_upcast = True


def _to_float32(module, args, output):
    if torch.is_tensor(output) and output.dtype in (torch.float16, torch.bfloat16):
        return output.float()
    return None
