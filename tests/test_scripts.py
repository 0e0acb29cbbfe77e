"""The project's shell scripts parse, and the test files they name exist: ``scripts/gpu-check.sh``
runs once on a lent GPU machine, where a stale path would cost the whole check."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh")) + [ROOT / ".ci" / "run"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses_and_names_existing_tests(script):
    if shutil.which("bash") is None:
        pytest.skip("no bash to parse the script with")
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    named = set(re.findall(r"\btests/[\w/]+\.py\b", script.read_text()))
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"{script.name} names test files that do not exist: {missing}"

