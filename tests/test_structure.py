"""The shape of ``pipelines/``: no import cycles, and no module that grew long without a reason.

Cycles are counted over every import of ``pipelines.*`` in a file, lazy imports inside functions
and ``TYPE_CHECKING`` imports included: a lazy import hides a cycle from the interpreter, not from
a reader. The graph is the one drawn in docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 420  # "about 400"
REASON = "Length:"  # a long module says why in its docstring, in a paragraph starting so


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the sibling modules it imports (``pipelines.x``, ``from pipelines import x``)."""
    mods = {p.stem: p for p in package.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                parts = node.module.split(".")
                if parts[0] == package.name:
                    deps |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package.name and len(parts) > 1:
                        deps.add(parts[1])
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (a naive O(V (V + E)) walk)."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    comps = {frozenset({m} | {o for o in reachable[m] if m in reachable[o]}) for m in graph}
    return sorted(sorted(c) for c in comps if len(c) > 1)


def test_pipelines_has_no_import_cycles():
    graph = import_graph(ROOT / "pipelines")
    assert len(graph) > 10 and graph["train"], "the scanner found no modules or imports"
    assert cycles(graph) == []


def test_cycle_check_can_fail(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("from pkg.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
    )
    (pkg / "d.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_long_modules_say_why():
    for path in sorted((ROOT / "pipelines").glob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            assert REASON in doc, f"{path.name}: {n} lines and no '{REASON}' in its docstring"


def test_the_graph_in_docs_is_the_real_one():
    """docs/architecture.md draws the import graph; a new import or module updates it."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("imports of every file:\n\n```\n", 1)[1].split("```", 1)[0]
    drawn: dict[str, set[str]] = {}
    module = None
    for line in block.splitlines():
        if line.startswith("("):  # "(a, b import none)"
            for name in line.strip("()").removesuffix(" import none").split(", "):
                drawn[name] = set()
        elif "->" in line:
            module, deps = (x.strip() for x in line.split("->"))
            drawn[module] = {d.strip() for d in deps.split(",") if d.strip()}
        elif module is not None:  # a wrapped continuation line
            drawn[module] |= {d.strip() for d in line.split(",") if d.strip()}
    assert drawn == import_graph(ROOT / "pipelines")
