"""Layering: the parallel layer never imports the trainer, and its modules import each other without circles."""
from __future__ import annotations

import ast
from pathlib import Path

import sparsetrain

PKG = Path(sparsetrain.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every sparsetrain module a file imports, at top level, inside functions or under TYPE_CHECKING."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparsetrain"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("sparsetrain"))
    return out


def _parallel_graph() -> dict[str, set[str]]:
    mods = {f"sparsetrain.parallel.{p.stem}": p for p in (PKG / "parallel").glob("*.py") if p.stem != "__init__"}
    return {m: {i for i in _imports(p) if i in mods} for m, p in mods.items()}


def test_parallel_does_not_import_train():
    for p in (PKG / "parallel").glob("*.py"):
        bad = sorted(i for i in _imports(p) if i.startswith(("sparsetrain.train", "sparsetrain.cli")))
        assert not bad, f"{p.name} imports {bad}: the parallel layer must not reach up into the trainer"


def test_no_import_cycles_in_parallel():
    graph = _parallel_graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
