"""The export pipeline is a straight line: no import cycle between its modules (lazy imports
inside functions included), and each module imports on its own."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

EXPORT = Path(__file__).resolve().parents[2] / "export"
MODULES = sorted(p.stem for p in EXPORT.glob("*.py") if p.stem != "__init__")


def export_imports(module: str) -> set[str]:
    """The export.* modules `module` imports anywhere in its source (top level or in a function)."""
    tree = ast.parse((EXPORT / f"{module}.py").read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            # `from export import x` names the module x; `from export.x import y` the module x
            names = [f"export.{a.name}" for a in node.names] if node.module == "export" else [node.module]
        else:
            continue
        out |= {n.split(".")[1] for n in names if n.startswith("export.") and n.split(".")[1] in MODULES}
    return out - {module}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_one() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_export() -> None:
    graph = {m: export_imports(m) for m in MODULES}
    assert graph["distill"] and "evaluate" not in graph["prune"]  # the parser sees real imports
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph) or [])}"


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports(module: str) -> None:
    importlib.import_module(f"export.{module}")
