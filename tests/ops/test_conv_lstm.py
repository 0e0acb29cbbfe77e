"""ConvLSTM2D: vkconv.conv_lstm2d / vkconv.ConvLSTM2D, the vkconv.ConvLSTM2D cv2 layer, and the
Keras converter (cv_plugin.keras).

Oracles: a float64 numpy ConvLSTM written from Keras 3's equations (tests/conv_lstm_reference.py),
and Keras itself (torch backend) where keras and torch are installed.
Tolerance: max abs diff <= 1e-4 x max|expected| (tests/oracles.assert_close).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest
from conftest import needs_opencv_layers
from conv_lstm_reference import conv_lstm2d as reference
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close

import cv_plugin
import vkconv
import vkconv.ops.conv_lstm as conv_lstm_module
from cv_plugin.keras import next_frame_model, randomize_weights, to_onnx
from vkconv.graph import Graph
from vkconv.onnx import unsupported_reason
from vkconv.ops.conv.selection import Candidate
from vkconv.ops.conv_lstm import ConvLSTMCandidate

REL = 1e-4
# Keras 3.15 on numpy 2 warns inside its own variable conversions; nothing here can act on it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _arrays(seed, n, t, c, hw, f, kernel, rkernel, bias=True, state_hw=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, t, c, *hw)).astype(np.float32)
    k = (rng.standard_normal((*kernel, c, 4 * f)) / np.sqrt(c * np.prod(kernel))).astype(np.float32)
    u = (rng.standard_normal((*rkernel, f, 4 * f)) / np.sqrt(f * np.prod(rkernel))).astype(np.float32)
    b = (0.5 * rng.standard_normal(4 * f)).astype(np.float32) if bias else None
    state = None
    if state_hw is not None:
        state = tuple(rng.standard_normal((n, f, *state_hw)).astype(np.float32) for _ in range(2))
    return x, k, u, b, state


# (id, shapes: n, t, c, (h, w), f, kernel, recurrent kernel, options, reference activation names)
CASES = [
    ("same-3x3", (2, 3, 3, (7, 6), 5, (3, 3), (3, 3)), {}, None),
    ("valid-stride21-rect-kernels-last-state", (1, 4, 2, (9, 8), 3, (3, 2), (2, 3)),
     dict(padding="valid", strides=(2, 1), return_sequences=False, recurrent_activation="hard_sigmoid",
          initial_state=True), None),
    ("same-stride2-even-kernel-state", (2, 2, 4, (8, 7), 9, (4, 4), (3, 3)),
     dict(strides=2, initial_state=True), None),
    ("same-dilation2-relu-last", (1, 3, 2, (10, 9), 2, (3, 3), (3, 3)),
     dict(dilation=2, return_sequences=False, activation="relu"), None),
    ("valid-dilation-rect", (1, 2, 3, (9, 11), 4, (2, 3), (1, 1)),
     dict(padding="valid", dilation=(2, 3)), None),
    ("no-bias-one-step-linear", (3, 1, 2, (5, 5), 6, (3, 3), (5, 5)),
     dict(bias=False, activation="linear"), None),
    ("keras2-hard-sigmoid", (1, 3, 2, (6, 6), 3, (3, 3), (3, 3)),
     dict(recurrent_activation=("HardSigmoid", 0.2, 0.5), activation="hard_sigmoid"),
     ("hard_sigmoid", "keras2_hard_sigmoid")),
    ("one-by-one-pixel-frames", (2, 4, 3, (1, 1), 8, (1, 1), (1, 1)), {}, None),
]


def _run_case(shape, options, ref_names, seed=0):
    n, t, c, hw, f, kernel, rkernel = shape
    options = dict(options)
    with_bias = options.pop("bias", True)
    with_state = options.pop("initial_state", False)
    out_hw = conv_lstm_module.output_shape((n, t, c, *hw), (*kernel, c, 4 * f), **{
        k: v for k, v in options.items() if k in ("padding", "strides", "dilation")})[-2:]
    x, k, u, b, state = _arrays(seed, n, t, c, hw, f, kernel, rkernel, with_bias,
                                out_hw if with_state else None)
    got = vkconv.conv_lstm2d(x, k, u, b, initial_state=state, **options)
    ref_opts = dict(options)
    for key in ("strides", "dilation"):
        if key in ref_opts and isinstance(ref_opts[key], int):
            ref_opts[key] = (ref_opts[key],) * 2
    if ref_names is not None:
        ref_opts["activation"], ref_opts["recurrent_activation"] = ref_names
    expected = reference(x, k, u, b, initial_state=state, **ref_opts)
    assert_close(got, expected, REL)


@pytest.mark.parametrize("shape, options, ref_names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_reference(shape, options, ref_names):
    _run_case(shape, options, ref_names)


@pytest.mark.parametrize("activation", sorted(conv_lstm_module.KERAS_ACTIVATIONS))
def test_cell_activations(activation):
    _run_case((1, 2, 2, (5, 4), 3, (3, 3), (3, 3)), dict(activation=activation), None)


# Register tiles (MB output channels = MB / 4 whole filters, PB pixels) of the implicit-GEMM
# kernel both convolutions run on; the device's tables pick one per layer (every tile the tuner
# may pick: tests/ops/test_conv_lstm_tune.py).
FORCED_TILES = [(4, 4), (8, 8), (16, 16), (16, 8)]


def _forced(tile=None, family=None):
    step = None if tile is None else Candidate("implicit_gemm", *tile)
    inp = None if family is None and tile is None else Candidate(family or "implicit_gemm", *(tile or (0, 0)))
    return ConvLSTMCandidate(step, inp)


@pytest.mark.parametrize("tile", FORCED_TILES, ids=lambda t: f"mb{t[0]}-pb{t[1]}")
def test_every_register_tile(tile, monkeypatch):
    """Each register tile, with filters that do not fill the last block, odd frame sizes (H*W
    not a multiple of 4, widths not a multiple of PB) and an initial state."""
    monkeypatch.setattr(conv_lstm_module, "ConvLSTM2D",
                        functools.partial(vkconv.ConvLSTM2D, candidate=_forced(tile)))
    for return_sequences in (True, False):
        _run_case((2, 3, 3, (7, 9), 9, (3, 3), (3, 3)),
                  dict(return_sequences=return_sequences, initial_state=True), None, seed=1)
    _run_case((1, 2, 5, (5, 13), 3, (3, 3), (3, 3)), dict(padding="valid", strides=(1, 2)), None, seed=2)


@pytest.mark.parametrize("family", ["winograd", "implicit_gemm"])
def test_input_convolution_families(family):
    """The input convolution on each kernel family it may take (Winograd where a Conv of its shape
    would: 64 input channels, 3x3, stride 1), odd frame sizes, batch 2, an initial state."""
    shape = (2, 2, 64, (17, 15), 9, (3, 3), (3, 3))
    x, k, u, b, state = _arrays(6, *shape, state_hw=shape[3])
    with vkconv.ConvLSTM2D(k, u, b, tune=False) as heuristic:
        assert heuristic.choice_for(x.shape, True).candidate.input.kernel == "winograd"
    with vkconv.ConvLSTM2D(k, u, b, candidate=_forced(family=family)) as op:
        got = op(x, state)
        assert {cand.kernel for role, cand in op._kernels if role == "input"} == {family}
    assert_close(got, reference(x, k, u, b, initial_state=state), REL)


def test_resident_weights_one_submit_per_call_and_state_reset():
    ctx = vkconv.get_context()
    x, k, u, b, state = _arrays(2, 2, 5, 3, (6, 6), 4, (3, 3), (3, 3), state_hw=(6, 6))
    with vkconv.ConvLSTM2D(k, u, b) as op:
        assert op.output_shape(x.shape) == (2, 5, 4, 6, 6)
        first = op(x)
        before = dict(ctx.stats)
        again = op(x)  # the cell state of the previous call must not leak into this one
        assert ctx.stats["submits"] - before.get("submits", 0) == 1
        # the input convolution (6-wide frames need its pack pass), then one dispatch per time step
        assert ctx.stats["dispatches"] - before.get("dispatches", 0) == 2 + x.shape[1]
        assert ctx.stats["pipelines_created"] == before.get("pipelines_created", 0)
        np.testing.assert_array_equal(first, again)
        assert_close(first, reference(x, k, u, b), REL)
        assert_close(op(x, state), reference(x, k, u, b, initial_state=state), REL)
        assert_close(op(x[:1, :2]), reference(x[:1, :2], k, u, b), REL)
        _, k2, u2, b2, _ = _arrays(3, 2, 5, 3, (6, 6), 4, (3, 3), (3, 3))
        op.set_weights(k2, u2, b2)
        assert_close(op(x), reference(x, k2, u2, b2), REL)
        with pytest.raises(ValueError, match="kernel"):
            op.set_weights(k2[:2], u2, b2)


def test_empty_batch_gives_empty_output():
    x, k, u, b, _ = _arrays(0, 1, 2, 2, (4, 4), 3, (3, 3), (3, 3))
    y = vkconv.conv_lstm2d(x[:0], k, u, b)
    assert y.shape == (0, 2, 3, 4, 4) and y.dtype == np.float32


def _bad_calls():
    x, k, u, b, _ = _arrays(0, 1, 2, 2, (4, 4), 3, (3, 3), (3, 3))
    h = np.zeros((1, 3, 4, 4), np.float32)
    return [
        ("x", lambda: vkconv.conv_lstm2d(x.astype(np.float64), k, u, b)),
        ("x", lambda: vkconv.conv_lstm2d(x[0], k, u, b)),
        ("x", lambda: vkconv.conv_lstm2d(x[:, :, :1], k, u, b)),  # channel mismatch
        ("x", lambda: vkconv.conv_lstm2d(x[:, :0], k, u, b)),  # no time step
        ("x", lambda: vkconv.conv_lstm2d(x[..., :2, :2], k, u, b, padding="valid")),
        ("kernel", lambda: vkconv.conv_lstm2d(x, k[..., :10], u, b)),
        ("kernel", lambda: vkconv.conv_lstm2d(x, k[:0], u, b)),
        ("recurrent_kernel", lambda: vkconv.conv_lstm2d(x, k, u[:, :, :2], b)),
        ("recurrent_kernel", lambda: vkconv.conv_lstm2d(x, k, u[..., :8], b)),
        ("bias", lambda: vkconv.conv_lstm2d(x, k, u, b[:5])),
        ("padding", lambda: vkconv.conv_lstm2d(x, k, u, b, padding="full")),
        ("strides", lambda: vkconv.conv_lstm2d(x, k, u, b, strides=0)),
        ("dilation", lambda: vkconv.conv_lstm2d(x, k, u, b, dilation=(1, 2, 3))),
        ("activation", lambda: vkconv.conv_lstm2d(x, k, u, b, activation="gelu")),
        ("recurrent_activation", lambda: vkconv.conv_lstm2d(x, k, u, b, recurrent_activation="tanh")),
        ("initial_state", lambda: vkconv.conv_lstm2d(x, k, u, b, initial_state=h)),
        ("initial_state", lambda: vkconv.conv_lstm2d(x, k, u, b, initial_state=(h, h[..., :3]))),
        ("initial_state", lambda: vkconv.conv_lstm2d(x, k, u, b, initial_state=(h, h.astype(np.float16)))),
    ]


@pytest.mark.parametrize("name, call", _bad_calls(),
                         ids=[f"{i}-{n}" for i, (n, _) in enumerate(_bad_calls())])
def test_bad_arguments_name_the_argument(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_buffer_past_device_limit_is_refused():
    ctx = vkconv.get_context()
    limit = ctx.info.max_storage_buffer_range
    f, hw = 8, 256
    steps = limit // (16 * f * hw * hw) + 1  # the input gates (one vec4 per filter and pixel) overflow
    if steps * hw * hw * 4 > limit:
        pytest.skip("this device's storage-buffer limit is too large to exceed cheaply")
    x = np.zeros((1, steps, 1, hw, hw), np.float32)
    k = np.zeros((1, 1, 1, 4 * f), np.float32)
    u = np.zeros((1, 1, f, 4 * f), np.float32)
    live = dict(ctx.live)
    with vkconv.ConvLSTM2D(k, u, None, return_sequences=False) as op:
        with pytest.raises(vkconv.VkconvError, match="conv_lstm input gates"):
            op(x)
    assert dict(ctx.live) == live


# -- the cv2 layer, from a hand-made ONNX node (no Keras needed) -----------------------------------
needs_opencv = needs_opencv_layers()


def _node_model(x, k, u, b, *, runtime_weights=False, with_state=False, out_shape, **attrs):
    names = ["x", "kernel", "recurrent_kernel", "bias"] + (["h0", "c0"] if with_state else [])
    node = helper.make_node("ConvLSTM2D", names, ["y"], domain="vkconv", **attrs)
    weights = {"kernel": k, "recurrent_kernel": u, "bias": b}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))]
    inits = []
    for name, value in weights.items():
        if runtime_weights:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
        else:
            inits.append(numpy_helper.from_array(value, name))
    if with_state:
        inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, [x.shape[0], k.shape[3] // 4,
                                                                          *out_shape[-2:]])
                   for s in ("h0", "c0")]
    graph = helper.make_graph([node], "conv_lstm", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("vkconv", 1)])


@needs_opencv
@pytest.mark.parametrize("runtime_weights", [False, True], ids=["constant-weights", "runtime-weights"])
def test_cv2_layer_matches_reference(runtime_weights):
    x, k, u, b, state = _arrays(4, 2, 3, 2, (9, 8), 5, (3, 3), (3, 3), state_hw=(5, 4))
    attrs = dict(vk_padding="same", vk_strides=[2, 2], vk_dilations=[1, 1], vk_return_sequences=0,
                 vk_activation="tanh", vk_recurrent_activation="hard_sigmoid")
    expected = reference(x, k, u, b, strides=(2, 2), return_sequences=False,
                         recurrent_activation="hard_sigmoid", initial_state=state)
    model = _node_model(x, k, u, b, runtime_weights=runtime_weights, with_state=True,
                        out_shape=expected.shape, **attrs)
    with cv_plugin.read_net(model) as net:
        feeds = {"x": x, "h0": state[0], "c0": state[1]}
        if runtime_weights:
            feeds.update(kernel=k, recurrent_kernel=u, bias=b)
        for name, value in feeds.items():
            net.setInput(value, name)
        assert_close(net.forward(), expected, REL)
        if runtime_weights:  # new runtime weights reach the device copy
            net.setInput(-k, "kernel")
            assert_close(net.forward(), reference(x, -k, u, b, strides=(2, 2), return_sequences=False,
                                                  recurrent_activation="hard_sigmoid", initial_state=state),
                         REL)
        assert list(net.vulkan_forwards().values()) == [2 if runtime_weights else 1]


@needs_opencv
@pytest.mark.parametrize("with_state", [True, False], ids=["h0-c0", "no-state"])
def test_cv2_plain_readnet_of_the_vkconv_node(with_state, tmp_path):
    """The vkconv domain through plain cv2.dnn.readNet after register(): the layer takes its
    weights from the blobs OpenCV hands over (bias as (4F, 1))."""
    from cv_plugin import compat

    x, k, u, b, state = _arrays(5, 2, 3, 2, (9, 8), 5, (3, 3), (3, 3), state_hw=(5, 4))
    attrs = dict(vk_padding="same", vk_strides=[2, 2], vk_dilations=[1, 1], vk_return_sequences=1,
                 vk_activation="tanh", vk_recurrent_activation="sigmoid")
    expected = reference(x, k, u, b, strides=(2, 2), return_sequences=True,
                         initial_state=state if with_state else None)
    model = _node_model(x, k, u, b, with_state=with_state, out_shape=expected.shape, **attrs)
    path = tmp_path / "conv_lstm.onnx"
    path.write_bytes(model.SerializeToString())
    cv_plugin.register()
    net = compat.cv2_module().dnn.readNet(str(path))
    net.setInput(x, "x")
    if with_state:
        net.setInput(state[0], "h0")
        net.setInput(state[1], "c0")
    assert_close(np.array(net.forward()), expected, REL)


@needs_opencv
def test_cv2_layer_bad_attribute_fails_at_load():
    x, k, u, b, _ = _arrays(0, 1, 2, 2, (4, 4), 3, (3, 3), (3, 3))
    model = _node_model(x, k, u, b, out_shape=(1, 2, 3, 4, 4), vk_padding="full")
    with pytest.raises(ValueError, match="vk_padding"):
        cv_plugin.read_net(model)


def test_device_graph_step_with_state_made_and_read_again_in_the_graph():
    """vkconv.ConvLSTM2D as a step of a vkconv.graph.Graph: c0 is made in the graph (Tanh) and read
    again after the LSTM, so the LSTM's plan must leave its state inputs as they were."""
    x, k, u, b, (h0, c_in) = _arrays(6, 2, 3, 2, (7, 6), 5, (3, 3), (3, 3), state_hw=(4, 3))
    attrs = dict(vk_padding="same", vk_strides=[2, 2], vk_return_sequences=0, vk_recurrent_activation="hard_sigmoid")
    nodes = [helper.make_node("Tanh", ["c_in"], ["c0"]),
             helper.make_node("ConvLSTM2D", ["x", "k", "u", "b", "h0", "c0"], ["y"], domain="vkconv", **attrs),
             helper.make_node("Add", ["y", "c0"], ["z"])]
    c0 = np.tanh(c_in.astype(np.float64))
    expected = reference(x, k, u, b, strides=(2, 2), return_sequences=False, recurrent_activation="hard_sigmoid",
                         initial_state=(h0, c0))
    with Graph(nodes, {"k": k, "u": u, "b": b}, outputs=["y", "z"]) as g:
        assert [n.op_type for n, _, _ in g.steps] == ["Elementwise", "ConvLSTM2D", "Elementwise"]
        for _ in range(2):  # the second run replays the recorded plan
            out = g({"x": x, "h0": h0, "c_in": c_in})
            assert_close(out["y"], expected, REL)
            assert_close(out["z"], expected + c0, REL)
        with pytest.raises(ValueError, match=r"initial_state\[0\] \(h0\): expected shape \(2, 5, 4, 3\)"):
            g({"x": x, "h0": h0[:, :, :3], "c_in": c_in})


