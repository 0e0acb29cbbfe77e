"""`vkconv info` (python -m vkconv / the console script): text, JSON, device choice, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vkconv
from vkconv.cli import main
from vkconv.context import choose_device

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def devices(monkeypatch):
    monkeypatch.delenv("VKCONV_DEVICE", raising=False)
    return vkconv.list_devices()


def test_info_lists_every_device_and_marks_the_chosen_one(devices, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    chosen = choose_device(devices)
    for d in devices:
        assert f"[{d.index}] {d.name}" in out
    marked = [line for line in out.splitlines() if line.startswith("* ")]
    assert marked == [next(line for line in out.splitlines() if f"[{chosen.index}] {chosen.name}" in line)]
    for label in ("invocations", "shared", "max storage buffer range", "push constants", "subgroup size",
                  "fp16 storage", "fp16 arithmetic", "unified"):
        assert label in out


def test_info_json_matches_list_devices(devices, capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["vkconv"] == vkconv.__version__
    assert data["selector"] is None
    assert data["chosen"] == choose_device(devices).index
    assert [d["name"] for d in data["devices"]] == [d.name for d in devices]
    assert [d["chosen"] for d in data["devices"]] == [d.index == data["chosen"] for d in devices]
    first, info = data["devices"][0], devices[0]
    assert first["max_workgroup_invocations"] == info.max_workgroup_invocations
    assert first["max_workgroup_size"] == list(info.max_workgroup_size)
    assert first["max_storage_buffer_range"] == info.max_storage_buffer_range
    assert first["fp16_storage"] == info.fp16_storage
    assert "rank" not in first


@pytest.mark.parametrize("by", ["index", "name"])
def test_info_honours_vkconv_device(devices, monkeypatch, capsys, by):
    target = devices[-1]
    selector = str(target.index) if by == "index" else target.name.split()[0].upper()
    monkeypatch.setenv("VKCONV_DEVICE", selector)
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["selector"] == selector
    assert data["devices"][data["chosen"]]["name"].lower().startswith(target.name.split()[0].lower())


def test_unmatched_selector_is_one_line_naming_the_devices(devices, monkeypatch, capsys):
    monkeypatch.setenv("VKCONV_DEVICE", "no-such-gpu-xyz")
    assert main(["info"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "VKCONV_DEVICE" in lines[0] and devices[0].name in lines[0]
    assert "Traceback" not in captured.err


def test_debug_shows_the_traceback(devices, monkeypatch, capsys):
    monkeypatch.setenv("VKCONV_DEVICE", "no-such-gpu-xyz")
    assert main(["--debug", "info"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["info", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["info", "--bogus"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "info" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert vkconv.__version__ in capsys.readouterr().out


def _env_without(*names: str) -> dict:
    return {k: v for k, v in os.environ.items() if k not in names}


def test_python_dash_m_and_console_script():
    env = _env_without("VKCONV_DEVICE")
    res = subprocess.run([sys.executable, "-m", "vkconv", "info"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "<- chosen" in res.stdout
    script = Path(sys.executable).parent / "vkconv"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter (pip install -e .)")
    res = subprocess.run([str(script), "info", "--json"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["devices"]


def test_no_loader_is_one_line_saying_what_to_install():
    # None in sys.modules makes `import vulkan` fail exactly as a missing libvulkan.so.1 would.
    code = "import sys; sys.modules['vulkan'] = None; from vkconv.cli import main; sys.exit(main(['info']))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 1
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "no Vulkan loader" in lines[0] and "apt-get install" in lines[0]


def test_unexpected_errors_are_one_line_with_a_hint(monkeypatch, capsys):
    def broken():
        raise KeyError("driver returned nonsense")

    monkeypatch.setattr("vkconv.cli.list_devices", broken)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (KeyError)" in err and "--debug" in err
