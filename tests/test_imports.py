"""The import graph of polyburn, flows, tasks and deployments has no cycle, and no module reads
the environment when it is imported.

Edges are the imports a module executes: at module level (also inside ``if``/``try``), and
inside functions and methods (lazy imports run on first call, and a cycle through them is a
layering knot all the same). Imports under ``if TYPE_CHECKING:`` never run and do not count.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; a
module's own package is no edge (Python initialises it first).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("polyburn", "flows", "tasks", "deployments")

#: Cycles through lazy (function-level) imports that are yet to be broken: none. This set may
#: only shrink.
KNOWN_LAZY_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, name: str, is_package: bool, lazy: bool) -> set[str]:
    """Dotted names imported by the module; with ``lazy``, also inside functions."""
    names: set[str] = set()

    def visit(body: list[ast.stmt], in_function: bool) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse, in_function)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if lazy:
                    visit(node.body, True)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join([*package, base] if base else package)
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, ()) or ():
                        if isinstance(child, ast.ExceptHandler):
                            visit(child.body, in_function)
                    block = getattr(node, field, None)
                    if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                        visit(block, in_function)

    visit(tree.body, False)
    return names


def import_graph(lazy: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for imported in _imports(tree, name, path.name == "__init__.py", lazy):
            parts = imported.split(".")
            target = next(
                (
                    ".".join(parts[:i])
                    for i in range(len(parts), 0, -1)
                    if ".".join(parts[:i]) in modules
                ),
                None,
            )
            if target and target != name and not name.startswith(target + "."):
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_no_import_cycle_at_import_time():
    assert cycles(import_graph(lazy=False)) == []


def test_no_new_import_cycle_through_lazy_imports():
    assert set(cycles(import_graph(lazy=True))) <= KNOWN_LAZY_CYCLES


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_reads_the_environment_when_imported():
    """Import every module with ``os.environ`` poisoned: no read from polyburn's own code (any
    variable) may happen; libraries that copy the environment are left alone."""
    names = sorted(_modules())
    roots = tuple(str(REPO / package) + os.sep for package in PACKAGES)
    code = f"""
import os, sys
ROOTS = {roots!r}
LIBRARY = ("os.py", "_collections_abc.py", "<frozen os>", "<frozen _collections_abc>")
class Poisoned(type(os.environ)):
    def __getitem__(self, key):
        frame = sys._getframe(1)
        while frame and frame.f_code.co_filename.endswith(LIBRARY):
            frame = frame.f_back
        if frame and frame.f_code.co_filename.startswith(ROOTS):
            raise AssertionError(f"{{frame.f_code.co_filename}} reads {{key}} at import time")
        return super().__getitem__(key)
os.environ.__class__ = Poisoned
import importlib
for name in {names!r}:
    importlib.import_module(name)
print("imported", len({names!r}))
"""
    env = {**os.environ, "POLYBURN_ENGINE": "rasterio", "DATALOOP_API_KEY": "x"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(names)}" in done.stdout
