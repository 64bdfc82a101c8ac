"""micronet's modules import each other without cycles, counting lazy (function-level) imports too.

A cycle hidden in a function body still ties the two modules together: neither can be understood, tested or
moved without the other, and an innocent top-level import added later turns it into an ImportError.
Imports under ``if TYPE_CHECKING:`` are not counted: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import micronet

PACKAGE_ROOT = Path(micronet.__file__).parent

# Edges (importer, or the package whose modules import, → imported) tolerated for now, with the reason; empty
# is the goal.
ALLOWED_EDGES: dict[tuple[str, str], str] = {}


def _allowed(importer: str, imported: str) -> bool:
    return any((importer == source or importer.startswith(source + ".")) and imported == target
               for source, target in ALLOWED_EDGES)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking_block(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:  # relative: resolve against the importing package
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    # ``from a import b`` imports the submodule a.b when there is one, else a name defined in a
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}


def import_graph() -> dict[str, set[str]]:
    """Module → the micronet modules it imports anywhere in its body."""
    files = {_module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = set()
        for node in _imports(tree):
            for target in _targets(node, name, path.name == "__init__.py", set(files)):
                if target in files and target != name and not _allowed(name, target):
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest path from the component's first module back to itself (breadth first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in micronet/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_lazy_and_relative_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    tree = ast.parse("def f():\n    from .. import cli\n    from ..engine import checkpoint, Trainer\n"
                     "if TYPE_CHECKING:\n    import micronet.io\n")
    modules = {"micronet.cli", "micronet.engine", "micronet.engine.checkpoint", "micronet.io"}
    found = set().union(*(_targets(n, "micronet.pipeline.config", False, modules) for n in _imports(tree)))
    assert found == {"micronet.cli", "micronet.engine.checkpoint", "micronet.engine"}


def test_the_engine_only_stores_what_compression_changed():
    """The training engine knows nothing of compression; its one door is ``Checkpoint.build_model`` (and
    ``quant_scheme``), which hand a checkpoint to :mod:`micronet.compression.restore`."""
    graph = import_graph()
    reached = {(module, target) for module, targets in graph.items() if module.startswith("micronet.engine")
               for target in targets if target.startswith("micronet.compression")}
    assert reached == {("micronet.engine.checkpoint", "micronet.compression.restore")}
