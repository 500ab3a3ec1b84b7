"""Static checks that model code does not import TensorFlow (or gin).

Keras' numpy backend needs JAX, which is not installed everywhere the tests run, so
"importing this module does not import TensorFlow" is checked on the source: the named
files import neither anywhere (not even inside functions), and no module that importing
the named modules runs imports TensorFlow at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = frozenset({"tensorflow", "tf_keras", "gin"})


def imports(tree: ast.Module, top_level_only: bool):
    """Absolute module names imported in `tree` (module level only, or anywhere)."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module or ""


def module_file(name: str) -> Path:
    """The source file of an mmt module or package."""
    path = REPO / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def assert_no_tensorflow(files, modules) -> set[str]:
    """Asserts the checks above; returns the mmt modules that importing `modules` runs."""
    for file in files:
        for name in imports(ast.parse((REPO / file).read_text()), top_level_only=False):
            assert name.split(".")[0] not in FORBIDDEN, f"{file} imports {name}"
    seen, todo = set(), list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # the packages on the way are imported too
            module = ".".join(parts[:i])
            if module in seen or not module_file(module).is_file():
                continue
            seen.add(module)
            for name in imports(ast.parse(module_file(module).read_text()), top_level_only=True):
                assert name.split(".")[0] not in FORBIDDEN, f"{module} imports {name} at import time"
                if name.split(".")[0] == "mmt":
                    todo.append(name)
    return seen
