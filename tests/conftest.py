"""Shared pytest fixtures: a validation-layer guard on every test, and the conformance data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import vkconv

ROOT = Path(__file__).resolve().parent.parent


def conformance_root() -> Path | None:
    """``VKCONV_CONFORMANCE`` or the ``shared/conformance`` beside / inside the checkout."""
    candidates = [os.environ.get("VKCONV_CONFORMANCE"), ROOT.parent / "shared" / "conformance",
                  ROOT / "shared" / "conformance"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


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


@pytest.fixture(scope="session")
def conformance() -> Path:
    root = conformance_root()
    if root is None:
        pytest.skip("ONNX conformance data not found: set VKCONV_CONFORMANCE or place shared/ beside "
                    "the checkout")
    return root
