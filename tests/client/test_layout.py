"""The client package's shape: no import circle (counting the imports inside functions,
which import-linter's layers contract does not forbid and which once hid the circle
cache -> client -> session -> cache), a sans-IO core, only ``kvbroker.wire``, ``kvbroker.kvlayout`` and the
generated code from the broker, and files small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "client" / "kvbroker_client"
#: What the client may import of the broker's distribution.
BROKER_MODULES_ALLOWED = {"kvbroker", "kvbroker.wire", "kvbroker.kvlayout", "kvbroker.v1"}
MAX_LINES = 500


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {
        f"kvbroker_client.{p.stem}" if p.stem != "__init__" else "kvbroker_client": p for p in PACKAGE.glob("*.py")
    }
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_of_the_client_imports_itself_back() -> None:
    edges = graph()
    edges.pop("kvbroker_client")  # the package root re-exports; nothing imports it
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "visiting", f"import circle: {' -> '.join([*path, module])}"
        state[module] = "visiting"
        for dependency in sorted(edges.get(module, ())):
            visit(dependency, [*path, module])
        state[module] = "done"
        order.append(module)

    for module in sorted(edges):
        visit(module, [])
    assert order.index("kvbroker_client.core") < order.index("kvbroker_client.cache") < order.index(
        "kvbroker_client.sync"
    )


def module_level_imports(path: Path) -> set[str]:
    """What importing ``path`` imports at once (not in functions nor under TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_core_does_no_io_and_imports_no_torch() -> None:
    for name in ("core", "calls", "errors"):
        top = {m.split(".")[0] for m in imports_of(PACKAGE / f"{name}.py")}
        assert not top & {"torch", "asyncio", "mmap"}, name
    for name in ("dtypes", "cache", "sync", "aio", "__init__"):  # torch on first view only
        assert "torch" not in {m.split(".")[0] for m in module_level_imports(PACKAGE / f"{name}.py")}, name
    core = {m.split(".")[0] for m in imports_of(PACKAGE / "core.py")}
    assert "grpc" not in core, "the core neither calls nor knows grpc: transports do"


def test_only_the_wire_contract_and_the_generated_code_are_imported_from_the_broker() -> None:
    for path in PACKAGE.glob("*.py"):
        broker = {m for m in imports_of(path) if m.split(".")[0] == "kvbroker"}
        assert {".".join(m.split(".")[:2]) for m in broker} <= BROKER_MODULES_ALLOWED | {"kvbroker.__version__"}, path


def test_every_file_is_short_enough_to_read() -> None:
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= MAX_LINES, path
