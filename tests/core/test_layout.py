"""The core's module layout: no import cycles, no module too big to read in one sitting.

The import graph is read from the source with ``ast`` (every ``import`` and ``from ...
import`` of a ``kvbroker.core`` module, those under ``if TYPE_CHECKING:`` included), so a
cycle hidden behind a type-checking guard counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvbroker.core

CORE = Path(kvbroker.core.__file__).parent


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in CORE.glob("*.py"):
        module = f"kvbroker.core.{path.stem}" if path.stem != "__init__" else "kvbroker.core"
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t.startswith("kvbroker.core.") and (CORE / f"{t[14:]}.py").exists())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_core_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "kvbroker.core.ledger" in graph["kvbroker.core.broker"]  # the graph is read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_core_module_is_too_long() -> None:
    lengths = {path.name: len(path.read_text().splitlines()) for path in CORE.glob("*.py")}
    assert lengths["broker.py"] <= 400, lengths["broker.py"]
    assert max(lengths.values()) <= 500, lengths
