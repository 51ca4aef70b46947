"""The package's shape: folders by concept, no import cycles, and nothing below the
HTTP layer reaching up into it. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "servelm"

# What may sit at the package root: one folder per concept, and the few modules every
# concept shares (settings, the error tree).
ROOT_MODULES = {"__init__.py", "config.py", "errors.py", "py.typed"}
# The layers that serve HTTP or start processes: these compose the app, so they may
# import servelm.api; nothing else may (the walk, billing, engines, ... sit below it).
ABOVE_API = ("servelm.api", "servelm.cli", "servelm.processes")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the servelm modules it imports, TYPE_CHECKING imports included (a
    cycle through type hints is still two modules that need each other)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*head, base] if base else head)
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in mods:
                        graph[name].add(target)
                    elif base in mods:
                        graph[name].add(base)
    for name in graph:
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_nothing_below_the_http_layer_imports_it() -> None:
    up = {
        name: sorted(d for d in deps if d == "servelm.api" or d.startswith("servelm.api."))
        for name, deps in import_graph().items()
        if not name.startswith(ABOVE_API)
    }
    assert {name: deps for name, deps in up.items() if deps} == {}


def test_the_package_root_is_a_handful_of_concepts() -> None:
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    loose = {e for e in entries if not (PACKAGE / e).is_dir()} - ROOT_MODULES
    assert loose == set(), "a module at the root: give it its concept's folder"
    folders = {e for e in entries if (PACKAGE / e).is_dir()}
    # About ten rooms a newcomer can name; a new concept joins the folder it belongs
    # to (replicas under engines/, the console under api/, rate limits under access/,
    # the load generator under cli/) before it takes a new one.
    assert len(folders) <= 11, sorted(folders)
    assert all((PACKAGE / f / "__init__.py").is_file() for f in folders)
    # Each folder says in its docstring what lives there.
    assert all(
        ast.get_docstring(ast.parse((PACKAGE / f / "__init__.py").read_text())) for f in folders
    )


def test_errors_a_client_can_see_live_in_the_error_tree() -> None:
    """Every error that reaches a client (a subclass of errors.py's tree) is declared in
    errors.py, so a reader finds them all, with their status codes, in one place.
    Exceptions private to one module's control flow (an HTTP client's, a retry
    signal) stay beside the code that raises and catches them."""
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    declared = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    outside = []
    for name, path in _modules().items():
        if name == "servelm.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
                if bases & declared:
                    outside.append(f"{name}.{node.name}")
    assert outside == []
