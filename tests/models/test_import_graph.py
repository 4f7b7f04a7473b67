"""The models know nothing of tracking: no module under plantad/models imports plantad.tracking, directly
or through another plantad module (remote teacher weights are fetched by the callers)."""

from __future__ import annotations

import ast
from pathlib import Path

import plantad

PACKAGE = Path(plantad.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every module an import statement of module `name` names, at any depth (function-level imports
    too); relative imports resolved against its package; `from a import b` counts a and a.b."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def plantad_import_graph() -> dict[str, set[str]]:
    """{module: the plantad modules it imports} over the installed package's source files."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imported_modules(path.read_text(), name, path.name == "__init__.py") if m in files}
            for name, path in files.items()}


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """{module reachable from start: the module that imports it on one path}."""
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        here = todo.pop()
        for nxt in graph[here] - via.keys():
            via[nxt] = here
            todo.append(nxt)
    return via


def chain(via: dict[str, str], start: str, end: str) -> str:
    path = [end]
    while path[-1] != start:
        path.append(via[path[-1]])
    return " -> ".join(reversed(path))


def test_no_models_module_imports_tracking_directly_or_through_another_module():
    graph = plantad_import_graph()
    models = sorted(m for m in graph if m == "plantad.models" or m.startswith("plantad.models."))
    assert "plantad.models.factory" in models and "plantad.tracking.teacher_weights" in graph
    leaks = []
    for module in models:
        via = reachable(graph, module)
        leaks += [chain(via, module, m) for m in sorted(via) if m.startswith("plantad.tracking")][:1]
    assert not leaks, "models/ must not import plantad.tracking:\n" + "\n".join(leaks)


def test_the_check_finds_imports_inside_functions_and_relative_ones():
    """The check itself: function-level, relative and `from plantad import tracking` imports are seen."""
    source = ("import torch\n"
              "def f():\n    from ..tracking import registry\n"
              "def g():\n    from plantad import tracking\n"
              "class C:\n    import plantad.tracking.s3 as s3\n")
    found = imported_modules(source, "plantad.models.x")
    assert {"plantad.tracking", "plantad.tracking.registry", "plantad.tracking.s3", "torch"} <= found
    assert "plantad.tracking.teacher_weights" in plantad_import_graph()["plantad.training.trainer"]
