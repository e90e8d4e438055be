"""No import cycle anywhere in the repository's code, counting every import statement.

A cycle dodged with an import inside a function, or hidden behind ``if TYPE_CHECKING:``, is still a cycle
between two modules that each need the other: the scan reads every ``import`` in a file, wherever it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGES = ("implicitlayers", "examples", "benchmarks", "docs/scripts")


def module_names(root: Path, folders: tuple[str, ...]) -> dict[str, Path]:
    """Dotted name → file of every Python module under ``folders`` (a package by its ``__init__.py``)."""
    modules = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``module`` imports anywhere in its file (functions and type checks too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up level - 1 packages from this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:  # the longest prefix that is one of ours: a.b.c → a.b when a.b.c is a class
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges`` as ``[a, b, ..., a]``, or None when it has none."""
    state: dict[str, str] = {}  # "open" while on the depth-first path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph(root: Path, folders: tuple[str, ...]) -> dict[str, set[str]]:
    modules = module_names(root, folders)
    return {module: imported(module, path, modules) for module, path in modules.items()}


def test_the_repository_has_no_import_cycle():
    graph = import_graph(REPOSITORY, PACKAGES)
    assert len(graph) > 50, sorted(graph)  # the scan found the code
    assert "implicitlayers.implicit.gradients" in graph["implicitlayers.implicit"]
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])


@pytest.mark.parametrize("where", ["top", "function", "type_checking"])
def test_the_scan_finds_a_cycle_wherever_the_import_stands(tmp_path, where):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\n\nA = 1\n")
    back = {
        "top": "from .a import A\n",
        "function": "def f():\n    from pkg.a import A\n    return A\n",
        "type_checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
    }[where]
    (package / "b.py").write_text(back + "\nB = 2\n")
    cycle = find_cycle(import_graph(tmp_path, ("pkg",)))
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.a", "pkg.b"}


def test_the_scan_passes_an_acyclic_package(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .a import A\nfrom .b import B\n")
    (package / "a.py").write_text("from .b import B\n\nA = B\n")
    (package / "b.py").write_text("import math\n\nB = math.pi\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.a", "pkg.b"}, "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert find_cycle(graph) is None
