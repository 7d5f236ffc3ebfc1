"""The architecture stays readable: no import cycle among fcclass's modules (function-level imports included, imports
under TYPE_CHECKING not), modules of at most 400 lines, functions of at most 60, at most 12 modules directly under
fcclass/. The layers themselves are import-linter's contract in pyproject.toml (`lint-imports`, run by .ci/run)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fcclass"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    g = grimp.build_graph("fcclass", exclude_type_checking_imports=True)
    graph = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_package_importing_a_child_that_imports_it_back() -> None:
    """The reference for the test above: a cycle through a package's __init__ (fcclass.cli importing its commands while
    one of them imports fcclass.cli) is one, and so is a longer loop; a tree is not."""
    graph = {"p": {"p.a", "p.b"}, "p.a": {"p"}, "p.b": {"p.c"}, "p.c": set(), "q": {"q.x"}, "q.x": {"q.y"}, "q.y": {"q"}}
    assert sorted(_cycles(graph)) == [["p", "p.a"], ["q", "q.x", "q.y"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_fit_on_a_screen(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400, f"{path} has {len(text.splitlines())} lines; split it into a package"
    long = [(node.name, node.end_lineno - node.body[0].lineno + 1) for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.body[0].lineno + 1 > 60]
    assert long == [], f"functions over 60 lines in {path}: {long}"


def test_at_most_twelve_modules_directly_under_the_package() -> None:
    top = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) <= 12, top
