"""The compute room's modules import each other one way: no cycle (type-checking imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOM = Path(__file__).resolve().parents[2] / "compute"


def imports_of(path: Path, names: set[str]) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("compute."):
                out.add(node.module.split(".")[1])
            elif node.module == "compute":
                out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("compute.")}
    return out & names


def test_no_import_cycle_inside_compute() -> None:
    names = {p.stem for p in ROOM.glob("*.py") if p.stem != "__init__"}
    graph = {n: imports_of(ROOM / f"{n}.py", names) for n in names}
    done: set[str] = set()

    def visit(n: str, path: list[str]) -> None:
        for dep in sorted(graph[n]):
            assert dep not in path, f"import cycle: {' → '.join([*path[path.index(dep):], dep])}"
            if dep not in done:
                visit(dep, [*path, dep])
        done.add(n)

    for n in sorted(names):
        visit(n, [n])
    assert "node" not in graph["walreceiver"]
