"""What every part of the quality study shares: the task and method names, the cache version, the settings a
run's result depends on (part of every cache key), the digest that names a cache entry, and the log line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

TASKS = ("cls", "lm")
METHODS = ("dense", "hf_sparse", "random", "magnitude", "movement")
BASELINES = ("random", "magnitude", "movement")
CACHE_VERSION = 1
CONFIG_FIELDS = ("granularity", "budget", "compute", "score_init", "target_modules", "exclude_modules")


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything a run's result depends on besides method, sparsity, seed and steps (part of the cache key)."""

    # classification
    cls_passage_words: int = 40
    cls_max_length: int = 80
    cls_max_passages_per_play: int = 128
    cls_lr: float = 1e-4
    cls_batch: int = 16
    cls_max_train: int | None = None
    cls_max_eval: int | None = None
    # causal LM
    lm_vocab: int = 2048
    lm_block: int = 64
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_intermediate: int = 344
    lm_lr: float = 1e-3
    lm_batch: int = 16
    lm_max_train: int | None = None
    lm_max_eval: int = 128
    lm_tokenizer_speeches: int | None = None  # train the BPE on the first N speeches only (quick mode)
    # common
    warmup: float = 0.06
    quick: bool = False

    def for_task(self, task: str) -> dict[str, Any]:
        prefix = f"{task}_"
        out = {k: v for k, v in dataclasses.asdict(self).items() if k.startswith(prefix)}
        out.update(warmup=self.warmup, quick=self.quick)
        return out


def quick_settings() -> Settings:
    return Settings(
        cls_max_train=64, cls_max_eval=64, lm_vocab=512, lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2,
        lm_intermediate=128, lm_max_train=64, lm_max_eval=32, lm_tokenizer_speeches=3000, quick=True,
    )


def digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
