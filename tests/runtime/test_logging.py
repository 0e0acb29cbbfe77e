"""vkconv's logger: silent by default, VKCONV_LOG=debug|info|warning, and what it reports at debug."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vkconv
from vkconv.runtime import log as vklog

ROOT = Path(__file__).resolve().parents[2]

# A conv through the default context: device choice, a plan and its dispatches.
CONV_SCRIPT = """
import numpy as np, vkconv
x = np.ones((1, 2, 5, 5), np.float32)
w = np.ones((3, 2, 3, 3), np.float32)
y = vkconv.conv(x, w, pads=1)
assert y.shape == (1, 3, 5, 5) and float(y[0, 0, 2, 2]) == 18.0
print("done")
"""


def _run(script: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "VKCONV_LOG"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env=full, timeout=120)


def test_quiet_by_default():
    res = _run(CONV_SCRIPT + "import logging\n"
               "h = logging.getLogger('vkconv').handlers\n"
               "print([type(x).__name__ for x in h])\n")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert res.stdout.splitlines() == ["done", "['NullHandler']"]


def test_vkconv_log_debug_shows_device_pipelines_plan_and_dispatches():
    res = _run(CONV_SCRIPT, VKCONV_LOG="debug")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert all(line.startswith("vkconv") for line in lines), res.stderr
    device = [line for line in lines if line.startswith("vkconv.runtime.context DEBUG: device [")]
    assert len(device) == 1 and "chosen" in device[0]
    assert any(re.match(r"vkconv\.runtime\.plan DEBUG: plan created: inputs .* -> outputs .*\(1, 3, 5, 5\)", line)
               for line in lines), res.stderr
    assert any(line.startswith("vkconv.runtime.pipeline DEBUG: pipeline ") and " created: spec constants (" in line
               for line in lines), res.stderr
    dispatches = [line for line in lines if line.startswith("vkconv.runtime.command DEBUG: dispatch ")]
    assert dispatches and all(re.search(r"\(\d+, \d+, \d+\) workgroups of \(\d+, \d+, \d+\)", d)
                              for d in dispatches), res.stderr


@pytest.mark.parametrize("level", ["info", "WARNING"])
def test_vkconv_log_above_debug_hides_debug_records(level):
    res = _run(CONV_SCRIPT, VKCONV_LOG=level)
    assert res.returncode == 0, res.stderr
    assert "DEBUG" not in res.stderr


def test_bad_vkconv_log_warns_and_keeps_working():
    res = _run(CONV_SCRIPT, VKCONV_LOG="chatty")
    assert res.returncode == 0, res.stderr
    assert "VKCONV_LOG" in res.stderr and "'chatty'" in res.stderr and "debug, info, warning" in res.stderr
    assert "DEBUG" not in res.stderr


def test_configure_logging_attaches_one_stderr_handler():
    logger = logging.getLogger("vkconv")
    before_level, before = logger.level, list(logger.handlers)
    try:
        first = vkconv.configure_logging("info")
        second = vkconv.configure_logging(logging.DEBUG)
        added = [h for h in logger.handlers if h not in before]
        assert added == [second] and first not in logger.handlers
        assert second.level == logging.DEBUG and logger.level == logging.DEBUG
        with pytest.raises(ValueError, match="level"):
            vkconv.configure_logging("loud")
    finally:
        for h in logger.handlers:
            if h not in before:
                logger.removeHandler(h)
        vklog._handler = None
        logger.setLevel(before_level)


def test_pipeline_creation_and_dispatch_sizes_are_logged(caplog):
    """A fresh context, so that every pipeline is really created (the default one caches them)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 6, 5), dtype=np.float32)
    w = rng.standard_normal((4, 2, 3, 3), dtype=np.float32)
    offset = np.zeros((1, 18, 6, 5), np.float32)
    caplog.set_level(logging.DEBUG, logger="vkconv")
    with vkconv.Context() as ctx:
        with vkconv.DeformConv(w, pads=1, ctx=ctx) as op:
            op(x, offset)
        created = ctx.stats["pipelines_created"]
    records = [r for r in caplog.records if r.name.startswith("vkconv")]
    device = [r for r in records if r.name == "vkconv.runtime.context"]
    assert len(device) == 1 and ctx.info.name in device[0].getMessage()
    pipes = [r.getMessage() for r in records if r.name == "vkconv.runtime.pipeline"]
    assert len(pipes) == created >= 1
    assert all(re.match(r"pipeline \w+ created: spec constants \(.*\), \d+ buffers, \d+ push-constant bytes",
                        m) for m in pipes), pipes
    assert any(m.startswith("pipeline deform_conv_") for m in pipes), pipes
    plans = [r.getMessage() for r in records if r.name == "vkconv.runtime.plan"]
    assert len(plans) == 1 and "(1, 4, 6, 5)" in plans[0]
    dispatches = [r.getMessage() for r in records if r.name == "vkconv.runtime.command"]
    assert len(dispatches) >= 1 and all(m.startswith(("dispatch deform_conv_", "dispatch conv_rows")) for m in dispatches)


def test_read_net_logs_its_routing(caplog):
    pytest.importorskip("cv2")
    import cv_plugin
    from cv_plugin.bench import soak

    caplog.set_level(logging.DEBUG, logger="vkconv")
    with cv_plugin.read_net(soak.small_net()):
        pass
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("read_net:")]
    assert summary == ["read_net: routed to vkconv ['Conv#0', 'Conv#3', 'Conv#5']; left to OpenCV []; "
                       "1 BatchNorm folded, 2 activations fused"]
