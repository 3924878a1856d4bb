"""The package's import graph has no circle, and docs/architecture.md lists every module of hf_sparse/."""

import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")
PKG = os.path.join(ROOT, "hf_sparse")


def _modules() -> dict[str, str]:
    """{"trainer": source, "tasks/pairs": source, ...} for every module of the package but the __init__ files."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                rel = os.path.relpath(os.path.join(folder, name), PKG)[:-3].replace(os.sep, "/")
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    out[rel] = f.read()
    return out


def _imports() -> dict[str, set[str]]:
    graph = {}
    for rel, text in _modules().items():
        here = rel.rpartition("/")[0]
        deps = set()
        for dots, mod in re.findall(r"^\s*from (\.+)([a-z_]*) import", text, re.MULTILINE):
            base = here if len(dots) == 1 else here.rpartition("/")[0] if "/" in here else ""
            deps.add(f"{base}/{mod}".strip("/") if mod else base or "__init__")
        graph[rel] = deps - {rel}
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
    for rel, text in _modules().items():
        for line in text.splitlines():
            m = re.match(r"\s*from \.+[a-z_]* import \(?(.*)", line)
            if m:
                names = [n.strip() for n in m.group(1).replace(")", "").split(",") if n.strip()]
                assert not [n for n in names if n.startswith("_")], f"{rel}: {line.strip()}"


def test_no_module_is_over_500_lines():
    long = {rel: text.count("\n") for rel, text in _modules().items() if text.count("\n") > 500}
    assert not long, f"split these modules by job: {long}"


def test_the_core_never_imports_the_embedded_tasks():
    for rel, deps in _imports().items():
        if not rel.startswith("tasks/") and rel != "data":
            assert not [d for d in deps if d.startswith("tasks") or d == "data"], f"{rel} imports {deps}"


def test_architecture_doc_lists_every_module():
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        doc = f.read()
    missing = [m for m in _modules() if f"`{m}.py`" not in doc]
    assert not missing, f"docs/architecture.md does not describe {missing}"
