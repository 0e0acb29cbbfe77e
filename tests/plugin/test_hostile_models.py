"""Malformed and adversarial models are refused with a clear message before anything is dispatched,
never a crash or a hang (ONNX models may come from anywhere)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_opencv_layers
from onnx import TensorProto, helper, numpy_helper

import cv_plugin
import vkconv

pytestmark = needs_opencv_layers()

W = np.ones((4, 3, 3, 3), np.float32)


def _model(attrs=None, w=W, x_shape=(1, 3, 8, 8), y_shape=(1, 4, 8, 8), op="Conv"):
    node = helper.make_node(op, ["x", "w"], ["y"], **(attrs or {}))
    graph = helper.make_graph(
        [node], "hostile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("attrs,message", [
    ({"strides": [0, 1]}, "strides"),
    ({"dilations": [1, -2]}, "dilations"),
    ({"pads": [1, 1, -1, 1]}, "pads"),
    ({"pads": [1, 1]}, "pads has 2 values"),
    ({"strides": [2**31, 1]}, "out of range"),
    ({"kernel_shape": [5, 5]}, "does not match the weights"),
    ({"group": 0}, "group=0"),
])
def test_bad_attributes_are_refused_before_opencv(attrs, message):
    with pytest.raises(ValueError, match=f"model: node 'Conv#0' \\(Conv\\): .*{message}"):
        cv_plugin.read_net(_model(attrs))


def test_conv_transpose_bad_output_padding():
    w = np.ones((3, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="output_padding"):
        cv_plugin.read_net(_model({"output_padding": [-1, 0]}, w=w, op="ConvTranspose"))


@pytest.mark.parametrize("w,x_shape,message", [
    (np.ones((4, 5, 3, 3), np.float32), (1, 3, 8, 8), "^x: 3 channels"),   # weights for 5 channels
    (np.ones((4, 3, 3, 3), np.float32), (1, 3, 2, 2), "^x: spatial size"),  # kernel larger than input
    (np.ones((6, 1, 3, 3), np.float32), (1, 3, 8, 8), "^x: 3 channels"),   # group missing
])
def test_shape_errors_stop_the_import(w, x_shape, message):
    with pytest.raises(ValueError, match=message):
        cv_plugin.read_net(_model(w=w, x_shape=x_shape))


def test_group_not_dividing_channels():
    with pytest.raises(ValueError, match="not divisible by group=3"):
        net = cv_plugin.read_net(_model({"group": 3}, w=np.ones((4, 1, 3, 3), np.float32)))
        net.setInput(np.ones((1, 3, 8, 8), np.float32))
        net.forward()


def test_tensor_past_the_storage_buffer_range_is_refused_at_forward():
    limit = vkconv.get_context().info.max_storage_buffer_range
    side = int(np.ceil(np.sqrt(limit / 4 / 4))) + 1  # a 4-channel output just over the limit
    model = _model({"pads": [1, 1, 1, 1]}, x_shape=(1, 3, side, side), y_shape=(1, 4, side, side))
    with cv_plugin.read_net(model) as net:
        net.setInput(np.zeros((1, 3, side, side), np.float32))
        with pytest.raises(vkconv.VkconvError, match="maxStorageBufferRange"):
            net.forward()


@pytest.mark.parametrize("data", [b"", b"\x08\x07garbage", b"\xff" * 64])
def test_garbage_bytes(data):
    with pytest.raises(ValueError, match="^model:"):
        cv_plugin.read_net(data)
