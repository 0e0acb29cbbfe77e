"""cv_plugin: ONNX models through cv2.dnn with Conv on Vulkan, against independent oracles.

Oracles: the ONNX project's own expected outputs (conformance data), onnxruntime on the unmodified
model, and OpenCV's own CPU layers on the unmodified model.  Tolerance: max abs diff <= 1e-4 x max|y|
(1e-3 for VGG-16, whose 16 layers accumulate float32 rounding differently).
"""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conformance_root, needs_opencv_layers
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close

import cv_plugin
import vkconv
from cv_plugin import compat
from cv_plugin.bench import zoo

pytestmark = needs_opencv_layers()


def _cases(op_type: str, weight_ranks: tuple[int, ...]) -> list[Path]:
    """Conformance cases made of one ``op_type`` node whose weights have one of ``weight_ranks``."""
    root = conformance_root()
    if root is None:
        return []
    cases = []
    for d in sorted(glob.glob(str(root / "onnx-node" / "test_*"))) + sorted(
            glob.glob(str(root / "onnx-pytorch" / "test_*"))):
        model = onnx.load(str(Path(d) / "model.onnx"), load_external_data=False)
        if [n.op_type for n in model.graph.node] != [op_type]:
            continue
        w = model.graph.node[0].input[1]
        w_dims = next((len(t.dims) for t in model.graph.initializer if t.name == w), None)
        if w_dims is None:
            w_dims = next(len(i.type.tensor_type.shape.dim) for i in model.graph.input if i.name == w)
        if w_dims in weight_ranks:
            cases.append(Path(d))
    return cases


def _load_case(case: Path):
    model = onnx.load(str(case / "model.onnx"))
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    data = case / "test_data_set_0"
    inputs = [numpy_helper.to_array(onnx.load_tensor(str(p))) for p in sorted(data.glob("input_*.pb"))]
    expected = numpy_helper.to_array(onnx.load_tensor(str(data / "output_0.pb")))
    return model, dict(zip(names, inputs)), expected


CONV_CASES = _cases("Conv", (3, 4, 5))  # 1-D, 2-D and 3-D convolutions
CONV_TRANSPOSE_CASES = _cases("ConvTranspose", (3, 4, 5))


@pytest.mark.skipif(not CONV_CASES, reason="ONNX conformance data not found (shared/conformance)")
@pytest.mark.parametrize("case", CONV_CASES, ids=[c.name for c in CONV_CASES])
def test_conformance_conv(case: Path):
    run_conformance_case(case)


def run_conformance_case(case: Path) -> None:
    """One conformance model through read_net + cv2.dnn, its single node routed to Vulkan."""
    model, feeds, expected = _load_case(case)
    with cv_plugin.read_net(model) as net:
        assert len(net.report.routed) == 1
        for name, value in feeds.items():
            net.setInput(value, name)
        out = net.forward()
        assert net.vulkan_forwards() == {net.report.routed[0]: 1}
    assert_close(out, expected, 1e-4, case.name)


@pytest.mark.skipif(not CONV_TRANSPOSE_CASES, reason="ONNX conformance data not found (shared/conformance)")
@pytest.mark.parametrize("case", CONV_TRANSPOSE_CASES, ids=[c.name for c in CONV_TRANSPOSE_CASES])
def test_conformance_conv_transpose(case: Path):
    run_conformance_case(case)


def test_conformance_cases_found():
    if conformance_root() is None:
        pytest.skip("ONNX conformance data not found (shared/conformance)")
    assert len(CONV_CASES) == 26  # 6 node tests + 8 Conv1d + 6 Conv2d + 6 Conv3d
    assert len(CONV_TRANSPOSE_CASES) == 12  # 11 node tests + ConvTranspose2d


# -- fusion -------------------------------------------------------------------------------------
def _model(nodes, inits, x_shape, y_shape, opset=17):
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ort(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _run(model, x, **kw):
    with cv_plugin.read_net(model, **kw) as net:
        net.setInput(x)
        return net.forward(), net.report, list(net.getLayerTypes())


RNG = np.random.default_rng(7)
X = RNG.standard_normal((1, 6, 9, 11), dtype=np.float32)
W = RNG.standard_normal((8, 3, 3, 3), dtype=np.float32) * 0.3
B = RNG.standard_normal(8, dtype=np.float32)


def _conv(out="c", group=2):
    return helper.make_node("Conv", ["x", "w", "b"], [out], kernel_shape=[3, 3], pads=[1, 0, 2, 1],
                            strides=[1, 2], group=group)


ACTIVATIONS = [
    ("Relu", {}, {}),
    ("LeakyRelu", {"alpha": 0.07}, {}),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, {}),
    ("HardSwish", {}, {}),
    ("Sigmoid", {}, {}),
    ("Tanh", {}, {}),
    ("Clip", {}, {"lo": np.float32(-0.5), "hi": np.float32(0.8)}),
    ("Clip", {}, {"hi": np.float32(1.5)}),
]


