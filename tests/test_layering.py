"""The package layering holds: config <- models <- pipeline <- dicom_node, and only models/ imports torch."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORDER = ["config", "models", "pipeline", "dicom_node"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ORDER)
def test_dependencies_point_one_way(package):
    forbidden = set(ORDER[ORDER.index(package) + 1:])
    offenders = {
        str(path.relative_to(REPO)): sorted(_imports(path) & forbidden)
        for path in (REPO / package).rglob("*.py")
        if _imports(path) & forbidden
    }
    assert offenders == {}, f"{package} must not import {sorted(forbidden)}"


@pytest.mark.parametrize("package", ["config", "pipeline", "dicom_node"])
def test_only_models_imports_torch(package):
    offenders = [str(p.relative_to(REPO)) for p in (REPO / package).rglob("*.py")
                 if _imports(p) & {"torch", "monai", "torchvision"}]
    assert offenders == []


@pytest.mark.parametrize("package", ORDER)
def test_generic_top_level_names_import_from_this_repository(package):
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().is_relative_to(REPO)


def test_no_undefined_names_or_unused_imports():
    """pyflakes over the code: an undefined name (one in ``__all__`` that no longer exists, say) fails here rather
    than at a user's ``import *``; a line marked ``noqa`` (a deliberate re-export) is left alone."""
    from pyflakes.api import checkPath
    from pyflakes.reporter import Reporter

    class Collect(Reporter):
        def __init__(self) -> None:
            self.found: list[str] = []

        def flake(self, message) -> None:
            line = Path(message.filename).read_text().splitlines()[message.lineno - 1]
            if "noqa" not in line:
                self.found.append(str(message))

        def unexpectedError(self, filename, msg) -> None:
            self.found.append(f"{filename}: {msg}")

        def syntaxError(self, filename, msg, lineno, offset, text) -> None:
            self.found.append(f"{filename}:{lineno}: {msg}")

    reporter = Collect()
    for folder in [*ORDER, "bench", "tests"]:
        for path in sorted((REPO / folder).rglob("*.py")):
            checkPath(str(path), reporter)
    assert reporter.found == []
