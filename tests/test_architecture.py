"""The layout docs/architecture.md draws, held against the code: data flows one way (images ->
backbone -> cache -> head -> model -> reports), each module imports only its own layer and the
layers below, no circle of imports, no module over 450 lines, and every import made inside a
function says why on its line. Read from the source with `ast`: nothing is imported or run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

PIPELINE = ROOT / "pipeline"
MAX_LINES = 450
# Bottom to top. A module may import its own layer and any layer below, never one above.
LAYERS = [
    ["errors", "settings"],
    ["files", "progress", "devices", "resize"],
    ["images", "head", "demo", "backbones", "cache"],
    ["extraction"],
    ["fitting"],
    ["shipping"],
    ["reports"],
    ["runs"],
    ["__init__"],
    ["cli"],
]
LAYER = {room: depth for depth, rooms in enumerate(LAYERS) for room in rooms}


def _modules() -> dict[str, Path]:
    """'pipeline.fitting.probe' -> its file, for every module of the library and the CLI."""
    found = {"cli": ROOT / "cli.py"}
    for path in PIPELINE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _room(module: str) -> str:
    """The unit of the layering: a top-level module or subpackage of pipeline (or the CLI)."""
    parts = module.split(".")
    return "cli" if parts[0] == "cli" else "__init__" if len(parts) == 1 else parts[1]


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The library modules an import statement names (ignoring everything outside the library)."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [f"{target}.{alias.name}" for alias in node.names]
    hits = [n for n in names if n in MODULES]  # `from . import cache` names a module
    return hits or ([target] if target in MODULES else [])


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, made inside a function) for each import of a library module."""
    tree = ast.parse(MODULES[module].read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            targets = _resolve(module, node)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name in MODULES]
        else:
            continue
        out += [(t, node.lineno, id(node) in local) for t in targets]
    return out


GRAPH = {m: sorted({t for t, _, _ in _imports(m)} - {m}) for m in MODULES}


def _circles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one node (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_circle_of_imports_between_modules_or_between_rooms():
    assert _circles(GRAPH) == []
    rooms: dict[str, set] = {}
    for module, targets in GRAPH.items():
        rooms.setdefault(_room(module), set()).update(_room(t) for t in targets if _room(t) != _room(module))
    assert _circles({r: sorted(t) for r, t in rooms.items()}) == []


def test_every_room_has_a_layer_and_no_import_runs_up():
    assert {_room(m) for m in MODULES} <= set(LAYER), "a new room: give it a layer here and in docs/architecture.md"
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if LAYER[_room(t)] > LAYER[_room(m)]]
    assert upward == []


# cli.py is one decorator stack of options and help text per command: it grows with the commands,
# not with what any one of them does (each calls one library function).
MAX_CLI_LINES = 650


def test_no_module_is_over_450_lines():
    long = {m: n for m, p in MODULES.items()
            if (n := len(p.read_text().splitlines())) > (MAX_CLI_LINES if m == "cli" else MAX_LINES)}
    assert long == {}


def test_imports_inside_functions_say_why():
    """Only where they keep `import pipeline` (or a stage) light, or an optional dependency optional."""
    silent = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for f in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    # The reason stands on the import's line, on another import of its block, or just above it.
                    top = node.lineno - 1
                    while top > 0 and lines[top - 1].strip().startswith(("import ", "from ")):
                        top -= 1
                    if not any("#" in line for line in lines[max(top - 1, 0):node.lineno]):
                        silent.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert silent == []


def test_the_architecture_document_names_every_module_and_its_layers():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:pipeline/)?[\w/]+\.py)`", text))
    missing = [str(p.relative_to(ROOT)) for p in MODULES.values()
               if p.name != "__init__.py" and str(p.relative_to(ROOT)) not in named
               and str(p.relative_to(PIPELINE)) not in named]
    assert missing == []
    for rooms in LAYERS:
        for room in rooms:
            assert room in text, room
