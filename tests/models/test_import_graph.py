"""The model layer loads in one direction: read -> normalise -> detect -> build -> wrap.

The import graph of `ldmgraph/models` is read from the source with `ast` (every import, also the
ones inside functions and `TYPE_CHECKING` blocks), so a cycle cannot hide behind a function-local
import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import ldmgraph.models

PACKAGE = "ldmgraph.models"
FOLDER = Path(ldmgraph.models.__file__).parent
MODULES = {f"{PACKAGE}.{p.stem}": p for p in FOLDER.glob("*.py") if p.stem != "__init__"}
PIPELINE = ["files", "diffusers_folder", "detection", "build", "handles", "checkpoint"]


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The ldmgraph.models modules an import statement names (`from ldmgraph.models import x` too)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            base = ".".join([*module.split(".")[: -node.level], *([base] if base else [])])
        names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return {name for name in names if name in MODULES}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(modules imported at module level, modules imported inside a function) of one module."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    local: set[str] = set()
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    local |= _imported(node, module)
    every: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            every |= _imported(node, module)
    return every, local


def _graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for module in MODULES:
        graph.add_node(module)
        every, _ = _imports(module)
        graph.add_edges_from((module, target) for target in every if target != module)
    return graph


def test_the_parser_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = "def f():\n    from ldmgraph.models.files import read_state_dict\n    from . import unet\n"
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _imported(node, f"{PACKAGE}.example")
    assert found == {f"{PACKAGE}.files", f"{PACKAGE}.unet"}


def test_models_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert graph.number_of_edges() > 20  # the walk found the package's imports
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], f"import cycles among {PACKAGE} modules: {cycles}"


def test_no_function_local_import_between_model_modules() -> None:
    hidden = {module: sorted(local) for module in MODULES if (local := _imports(module)[1])}
    assert hidden == {}, f"function-local imports between {PACKAGE} modules: {hidden}"


def test_loading_steps_import_each_other_in_pipeline_order_only() -> None:
    graph = _graph()
    order = [f"{PACKAGE}.{name}" for name in PIPELINE]
    for i, step in enumerate(order):
        later = set(order[i + 1 :])
        reached = nx.descendants(graph, step) & later
        assert not reached, f"{step} imports a later loading step: {sorted(reached)}"
    for earlier, later in zip(order, order[1:], strict=False):
        if later != f"{PACKAGE}.handles":  # wrapping takes built modules; it needs no earlier step's code
            assert nx.has_path(graph, later, earlier), f"{later} does not build on {earlier}"
