"""The modules of engines/ import each other as a tree: no circle, and none held apart by an import
inside a function (the back-ends import `backend`, `factory` imports the back-ends)."""

from __future__ import annotations

import ast
from pathlib import Path

from shared_data import REPO

ENGINES = REPO / "engines"
PACKAGE = "sam_batch.engines"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """The engines modules `path` imports, each with whether the import is at module level."""
    modules = {p.stem for p in ENGINES.glob("*.py")}
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.ImportFrom):
                if child.level == 1:
                    names = [child.module.split(".")[0]] if child.module else [a.name for a in child.names]
                elif child.module == PACKAGE:
                    names = [a.name for a in child.names]
                elif child.module and child.module.startswith(PACKAGE + "."):
                    names = [child.module.split(".")[2]]
            elif isinstance(child, ast.Import):
                names = [a.name.split(".")[2] for a in child.names if a.name.startswith(PACKAGE + ".")]
            found.extend((name, top) for name in names if name in modules)
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), True)
    return found


def test_engines_import_each_other_at_module_level_only() -> None:
    inside = {p.stem: [m for m, top in _imports(p) if not top] for p in ENGINES.glob("*.py")}
    assert {name: mods for name, mods in inside.items() if mods} == {}


def test_engines_imports_have_no_circle() -> None:
    graph = {p.stem: {m for m, _ in _imports(p)} for p in ENGINES.glob("*.py")}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import circle: {' -> '.join(path[path.index(module) :] + [module])}"
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, path + [module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert set(graph["factory"]) >= {"torch_backend", "onnx_backend", "tensorrt_backend"}
