"""A larger offline causal-LM corpus: the Python sources of an installed package.

The Shakespeare corpus (`load_lm_corpus`, 1.1M tokens) is spent in about one epoch of the LM study's
runs, too soon for a horizon where a model's size pays (docs/quality.md, "Pretraining at a longer
horizon"). The sources of the installed ``torch`` (pinned by the set-up, so every machine reads the same
files) are about 50 MB of varied Python: `load_code_corpus` reads them, one row per file, and splits them
by a stable hash of the file's path (no file in both splits; the same split on every machine).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import datasets


def package_sources(package: str) -> tuple[str, list[str]]:
    """(the folder of an installed package, its ``.py`` files as paths relative to it, sorted)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed as a folder; install it or choose another package")
    root = next(iter(spec.submodule_search_locations))
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        found += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files) if f.endswith(".py")]
    return root, sorted(found)


def load_code_corpus(package: str = "torch", validation_share: float = 0.05,
                     max_file_chars: int = 200_000) -> datasets.DatasetDict:
    """The Python sources of an installed package as a causal-LM corpus, split by file.

    Args:
        package: an installed package (default ``torch``: the set-up pins its version).
        validation_share: the share of the files (by a hash of the relative path) held out as ``validation``.
        max_file_chars: longer files (generated tables) are left out.

    Returns:
        a ``DatasetDict`` with ``train`` and ``validation`` splits, one row per file in path order, columns
        ``text`` (the file) and ``path`` (relative to the package), plus ``package`` and its version in
        ``info.description``.
    """
    import datasets

    if not 0.0 < validation_share < 1.0:
        raise ValueError(f"validation_share must be in (0, 1), got {validation_share}")
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "validation": []}
    root, sources = package_sources(package)  # (refuses a package that is not installed)
    for rel in sources:
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        if not text.strip() or len(text) > max_file_chars:
            continue
        bucket = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 16**8
        rows["validation" if bucket < validation_share else "train"].append((text, rel))
    version = _version(package)
    out = {}
    for name, items in rows.items():
        info = datasets.DatasetInfo(description=f"Python sources of {package} {version}, {name} split")
        out[name] = datasets.Dataset.from_dict({"text": [t for t, _ in items], "path": [p for _, p in items]}, info=info)
    return datasets.DatasetDict(out)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
