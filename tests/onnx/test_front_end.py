"""Layer mode and subgraph mode share one ONNX front end (vkconv.onnx): on every model the suite
uses, the fused (conv, BatchNorm / affine, activation, epilogue) groups each mode chooses are the
same, and each model's outputs match OpenCV's CPU layers."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from conftest import needs_opencv_layers
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close

import cv_plugin
from cv_plugin import compat
from cv_plugin.bench import zoo
from cv_plugin.subgraph import SubgraphOp
from vkconv.onnx.fusion import CONV_TYPES

pytestmark = needs_opencv_layers()
RNG = np.random.default_rng(3)


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node named, so that a node is the same node before and after partitioning."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"n{i}"
    return model


def _groups(model: onnx.ModelProto, mode: str, feeds: dict[str, np.ndarray]) -> tuple[dict, np.ndarray]:
    """Fused groups (first member -> members) the mode chose, and the output of one forward."""
    with cv_plugin.read_net(model, mode=mode) as net:
        groups = dict(net.report.fused)
        for op in net.state.ops.values():
            if isinstance(op, SubgraphOp):
                groups.update({n.members[0]: n.members for n, _, _ in op.graph.steps
                               if n.op_type in CONV_TYPES and len(n.members) > 1})
        for name, value in feeds.items():
            net.setInput(value, name)
        return groups, net.forward()


def _cpu(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    net = compat.read_onnx(model.SerializeToString())
    for name, value in feeds.items():
        net.setInput(value, name)
    return net.forward()


def _dcn_block() -> onnx.ModelProto:
    """ResNet-DCN style: Conv-BN-ReLU, a conv predicting offsets and mask, DeformConv, BN, ReLU,
    and a residual Add."""
    c = 8
    f = lambda *s: (RNG.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    inits = {"w1": f(c, c, 3, 3), "w_off": f(27, c, 3, 3) * 0.3, "w2": f(c, c, 3, 3), "b2": f(c),
             "s0": np.array([0], np.int64), "s18": np.array([18], np.int64), "s27": np.array([27], np.int64),
             "ax": np.array([1], np.int64)}
    for k in ("1", "2"):
        inits.update({f"g{k}": RNG.uniform(0.5, 1.5, c).astype(np.float32), f"be{k}": f(c), f"m{k}": f(c),
                      f"v{k}": RNG.uniform(0.5, 2, c).astype(np.float32)})
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w_off"], ["om"], pads=[1, 1, 1, 1]),
        helper.make_node("Slice", ["om", "s0", "s18", "ax"], ["offset"]),
        helper.make_node("Slice", ["om", "s18", "s27", "ax"], ["mlogit"]),
        helper.make_node("Sigmoid", ["mlogit"], ["mask"]),
        helper.make_node("DeformConv", ["r1", "w2", "offset", "b2", "mask"], ["d"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["d", "g2", "be2", "m2", "v2"], ["n2"]),
        helper.make_node("Add", ["n2", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "dcn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 13, 11])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 13, 11])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _vgg16():
    model = zoo.vgg16(seed=1, size=32, classes=10)
    return model, {model.graph.input[0].name: RNG.random((1, 3, 32, 32), dtype=np.float32)}


def _ppocr(kind: str):
    try:
        path = zoo.ppocr_models()[kind]
    except RuntimeError as exc:
        pytest.skip(f"{exc} (no package index?)")
    model = onnx.load(str(path))
    x = RNG.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32) if kind == "cls" else zoo.text_image_blob(160)
    return model, {model.graph.input[0].name: x}


def _conv_lstm():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    pytest.importorskip("keras", reason="the ConvLSTM model is built with Keras (extra [keras])")
    from cv_plugin.keras import next_frame_model, to_onnx

    model = to_onnx(next_frame_model(size=12, filters=4, seed=0))
    return model, {model.graph.input[0].name: RNG.random((1, 3, 12, 12, 1), dtype=np.float32)}


MODELS = {"vgg16": _vgg16, "ppocr-det": lambda: _ppocr("det"), "ppocr-cls": lambda: _ppocr("cls"),
          "dcn-block": lambda: (_dcn_block(), {"x": RNG.standard_normal((1, 8, 13, 11), dtype=np.float32)}),
          "conv-lstm": _conv_lstm}


@pytest.mark.parametrize("name", list(MODELS))
def test_both_modes_fuse_the_same_groups(name):
    model, feeds = MODELS[name]()
    model = _named(model)
    layer, out_layer = _groups(model, "layer", feeds)
    subgraph, out_subgraph = _groups(model, "subgraph", feeds)
    assert layer == subgraph
    assert layer, f"{name}: nothing fused"  # each has a conv followed by BatchNorm or an activation
    if name in ("dcn-block", "conv-lstm"):  # OpenCV cannot run these alone; their own tests check them
        assert_close(out_subgraph, out_layer, 1e-4, f"{name} subgraph vs layer")
    else:
        expected = _cpu(model, feeds)
        assert_close(out_layer, expected, 1e-3, f"{name} layer")
        assert_close(out_subgraph, expected, 1e-3, f"{name} subgraph")


def test_dcn_block_groups():
    """The groups chosen for the DCN block, written out: BN + ReLU fold into the first conv; the
    DeformConv takes activations only (no folding), and its BN is followed by the residual Add."""
    layer, _ = _groups(_named(_dcn_block()), "layer", {"x": RNG.standard_normal((1, 8, 13, 11), dtype=np.float32)})
    assert layer == {"n0": ("n0", "n1", "n2")}