def test_support_matrix_takes_the_vkconv_node():
    """The vkconv-domain node with constant weights runs in device graphs; a ConvLSTM2D of another
    domain, runtime weights or half an initial state do not."""
    _, k, u, b, _ = _arrays(0, 1, 2, 2, (4, 4), 3, (3, 3), (3, 3))
    consts = {"k": k, "u": u, "b": b}
    node = lambda *ins, domain="vkconv", **a: helper.make_node("ConvLSTM2D", list(ins), ["y"], domain=domain, **a)  # noqa: E731
    assert unsupported_reason(node("x", "k", "u", "b"), consts, {"x": 5}) is None
    assert unsupported_reason(node("x", "k", "u", "b", "h0", "c0"), consts, {"x": 5}) is None
    assert "domain ''" in unsupported_reason(node("x", "k", "u", "b", domain=""), consts, {"x": 5})
    assert "constants" in unsupported_reason(node("x", "kx", "u", "b"), consts, {"x": 5})
    assert "h0 and c0" in unsupported_reason(node("x", "k", "u", "b", "h0"), consts, {"x": 5})
    assert "rank" in unsupported_reason(node("x", "k", "u", "b"), consts, {"x": 4})
    assert "vk_padding" in unsupported_reason(node("x", "k", "u", "b", vk_padding="full"), consts, {"x": 5})


