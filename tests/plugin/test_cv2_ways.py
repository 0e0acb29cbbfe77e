"""The ways into cv2.dnn (issue 15): omitted optional inputs, plain ``cv2.dnn.readNet`` after
``register()``, saved converted models (in a fresh process), symbolic input dims, and errors that
always say what failed.

Oracle: onnxruntime on the unmodified model (for mmcv / torchvision / custom exports, which
onnxruntime cannot load, on the equivalent ONNX ``DeformConv`` model).  Tolerance: max abs diff
<= 1e-4 x max |y|.  Run on every OpenCV of the CI matrix (.ci/run).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ROOT, needs_opencv_layers
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close

import cv_plugin
import vkconv
from cv_plugin import cli, compat
from cv_plugin.deform_layer import DeformConvOp
from cv_plugin.layers import STANDALONE

pytestmark = needs_opencv_layers()
RNG = np.random.default_rng(15)


def _model(nodes, inits, inputs: dict, outputs: dict, opset: int = 19, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                             + [helper.make_opsetid(d, 1) for d in domains])


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _forward(net, feeds: dict) -> np.ndarray:
    for name, value in feeds.items():
        net.setInput(compat.as_nd_mat(value), name)
    return np.array(net.forward())


def _plain(path: Path, feeds: dict, reader: str = "readNet") -> np.ndarray:
    """``feeds`` through plain OpenCV (``cv2.dnn.<reader>``) after cv_plugin.register()."""
    cv2 = compat.cv2_module()
    cv_plugin.register()
    net = getattr(cv2.dnn, reader)(str(path))
    return _forward(net, feeds)


# -- 1. omitted optional inputs (empty names) ---------------------------------------------------
X = RNG.standard_normal((1, 4, 9, 8)).astype(np.float32)
W = (RNG.standard_normal((6, 4, 3, 3)) * 0.5).astype(np.float32)
WT = (RNG.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32)  # ConvTranspose [C_in, C_out, kH, kW]
B = RNG.standard_normal(6).astype(np.float32)
OFFSET = (RNG.standard_normal((1, 18, 5, 4)) * 2).astype(np.float32)
MASK = RNG.uniform(0, 1, (1, 9, 5, 4)).astype(np.float32)
DEFORM = dict(strides=[2, 2], pads=[1, 1, 1, 1])


def _deform_model(b: bool, mask: bool, opset: int = 19) -> tuple[onnx.ModelProto, dict]:
    """DeformConv(x, W, offset, B or "", mask or "") with W (and B) as initializers."""
    node = helper.make_node("DeformConv", ["x", "w", "offset", "b" if b else "", "mask" if mask else ""],
                            ["y"], **DEFORM)
    feeds = {"x": X, "offset": OFFSET, **({"mask": MASK} if mask else {})}
    inits = {"w": W, **({"b": B} if b else {})}
    return _model([node], inits, {k: v.shape for k, v in feeds.items()}, {"y": (1, 6, 5, 4)}, opset), feeds


def _empty_slot_cases() -> dict[str, tuple[onnx.ModelProto, dict, int]]:
    """name -> (model with an omitted optional input, feeds, routed node count)."""
    conv = helper.make_node("Conv", ["x", "w", ""], ["y"], pads=[1, 1, 1, 1])
    conv_t = helper.make_node("ConvTranspose", ["x", "wt", ""], ["y"], strides=[2, 2])
    lo, hi = np.array(-0.5, np.float32), np.array(0.7, np.float32)
    clip_min = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                helper.make_node("Clip", ["c", "", "hi"], ["y"])]
    clip_max = [clip_min[0], helper.make_node("Clip", ["c", "lo"], ["y"])]
    clip_max[1].input.append("")
    cases = {
        "conv_B": (_model([conv], {"w": W}, {"x": X.shape}, {"y": (1, 6, 9, 8)}), {"x": X}, 1),
        "conv_transpose_B": (_model([conv_t], {"wt": WT}, {"x": X.shape}, {"y": (1, 3, 19, 17)}), {"x": X}, 1),
        "clip_min": (_model(clip_min, {"w": W, "b": B, "hi": hi}, {"x": X.shape}, {"y": (1, 6, 9, 8)}), {"x": X}, 1),
        "clip_max": (_model(clip_max, {"w": W, "b": B, "lo": lo}, {"x": X.shape}, {"y": (1, 6, 9, 8)}), {"x": X}, 1),
    }
    for name, b, mask in (("deform_B", False, True), ("deform_mask", True, False), ("deform_B_mask", False, False)):
        model, feeds = _deform_model(b, mask)
        cases[name] = (model, feeds, 1)
    return cases


EMPTY_CASES = _empty_slot_cases()


@pytest.mark.parametrize("name", list(EMPTY_CASES))
def test_empty_optional_input_read_net(name):
    model, feeds, routed = EMPTY_CASES[name]
    with cv_plugin.read_net(model) as net:
        out = _forward(net, feeds)
        assert len(net.report.routed) == routed and sum(net.vulkan_forwards().values()) == routed
        if name.startswith("clip"):
            assert net.report.fused_activations == 1
    assert_close(out, _ort(model, feeds), 1e-4, name)


def _deform_variants(b: bool, mask: bool):
    """The mmcv, custom (TensorRT plugin) and torchvision exports of :func:`_deform_model`'s op."""
    feeds = {"x": X, "offset": OFFSET, **({"mask": MASK} if mask else {})}
    shapes = {k: v.shape for k, v in feeds.items()}
    inits = {"w": W, **({"b": B} if b else {})}
    mm = helper.make_node("MMCVModulatedDeformConv2d", ["x", "offset", "mask" if mask else "", "w", "b" if b else ""],
                          ["y"], domain="mmcv", stride=[2, 2], padding=[1, 1], dilation=[1, 1], groups=1,
                          deform_groups=1)
    custom = helper.make_node("DeformConv2d", ["x", "offset", "mask" if mask else "", "w", "b" if b else ""],
                              ["y"], domain="custom", stride=[2, 2], padding=[1, 1], dilation=[1, 1],
                              deformable_groups=1)
    scalars = {"sh": 2, "sw": 2, "ph": 1, "pw": 1, "dh": 1, "dw": 1, "g": 1, "og": 1, "um": int(mask)}
    tv = helper.make_node("deform_conv2d", ["x", "w", "offset", "mask" if mask else "", "b" if b else "", *scalars],
                          ["y"], domain="torchvision")
    tv_inits = {**inits, **{k: np.array(v, np.int64) for k, v in scalars.items()}}
    return {"mmcv": (_model([mm], inits, shapes, {"y": (1, 6, 5, 4)}, domains=["mmcv"]), feeds),
            "custom": (_model([custom], inits, shapes, {"y": (1, 6, 5, 4)}, domains=["custom"]), feeds),
            "torchvision": (_model([tv], tv_inits, shapes, {"y": (1, 6, 5, 4)}, domains=["torchvision"]), feeds)}


