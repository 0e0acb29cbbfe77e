"""The package as users get it: ``python -m build`` makes an sdist and a pure-Python wheel holding the
embedded SPIR-V, and the wheel installed into a fresh virtualenv (its dependencies from the package
index, no shader compiler reachable, run from outside the checkout) registers the layers and runs
the VGG-16 demo, ``vkconv info`` and ``vkconv run``.

Needs the package index: when pip (or build's isolated environment) cannot reach it, the test is
skipped saying so; ``-m "not network"`` deselects it.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import vkconv
from vkconv.runtime._spirv import SPIRV

ROOT = Path(__file__).resolve().parent.parent
# pip/build output that means the package index could not be used, rather than a packaging bug.
OFFLINE = re.compile(r"Temporary failure in name resolution|Network is unreachable|Max retries exceeded|"
                     r"NewConnectionError|ConnectTimeout|ReadTimeout|Could not find a version that satisfies|"
                     r"No matching distribution found|ProxyError|SSLError|Connection refused")

pytestmark = pytest.mark.network


def _call(cmd: list, *, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _offline(res: subprocess.CompletedProcess) -> str | None:
    """What in a failed pip/build run says the package index could not be used, if anything."""
    m = OFFLINE.search(res.stdout + res.stderr) if res.returncode else None
    return m[0] if m else None


def _run(cmd: list, *, cwd: Path, env: dict | None = None, timeout: int = 300,
         what: str) -> subprocess.CompletedProcess:
    """Run ``cmd``; skip the test when pip failed for want of the package index, fail it otherwise."""
    res = _call(cmd, cwd=cwd, env=env, timeout=timeout)
    if res.returncode != 0:
        if what == "pip install" and _offline(res):
            pytest.skip(f"pip could not use the package index ({_offline(res)}): no network?")
        pytest.fail(f"{what} exited {res.returncode}:\n{(res.stdout + res.stderr)[-4000:]}")
    return res


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """``python -m build`` of the checkout.  Offline, build's isolated environment cannot get
    setuptools, so the build is retried in this environment (``--no-isolation``)."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (pip install 'vkconv[test]')")
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--outdir", out, ROOT]
    res = _call(cmd, cwd=ROOT, timeout=240)
    offline = _offline(res)
    if offline:
        res = _call(cmd + ["--no-isolation"], cwd=ROOT, timeout=240)
        if res.returncode:
            last = (res.stdout + res.stderr).strip().splitlines()[-1:]
            pytest.skip(f"build could not use the package index ({offline}), nor build without it: {last}")
    if res.returncode:
        pytest.fail(f"python -m build exited {res.returncode}:\n{(res.stdout + res.stderr)[-4000:]}")
    return out


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_wheel_is_pure_python_with_the_embedded_spirv(dist):
    wheel = _one(dist, "*.whl")
    assert wheel.name == f"vkconv-{vkconv.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"vkconv-{vkconv.__version__}.dist-info/METADATA").decode()
        entry_points = z.read(f"vkconv-{vkconv.__version__}.dist-info/entry_points.txt").decode()
        spirv = z.read("vkconv/runtime/_spirv.py")
    assert {"vkconv/__init__.py", "vkconv/runtime/_spirv.py", "cv_plugin/cli.py", "cv_plugin/__init__.py",
            "cv_plugin/demo.py"} <= names
    assert not any(n.startswith(("tests/", "shaders/")) or n.endswith((".so", ".pyd")) for n in names)
    assert spirv == (ROOT / "vkconv" / "runtime" / "_spirv.py").read_bytes()  # every compiled shader, as checked in
    assert "vkconv = cv_plugin.cli:main" in entry_points
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    for dep in ("numpy", "vulkan", "onnx"):
        assert any(r.startswith(dep) and "extra" not in r for r in requires), requires
    # cv2 stays optional, so that an installed opencv-python / opencv-contrib-python is kept.
    assert not any(r.startswith("opencv") and "extra" not in r for r in requires), requires
    assert any(r.startswith("opencv-python-headless") and 'extra == "cv"' in r for r in requires), requires


def test_sdist_can_rebuild_the_shaders(dist):
    sdist = _one(dist, "*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "build_shaders.py", "vkconv/runtime/_spirv.py",
            "shaders/include/activation.glsl", "tests/conftest.py", "tests/oracles.py"} <= names
    assert any(n.startswith("shaders/") and n.endswith(".comp") for n in names)


def test_wheel_runs_in_a_fresh_virtualenv(dist, tmp_path):
    wheel = _one(dist, "*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, what="python -m venv", timeout=120)
    py, bindir = venv / "bin" / "python", venv / "bin"
    # No PYTHONPATH anywhere: a checkout on it would make pip think vkconv is already installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([py, "-m", "pip", "install", "--disable-pip-version-check", f"{wheel}[cv]"], cwd=tmp_path,
         env=env, what="pip install")
    # Outside the checkout, with nothing but the venv on PATH: no glslangValidator, no repo imports.
    work = tmp_path / "elsewhere"
    work.mkdir()
    env["PATH"] = str(bindir)

    res = _run([py, "-c", "import cv_plugin, vkconv; cv_plugin.register(); "
                "print(vkconv.__version__, vkconv.__file__, cv_plugin.__file__)"],
               cwd=work, env=env, what="import cv_plugin; cv_plugin.register()", timeout=120)
    version, *files = res.stdout.split()
    assert version == vkconv.__version__
    assert all(Path(f).is_relative_to(venv) for f in files), files

    res = _run([py, "-c", "import vkconv.runtime._spirv as s; print(len(s.SPIRV))"], cwd=work, env=env,
               what="import vkconv.runtime._spirv", timeout=120)
    assert int(res.stdout) == len(SPIRV)

    res = _run([py, "-m", "cv_plugin.demo", "--size", "64", "--runs", "1"], cwd=work, env=env,
               what="python -m cv_plugin.demo", timeout=300)
    assert res.stdout.splitlines()[-1] == "OK", res.stdout

    res = _run([bindir / "vkconv", "info"], cwd=work, env=env, what="vkconv info", timeout=120)
    assert "<- chosen" in res.stdout

    _run([py, "-c", "import onnx; from cv_plugin.bench import soak; onnx.save(soak.small_net(), 'small.onnx')"],
         cwd=work, env=env, what="writing small.onnx", timeout=120)
    res = _run([bindir / "vkconv", "run", "small.onnx", "--compare-cpu", "--runs", "1"], cwd=work, env=env,
               what="vkconv run", timeout=120)
    assert "output y: (1, 4, 10, 12) float32" in res.stdout
    assert float(re.search(r"relative (\S+)\)", res.stdout)[1]) <= 1e-4, res.stdout
