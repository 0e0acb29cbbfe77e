"""Shared pytest fixtures: a validation-layer guard on every test, and the conformance data."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import vkconv

ROOT = Path(__file__).resolve().parent.parent

# Never read or write the user's tuning cache: a tuned choice there would change which kernels the
# tests run (subprocesses inherit this too).  VKCONV_TUNE stays at its default, "cache".
os.environ["VKCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="vkconv-test-cache-")
atexit.register(shutil.rmtree, os.environ["VKCONV_CACHE_DIR"], True)
os.environ.pop("VKCONV_TUNE", None)


def conformance_root() -> Path | None:
    """``VKCONV_CONFORMANCE`` or the ``shared/conformance`` beside / inside the checkout."""
    candidates = [os.environ.get("VKCONV_CONFORMANCE"), ROOT.parent / "shared" / "conformance",
                  ROOT / "shared" / "conformance"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def pytest_report_header(config) -> str:
    """Say which device profile and validation the run has (CI runs the suite under several)."""
    flags = {name: os.environ.get(name, "") for name in ("VKCONV_VALIDATION", "VKCONV_LIMITS", "VKCONV_MEMORY")}
    validation = "on (core and synchronization)" if flags.pop("VKCONV_VALIDATION") not in ("", "0") else "OFF"
    profiles = ", ".join(f"{k}={v}" for k, v in flags.items() if v) or "none"
    return f"vkconv: validation layer {validation}; device profiles: {profiles}"


def _fail_on_validation_messages() -> None:
    messages = vkconv.validation_messages(clear=True)
    if messages:
        pytest.fail("Vulkan validation layer reported:\n" + "\n".join(messages), pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Fail the test during whose body the Khronos validation layer reported anything."""
    vkconv.validation_messages(clear=True)
    yield
    _fail_on_validation_messages()


@pytest.fixture(autouse=True)
def no_validation_messages():
    """Messages from fixture teardown (objects left alive at vkDestroyDevice...) fail it too."""
    yield
    _fail_on_validation_messages()


_opencv_problem: list[str | None] = []


def opencv_problem() -> str | None:
    """Why the installed cv2 cannot host vkconv's layers (None when it can); probed once."""
    if not _opencv_problem:
        import cv_plugin

        try:
            cv_plugin.register()
            _opencv_problem.append(None)
        except vkconv.VkconvError as exc:
            _opencv_problem.append(str(exc))
    return _opencv_problem[0]


def needs_opencv_layers():
    """A skip marker for tests that load models through cv2.dnn."""
    problem = opencv_problem()
    return pytest.mark.skipif(problem is not None, reason=f"{problem}")


@pytest.fixture(scope="session")
def conformance() -> Path:
    root = conformance_root()
    if root is None:
        pytest.skip("ONNX conformance data not found: set VKCONV_CONFORMANCE or place shared/ beside "
                    "the checkout")
    return root
