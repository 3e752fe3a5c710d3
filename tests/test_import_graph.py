"""The package's floors, read from the import graph: no circle, and no room imports upward."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "effllm_helpers"
LOWER_FLOORS = ("models", "measure", "data")  # below the study axes


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every effllm_helpers name a module imports, lazy (in-function) imports included."""
    mod = _module(path)
    here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {t for t in out if t.split(".")[0] == "effllm_helpers"}


def _room(name: str) -> str | None:
    """The package room a dotted name belongs to: a subpackage or a top-level module."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def room_graph() -> dict[str, set[str]]:
    """room -> rooms it imports (a top-level module or subpackage of effllm_helpers each)."""
    modules = {_module(p) for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        src = _room(_module(path))
        if src is None:
            continue
        for target in _imports(path):
            while target not in modules and "." in target:  # `from pkg import name` of a name
                target = target.rsplit(".", 1)[0]
            dst = _room(target)
            if dst is not None and dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def module_graph() -> dict[str, set[str]]:
    """module -> modules it imports. ``from . import name`` inside a package also names the
    package itself; that edge to an enclosing package is how Python reaches a sibling, not a
    dependency on the package's own code, so it is left out."""
    modules = {_module(p) for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        src = _module(path)
        for target in _imports(path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != src and not src.startswith(target + "."):
                graph.setdefault(src, set()).add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read_from_the_sources() -> None:
    graph = room_graph()
    assert "models" in graph["axes"] and "config" in graph["models"]


def test_no_import_circle_between_rooms() -> None:
    assert _cycle(room_graph()) is None, " -> ".join(_cycle(room_graph()) or [])


def test_no_import_circle_between_modules() -> None:
    # models.embedded and models.sources imported each other (the build lock): it lives in paths
    graph = module_graph()
    assert "effllm_helpers.paths" in graph["effllm_helpers.models.sources"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_models_measure_and_data_never_import_the_axes() -> None:
    graph = room_graph()
    upward = {room: "axes" for room in LOWER_FLOORS if "axes" in graph.get(room, set())}
    assert upward == {}
