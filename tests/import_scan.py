"""The import statements of a Python file, read statically with ``ast``: function-level imports included,
those under ``if TYPE_CHECKING:`` (which never run) left out. Shared by tests/test_envs.py (what a rule's env
must provide) and tests/test_imports.py (the library's parts depend one way)."""

from __future__ import annotations

import ast
from dataclasses import dataclass


@dataclass(frozen=True)
class ImportStatement:
    """``import base`` (``names`` empty) or ``from base import names``, with ``base`` absolute."""

    base: str
    names: tuple[str, ...]
    lazy: bool  # inside a function (or lambda): runs only when it is called


def _under_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_statements(tree: ast.AST, module: str, is_package: bool) -> list[ImportStatement]:
    """Every import in ``tree``, the source of ``module`` (``is_package``: an ``__init__.py``).

    Relative imports are made absolute; ``importlib.import_module("literal")`` counts as ``import literal``.
    """
    found: list[ImportStatement] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and _under_type_checking(node):
            for child in node.orelse:
                visit(child, lazy)
            return
        if isinstance(node, ast.Import):
            found.extend(ImportStatement(alias.name, (), lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            found.append(ImportStatement(base, tuple(a.name for a in node.names), lazy))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if called == "import_module" and isinstance(arg, ast.Constant):
                found.append(ImportStatement(str(arg.value), (), lazy))
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found
