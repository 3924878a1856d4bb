"""The package's import graph has no circle, and docs/architecture.md lists every module of hf_sparse/."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")
PKG = os.path.join(ROOT, "hf_sparse")


def _imports() -> dict[str, set[str]]:
    graph = {}
    for name in os.listdir(PKG):
        if name.endswith(".py") and name != "__init__.py":
            with open(os.path.join(PKG, name), encoding="utf-8") as f:
                text = f.read()
            graph[name[:-3]] = set(re.findall(r"^\s*from \.([a-z_]+) import", text, re.MULTILINE)) - {name[:-3]}
    return graph


def test_no_import_circle_in_hf_sparse():
    graph = _imports()
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import circle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in graph.get(node, ()):
            visit(dep, path + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


def test_no_module_imports_a_private_name_of_another():
    for name in os.listdir(PKG):
        if name.endswith(".py"):
            with open(os.path.join(PKG, name), encoding="utf-8") as f:
                for line in f:
                    m = re.match(r"\s*from \.[a-z_]+ import \(?(.*)", line)
                    if m:
                        names = [n.strip() for n in m.group(1).replace(")", "").split(",") if n.strip()]
                        assert not [n for n in names if n.startswith("_")], f"{name}: {line.strip()}"


def test_architecture_doc_lists_every_module():
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        doc = f.read()
    missing = [m for m in _imports() if f"`{m}.py`" not in doc]
    assert not missing, f"docs/architecture.md does not describe {missing}"
