"""The layers of ARCHITECTURE.md, checked on the source: no import runs from a lower layer to a higher one, and no
modules import each other round a circle.

The layer table is read from ARCHITECTURE.md itself, so the picture a reader sees is the rule the code obeys.
Every import counts: module-level and inside functions (a deferred import is still a dependency).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "linearize"
#: A row of the layer table: "| 3 | `attention` | what it holds |".
ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([\w.]+)`")


def layer_table() -> dict[str, int]:
    """``{dotted name under linearize: layer}`` from ARCHITECTURE.md ('' is the package's own ``__init__``)."""
    table = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        m = ROW.match(line)
        if m:
            name = m.group(2)
            table["" if name == "linearize" else name] = int(m.group(1))
    return table


def modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module under src/linearize (a package is its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """The project modules ``name`` imports, with line numbers; ``from pkg import sub`` counts as ``pkg.sub``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module: its module
                target = target.rpartition(".")[0]
            if target.split(".")[0] == "linearize" and (target, node.lineno) not in found:
                found.append((target, node.lineno))
    return found


def entry(name: str, table: dict[str, int]) -> str:
    """The table row a module belongs to: its longest dotted prefix in the table."""
    rel = name.removeprefix("linearize").removeprefix(".")
    parts = rel.split(".") if rel else []
    for n in range(len(parts), -1, -1):
        key = ".".join(parts[:n])
        if key in table:
            return key
    raise KeyError(name)


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    table = layer_table()
    assert table, "ARCHITECTURE.md has no layer table"
    unplaced = []
    for name in modules():
        try:
            entry(name, table)
        except KeyError:
            unplaced.append(name)
    assert not unplaced, f"modules missing from the layer table of ARCHITECTURE.md: {unplaced}"


def test_imports_point_down(graph):
    """An import goes to a lower layer or stays inside its own row (package); rows of one layer (train and
    evaluate) do not import each other."""
    table = layer_table()
    bad = []
    for name, targets in graph.items():
        src = entry(name, table)
        for target, line in targets:
            dst = entry(target, table)
            if dst != src and table[dst] >= table[src]:
                bad.append(f"{name}:{line} -> {target} ({src or 'linearize'} layer {table[src]} -> "
                           f"{dst or 'linearize'} layer {table[dst]})")
    assert not bad, "imports that do not point down:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    """No circle of imports between modules (Tarjan's strongly connected components); the package's own
    ``__init__`` (the public face, imported by nobody inside) is left out."""
    edges = {n: sorted({t for t, _ in ts if t != n and t != "linearize"}) for n, ts in graph.items() if n != "linearize"}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "modules that import each other round a circle: " + "; ".join(map(str, cycles))
