"""The package's import graph: every import of a module of ours, type-only ones included,
runs one way, so the graph has no cycle (``python -m pytest tests/test_imports.py``)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "quart_wslb"


def imports_of(path: Path) -> set[str]:
    """The modules of the package that ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import signals
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("quart_wslb."):
            found.add((node.module or "").split(".")[1])
    return found


def graph() -> dict[str, set[str]]:
    modules = {path.stem: path for path in PACKAGE.glob("*.py")}
    return {name: imports_of(path) & modules.keys() - {name} for name, path in modules.items()}


def test_imports_have_no_cycle() -> None:
    try:
        order = list(TopologicalSorter(graph()).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None
    assert "__init__" in order and "extension" in order


def test_imports_nothing_imports_the_facade() -> None:
    above = {"__init__", "extension", "flask", "metrics", "sync"}  # metrics: an add-on on top
    upward = {
        (name, target)
        for name, targets in graph().items()
        for target in targets & above
        if name not in above and name != target
    }
    assert upward == set()


def test_imports_reads_type_only_imports() -> None:
    """The reader sees imports under ``if TYPE_CHECKING:`` (type-level cycles count)."""
    assert "records" in imports_of(PACKAGE / "selectors.py")