@pytest.mark.parametrize("b,mask", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("export", ["mmcv", "custom", "torchvision"])
def test_empty_optional_input_deform_exports(export, b, mask, tmp_path):
    """The same omitted inputs in the other exporters' forms, through read_net and plain readNet."""
    model, feeds = _deform_variants(b, mask)[export]
    expected = _ort(_deform_model(b, mask)[0], feeds)
    with cv_plugin.read_net(model) as net:
        assert_close(_forward(net, feeds), expected, 1e-4, f"{export} read_net")
    onnx.save(model, tmp_path / "m.onnx")
    assert_close(_plain(tmp_path / "m.onnx", feeds), expected, 1e-4, f"{export} plain readNet")


# -- 2. errors always say what failed ------------------------------------------------------------
def _plant(monkeypatch, exc: BaseException) -> None:
    def forward(self, arrays):
        raise exc
    monkeypatch.setattr(DeformConvOp, "forward", forward)


def test_layer_error_without_message_names_type_node_op_and_shapes(monkeypatch):
    _plant(monkeypatch, StopIteration())
    model, feeds = _deform_model(False, True)
    model.graph.node[0].name = "dcn1"
    with cv_plugin.read_net(model) as net:
        with pytest.raises(vkconv.VkconvError) as info:
            _forward(net, feeds)
    message = str(info.value)
    for part in ("StopIteration", "'dcn1'", "DeformConv", "(1, 4, 9, 8)", "(1, 18, 5, 4)", "(1, 9, 5, 4)"):
        assert part in message, f"{part!r} not in {message!r}"
    assert isinstance(info.value.__cause__, StopIteration)


def test_user_error_keeps_its_type_and_gets_the_layer_as_a_note(monkeypatch):
    _plant(monkeypatch, ValueError("offset: planted"))
    model, feeds = _deform_model(True, True)
    with cv_plugin.read_net(model) as net:
        with pytest.raises(ValueError, match="^offset: planted") as info:
            _forward(net, feeds)
    assert any("DeformConv" in n and "(1, 18, 5, 4)" in n for n in info.value.__notes__)


def test_plain_readnet_layer_error_is_a_cv2_error_logged_and_kept(monkeypatch, tmp_path, caplog):
    _plant(monkeypatch, RuntimeError())
    model, feeds = _deform_model(True, True)
    onnx.save(model, tmp_path / "m.onnx")
    cv_plugin.take_errors()
    with pytest.warns(RuntimeWarning, match="RuntimeError"), pytest.raises(compat.cv2_module().error):
        _plain(tmp_path / "m.onnx", feeds)
    errors = cv_plugin.take_errors()
    assert len(errors) == 1 and "RuntimeError" in str(errors[0]) and "(1, 18, 5, 4)" in str(errors[0])
    assert any("RuntimeError" in r.getMessage() for r in caplog.records if r.name == "vkconv")


# -- 3. plain cv2.dnn.readNet after register() --------------------------------------------------
@pytest.mark.parametrize("opset", [19, 22])
@pytest.mark.parametrize("reader", ["readNet", "readNetFromONNX"])
def test_plain_readnet_onnx_deform_conv(opset, reader, tmp_path):
    model, feeds = _deform_model(True, True, opset)
    onnx.save(model, tmp_path / "m.onnx")
    before = sum(STANDALONE.forwards.values())
    out = _plain(tmp_path / "m.onnx", feeds, reader)
    assert_close(out, _ort(model, feeds), 1e-4)
    assert sum(STANDALONE.forwards.values()) == before + 1  # it ran in vkconv's layer


def test_plain_readnet_from_buffer_and_layer_types(tmp_path):
    cv2 = compat.cv2_module()
    model, feeds = _deform_model(True, True)
    cv_plugin.register()
    net = cv2.dnn.readNetFromONNX(np.frombuffer(model.SerializeToString(), np.uint8))
    assert "DeformConv" in net.getLayerTypes()
    assert_close(_forward(net, feeds), _ort(model, feeds), 1e-4)


def test_plain_readnet_reuses_device_weights_across_loads(tmp_path):
    """OpenCV never frees layer instances: loading the same model again must not pile up ops."""
    model, feeds = _deform_model(True, True)
    onnx.save(model, tmp_path / "m.onnx")
    _plain(tmp_path / "m.onnx", feeds)
    count = len(STANDALONE.ops)
    for _ in range(3):
        _plain(tmp_path / "m.onnx", feeds)
    assert len(STANDALONE.ops) == count


# -- 4. saved converted models -------------------------------------------------------------------
def _fresh_process(path: Path, feeds: dict, tmp_path: Path) -> np.ndarray:
    """Run the saved model with plain cv2.dnn.readNet in a new Python process; its output."""
    np.savez(tmp_path / "feeds.npz", **feeds)
    code = (
        "import sys, json, numpy as np, cv2, cv_plugin, vkconv\n"
        "cv_plugin.register()\n"
        f"net = cv2.dnn.readNet({str(path)!r})\n"
        f"feeds = np.load({str(tmp_path / 'feeds.npz')!r})\n"
        "for k in feeds.files: net.setInput(feeds[k], k)\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, net.forward())\n"
        "print(json.dumps({'types': list(net.getLayerTypes()), 'validation': vkconv.validation_messages(),"
        " 'errors': [str(e) for e in cv_plugin.take_errors()]}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert not info["validation"] and not info["errors"], info
    assert any(t.startswith("vkconv.") for t in info["types"]), info["types"]
    return np.load(tmp_path / "out.npy")


@pytest.mark.parametrize("mode", ["layer", "subgraph"])
def test_convert_runs_in_a_fresh_process(mode, tmp_path):
    model = dcn_model(bias=False, blocks=1)
    feeds = {"x": DCN_X}
    report = cv_plugin.convert(model, tmp_path / "out.onnx", mode=mode)
    assert report.routed
    out = _fresh_process(tmp_path / "out.onnx", feeds, tmp_path)
    assert_close(out, _ort(model, feeds), 1e-4, mode)
    with cv_plugin.read_net(model, mode=mode) as net:
        assert_close(out, _forward(net, feeds), 1e-6, "same as read_net")


def test_cli_convert_with_input_shape(tmp_path, capsys):
    model = symbolic_reshape_model()
    onnx.save(model, tmp_path / "in.onnx")
    assert cli.main(["convert", str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"),
                     "--input-shape", "x=1,3,8,20"]) == 0
    assert "wrote" in capsys.readouterr().out
    x = RNG.standard_normal((1, 3, 8, 20)).astype(np.float32)
    out = _plain(tmp_path / "out.onnx", {"x": x})
    assert_close(out, _ort(model, {"x": x}), 1e-4)
    assert cli.main(["convert", str(tmp_path / "in.onnx"), str(tmp_path / "o.onnx"),
                     "--input-shape", "nope=1,3,8,20"]) == 1
    assert "'nope' is not an input" in capsys.readouterr().err


# -- 5. symbolic input dims -----------------------------------------------------------------------
def symbolic_reshape_model() -> onnx.ModelProto:
    """x [1, 3, 8, W] -> Conv -> Reshape to [1, 32, W] (W read with Shape/Gather) -> [1, W, 32]."""
    inits = {"w": (RNG.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32),
             "idx": np.array([3], np.int64), "head": np.array([1, 32], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Gather", ["s", "idx"], ["width"], axis=0),
             helper.make_node("Concat", ["head", "width"], ["shape"], axis=0),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1])]
    return _model(nodes, inits, {"x": (1, 3, 8, "W")}, {"y": (1, "W", 32)}, opset=17)


def test_symbolic_input_dims_stock_opencv_fails():
    model = symbolic_reshape_model()
    x = RNG.standard_normal((1, 3, 8, 20)).astype(np.float32)
    cv2 = compat.cv2_module()
    with pytest.raises(cv2.error):
        net = compat.read_onnx(model.SerializeToString())
        net.setInput(x)
        net.forward()


def test_symbolic_input_dims_rebuilt_per_shape():
    model = symbolic_reshape_model()
    with cv_plugin.read_net(model, max_shapes=2) as net:
        for width in (20, 28, 20, 12, 28):
            x = RNG.standard_normal((1, 3, 8, width)).astype(np.float32)
            out = _forward(net, {"x": x})
            assert_close(out, _ort(model, {"x": x}), 1e-4, f"W={width}")
            assert sum(net.vulkan_forwards().values()) >= 1
        assert len(net._by_shape) == 2  # bounded: the least recently used imports were closed


def test_symbolic_input_dims_fixed_by_input_shapes():
    model = symbolic_reshape_model()
    x = RNG.standard_normal((1, 3, 8, 320)).astype(np.float32)
    with cv_plugin.read_net(model, input_shapes={"x": (1, 3, 8, 320)}) as net:
        net.setInput(x)  # setInput without a name, as OpenCV users do
        assert_close(np.array(net.forward()), _ort(model, {"x": x}), 1e-4)
    with pytest.raises(ValueError, match="'y' is not an input"):
        cv_plugin.read_net(model, input_shapes={"y": (1, 3, 8, 20)})
    with pytest.raises(ValueError, match="dim 2 is fixed to 8"):
        cv_plugin.read_net(model, input_shapes={"x": (1, 3, 9, 20)})


# -- acceptance: a DCNv2 ResNet block stack --------------------------------------------------------
DCN_C = 8
DCN_X = RNG.standard_normal((1, DCN_C, 12, 10)).astype(np.float32)


def dcn_model(bias: bool, blocks: int = 2, seed: int = 0) -> onnx.ModelProto:
    """torchvision-style DCNv2 ResNet basic blocks: a conv predicts offsets and mask (sigmoid) from
    the block input, a 3x3 DeformConv (with or without bias) + ReLU, a 3x3 Conv, and the residual
    add + ReLU; seeded random weights.  Convs carry kernel_shape, as exporters write it (plain
    OpenCV 4.10 refuses a Conv without it)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], {"s0": np.array([0], np.int64), "s18": np.array([18], np.int64),
                        "s27": np.array([27], np.int64), "ax": np.array([1], np.int64)}
    x = "x"
    pads = [1, 1, 1, 1]
    for i in range(blocks):
        p = f"b{i}_"
        inits[p + "w_om"] = (rng.standard_normal((27, DCN_C, 3, 3)) * 0.05).astype(np.float32)
        inits[p + "b_om"] = (rng.standard_normal(27) * 0.1).astype(np.float32)
        inits[p + "w1"] = (rng.standard_normal((DCN_C, DCN_C, 3, 3)) / np.sqrt(9 * DCN_C)).astype(np.float32)
        inits[p + "w2"] = (rng.standard_normal((DCN_C, DCN_C, 3, 3)) / np.sqrt(9 * DCN_C)).astype(np.float32)
        inits[p + "b2"] = (rng.standard_normal(DCN_C) * 0.1).astype(np.float32)
        if bias:
            inits[p + "b1"] = (rng.standard_normal(DCN_C) * 0.1).astype(np.float32)
        nodes += [
            helper.make_node("Conv", [x, p + "w_om", p + "b_om"], [p + "om"], pads=pads, kernel_shape=[3, 3]),
            helper.make_node("Slice", [p + "om", "s0", "s18", "ax"], [p + "offset"]),
            helper.make_node("Slice", [p + "om", "s18", "s27", "ax"], [p + "mlogit"]),
            helper.make_node("Sigmoid", [p + "mlogit"], [p + "mask"]),
            helper.make_node("DeformConv", [x, p + "w1", p + "offset", p + "b1" if bias else "", p + "mask"],
                             [p + "d"], pads=pads, name=p + "dcn"),
            helper.make_node("Relu", [p + "d"], [p + "r"]),
            helper.make_node("Conv", [p + "r", p + "w2", p + "b2"], [p + "c"], pads=pads, kernel_shape=[3, 3]),
            helper.make_node("Add", [p + "c", x], [p + "sum"]),
            helper.make_node("Relu", [p + "sum"], [p + "out"]),
        ]
        x = p + "out"
    nodes[-1].output[0] = "y"
    return _model(nodes, inits, {"x": DCN_X.shape}, {"y": DCN_X.shape}, opset=19)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_dcn_resnet_stack_every_way_in(bias, tmp_path):
    model = dcn_model(bias)
    feeds = {"x": DCN_X}
    expected = _ort(model, feeds)
    scale = float(np.abs(expected).max())
    onnx.save(model, tmp_path / "dcn.onnx")
    results = {"plain readNet": _plain(tmp_path / "dcn.onnx", feeds)}
    with cv_plugin.read_net(model) as net:
        results["read_net layer"] = _forward(net, feeds)
        assert len(net.report.routed) == 3 * 2  # 2 convs + 1 DeformConv per block
    with cv_plugin.read_net(model, mode="subgraph") as net:
        results["read_net subgraph"] = _forward(net, feeds)
    for mode in ("layer", "subgraph"):
        cv_plugin.convert(model, tmp_path / f"dcn.{mode}.onnx", mode=mode)
        results[f"saved {mode}, fresh process"] = _fresh_process(tmp_path / f"dcn.{mode}.onnx", feeds, tmp_path)
    for way, out in results.items():
        diff = float(np.abs(out.astype(np.float64) - expected).max())
        print(f"DCN stack ({'bias' if bias else 'no bias'}) {way}: max|diff| {diff:.3g}, max|y| {scale:.3g}, "
              f"relative {diff / scale:.2g}")
        assert_close(out, expected, 1e-4, way)
