"""Deformable convolution through cv_plugin + cv2.dnn (which cannot import it on its own).

Oracles: the ONNX conformance outputs and the float64 numpy reference written from the spec
(tests/deform_reference.py).  Tolerance: max abs diff <= 1e-4 x max |expected|.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_opencv_layers
from deform_reference import deform_conv_ref
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close
from test_plugin import _cases, run_conformance_case

import cv_plugin

pytestmark = needs_opencv_layers()

DEFORM_CASES = _cases("DeformConv", (4,))
RNG = np.random.default_rng(11)


@pytest.mark.skipif(not DEFORM_CASES, reason="ONNX conformance data not found (shared/conformance)")
@pytest.mark.parametrize("case", DEFORM_CASES, ids=[c.name for c in DEFORM_CASES])
def test_conformance_deform_conv(case):
    run_conformance_case(case)
    assert len(DEFORM_CASES) == 2


def _graph(nodes, inits, inputs, out_shape, domains=()):
    graph = helper.make_graph(
        nodes, "deform", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 19)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def _run(model, feeds):
    with cv_plugin.read_net(model) as net:
        for name, value in feeds.items():
            net.setInput(value, name)
        return net.forward(), net.report


def test_dcn_block_offsets_predicted_by_a_conv():
    """Conv -> (offset, mask) -> DeformConv, as in DCN-ResNet blocks, all inside one cv2 net."""
    x = RNG.standard_normal((1, 8, 13, 11)).astype(np.float32)
    w_off = (RNG.standard_normal((27, 8, 3, 3)) * 0.1).astype(np.float32)  # 18 offsets + 9 mask
    w = RNG.standard_normal((6, 8, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(6).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w_off"], ["om"], pads=[1, 1, 1, 1]),
        helper.make_node("Slice", ["om", "s0", "s18", "ax"], ["offset"]),
        helper.make_node("Slice", ["om", "s18", "s27", "ax"], ["mlogit"]),
        helper.make_node("Sigmoid", ["mlogit"], ["mask"]),
        helper.make_node("DeformConv", ["x", "w", "offset", "b", "mask"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = {"w_off": w_off, "w": w, "b": b, "s0": np.array([0], np.int64), "s18": np.array([18], np.int64),
             "s27": np.array([27], np.int64), "ax": np.array([1], np.int64)}
    out, report = _run(_graph(nodes, inits, [("x", x)], (1, 6, 13, 11)), {"x": x})
    assert len(report.routed) == 2  # the offset conv and the deformable conv
    om = deform_conv_ref(x, w_off, np.zeros((1, 18, 13, 11)), pads=1)  # zero offsets == plain conv
    expected = deform_conv_ref(x, w, om[:, :18], b, 1 / (1 + np.exp(-om[:, 18:])), pads=1)
    assert_close(out, expected, 1e-4)


def _deform_inputs(og=2, group=2):
    x = RNG.standard_normal((2, 4, 9, 8)).astype(np.float32)
    w = RNG.standard_normal((6, 4 // group, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(6).astype(np.float32)
    offset = (RNG.standard_normal((2, og * 18, 5, 4)) * 2).astype(np.float32)
    mask = RNG.uniform(0, 1, (2, og * 9, 5, 4)).astype(np.float32)
    return x, w, b, offset, mask


ATTRS = dict(strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1])


def _expected(x, w, b, offset, mask, group, og):
    return deform_conv_ref(x, w, offset, b, mask, group=group, offset_group=og, **ATTRS)


def test_mmcv_modulated_deform_conv():
    x, w, b, offset, mask = _deform_inputs()
    node = helper.make_node("MMCVModulatedDeformConv2d", ["x", "offset", "mask", "w", "b"], ["y"],
                            domain="mmcv", stride=[2, 2], padding=[1, 1], dilation=[1, 1], groups=2,
                            deform_groups=2)
    model = _graph([node], {"w": w, "b": b}, [("x", x), ("offset", offset), ("mask", mask)], (2, 6, 5, 4),
                   domains=["mmcv"])
    out, _ = _run(model, {"x": x, "offset": offset, "mask": mask})
    assert_close(out, _expected(x, w, b, offset, mask, 2, 2), 1e-4)


def test_custom_deform_conv2d():
    x, w, b, offset, mask = _deform_inputs(og=2, group=1)
    node = helper.make_node("DeformConv2d", ["x", "offset", "mask", "w", "b"], ["y"], domain="custom",
                            stride=[2, 2], padding=[1, 1], dilation=[1, 1], deformable_groups=2,
                            activation_type=-1, alpha=0.0, beta=0.0)
    model = _graph([node], {"w": w, "b": b}, [("x", x), ("offset", offset), ("mask", mask)], (2, 6, 5, 4),
                   domains=["custom"])
    out, _ = _run(model, {"x": x, "offset": offset, "mask": mask})
    assert_close(out, _expected(x, w, b, offset, mask, 1, 2), 1e-4)


@pytest.mark.parametrize("use_mask", [1, 0])
def test_torchvision_fallthrough_deform_conv2d(use_mask):
    x, w, b, offset, mask = _deform_inputs(og=1, group=2)
    scalars = {"sh": 2, "sw": 2, "ph": 1, "pw": 1, "dh": 1, "dw": 1, "g": 2, "og": 1, "um": use_mask}
    inits = {"w": w, "b": b, **{k: np.array(v, np.int64) for k, v in scalars.items()}}
    mask_in = mask if use_mask else np.zeros((0,), np.float32)
    inits["mask"] = mask_in
    node = helper.make_node("deform_conv2d", ["x", "w", "offset", "mask", "b", *scalars], ["y"],
                            domain="torchvision")
    model = _graph([node], inits, [("x", x), ("offset", offset)], (2, 6, 5, 4), domains=["torchvision"])
    out, _ = _run(model, {"x": x, "offset": offset})
    assert_close(out, _expected(x, w, b, offset, mask if use_mask else None, 2, 1), 1e-4)


def test_offset_channel_mismatch_is_reported():
    x, w, b, offset, mask = _deform_inputs(og=1, group=1)
    node = helper.make_node("DeformConv", ["x", "w", "offset", "b"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1])
    model = _graph([node], {"w": w, "b": b}, [("x", x), ("offset", offset)], (2, 6, 5, 4))
    with cv_plugin.read_net(model) as net:
        net.setInput(x, "x")
        net.setInput(offset[:, :16].copy(), "offset")
        with pytest.raises(ValueError, match="^offset: 16 channels"):
            net.forward()


@pytest.mark.parametrize("mode", ["layer", "subgraph"])
@pytest.mark.parametrize("use_mask", [True, False])
def test_profile_times_the_deform_conv_layer(mode, use_mask):
    """cv_plugin.profile replays the plan the call ran (it knows the input shape only: the
    DeformConv remembers whether that shape ran with a mask)."""
    x, w, b, offset, mask = _deform_inputs(og=1, group=1)
    names = ["x", "w", "offset", "b", "mask"] if use_mask else ["x", "w", "offset", "b"]
    node = helper.make_node("DeformConv", names, ["y"], **ATTRS)
    feeds = {"x": x, "offset": offset, **({"mask": mask} if use_mask else {})}
    model = _graph([node], {"w": w, "b": b}, list(feeds.items()), (2, 6, 5, 4))
    with cv_plugin.read_net(model, mode=mode) as net:
        for name, value in feeds.items():
            net.setInput(value, name)
        out = net.forward()
        report = cv_plugin.profile(net, feeds)
    assert_close(out, _expected(x, w, b, offset, mask if use_mask else None, 1, 1), 1e-4)
    steps = [s for layer in report.layers for s in layer.steps]
    assert steps and all(s.ms > 0 for s in steps)
