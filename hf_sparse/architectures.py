"""The one table of per-model knowledge: where each family keeps its MLP and attention projections.

A *block* is the module that owns one group of units (an MLP's neurons or an attention's heads). Its
members are the projections those units span: `out` members produce the units (rows of up/gate/q/k/v),
`in` members consume them (columns of down/o_proj). Adding a model family is one entry in `ARCHITECTURES`;
anything else can pass the same layout as `SparseConfig(architecture={...})`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

ROLES = ("out", "in")
# How many rows (out) or columns (in) of a member one unit spans:
#   "1": one (an MLP neuron); "head": head_dim (a key/value head);
#   "group": query heads per key/value group * head_dim (the query side of one GQA group).
WIDTHS = ("1", "head", "group")
# What an attention module's head-count attributes count, for `shrink_model` to rewrite them to the kept sizes:
#   "query_heads": query heads kept; "kv_heads": key/value heads kept; "query_width": query heads kept * head_dim.
SHRINK_COUNTS = ("query_heads", "kv_heads", "query_width")
# The attribute names Transformers' attention modules use (each rewritten only where the module has it as an int).
DEFAULT_SHRINK_ATTRS = (("num_heads", "query_heads"), ("num_attention_heads", "query_heads"),
                        ("num_key_value_heads", "kv_heads"), ("all_head_size", "query_width"))
DEFAULT_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size")  # where an attention module keeps its head size


@dataclass(frozen=True)
class Member:
    path: str  # dotted path from the block module
    role: str  # "out" or "in"
    width: str = "1"
    segments: int = 1  # fused projections: GPT-2's c_attn holds q, k and v side by side (3)


@dataclass(frozen=True)
class EmptyBlock:
    """What to skip while a block keeps no unit (hf_sparse/empty_blocks.py): `core`, the module computing from
    the units (path from the block, "" = the block itself); `norm`, a sibling of the block that feeds only it
    (a pre-norm), skipped too; `dropout`, the core's output dropout (path from the core), applied to the
    bias it returns."""

    core: str = ""
    norm: str | None = None
    dropout: str | None = None


@dataclass(frozen=True)
class BlockSpec:
    anchor: str  # regex searched at the end of a module's full name, e.g. r"layers\.\d+\.mlp"
    members: tuple[Member, ...]
    # Attributes of the attention module (path from the block, value = kept units * width) that its
    # forward uses to reshape; they must follow the number of computed heads under gather compute.
    head_attrs: tuple[tuple[str, str], ...] = ()
    # Attention only: the attributes `shrink_model` sets to the kept counts, and where the head size is read.
    shrink_attrs: tuple[tuple[str, str], ...] = DEFAULT_SHRINK_ATTRS
    head_dim_attrs: tuple[str, ...] = DEFAULT_HEAD_DIM_ATTRS
    # Skipped while nothing is kept; None: the block computes one stand-in unit instead (see layers.py).
    empty: EmptyBlock | None = None

    def matches(self, name: str) -> bool:
        return re.search(rf"(^|\.){self.anchor}$", name) is not None


@dataclass(frozen=True)
class ArchitectureSpec:
    mlp: BlockSpec | None = None
    attention: BlockSpec | None = None
    decoder: bool = False  # a causal-LM family: the benchmarks build it with AutoModelForCausalLM
    # What the family's config can say, for the standard config of a uniform-layers shrunk export
    # (SparseConfig.uniform_layers; hf_sparse/shrink.py): the config field of the MLP width (None: the MLP stays
    # at full size with the dropped neurons zeroed), whether it takes an explicit `head_dim` (so fewer heads
    # keep their size; else the attention stays at full size, dropped heads zeroed), and whether it refuses a
    # `num_attention_heads` that does not divide `hidden_size` even then (LlamaConfig in Transformers 5.25).
    mlp_size_attr: str | None = None
    explicit_head_dim: bool = False
    heads_divide_hidden: bool = False
    notes: str = field(default="", compare=False)

    def blocks(self) -> dict[str, BlockSpec]:
        return {k: v for k, v in (("neuron", self.mlp), ("head", self.attention)) if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchitectureSpec":
        """`{"mlp": {"anchor": ..., "members": [{"path", "role", "width", "segments"}]}, "attention": {...,
        "head_attrs": [["num_heads", "1"]], "shrink_attrs": [["n_heads", "query_heads"]], "head_dim_attrs":
        ["head_size"], "empty": {"core": "", "norm": "ln_1"}}, "decoder": true}`; either block may be missing.
        Without "empty" a block with nothing kept computes one stand-in unit (correct for any layout)."""
        unknown = sorted(set(data) - {"mlp", "attention", "decoder", "notes", *_CONFIG_KEYS})
        if unknown:
            raise ValueError(f"SparseConfig.architecture has unknown keys {unknown}; expected 'mlp' and/or 'attention'")
        blocks = {}
        for key in ("mlp", "attention"):
            block = data.get(key)
            if block is None:
                continue
            try:
                members = tuple(Member(**m) for m in block["members"])
                spec = BlockSpec(
                    anchor=block["anchor"],
                    members=members,
                    head_attrs=tuple(tuple(a) for a in block.get("head_attrs", ())),
                    shrink_attrs=tuple(tuple(a) for a in block.get("shrink_attrs", DEFAULT_SHRINK_ATTRS)),
                    head_dim_attrs=tuple(block.get("head_dim_attrs", DEFAULT_HEAD_DIM_ATTRS)),
                    empty=EmptyBlock(**block["empty"]) if block.get("empty") is not None else None,
                )
            except (KeyError, TypeError) as e:
                raise ValueError(f"SparseConfig.architecture[{key!r}] is malformed ({e}); see ArchitectureSpec.from_dict") from e
            for m in members:
                if m.role not in ROLES or m.width not in WIDTHS or m.segments < 1:
                    raise ValueError(
                        f"SparseConfig.architecture[{key!r}] member {m}: role must be in {ROLES}, width in {WIDTHS}, "
                        "segments >= 1"
                    )
            bad = [a for a in spec.shrink_attrs if len(a) != 2 or a[1] not in SHRINK_COUNTS]
            if bad:
                raise ValueError(f"SparseConfig.architecture[{key!r}] shrink_attrs {bad}: each is [attribute, count] "
                                 f"with count in {SHRINK_COUNTS}")
            if not any(m.role == "out" for m in members) or not any(m.role == "in" for m in members):
                raise ValueError(f"SparseConfig.architecture[{key!r}] needs at least one 'out' and one 'in' member")
            blocks[key] = spec
        if not blocks:
            raise ValueError("SparseConfig.architecture defines neither 'mlp' nor 'attention'")
        return cls(**blocks, decoder=bool(data.get("decoder", False)), notes=data.get("notes", ""),
                   mlp_size_attr=data.get("mlp_size_attr"),
                   explicit_head_dim=bool(data.get("explicit_head_dim", False)),
                   heads_divide_hidden=bool(data.get("heads_divide_hidden", False)))


_CONFIG_KEYS = ("mlp_size_attr", "explicit_head_dim", "heads_divide_hidden")


def _plain_mlp(anchor: str, up: tuple[str, ...], down: str, empty: EmptyBlock | None = None) -> BlockSpec:
    return BlockSpec(anchor, tuple(Member(p, "out") for p in up) + (Member(down, "in"),), empty=empty)


def _qkvo_attention(anchor: str, q: str, k: str, v: str, o: str, head_attrs=(), empty=None) -> BlockSpec:
    members = (Member(q, "out", "group"), Member(k, "out", "head"), Member(v, "out", "head"), Member(o, "in", "group"))
    return BlockSpec(anchor, members, head_attrs, empty=empty)


# Post-norm encoders: the norm after the residual is not skippable; the attention's and MLP's insides are.
_BERT = ArchitectureSpec(
    mlp=_plain_mlp(r"layer\.\d+", ("intermediate.dense",), "output.dense", EmptyBlock("intermediate")),
    attention=_qkvo_attention(r"layer\.\d+\.attention", "self.query", "self.key", "self.value", "output.dense",
                              empty=EmptyBlock("self")),
    mlp_size_attr="intermediate_size",  # the head size is hidden_size // num_attention_heads: heads stay
    notes="BERT-style encoders: intermediate.dense / output.dense, self.{query,key,value} / output.dense",
)
_GPT2 = ArchitectureSpec(
    mlp=_plain_mlp(r"h\.\d+\.mlp", ("c_fc",), "c_proj", EmptyBlock("", "ln_2", "dropout")),
    attention=BlockSpec(
        r"h\.\d+\.attn",
        (Member("c_attn", "out", "head", segments=3), Member("c_proj", "in", "head")),
        head_attrs=(("split_size", "head"), ("num_heads", "1")),
        empty=EmptyBlock("", "ln_1", "resid_dropout"),
    ),
    decoder=True,
    mlp_size_attr="n_inner",
    notes="GPT-2: Conv1D layers, fused c_attn split by split_size",
)
_LLAMA = ArchitectureSpec(
    mlp=_plain_mlp(r"layers\.\d+\.mlp", ("gate_proj", "up_proj"), "down_proj", EmptyBlock("", "post_attention_layernorm")),
    attention=_qkvo_attention(r"layers\.\d+\.self_attn", "q_proj", "k_proj", "v_proj", "o_proj",
                              empty=EmptyBlock("", "input_layernorm")),
    decoder=True,
    mlp_size_attr="intermediate_size",
    explicit_head_dim=True,
    heads_divide_hidden=True,  # LlamaConfig.validate_architecture: hidden_size % num_attention_heads == 0
    notes="Llama-style decoders: gated MLP, grouped-query attention (a unit is one key/value group)",
)
_MISTRAL = replace(_LLAMA, heads_divide_hidden=False)  # Mistral's and Qwen2's configs take any head count
_OPT = ArchitectureSpec(
    mlp=_plain_mlp(r"layers\.\d+", ("fc1",), "fc2"),
    attention=_qkvo_attention(
        r"layers\.\d+\.self_attn", "q_proj", "k_proj", "v_proj", "out_proj", head_attrs=(("num_heads", "1"),),
        empty=EmptyBlock(""),  # its norm is a pre-norm or a post-norm depending on the config: not skipped
    ),
    decoder=True,
    mlp_size_attr="ffn_dim",
    notes="OPT: fc1 / fc2 in the decoder layer (no module of their own: an empty MLP computes a stand-in "
          "unit); attention reshapes with self.num_heads",
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _MISTRAL,
    "qwen2": _MISTRAL,
    "opt": _OPT,
}


@dataclass(frozen=True)
class HeadGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def width(self, symbol: str) -> int:
        return {"1": 1, "head": self.head_dim, "group": self.group_size * self.head_dim}[symbol]


def head_geometry(config) -> HeadGeometry:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadGeometry(heads, kv, head_dim)


def get_architecture(model_config, override: dict[str, Any] | None = None) -> ArchitectureSpec:
    if override is not None:
        return ArchitectureSpec.from_dict(override)
    model_type = getattr(model_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"hf_sparse has no unit layout for model_type={model_type!r} (supported: {sorted(ARCHITECTURES)}). "
            "Pass SparseConfig(architecture={'mlp': {'anchor': ..., 'members': [...]}, 'attention': {...}}) "
            "describing where its MLP and attention projections are, or use granularity='weight' with "
            "target_modules naming its nn.Linear layers."
        )
    return ARCHITECTURES[model_type]