@pytest.mark.parametrize("op,attrs,bounds", ACTIVATIONS,
                         ids=[f"{a[0]}{'-'.join(a[2])}" for a in ACTIVATIONS])
def test_batchnorm_and_activation_fused(op, attrs, bounds):
    bn = {"s": RNG.uniform(0.5, 2, 8).astype(np.float32), "beta": RNG.standard_normal(8).astype(np.float32),
          "mean": RNG.standard_normal(8).astype(np.float32), "var": RNG.uniform(0.5, 2, 8).astype(np.float32)}
    act_inputs = ["n"]
    if op == "Clip":
        act_inputs += ["lo" if "lo" in bounds else "", "hi" if "hi" in bounds else ""]
    nodes = [_conv(),
             helper.make_node("BatchNormalization", ["c", "s", "beta", "mean", "var"], ["n"], epsilon=1e-3),
             helper.make_node(op, act_inputs, ["y"], **attrs)]
    model = _model(nodes, {"w": W, "b": B, **bn, **bounds}, X.shape, (1, 8, 10, 5))
    out, report, types = _run(model, X)
    assert report.folded_batchnorm == 1 and report.fused_activations == 1
    assert set(types) - {"__NetInputLayer__", "Identity"} == {"vkconv.Conv"}, types
    assert_close(out, _ort(model, X), 1e-4, op)


def test_not_fused_when_intermediate_has_other_reader():
    """OpenCV's Transpose also reads the conv's output, so the Relu stays OpenCV's."""
    nodes = [_conv(), helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Transpose", ["c"], ["t"]),
             helper.make_node("Transpose", ["t"], ["u"]), helper.make_node("Sub", ["r", "u"], ["y"])]
    model = _model(nodes, {"w": W, "b": B}, X.shape, (1, 8, 10, 5))
    out, report, types = _run(model, X)
    assert report.fused_activations == 0 and report.fused == {} and "ReLU" in types
    assert_close(out, _ort(model, X), 1e-4)


def test_elementwise_chain_on_the_conv_output_becomes_its_epilogue():
    """Relu(c) + c reads only the conv's output: one elementwise program, run in the conv's store
    (the same decision subgraph mode makes)."""
    nodes = [_conv(), helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Add", ["r", "c"], ["y"])]
    model = _model(nodes, {"w": W, "b": B}, X.shape, (1, 8, 10, 5))
    out, report, types = _run(model, X)
    assert report.fused == {"Conv#0": ("Conv#0", "Relu#1", "Add#2")}
    assert set(types) - {"__NetInputLayer__", "Identity"} == {"vkconv.Conv"}, types
    assert_close(out, _ort(model, X), 1e-4)


def test_fuse_false_keeps_opencv_activation():
    nodes = [_conv(), helper.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, {"w": W, "b": B}, X.shape, (1, 8, 10, 5))
    out, report, types = _run(model, X, fuse=False)
    assert report.fused_activations == 0 and "ReLU" in types
    assert_close(out, _ort(model, X), 1e-4)


def test_clip_with_runtime_bound_is_not_fused():
    nodes = [_conv(), helper.make_node("Sigmoid", ["c"], ["m"]),
             helper.make_node("ReduceMax", ["m"], ["hi"], keepdims=1),
             helper.make_node("Clip", ["c", "", "hi"], ["y"])]
    model = _model(nodes, {"w": W, "b": B}, X.shape, (1, 8, 10, 5))
    routed, report = cv_plugin.rewrite(model, net_id=0)  # OpenCV itself cannot load runtime bounds
    assert report.routed and report.fused_activations == 0
    assert [n.op_type for n in routed.graph.node] == ["Conv", "Sigmoid", "ReduceMax", "Clip"]


def test_conv_1d_in_a_chain():
    x = RNG.standard_normal((2, 4, 13), dtype=np.float32)
    w = RNG.standard_normal((6, 4, 5), dtype=np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[2, 1], dilations=[2]),
             helper.make_node("Relu", ["c"], ["y"])]
    model = _model(nodes, {"w": w}, x.shape, (2, 6, 8))
    out, report, _ = _run(model, x)
    assert report.fused_activations == 1
    assert_close(out, _ort(model, x), 1e-4)


