"""cv_plugin.read_net(mode="subgraph"): groups of supported ops as one device-resident layer each,
against OpenCV's own CPU layers and onnxruntime (max abs diff <= 1e-3 x max|expected|)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close

import cv_plugin
import vkconv
from cv_plugin import compat
from cv_plugin.bench import soak, zoo
from cv_plugin.subgraph import SubgraphOp, partition


def _cpu(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    net = compat.read_onnx(model.SerializeToString())
    net.setInput(x)
    return net.forward()


def _subgraphs(net) -> list[SubgraphOp]:
    return [op for op in net.state.ops.values() if isinstance(op, SubgraphOp)]


def _transfers(net) -> int:
    """Host<->device tensor copies so far: subgraphs' counters, plus one upload and one readback
    per forward of each layer-mode node."""
    graph = sum(op.graph.transfers["uploads"] + op.graph.transfers["downloads"] for op in _subgraphs(net))
    layer = sum(n for key, n in net.vulkan_forwards().items()
                if not isinstance(net.state.ops.get(key), SubgraphOp))
    return graph + 2 * layer


def _boundaries(net) -> int:
    """Tensors crossing between OpenCV and the device per forward."""
    return sum(len(op.spec.inputs) + len(op.spec.outputs) for op in _subgraphs(net)) + 2 * sum(
        1 for op in net.state.ops.values() if not isinstance(op, SubgraphOp))


def _check(model, x, expected, *, subgraphs: int, rel=1e-3, **kw):
    with cv_plugin.read_net(model, mode="subgraph", **kw) as net:
        assert len(_subgraphs(net)) == subgraphs
        for _ in range(2):  # the second forward replays the recorded plan
            before = _transfers(net)
            net.setInput(x)
            out = net.forward()
            assert _transfers(net) - before == _boundaries(net)
            assert_close(out, expected, rel)
        return net


def test_vgg16_is_one_subgraph():
    model = zoo.vgg16(seed=1, size=32, classes=10)
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    with cv_plugin.read_net(model, mode="subgraph") as net:
        (op,) = _subgraphs(net)
        assert len(op.spec.nodes) == 13 * 2 + 5  # conv + relu, max pools; Flatten/Gemm stay with OpenCV
        assert [n.op_type for n, _, _ in op.graph.steps].count("Relu") == 0  # fused into the convs
        net.setInput(x)
        before = _transfers(net)
        out = net.forward()
        assert _transfers(net) - before == 2 == _boundaries(net)
        assert net.report.routed == [next(iter(net.state.ops))]
    assert_close(out, _cpu(model, x), 1e-3)


def test_small_net():
    model = soak.small_net(seed=2)
    x = np.random.default_rng(2).standard_normal(soak.INPUT_SHAPE).astype(np.float32)
    _check(model, x, _cpu(model, x), subgraphs=1)


def _se_model(rng, shape):
    f = lambda *s: (rng.standard_normal(s) * 0.4).astype(np.float32)  # noqa: E731
    c = shape[1]
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w0": f(c, c, 3, 3), "w1": f(4, c, 1, 1), "b1": f(4), "w2": f(c, 4, 1, 1), "b2": f(c),
        "three": np.array(3.0, np.float32), "six": np.array(6.0, np.float32),
        "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        # HardSwish decomposed as Paddle2ONNX exports it
        helper.make_node("Add", ["c0", "three"], ["a0"]),
        helper.make_node("Clip", ["a0", "lo", "hi"], ["a1"]),
        helper.make_node("Mul", ["c0", "a1"], ["a2"]),
        helper.make_node("Div", ["a2", "six"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["g"]),
        helper.make_node("Conv", ["g", "w1", "b1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
        helper.make_node("HardSigmoid", ["c2"], ["s"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["h", "s"], ["y"]),  # broadcast [1, C, 1, 1] over [1, C, H, W]
    ]
    graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_se_block_hardswish():
    rng = np.random.default_rng(3)
    shape = (1, 8, 13, 10)
    model = _se_model(rng, shape)
    x = rng.standard_normal(shape).astype(np.float32)
    _check(model, x, _cpu(model, x), subgraphs=1)


def test_tensor_read_by_vulkan_and_opencv():
    """r feeds the subgraph's MaxPool and OpenCV's Softmax; the Softmax result comes back in."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Softmax", ["r"], ["sm"], axis=1),          # OpenCV
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sigmoid", ["p"], ["q"]),
             helper.make_node("Resize", ["q", "", "scales"], ["u"], mode="nearest"),
             helper.make_node("Add", ["u", "sm"], ["y"])]                   # a second subgraph
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 10])],
                              [numpy_helper.from_array(w, "w"), scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.standard_normal((1, 3, 8, 10)).astype(np.float32)
    # The Add cannot join the first group (that would make a cycle through the Softmax) and alone
    # it is below min_ops; r leaves the first group for the Softmax as well as staying inside.
    _, specs = partition(model)
    (spec,) = specs.values()
    assert [n.op_type for n in spec.nodes] == ["Conv", "Relu", "MaxPool", "Sigmoid", "Resize"]
    assert spec.outputs == ["r", "u"]
    _check(model, x, _cpu(model, x), subgraphs=1)
    _check(model, x, _cpu(model, x), subgraphs=2, min_ops=1)


def test_read_net_mode_arguments():
    model = soak.small_net()
    with pytest.raises(ValueError, match="mode"):
        cv_plugin.read_net(model, mode="graph")
    with pytest.raises(ValueError, match="min_ops"):
        cv_plugin.read_net(model, mode="subgraph", min_ops=0)
    with cv_plugin.read_net(model, mode="subgraph", min_ops=100) as net:  # nothing big enough
        assert not _subgraphs(net) and len(net.report.routed) == 3


def test_dynamic_input_dims_and_constant_node_weights():
    """Paddle2ONNX style: symbolic input dims (OpenCV asks for shapes with unknown dims while
    importing) and weights in Constant nodes, as in the PP-OCR models; two input sizes."""
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    model = _se_model(rng, ("N", 8, "H", "W"))
    for init in list(model.graph.initializer):  # initializers -> Constant nodes
        model.graph.node.insert(0, helper.make_node("Constant", [], [init.name], value=init))
    del model.graph.initializer[:]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with cv_plugin.read_net(model, mode="subgraph") as net:
        assert len(_subgraphs(net)) == 1
        for shape in [(1, 8, 9, 11), (2, 8, 16, 5)]:
            x = rng.standard_normal(shape).astype(np.float32)
            net.setInput(x)
            assert_close(net.forward(), sess.run(None, {"x": x})[0], 1e-3, str(shape))


@pytest.mark.parametrize("mode", ["subgraph", "layer"])
def test_profile_reports_device_time_and_transfers(mode, tmp_path):
    rng = np.random.default_rng(9)
    shape = (1, 8, 13, 10)
    model = _se_model(rng, shape)
    x = rng.standard_normal(shape).astype(np.float32)
    ctx = vkconv.get_context()
    with cv_plugin.read_net(model, mode=mode) as net:
        net.setInput(x)
        expected = net.forward()
        cv_plugin.profile(net, x)
        live = ctx.live.copy()
        report = cv_plugin.profile(net, x)
        assert ctx.live == live  # the timed replay's plan, command buffer and query pool are freed
        assert net.state.profiles is None  # profiling is for that one forward only
        net.setInput(x)
        assert_close(net.forward(), expected, 1e-6)  # the net still runs unprofiled
        keys = set(net.state.ops)
    assert {layer.key for layer in report.layers} == keys
    for layer in report.layers:
        assert layer.steps and all(s.ms > 0 for s in layer.steps)
    if mode == "subgraph":
        (layer,) = report.layers
        # one upload of x, one readback of y
        assert (layer.upload_bytes, layer.download_bytes) == (x.nbytes, x.nbytes)
        # the written-out HardSwish runs in the first conv's epilogue, the SE block's Mul on its own
        assert [s.kernel.split()[0] for s in layer.steps] == ["conv", "pool", "conv", "conv", "elementwise"]
    else:
        assert all(layer.kind == "Conv" for layer in report.layers) and len(report.layers) == 3
    assert 0 < report.device_ms and report.transfer_bytes == sum(
        layer.upload_bytes + layer.download_bytes for layer in report.layers)
    table = report.table()
    assert "device ms" in table and report.layers[0].key in table
    report.chart(str(tmp_path / "profile.svg"))
    assert (tmp_path / "profile.svg").read_text().startswith("<svg")
    with pytest.raises(ValueError, match="cv_plugin.Net"):
        cv_plugin.profile(object(), x)


def _dcn_model(with_bias: bool, with_mask: bool) -> onnx.ModelProto:
    """A DCNv2 block as exporters write it: a conv predicts offsets (and mask logits), Slice splits
    them, Sigmoid makes the mask, DeformConv (optional B and mask as empty names), then ReLU."""
    rng = np.random.default_rng(11)
    c, taps = 6, 9
    extra = taps if with_mask else 0
    inits = {"w_off": (rng.standard_normal((2 * taps + extra, c, 3, 3)) * 0.05).astype(np.float32),
             "w": (rng.standard_normal((8, c, 3, 3)) * 0.3).astype(np.float32),
             "b": rng.standard_normal(8).astype(np.float32),
             "s0": np.array([0], np.int64), "s18": np.array([18], np.int64),
             "s27": np.array([27], np.int64), "ax": np.array([1], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w_off"], ["om"], pads=[1, 1, 1, 1]),
             helper.make_node("Slice", ["om", "s0", "s18", "ax"], ["offset"])]
    if with_mask:
        nodes += [helper.make_node("Slice", ["om", "s18", "s27", "ax"], ["mlogit"]),
                  helper.make_node("Sigmoid", ["mlogit"], ["mask"])]
    deform_inputs = ["x", "w", "offset", "b" if with_bias else ""] + (["mask"] if with_mask else [])
    nodes += [helper.make_node("DeformConv", deform_inputs, ["d"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["d"], ["y"])]
    graph = helper.make_graph(nodes, "dcn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 11, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 11, 9])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.mark.parametrize("with_bias, with_mask", [(True, True), (False, True), (True, False)],
                         ids=["bias-mask", "no-bias", "no-mask"])
def test_dcn_block_is_one_device_resident_layer(with_bias, with_mask):
    """The offset conv, the Slices, the Sigmoid, the DeformConv and its ReLU form one subgraph: one
    upload and one readback per forward, against onnxruntime."""
    import onnxruntime as ort

    model = _dcn_model(with_bias, with_mask)
    x = np.random.default_rng(12).standard_normal((2, 6, 11, 9)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"x": x})[0]
    _check(model, x, expected, subgraphs=1, rel=1e-4)
    with cv_plugin.read_net(model, mode="subgraph") as net:
        (op,) = _subgraphs(net)
        assert net.report.routed == [op.name]  # nothing left to layer mode
        assert [n.op_type for n, _, _ in op.graph.steps].count("DeformConv") == 1
        assert (op.spec.inputs, op.spec.outputs) == (["x"], ["y"])


# Keras 3.15 on numpy 2 warns inside its own variable conversions; nothing here can act on it.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_keras_next_frame_model_is_one_device_resident_layer():
    """Keras' next-frame model converted by cv_plugin.keras: the Transposes between layouts, the
    three ConvLSTM2D, the BatchNormalizations, the Conv3D and its Sigmoid form one subgraph, so one
    upload and one readback per forward (layer mode: 8), equal to layer mode and to Keras' own
    prediction within tests/ops/test_conv_lstm.py's tolerance (1e-4 x max|expected|)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="the model is built with Keras (extra [keras])")
    from cv_plugin.keras import next_frame_model, to_onnx

    model = next_frame_model(size=12, filters=4, seed=0)
    x = np.random.default_rng(13).uniform(size=(1, 3, 12, 12, 1)).astype(np.float32)
    expected = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
    proto = to_onnx(model)
    _check(proto, x, expected, subgraphs=1, rel=1e-4)
    with cv_plugin.read_net(proto, mode="subgraph") as net:
        (op,) = _subgraphs(net)
        assert net.report.routed == [op.name]  # nothing left to layer mode or to OpenCV
        assert [n.op_type for n in op.spec.nodes].count("ConvLSTM2D") == 3
        assert (op.spec.inputs, op.spec.outputs) == ([proto.graph.input[0].name], [proto.graph.output[0].name])
        net.setInput(x)
        got = net.forward()
    with cv_plugin.read_net(proto) as layer_net:
        layer_net.setInput(x)
        assert_close(got, layer_net.forward(), 1e-4, "subgraph vs layer mode")
