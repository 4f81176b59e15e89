"""The import graph of fhir_bridge.api goes one way (fhir_io ← auth_routes ← security ← deps ← the route modules
← app): no circle, and no import of a fhir_bridge module hidden inside a function or a block."""

from __future__ import annotations

import ast
from pathlib import Path

import fhir_bridge.api

API = Path(fhir_bridge.api.__file__).parent


def imports() -> dict[str, list[tuple[ast.stmt, bool]]]:
    """module → its import statements that name a fhir_bridge module, each with whether it is at module level."""
    found: dict[str, list[tuple[ast.stmt, bool]]] = {}
    for path in sorted(API.glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        module = "fhir_bridge.api" + ("" if path.stem == "__init__" else f".{path.stem}")
        found[module] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(name.startswith("fhir_bridge") for name in names):
                found[module].append((node, id(node) in top))
    return found


def test_every_import_of_the_bridge_is_at_module_level() -> None:
    hidden = [f"{module}:{node.lineno}" for module, nodes in imports().items() for node, top in nodes if not top]
    assert hidden == []


def test_the_api_modules_import_each_other_without_a_circle() -> None:
    found = imports()
    graph: dict[str, set[str]] = {module: set() for module in found}
    for module, nodes in found.items():
        for node, _ in nodes:
            if isinstance(node, ast.ImportFrom):
                named = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                named = [a.name for a in node.names]
            graph[module] |= {name for name in named if name in graph and name != module}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, (*path, module))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())
