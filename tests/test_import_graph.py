"""The import graph of `edgert/`: no cycles, and every layer imports downward only.

Imports are read from the sources (also those inside functions, which Python runs later but
which tie the modules together all the same), so a cycle cannot hide in a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgert"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The edgert modules ``path`` imports (``from pkg import submodule`` counts as the submodule)."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*stem, base] if base else stem)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in targets:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != own:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
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
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    edges = graph()
    assert "edgert.families.registry" in edges and "edgert.compiler.compile" in edges
    # The reader sees imports inside functions (`compile_model` imports the compiler lazily).
    assert "edgert.compiler.compile" in edges["edgert.families.compile"]
    assert cycles(edges) == []


def _layer(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


# Which top-level parts each part may import (errors, paths, targets, recipes and artifact are shared below all).
BASE = {"edgert.version", "edgert.errors", "edgert.paths", "edgert.targets", "edgert.recipes", "edgert.artifact"}
ALLOWED = {
    "edgert.artifact": BASE,
    "edgert.runtime": BASE | {"edgert.runtime"},
    "edgert.frontend": BASE | {"edgert.frontend"},
    "edgert.compiler": BASE | {"edgert.compiler", "edgert.frontend"},
    "edgert.families": BASE | {"edgert.families", "edgert.compiler", "edgert.frontend", "edgert.runtime"},
    "edgert.profile": BASE | {"edgert.profile", "edgert.runtime", "edgert.families"},
    "edgert.deploy": BASE | {"edgert.deploy", "edgert.runtime", "edgert.families", "edgert.profile"},
    "edgert.serve": BASE | {"edgert.serve", "edgert.runtime", "edgert.families"},
}


def test_layers_import_downward_only() -> None:
    bad = []
    for module, deps in graph().items():
        allowed = ALLOWED.get(_layer(module))
        if allowed is None:  # the CLI and the package root sit on top
            continue
        bad += [f"{module} -> {d}" for d in deps if _layer(d) not in allowed]
    assert bad == []
