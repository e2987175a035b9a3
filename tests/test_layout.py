"""Package layout: fmct_ray/eval/ (metrics, statistics, reports, figures) imports nothing from
fmct_ray/data/ (the data path, evaluation views included), so the two folders cannot form an
import loop again. Every import counts: function-local and relative ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fmct_ray"
EVAL_FILES = sorted((PACKAGE / "eval").rglob("*.py"))


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file, at any depth, relative ones resolved
    against the file's place under `root` (the fmct_ray folder)."""
    package = [root.name, *path.relative_to(root).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def test_there_are_eval_files():
    assert {"report.py", "metrics.py", "figures.py"} <= {p.name for p in EVAL_FILES}


def test_the_check_sees_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "fmct_ray"
    (pkg / "eval").mkdir(parents=True)
    probe = pkg / "eval" / "probe.py"
    probe.write_text("def f():\n    from ..data import crops\n    import fmct_ray.data.views\n")
    names = {name for _, name in imported_modules(probe, pkg)}
    assert {"fmct_ray.data", "fmct_ray.data.crops", "fmct_ray.data.views"} <= names


@pytest.mark.parametrize("path", EVAL_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_eval_imports_nothing_from_data(path):
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for line, name in imported_modules(path)
        if name == "fmct_ray.data" or name.startswith("fmct_ray.data.")
    ]
    assert not bad, bad