# -- errors and lifetime --------------------------------------------------------------------------
def test_layer_error_reaches_the_caller_without_hanging():
    nodes = [_conv(group=1, out="y")]
    model = _model(nodes, {"w": np.ones((8, 6, 3, 3), np.float32), "b": B}, X.shape, (1, 8, 10, 5))
    with cv_plugin.read_net(model) as net:
        net.setInput(np.ones((1, 5, 9, 11), np.float32))  # 5 channels: weights expect 6
        with pytest.raises(ValueError, match="channels"):
            net.forward()
        net.setInput(X)  # the net recovers for a well-formed input
        assert_close(net.forward(), _ort(model, X), 1e-4)


def test_read_net_arguments(tmp_path):
    model = _model([_conv(out="y")], {"w": W, "b": B}, X.shape, (1, 8, 10, 5))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    expected = _ort(model, X)
    for source in (str(path), path, model.SerializeToString(), model):
        with cv_plugin.read_net(source) as net:
            net.setInput(X)
            assert_close(net.forward(), expected, 1e-4)
    with pytest.raises(ValueError, match="model"):
        cv_plugin.read_net(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="model"):
        cv_plugin.read_net(12)


def test_register_is_idempotent_and_close_frees_vulkan_objects():
    cv_plugin.register()
    cv_plugin.register()
    assert "vkconv.Conv" in cv_plugin.registered()
    ctx = vkconv.get_context()
    before = dict(ctx.live)
    model = _model([_conv(out="y")], {"w": W, "b": B}, X.shape, (1, 8, 10, 5))
    for _ in range(3):
        net = cv_plugin.read_net(model)
        net.setInput(X)
        net.forward()
        net.close()
    assert {k: v for k, v in ctx.live.items() if v} == {k: v for k, v in before.items() if v}


# -- VGG-16 end to end ----------------------------------------------------------------------------
def test_vgg16_matches_opencv_cpu():
    model = zoo.vgg16(seed=3)
    blob = np.random.default_rng(3).random((1, 3, 224, 224), dtype=np.float32)
    cpu = compat.read_onnx(model.SerializeToString())
    cpu.setInput(blob)
    expected = cpu.forward()
    ctx = vkconv.get_context()
    with cv_plugin.read_net(model) as net:
        assert len(net.report.routed) == 13 and not net.report.left_to_opencv
        assert net.report.fused_activations == 13
        net.setInput(blob)
        before = ctx.stats.copy()
        out = net.forward()
        # every conv ran on Vulkan once: one submit each, at least one dispatch each
        assert sorted(net.vulkan_forwards().values()) == [1] * 13
        assert ctx.stats["submits"] - before["submits"] == 13
        assert ctx.stats["dispatches"] - before["dispatches"] >= 13
        assert "Convolution" not in net.getLayerTypes()
    assert_close(out, expected, 1e-3, "vgg16")


NO_DEVICE_SCRIPT = """
import warnings, numpy as np, onnx, cv_plugin, vkconv
from test_plugin import _model, _conv, W, B, X
model = _model([_conv(out="y")], {"w": W, "b": B}, X.shape, (1, 8, 10, 5))
try:
    cv_plugin.read_net(model)
except vkconv.NoDeviceError as exc:
    print("raised:", exc)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    net = cv_plugin.read_net(model, fallback=True)
net.setInput(X)
print("fallback:", net.forward().shape, net.report.routed, caught[0].message)
"""


def test_no_vulkan_device_raises_or_falls_back(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, VK_DRIVER_FILES=str(tmp_path / "none.json"),
               VK_ICD_FILENAMES=str(tmp_path / "none.json"), VKCONV_VALIDATION="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", NO_DEVICE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "raised:" in res.stdout and "mesa-vulkan-drivers" in res.stdout
    assert "fallback: (1, 8, 10, 5) []" in res.stdout and "OpenCV's own layers" in res.stdout


def test_dynamic_input_dims_and_constant_node_weights():
    """Paddle2ONNX-style model: symbolic input dims, weights in Constant nodes (as the PP-OCR models)."""
    w2 = RNG.standard_normal((5, 8, 1, 1), dtype=np.float32)
    nodes = [helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(W)),
             helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2)),
             helper.make_node("Conv", ["x", "wc"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, "H", "W"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with cv_plugin.read_net(model) as net:
        assert len(net.report.routed) == 2 and net.report.fused_activations == 1
        for shape in [(1, 6, 9, 11), (2, 6, 16, 5)]:
            x = RNG.standard_normal(shape, dtype=np.float32)
            net.setInput(x)
            assert_close(net.forward(), _ort(model, x), 1e-4, str(shape))


def test_symbolic_channel_dimension():
    """OpenCV reports a symbolic channel count as 0 while importing: it must not be refused."""
    nodes = [_conv(out="y")]
    graph = helper.make_graph(
        nodes, "dync", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "C", "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H2", "W2"])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with cv_plugin.read_net(model) as net:
        net.setInput(X)
        assert_close(net.forward(), _ort(model, X), 1e-4)
