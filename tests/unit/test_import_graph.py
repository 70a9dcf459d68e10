"""No import circles in logbroker/: the layering is a DAG (issue 14).

Every module under logbroker/ is parsed with `ast`; an arrow A -> B is any import in A of a
logbroker module B, wherever it stands: at the top, inside a function, or under
`if TYPE_CHECKING:` (those are still architectural arrows: A knows B's types). `from X import Y`
is an arrow to X.Y when Y is a module, else to X; importing a package also counts as an arrow to
its `__init__`. The test fails naming each strongly connected component of more than one module,
unless it is in ALLOWED_CYCLES (empty).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "logbroker"

# Cycles tolerated for now, each a frozenset of module names, with why. To be emptied.
ALLOWED_CYCLES: set[frozenset[str]] = set()  # none: keep it that way


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, name, is_package)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # `import a.b.c` names a.b.c; fall back to the longest prefix that is a module
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                out.append(component)
    return out


def test_the_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [c for c in strongly_connected(graph) if len(c) > 1] == [{"a", "b", "c"}]


def test_the_graph_has_the_known_arrows():
    graph = import_graph()
    assert "logbroker.server.request_context" in graph["logbroker.server.rpc"]
    assert "logbroker.v1.logbroker_pb2" in graph["logbroker.server.broker"]


def test_no_import_cycles_in_logbroker():
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if len(c) > 1 and frozenset(c) not in ALLOWED_CYCLES]
    lines = []
    for c in cycles:
        arrows = [f"{a} -> {b}" for a in sorted(c) for b in sorted(graph[a] & c)]
        lines.append(f"cycle of {len(c)} modules:\n    " + "\n    ".join(arrows))
    assert not cycles, "import cycles in logbroker/:\n" + "\n".join(lines)


def test_the_request_layer_imports_no_grpc():
    """server/apis/ and the request context are protocol-neutral: listeners map their statuses."""
    for path in [ROOT / PACKAGE / "server" / "request_context.py", ROOT / PACKAGE / "server" / "request_checks.py",
                 *sorted((ROOT / PACKAGE / "server" / "apis").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "grpc" or n.startswith("grpc.") for n in names), f"{path} imports grpc"


# The layers of docs/architecture.md, top first: a module may import its own layer or lower ones.
# Each entry is a module or package prefix; the longest matching prefix places a module.
LAYERS: list[list[str]] = [
    ["logbroker", "logbroker.__main__", "logbroker.cli", "logbroker.cli_groups", "logbroker.cli_queues", "logbroker.cli_security", "logbroker.cli_dump",
     "logbroker.cli_tls", "logbroker.cli_stats", "logbroker.cli_rebalance", "logbroker.console",
     "logbroker.worker", "logbroker.mirror", "logbroker.k8s_rack", "logbroker.testing"],
    ["logbroker.server"],
    ["logbroker.client"],
    ["logbroker.config"],
    ["logbroker.group", "logbroker.replication"],
    ["logbroker.cluster", "logbroker.storage", "logbroker.security"],
    ["logbroker.errors", "logbroker.retry", "logbroker.clock", "logbroker.wire", "logbroker.log_throttle",
     "logbroker.tls", "logbroker.client_id", "logbroker.log_format"],
    ["logbroker.v1"],
]
# `logbroker/__init__.py` re-exports the client API; importing it from below means `from logbroker
# import wire`, which the graph resolves to the submodule, so the package itself is only the top.


def layer_of(module: str) -> int:
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best >= 0, f"{module} is in no layer of docs/architecture.md"
    return best


def test_imports_only_point_down_the_layers():
    graph = import_graph()
    upward = [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]) if layer_of(b) < layer_of(a)]
    assert not upward, "imports that point up the layers of docs/architecture.md:\n    " + "\n    ".join(upward)