# -- Keras ------------------------------------------------------------------------------------------
def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as exc:
        return None, f"keras is not installed ({exc}): pip install 'vkconv[keras]' (torch==2.13.0 keras)"
    return keras, None


keras, KERAS_PROBLEM = _keras()
needs_keras = pytest.mark.skipif(KERAS_PROBLEM is not None, reason=f"{KERAS_PROBLEM}")


def _keras_run(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


KERAS_LAYER_CASES = [
    dict(filters=5, kernel_size=3, padding="same"),
    dict(filters=17, kernel_size=3, padding="same", frame=(7, 5)),  # H*W odd, filters past a whole tile
    dict(filters=9, kernel_size=(1, 3), padding="valid", strides=(2, 1), frame=(5, 6), batch=3),
    dict(filters=4, kernel_size=(3, 2), padding="valid", strides=2, recurrent_activation="hard_sigmoid"),
    dict(filters=3, kernel_size=4, padding="same", strides=2, activation="relu"),
    dict(filters=6, kernel_size=3, padding="same", dilation_rate=2, return_sequences=False,
         use_bias=False),
]


@needs_keras
@pytest.mark.parametrize("config", KERAS_LAYER_CASES,
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_matches_keras_layer(config, with_state):
    config = dict(config)
    return_sequences = config.pop("return_sequences", True)
    frame, batch = config.pop("frame", (9, 8)), config.pop("batch", 2)
    layer = keras.layers.ConvLSTM2D(return_sequences=return_sequences, **config)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((batch, 3, *frame, 3)).astype(np.float32)  # Keras layout N, T, H, W, C
    layer.build(x.shape)
    layer.set_weights([(0.3 * rng.standard_normal(w.shape)).astype(np.float32) for w in layer.get_weights()])
    cell = layer.cell
    kernel, recurrent = (keras.ops.convert_to_numpy(w) for w in (cell.kernel, cell.recurrent_kernel))
    bias = keras.ops.convert_to_numpy(cell.bias) if cell.use_bias else None
    state_shape = layer.compute_output_shape(x.shape)
    state_shape = (batch, *(state_shape[2:] if return_sequences else state_shape[1:]))  # N, H', W', F
    state = [rng.standard_normal(state_shape).astype(np.float32) for _ in range(2)] if with_state else None
    expected = np.asarray(keras.ops.convert_to_numpy(layer(x, initial_state=state)))
    got = vkconv.conv_lstm2d(
        np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3)), kernel, recurrent, bias,
        padding=config["padding"], strides=config.get("strides", 1), dilation=config.get("dilation_rate", 1),
        return_sequences=return_sequences, activation=config.get("activation", "tanh"),
        recurrent_activation=config.get("recurrent_activation", "sigmoid"),
        initial_state=None if state is None else tuple(np.ascontiguousarray(s.transpose(0, 3, 1, 2))
                                                      for s in state))
    assert_close(np.moveaxis(got, -3, -1), expected, REL)


