"""SparseConfig: what to sparsify and how. A dataclass with a JSON round trip (`sparse_config.json`)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

CONFIG_NAME = "sparse_config.json"
FORMAT_VERSION = 1

GRANULARITIES = ("neuron", "head", "weight")
BUDGETS = ("params", "units")
COMPUTE_MODES = ("gather", "mask")
SCORE_INITS = ("ones", "budget", "magnitude")


@dataclass
class SparseConfig:
    """Configuration of a score-gated sparse model.

    Parameters:
        sparsity: fraction of the prunable budget removed, in [0, 1). With `budget="params"` it is the
            fraction of the prunable parameters (the targeted projections' weights and biases).
        granularity: the kinds of prunable units: any of `"neuron"` (MLP intermediate neurons), `"head"`
            (attention heads; a key/value group with its query heads under grouped-query attention) and
            `"weight"` (element-wise; mask compute only, so it saves nothing on dense hardware).
        target_modules: restrict the units to these modules. A list matches module names exactly or as
            a dotted suffix (`["down_proj"]`); a string is a regular expression over full names.
            `None`: the architecture's attention and MLP projections.
        exclude_modules: the same forms; units touching a matching module are not prunable.
        budget: `"params"`: a unit costs its parameter count, so heads and neurons of every layer compete
            in one budget of kept parameters; `"units"`: every unit costs 1, as in the paper.
        compute: `"gather"`: kept rows/columns/heads are gathered and only they are computed, forward and
            backward (the fast path); `"mask"`: dense compute multiplied by the mask (the reference).
        score_init: the initial keep probabilities: `"ones"` (the dense model, for pretrained weights),
            `"budget"` (the kept fraction everywhere, for training from scratch) or `"magnitude"` (from
            each unit's weight norm, projected onto the budget).
        architecture: an explicit unit layout for a model type hf_sparse has no table entry for (see
            `hf_sparse.architectures.ArchitectureSpec.from_dict`).
        uniform_layers: every layer keeps the same number of units of each kind (heads -- key/value groups
            under grouped-query attention -- and MLP neurons), so that `export_model(..., export="shrink")`
            writes a standard config (a smaller `intermediate_size`, fewer heads with an explicit `head_dim`
            where the family's config takes one) that plain `from_pretrained`, `pipeline()` and other runtimes
            load. The budget is the same global one; the deterministic top-K mask (`fix_masks`, the trainer's
            fixed and evaluation mask) takes whole *levels* -- one more unit in every layer of a kind -- by
            descending mean score, while they fit (docs/export.md, "Serving a shrunk model"). The search itself
            is not forced: masks sampled while searching still differ between layers. Structured units only.
    """

    sparsity: float = 0.5
    granularity: list[str] = field(default_factory=lambda: ["neuron", "head"])
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    budget: str = "params"
    compute: str = "gather"
    score_init: str = "ones"
    architecture: dict[str, Any] | None = None
    uniform_layers: bool = False
    version: int = FORMAT_VERSION

    def __post_init__(self):
        if isinstance(self.granularity, str):
            self.granularity = [self.granularity]
        self.granularity = list(dict.fromkeys(self.granularity))
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"SparseConfig.sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(
                f"SparseConfig.sparsity must be in [0, 1) (the fraction of prunable parameters removed), got "
                f"{self.sparsity}. Use e.g. sparsity=0.5 to keep half."
            )
        self.sparsity = float(self.sparsity)
        if not self.granularity:
            raise ValueError(f"SparseConfig.granularity is empty; choose from {GRANULARITIES}")
        for g in self.granularity:
            if g not in GRANULARITIES:
                raise ValueError(f"SparseConfig.granularity has unknown value {g!r}; choose from {GRANULARITIES}")
        if "weight" in self.granularity and len(self.granularity) > 1:
            raise ValueError(
                f"SparseConfig.granularity={self.granularity}: 'weight' cannot be combined with structured units "
                "on the same projections; use ['neuron', 'head'] or ['weight']"
            )
        if not isinstance(self.uniform_layers, bool):
            raise ValueError(f"SparseConfig.uniform_layers must be True or False, got {self.uniform_layers!r}")
        if self.uniform_layers and self.uses_weights:
            raise ValueError(
                "SparseConfig.uniform_layers=True needs structured units (granularity 'neuron' and/or 'head'): "
                "element-wise sparsity has no per-layer count to keep equal"
            )
        _check_choice("budget", self.budget, BUDGETS)
        _check_choice("compute", self.compute, COMPUTE_MODES)
        _check_choice("score_init", self.score_init, SCORE_INITS)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"SparseConfig.{name} must be a list of names, a regex string or None, got {value!r}")
        if self.version > FORMAT_VERSION:
            raise ValueError(
                f"SparseConfig.version={self.version} is newer than this hf_sparse understands ({FORMAT_VERSION}); "
                "upgrade hf_sparse"
            )

    @property
    def uses_weights(self) -> bool:
        return self.granularity == ["weight"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"sparse config has unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SparseConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is it a folder saved by hf_sparse?")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt") from e
        return cls.from_dict(data)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SparseConfig.{name} must be one of {choices}, got {value!r}")
