"""The layering rules of the package, checked on every import statement (lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "recforge"
UPPER = ("recforge.train", "recforge.study", "recforge.protocols", "recforge.cli", "recforge.serve",
         "recforge.experiment", "recforge.bundle", "recforge.evaluate")  # fmt: skip
RULES = {
    "models": UPPER,
    "nn": (*UPPER, "recforge.models", "recforge.data"),
    "data": (*UPPER, "recforge.models", "recforge.nn"),
}


def imported(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "<relative import>"))
    return found


def violations(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, module in imported(path):
            if module == "<relative import>" or any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_never_imports_what_stands_on_it(layer):
    assert violations(layer, RULES[layer]) == []


def test_the_checker_sees_lazy_imports(tmp_path, monkeypatch):
    fake = tmp_path / "recforge" / "models"
    fake.mkdir(parents=True)
    (fake / "m.py").write_text("def f():\n    from recforge.train.trainer import Trainer\n")
    monkeypatch.setattr("test_imports.PACKAGE", tmp_path / "recforge")
    assert violations("models", RULES["models"]) == ["models/m.py:2 imports recforge.train.trainer"]
