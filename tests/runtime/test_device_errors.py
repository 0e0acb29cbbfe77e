"""Driver failures become Python exceptions, and the next call recovers (issue: reliability).

The failures are injected by replacing one `vulkan` binding function for one call: a real device
loss or out-of-memory cannot be provoked on demand.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_opencv_layers

import cv_plugin
import vkconv
from cv_plugin.bench import soak
from vkconv.runtime.context import vk

X = np.random.default_rng(0).standard_normal((1, 3, 9, 7)).astype(np.float32)
W = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)


def _fail_once(monkeypatch, name: str, error: type) -> None:
    real = getattr(vk, name)
    state = {"armed": True}

    def fake(*args, **kwargs):
        if state["armed"]:
            state["armed"] = False
            raise error()
        return real(*args, **kwargs)

    monkeypatch.setattr(vk, name, fake)


def test_out_of_memory_is_an_exception_and_the_next_call_works(monkeypatch):
    expected = vkconv.conv(X, W, pads=1)
    _fail_once(monkeypatch, "vkAllocateMemory", vk.VkErrorOutOfDeviceMemory)
    with pytest.raises(vkconv.VkconvError, match="out of device memory"):
        vkconv.conv(X, W, pads=1)
    assert np.array_equal(vkconv.conv(X, W, pads=1), expected)


def test_device_lost_is_an_exception_and_a_new_device_serves_the_next_call(monkeypatch):
    expected = vkconv.conv(X, W, pads=1)
    old = vkconv.get_context()
    op = vkconv.Conv(W, pads=1)
    _fail_once(monkeypatch, "vkWaitForFences", vk.VkErrorDeviceLost)
    with pytest.raises(vkconv.VkconvError, match="device lost"):
        op(X)
    with pytest.raises(vkconv.VkconvError, match="was lost"):
        op(X)  # objects of the lost device say so
    op.close()
    assert vkconv.get_context() is not old
    assert np.array_equal(vkconv.conv(X, W, pads=1), expected)


@needs_opencv_layers()
def test_cv2_net_recovers_after_device_loss(monkeypatch):
    x = np.random.default_rng(2).standard_normal(soak.INPUT_SHAPE).astype(np.float32)
    with cv_plugin.read_net(soak.small_net()) as net:
        net.setInput(x)
        expected = net.forward().copy()
        _fail_once(monkeypatch, "vkWaitForFences", vk.VkErrorDeviceLost)
        net.setInput(x)
        with pytest.raises(vkconv.VkconvError, match="device lost"):
            net.forward()
        net.setInput(x)
        assert np.array_equal(net.forward(), expected)
