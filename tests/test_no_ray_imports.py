"""models/, objectives/ and eval/ know nothing about Ray or devices (STYLE 1): no `ray`, no `.cuda()`;
nor do the evaluation-view loader (data/views.py) and the sampling of a run (data/sampling.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fmct_ray"
FILES = sorted(
    [p for pkg in ("models", "objectives", "eval") for p in (ROOT / pkg).glob("*.py")]
    + [ROOT / "data" / "views.py", ROOT / "data" / "sampling.py"]
)


def test_there_are_files_to_check():
    names = {p.name for p in FILES}
    assert {"vit3d.py", "heads.py", "dino.py", "tasks.py", "views.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_ray_import_and_no_cuda_call(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "ray" for a in node.names), path
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "ray", path
        if isinstance(node, ast.Attribute):
            assert node.attr != "cuda", f"{path}:{node.lineno} uses .cuda"


def test_importing_the_packages_does_not_load_ray():
    packages = (
        "fmct_ray.models, fmct_ray.objectives, fmct_ray.eval.report, fmct_ray.eval.labels,"
        " fmct_ray.data.views, fmct_ray.downstream.config"
    )
    code = f"import sys, {packages}; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
