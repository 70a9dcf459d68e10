"""The client packages import each other in layers: no circle among logbroker/client modules
(function-level imports included), and the transport implementations know only the interface."""

from __future__ import annotations

import ast
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "logbroker" / "client"


def _module_name(path: Path) -> str:
    rel = path.relative_to(CLIENT.parent.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The logbroker.client modules `path` imports (a `from package import name` counts the
    submodule when `name` is one, else the package)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in modules:
                    out.add(sub)
                elif node.module in modules:
                    out.add(node.module)
    return out


def client_import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in CLIENT.rglob("*.py")}
    modules = set(files)
    graph = {name: _imports(path, modules) - {name} for name, path in files.items()}
    # a package's __init__ re-exporting its submodules is not an edge back from them
    for name in graph:
        graph[name] = {dep for dep in graph[name] if not (name.startswith(dep + ".") and dep in files
                                                          and files[dep].name == "__init__.py")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_circle_in_the_client():
    cycle = find_cycle(client_import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_transports_know_the_interface_not_each_other():
    graph = client_import_graph()
    assert "logbroker.client.streams" not in graph["logbroker.client.wire_connection"]
    assert "logbroker.client.transport" in graph["logbroker.client.wire_connection"]
    assert "logbroker.client.transport" in graph["logbroker.client.streams"]
    assert graph["logbroker.client.transport"] == set()
