"""The validation harness itself: synchronization validation reports a missing barrier, and a test
during which the layer reports anything fails (tests/conftest.py), proven on planted errors."""
from __future__ import annotations

from pathlib import Path

import pytest

import vkconv
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context

pytest_plugins = ["pytester"]

def _validated_context() -> Context:
    try:
        return Context(validation=True)
    except vkconv.VkconvError as exc:
        pytest.skip(str(exc))


def test_sync_validation_reports_a_missing_barrier():
    ctx = _validated_context()
    try:
        vkconv.validation_messages(clear=True)
        src, dst = Buffer(ctx, 64), Buffer(ctx, 64)
        with CommandBuffer(ctx) as cmd:
            with cmd.recording():
                cmd.copy(src.buffer, dst.buffer, 64)
                cmd.copy(src.buffer, dst.buffer, 64)  # writes dst again with no barrier between
            cmd.submit()
        messages = vkconv.validation_messages(clear=True)
        assert any("SYNC-HAZARD-WRITE-AFTER-WRITE" in m for m in messages), messages
    finally:
        ctx.close()
        vkconv.validation_messages(clear=True)


PLANTED = '''
import vkconv
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context
from vkconv.runtime.pipeline import DescriptorSet, get_pipeline


def test_planted_error():
    ctx = Context(validation=True)
    pipe = get_pipeline(ctx, "conv_direct", 4, 128, (64, 1, 1, 0))
    other = get_pipeline(ctx, "conv_direct", 5, 128, (64, 1, 1, 0))
    dset = DescriptorSet(other, [Buffer(ctx, 64) for _ in range(5)])
    with CommandBuffer(ctx) as cmd:
        with cmd.recording():
            cmd.dispatch(pipe, dset, bytes(128), (1, 1, 1))  # set from an incompatible layout
    ctx.close()


def test_clean():
    ctx = Context(validation=True)
    ctx.close()
'''


def test_harness_fails_the_test_that_triggered_a_message(pytester):
    _validated_context().close()
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makepyfile(test_planted=PLANTED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, errors=0)
    result.stdout.fnmatch_lines(["*Vulkan validation layer reported*"])
