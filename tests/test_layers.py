"""The package's import graph: no cycles, and no import from a lower layer to a higher one.

Every import counts, a function's own included (a lazy import is a dependency all the same).
The layers, lowest first, are the folders in the order the data flows:

    base (types, config/, audio, stage, net, ...) < sources < windowing < teaching < inference
    < alerts < output < serve < daemon < tools < cli

``teaching`` sits below ``inference``: banks and kNN are what the examples model scores with, and
whatever teaching needs of a model (an embedder, the inference thread) is handed in through its port.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monitord"
LAYERS = ["base", "sources", "windowing", "teaching", "inference", "alerts", "output", "serve", "daemon", "tools", "cli"]
BASE = {"types", "config", "audio", "stage", "net", "secrets", "classmap", "sdnotify", "monitord"}
ENTRY = {"__main__": "cli"}


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: the monitord modules it imports}, each import resolved to the longest module name."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from pkg import sub` depends on pkg.sub when that is a module, else on pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("monitord") and target != name:
                    graph[name].add(target)
    for name in modules:
        graph.setdefault(name, set())
    return graph


def layer_of(module: str) -> str:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "monitord"
    top = ENTRY.get(top, top)
    return "base" if top in BASE else top


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = layer_of(module), layer_of(target)
            if a not in rank or b not in rank:
                out.append(f"{module} -> {target}: a folder with no layer ({a if a not in rank else b}); name it in LAYERS")
            elif rank[b] > rank[a]:
                out.append(f"{module} ({a}) imports {target} ({b}), a higher layer")
    return out


def test_no_import_cycles_inside_the_package():
    assert cycles(import_graph(PACKAGE)) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    assert upward(import_graph(PACKAGE)) == []


@pytest.mark.parametrize("files, expect", [
    ({"a/__init__.py": "", "a/x.py": "from monitord.a import y\n", "a/y.py": "def f():\n    from monitord.a.x import g\n"},
     "cycle"),
    ({"sources/__init__.py": "", "sources/s.py": "def f():\n    from monitord.alerts.e import x\n",
      "alerts/__init__.py": "", "alerts/e.py": "x = 1\n"}, "upward"),
    ({"sources/__init__.py": "", "sources/s.py": "", "alerts/__init__.py": "", "alerts/e.py": "from ..sources import s\n"},
     None),
])
def test_the_checks_catch_what_they_name(tmp_path, files, expect):
    """Each check fails on a small package built to break it (a lazy import in a cycle; a lazy
    import upward) and passes a clean one (a relative import downward)."""
    package = tmp_path / "monitord"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    graph = import_graph(package)
    assert bool(cycles(graph)) == (expect == "cycle")
    assert bool([u for u in upward(graph) if "no layer" not in u]) == (expect == "upward")
