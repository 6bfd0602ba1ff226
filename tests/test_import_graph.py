"""The import graph of the repository's packages (``bayeskern`` and ``kernels``): no cycle, and no import
from a lower layer to a higher one, counting imports inside functions (docs/design.md, "Layers").

Read from the source with ``ast``: every ``import``/``from ... import`` anywhere in a module is an edge
to the module it names (a name imported from a package is an edge to its submodule when one has that
name, else to the package).  An edge to a package's ``__init__`` is only what is written: importing
``bayeskern.ops.philox`` also runs ``bayeskern/__init__.py``, but that is Python's doing, not a
dependency of the importing module.  Imports under ``if TYPE_CHECKING:`` never run (annotations only)
and are no edges.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bayeskern", "kernels")

# Lowest first.  A module belongs to the layer of the longest prefix listed for it.
LAYERS: list[tuple[str, ...]] = [
    # foundations: kernels and the ops that launch them; what a batch, a likelihood, a metric is
    (
        "kernels",
        "bayeskern.ops",
        "bayeskern.validation",
        "bayeskern.batches",
        "bayeskern.likelihoods",
        "bayeskern.metrics",
    ),
    # machinery beside the ops: parallelism, per-example curvature, the posterior protocol, plots
    ("bayeskern.distributed", "bayeskern.curvature", "bayeskern.protocol", "bayeskern.plots"),
    # the predictive engine (knows the protocol, no posterior)
    ("bayeskern.predictive",),
    # the posterior families
    ("bayeskern.posteriors",),
    # the package face and framework integrations
    ("bayeskern", "bayeskern.integrations"),
    # the application
    ("bayeskern.app", "bayeskern.finetune"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (anywhere, functions included; not under TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return found


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str | None] = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(known(a.name) for a in node.names if a.name.split(".")[0] in PACKAGES)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] in PACKAGES:
                    targets.update(
                        f"{source}.{a.name}" if f"{source}.{a.name}" in modules else known(source) for a in node.names
                    )
        edges[name] = {t for t in targets if t is not None and t != name}
    return edges


def _layer(module: str) -> int:
    best, layer = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    return layer


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _edges(_modules())


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if _layer(m) < 0] == []


def test_no_import_cycle(graph):
    assert _cycle(graph) is None


def test_no_import_from_a_lower_layer_to_a_higher_one(graph):
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)]
    assert upward == []


def test_the_checks_see_function_level_imports_cycles_and_upward_edges(tmp_path, monkeypatch):
    """The checker itself: a cycle hidden in a function and an upward import are both found."""
    (tmp_path / "bayeskern" / "ops").mkdir(parents=True)
    (tmp_path / "bayeskern" / "__init__.py").write_text("")
    (tmp_path / "bayeskern" / "ops" / "__init__.py").write_text("")
    (tmp_path / "bayeskern" / "ops" / "a.py").write_text("def f():\n    from ..predictive import x\n")
    (tmp_path / "bayeskern" / "predictive.py").write_text(
        "from typing import TYPE_CHECKING\nfrom .ops import a\nif TYPE_CHECKING:\n    from .posteriors import b\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    edges = _edges(_modules())
    assert edges["bayeskern.ops.a"] == {"bayeskern.predictive"}
    assert edges["bayeskern.predictive"] == {"bayeskern.ops.a"}  # not the import under TYPE_CHECKING
    assert _cycle(edges) == ["bayeskern.ops.a", "bayeskern.predictive", "bayeskern.ops.a"]
    assert _layer("bayeskern.predictive") > _layer("bayeskern.ops.a")
