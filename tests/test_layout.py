"""The whole product's module layout: no import circles between any two modules of
``kvbroker`` (the generated ``kvbroker.v1`` aside) or of ``kvbroker_client``, and no
module over 500 lines. The core and the client check their own rooms more closely
(``tests/core/test_layout.py``, ``tests/client/test_layout.py``); this is the house."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.core.test_layout import find_cycle

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kvbroker": ROOT / "kvbroker", "kvbroker_client": ROOT / "client" / "kvbroker_client"}
MAX_LINES = 500


def modules(package: str) -> dict[str, Path]:
    base = PACKAGES[package]
    out = {}
    for path in base.rglob("*.py"):
        parts = path.relative_to(base).with_suffix("").parts
        if parts[:1] == ("v1",):
            continue  # generated
        name = ".".join((package, *parts))
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (every import statement,
    those inside functions and under TYPE_CHECKING included)."""
    known = modules(package)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import sub`` imports the submodule, not a name of pkg's
                # __init__ (which every submodule import runs anyway).
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in known and t != name)
    return graph


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_circle(package):
    graph = import_graph(package)
    assert sum(len(edges) for edges in graph.values()) > 10, "the graph is read"
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_module_over_500_lines(package):
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules(package).items()}
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not too_long, too_long