@needs_keras
@needs_opencv
def test_converted_model_with_every_supported_layer_matches_keras():
    layers = keras.layers
    model = keras.Sequential([
        layers.Input((3, 9, 10, 2)),
        layers.ConvLSTM2D(5, 3, padding="valid", strides=2, recurrent_activation="hard_sigmoid"),
        layers.BatchNormalization(), layers.ReLU(max_value=6.0),
        layers.Conv2D(4, 2, padding="same", strides=2, activation="hard_sigmoid"),
        layers.LeakyReLU(0.1), layers.Activation("tanh"),
        layers.Conv2D(3, 3, padding="same", activation="swish"),
        layers.Activation("elu")])
    conv1d = keras.Sequential([layers.Input((12, 3)),
                               layers.Conv1D(4, 3, padding="same", strides=2, activation="softplus")])
    any_size = keras.Sequential([layers.Input((None, None, 3)),  # "same" pads depend on the size
                                 layers.Conv2D(2, 3, padding="same", strides=2, activation="softsign")])
    rng = np.random.default_rng(7)
    for seed, (m, x, routed) in enumerate([(model, rng.standard_normal((2, 3, 9, 10, 2)), 3),
                                           (conv1d, rng.standard_normal((2, 12, 3)), 1),
                                           (any_size, rng.standard_normal((1, 9, 8, 3)), 1)]):
        randomize_weights(m, seed)
        x = x.astype(np.float32)
        with cv_plugin.read_net(to_onnx(m)) as net:
            net.setInput(x)
            assert_close(net.forward(), _keras_run(m, x), REL)
            assert len(net.vulkan_forwards()) == routed  # ConvLSTM2D and the convolutions


