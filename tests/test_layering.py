"""The package's layering holds (import-linter contracts in pyproject.toml) and the check is real:
a wrong-way import planted in a copy of the tree breaks it."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install 'vkconv[test]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_contracts_are_kept():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module, planted, contract", [
    ("vkconv/runtime/plan.py", "from vkconv.ops.conv.op import Conv", "vkconv's layers import downwards only"),
    ("vkconv/ops/pool.py", "import cv_plugin.net", "vkconv never imports cv_plugin"),
    ("cv_plugin/registry.py", "from cv_plugin import net", "no import cycles between sibling modules"),
], ids=["runtime-imports-ops", "core-imports-plugin", "plugin-cycle"])
def test_a_planted_wrong_way_import_breaks_the_contract(tmp_path, module, planted, contract):
    for part in ("vkconv", "cv_plugin"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    text = path.read_text()
    path.write_text(re.sub(r"^(from __future__ import annotations\n)", rf"\1{planted}  # noqa\n", text, count=1,
                           flags=re.M))
    res = _lint(tmp_path)
    assert res.returncode != 0, res.stdout
    assert re.search(rf"{re.escape(contract)} BROKEN", res.stdout), res.stdout