@needs_keras
@needs_opencv
def test_converted_channels_first_model_and_dynamic_time_steps():
    layers = keras.layers
    inp = layers.Input((None, 2, 9, 10))  # N, T, C, H, W: any number of frames
    y = layers.ConvLSTM2D(5, 3, padding="same", data_format="channels_first", return_sequences=True)(inp)
    y = layers.BatchNormalization(axis=2)(y)
    y = layers.ConvLSTM2D(4, 3, padding="valid", data_format="channels_first")(y)  # N, F, H', W'
    y = layers.Conv2D(3, 3, padding="same", strides=2, data_format="channels_first")(y)
    model = keras.Model(inp, y)
    randomize_weights(model, 8)
    with cv_plugin.read_net(to_onnx(model)) as net:
        for steps in (2, 4):
            x = np.random.default_rng(steps).standard_normal((1, steps, 2, 9, 10)).astype(np.float32)
            net.setInput(x)
            assert_close(net.forward(), _keras_run(model, x), REL)


@needs_keras
def test_converter_refuses_what_it_cannot_convert():
    layers = keras.layers
    with pytest.raises(ValueError, match="go_backwards"):
        to_onnx(keras.Sequential([layers.Input((3, 8, 8, 1)),
                                                  layers.ConvLSTM2D(4, 3, go_backwards=True)]))
    with pytest.raises(ValueError, match="Flatten"):
        to_onnx(keras.Sequential([layers.Input((3, 8, 8, 1)), layers.Flatten()]))
    with pytest.raises(ValueError, match="gelu"):
        to_onnx(keras.Sequential([layers.Input((8, 8, 1)), layers.Activation("gelu")]))
    with pytest.raises(ValueError, match="built Keras model"):
        to_onnx(keras.Sequential([layers.ConvLSTM2D(4, 3)]))


@needs_keras
@needs_opencv
def test_next_frame_model_through_cv2_matches_keras():
    model = next_frame_model(seed=9)
    frames = (np.random.default_rng(10).uniform(size=(1, 10, 40, 40, 1)) > 0.8).astype(np.float32)
    expected = _keras_run(model, frames)
    proto = to_onnx(model)
    with cv_plugin.read_net(proto) as net:
        net.setInput(frames)
        got = net.forward()
        assert sorted(net.vulkan_forwards().values()) == [1, 1, 1, 1]  # 3 ConvLSTM2D + the Conv3D
    assert got.shape == (1, 10, 40, 40, 1)
    assert_close(got, expected, REL)
