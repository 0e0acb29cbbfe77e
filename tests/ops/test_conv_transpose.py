"""ONNX ConvTranspose on the device (vkconv.conv_transpose / vkconv.ConvTranspose).

Oracles:
- the ONNX conformance cases (onnx-node ``test_convtranspose*``, onnx-pytorch ``test_ConvTranspose2d*``);
- ``scatter_reference`` below, written from the opset-22 specification text: each input pixel i adds
  ``x[i] * w[k]`` at output ``i * stride + k * dilation - pad_begin``, in float64;
- ``onnx.reference`` for group == 1 without ``output_shape``, and onnxruntime for group > 1 with explicit
  pads: the cases where each follows the specification (onnx.reference slices grouped weights along
  the wrong axis and ignores the pad split of ``output_shape``; onnxruntime refuses an ``output_shape``
  above the natural size and splits SAME_* padding the other way round).
Tolerance everywhere: max abs error <= 1e-4 x max |expected|.
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from oracles import assert_close, onnx_reference, onnxruntime_reference

import vkconv
from vkconv.ops.conv_transpose import TransposeCandidate

CT = importlib.import_module("vkconv.ops.conv_transpose")  # the module; vkconv.conv_transpose is the function

NODE_CASES = [
    "test_convtranspose", "test_convtranspose_1d", "test_convtranspose_3d",
    "test_convtranspose_autopad_same", "test_convtranspose_dilations", "test_convtranspose_group_2",
    "test_convtranspose_group_2_image_3", "test_convtranspose_kernel_shape",
    "test_convtranspose_output_shape", "test_convtranspose_pad", "test_convtranspose_pads",
]
PYTORCH_CASES = ["test_ConvTranspose2d"]


# -- independent reference, from the specification ------------------------------------------------
def spec_pads(in_spatial, kernel, strides, dilations, output_padding, pads, output_shape, auto_pad):
    """The opset-22 pad equations, written out again here (not vkconv.kernels.shapes)."""
    n = len(kernel)
    if output_shape is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        output_shape = [size * s for size, s in zip(in_spatial, strides)]
    if output_shape is None:
        return tuple(pads) if auto_pad == "NOTSET" else (0,) * (2 * n)
    begin, end = [], []
    for i in range(n):
        total = (strides[i] * (in_spatial[i] - 1) + output_padding[i]
                 + (kernel[i] - 1) * dilations[i] + 1 - output_shape[i])
        if auto_pad == "SAME_UPPER":
            begin.append(total // 2)
            end.append(total - total // 2)
        else:
            begin.append(total - total // 2)
            end.append(total // 2)
    return tuple(begin + end)


def scatter_reference(x, w, b, strides, dilations, output_padding, pads, group):
    """float64 ConvTranspose with explicit (possibly negative) pads, by scattering every tap."""
    n = x.ndim - 2
    cin_g, cout_g, kernel = x.shape[1] // group, w.shape[1], w.shape[2:]
    out = [strides[i] * (x.shape[2 + i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
           - pads[i] - pads[i + n] for i in range(n)]
    y = np.zeros((x.shape[0], cout_g * group, *out))
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    for g, tap in itertools.product(range(group), itertools.product(*map(range, kernel))):
        cin = slice(g * cin_g, (g + 1) * cin_g)
        with np.errstate(invalid="ignore", over="ignore"):
            contrib = np.einsum("nc...,cm->nm...", x64[:, cin], w64[(cin, slice(None)) + tap])
        src, dst = [slice(None)] * 2, [slice(None), slice(g * cout_g, (g + 1) * cout_g)]
        for i in range(n):
            shift = tap[i] * dilations[i] - pads[i]  # output index of input 0
            lo = max(0, -(shift // strides[i]))
            hi = min(x.shape[2 + i], (out[i] - 1 - shift) // strides[i] + 1)
            src.append(slice(lo, max(lo, hi)))
            dst.append(slice(lo * strides[i] + shift, lo * strides[i] + shift + max(0, hi - lo) * strides[i],
                             strides[i]))
        y[tuple(dst)] += contrib[tuple(src)]
    if b is not None:
        y += b.astype(np.float64).reshape((1, -1) + (1,) * n)
    return y


ACTIVATIONS = {  # ONNX definitions, in float64
    None: lambda v: v,
    "Relu": lambda v: np.maximum(v, 0.0),
    ("Clip", -0.5, 0.75): lambda v: np.clip(v, -0.5, 0.75),
    ("LeakyRelu", 0.2): lambda v: np.where(v < 0, 0.2 * v, v),
    "HardSwish": lambda v: v * np.clip(v / 6.0 + 0.5, 0.0, 1.0),
    ("HardSigmoid", 0.3, 0.4): lambda v: np.clip(0.3 * v + 0.4, 0.0, 1.0),
    "Sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
    "Tanh": np.tanh,
}


# -- conformance ------------------------------------------------------------------------------
def load_case(case_dir):
    """(inputs in node order with initializers filled in, attributes, expected output)."""
    model = onnx.load(str(case_dir / "model.onnx"))
    (node,) = model.graph.node
    assert node.op_type == "ConvTranspose"
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    fed = [i.name for i in model.graph.input if i.name not in values]
    data = case_dir / "test_data_set_0"
    for k, name in enumerate(fed):
        values[name] = numpy_helper.to_array(onnx.load_tensor(str(data / f"input_{k}.pb")))
    expected = numpy_helper.to_array(onnx.load_tensor(str(data / "output_0.pb")))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [values[name] if name else None for name in node.input], attrs, expected


def test_conformance_case_lists_complete(conformance):
    found_node = sorted(p.name for p in (conformance / "onnx-node").glob("test_convtranspose*"))
    found_torch = sorted(p.name for p in (conformance / "onnx-pytorch").glob("test_ConvTranspose2d*"))
    assert found_node == sorted(NODE_CASES)
    assert found_torch == sorted(PYTORCH_CASES)


@pytest.mark.parametrize("suite, case", [("onnx-node", c) for c in NODE_CASES]
                         + [("onnx-pytorch", c) for c in PYTORCH_CASES])
def test_conformance(conformance, suite, case):
    inputs, attrs, expected = load_case(conformance / suite / case)
    kwargs = {}
    for name, value in attrs.items():
        if name == "kernel_shape":  # implied by w; only check that they agree
            assert tuple(value) == inputs[1].shape[2:]
            continue
        kwargs[name] = value.decode() if isinstance(value, bytes) else value
    actual = vkconv.conv_transpose(*inputs, **kwargs)
    assert_close(actual, expected, what=case)


# -- random sweep -----------------------------------------------------------------------------
MODES = ["pads", "output_shape", "SAME_UPPER", "pads", "SAME_LOWER", "VALID", "output_shape"]
ACT_KEYS = list(ACTIVATIONS)


def sweep_case(seed: int) -> dict:
    rng = np.random.default_rng(1000 + seed)
    nd = 1 + seed % 3
    mode = MODES[seed % len(MODES)]
    strides = [int(v) for v in rng.integers(1, 4, nd)]
    case = dict(
        nd=nd, group=int(rng.choice([1, 1, 2, 3])), cin_g=int(rng.integers(1, 7)),
        cout_g=int(rng.integers(1, 10)), batch=int(rng.integers(1, 3)),
        kernel=[int(v) for v in rng.integers(1, 5 if nd < 3 else 4, nd)], strides=strides,
        dilations=[int(v) for v in rng.integers(1, 3, nd)],
        in_spatial=[int(v) for v in rng.integers(1, (12, 9, 5)[nd - 1], nd)],
        output_padding=[int(rng.integers(0, s)) for s in strides],
        pads=[int(v) for v in rng.integers(0, 3, 2 * nd)], auto_pad="NOTSET", output_shape=None,
        activation=ACT_KEYS[seed % len(ACT_KEYS)], bias=seed % 4 != 3)
    if mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        case["auto_pad"] = mode
    elif mode == "output_shape":
        natural = [s * (i - 1) + a + (k - 1) * d + 1 for s, i, a, k, d in zip(
            strides, case["in_spatial"], case["output_padding"], case["kernel"], case["dilations"])]
        case["output_shape"] = [max(1, v + int(rng.integers(-2, 3))) for v in natural]
        case["auto_pad"] = str(rng.choice(["NOTSET", "SAME_UPPER", "SAME_LOWER"]))
    return case


@pytest.mark.parametrize("method", ["gather", "phases"])
@pytest.mark.parametrize("seed", range(42))
def test_random_sweep(monkeypatch, method, seed):
    monkeypatch.setenv("VKCONV_CONVT_METHOD", method)
    check_sweep_case(seed)


@pytest.mark.parametrize("tile", CT.TILES)
def test_every_compiled_tile(monkeypatch, tile):
    """The device picks one tile; force each so that all embedded variants of the gather kernel are
    exercised here."""
    monkeypatch.setattr(CT, "choose_tile", lambda ctx, cout_g: tile)
    monkeypatch.setenv("VKCONV_CONVT_METHOD", "gather")
    for seed in (1, 2, 6, 9, 16):
        check_sweep_case(seed)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 6, 7, 19)).astype(np.float32)
    w = rng.standard_normal((6, 37, 2, 3)).astype(np.float32)  # 37 channels per group: a ragged block
    b = rng.standard_normal(74).astype(np.float32)
    pads = (1, 0, 0, 2)
    actual = vkconv.conv_transpose(x, w, b, strides=(2, 3), pads=pads, group=2, output_padding=(1, 2))
    assert_close(actual, scatter_reference(x, w, b, [2, 3], [1, 1], [1, 2], pads, 2))


def check_sweep_case(seed: int) -> None:
    c = sweep_case(seed)
    rng = np.random.default_rng(seed)
    g = c["group"]
    x = rng.standard_normal((c["batch"], c["cin_g"] * g, *c["in_spatial"])).astype(np.float32)
    w = rng.standard_normal((c["cin_g"] * g, c["cout_g"], *c["kernel"])).astype(np.float32)
    b = rng.standard_normal(c["cout_g"] * g).astype(np.float32) if c["bias"] else None
    pads = spec_pads(c["in_spatial"], c["kernel"], c["strides"], c["dilations"], c["output_padding"],
                     c["pads"], c["output_shape"], c["auto_pad"])
    nd = c["nd"]
    if any(s * (i - 1) + a + (k - 1) * d + 1 - pads[j] - pads[j + nd] < 1 for j, (s, i, a, k, d) in enumerate(
            zip(c["strides"], c["in_spatial"], c["output_padding"], c["kernel"], c["dilations"]))):
        with pytest.raises(ValueError, match="^pads:"):
            vkconv.conv_transpose(x, w, b, strides=c["strides"], pads=c["pads"], auto_pad=c["auto_pad"],
                                  dilations=c["dilations"], group=g, output_padding=c["output_padding"],
                                  output_shape=c["output_shape"])
        return
    raw = scatter_reference(x, w, b, c["strides"], c["dilations"], c["output_padding"], pads, g)
    actual = vkconv.conv_transpose(x, w, b, strides=c["strides"], pads=c["pads"], dilations=c["dilations"],
                                   group=g, output_padding=c["output_padding"],
                                   output_shape=c["output_shape"], auto_pad=c["auto_pad"],
                                   activation=c["activation"])
    assert_close(actual, ACTIVATIONS[c["activation"]](raw), what=f"case {c}")

    # Cross-check the spec reference itself where a library oracle follows the spec.
    attrs = dict(strides=c["strides"], dilations=c["dilations"], group=g,
                 output_padding=c["output_padding"], auto_pad=c["auto_pad"])
    if c["auto_pad"] == "NOTSET":
        attrs["pads"] = c["pads"]
    feeds = {"x": x, "w": w, "b": b}
    if c["output_shape"] is None and g == 1:
        assert_close(raw, onnx_reference("ConvTranspose", feeds, attrs), what="spec vs onnx.reference")
    elif c["output_shape"] is None and c["auto_pad"] == "NOTSET":
        assert_close(raw, onnxruntime_reference("ConvTranspose", feeds, attrs), what="spec vs onnxruntime")


def test_sweep_covers_the_space():
    cases = [sweep_case(s) for s in range(42)]
    assert {c["nd"] for c in cases} == {1, 2, 3}
    assert {c["group"] for c in cases} >= {1, 2, 3}
    assert {s for c in cases for s in c["strides"]} == {1, 2, 3}
    assert {d for c in cases for d in c["dilations"]} == {1, 2}
    assert any(c["pads"][:c["nd"]] != c["pads"][c["nd"]:] and c["auto_pad"] == "NOTSET"
               and c["output_shape"] is None for c in cases)
    assert any(max(c["output_padding"]) > 0 for c in cases)
    assert {c["auto_pad"] for c in cases} == {"NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"}
    assert sum(c["output_shape"] is not None for c in cases) >= 8
    assert {c["activation"] if isinstance(c["activation"], (str, type(None))) else c["activation"][0]
            for c in cases} == {None, "Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid",
                                "Tanh"}


@pytest.mark.parametrize("k, s, p, a", [(4, 4, 0, 0), (3, 2, 1, 1), (2, 2, 0, 0)])
def test_decoder_shapes_against_onnxruntime(k, s, p, a):
    """Typical upsampling layers, large enough for many workgroups and 4-channel blocks."""
    rng = np.random.default_rng(k * 10 + s)
    x = rng.standard_normal((2, 24, 13, 11)).astype(np.float32)
    w = (rng.standard_normal((24, 10, k, k)) / 10).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    attrs = dict(strides=[s, s], pads=[p] * 4, output_padding=[a, a])
    expected = onnxruntime_reference("ConvTranspose", {"x": x, "w": w, "b": b}, attrs)
    actual = vkconv.conv_transpose(x, w, b, strides=s, pads=p, output_padding=a, activation="Relu")
    assert_close(actual, np.maximum(expected, 0))


@pytest.mark.parametrize("x_shape, k, group, act", [
    ((2, 6, 5, 7), (2, 2), 1, None),           # odd output width: one output per invocation
    ((1, 8, 6, 8), (2, 2), 2, "Relu"),         # groups, vec4 stores
    ((1, 24, 20, 20), (2, 2), 1, "Sigmoid"),   # PP-OCR's head shape, scaled down
    ((1, 3, 9), (3,), 1, None),                # 1-D, 3 taps
    ((1, 4, 3, 4, 5), (2, 1, 3), 1, "Tanh"),   # 3-D, unequal strides
    ((1, 5, 4, 4), (1, 1), 1, None),           # 1x1 stride 1: one phase, a plain 1x1 GEMM
    ((1, 2, 3, 8), (1, 3), 1, None),           # vec4 reads of 3 column-tap planes
    ((2, 2, 2, 3, 4), (2, 2, 2), 1, "Relu"),   # 3-D, vec4
])
def test_kernel_equal_to_stride_runs_as_gemm(x_shape, k, group, act):
    """kernel == stride, no padding: the sub-pixel convolution is a 1x1 GEMM, then the shuffle (vec4
    shuffle when the input width is a multiple of 4; all strides 1: the phases' one 1x1 GEMM, no
    shuffle), against onnxruntime."""
    rng = np.random.default_rng(len(x_shape) + sum(k))
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal((x_shape[1], 3, *k)) / 3).astype(np.float32)
    b = rng.standard_normal(3 * group).astype(np.float32)
    expected = onnxruntime_reference("ConvTranspose", {"x": x, "w": w, "b": b}, dict(strides=list(k), group=group))
    expected = {None: expected, "Relu": np.maximum(expected, 0), "Sigmoid": 1 / (1 + np.exp(-expected)),
                "Tanh": np.tanh(expected)}[act]
    with vkconv.ConvTranspose(w, b, strides=k, group=group, activation=act) as op:
        one_phase = all(v == 1 for v in k)
        assert op.method_for(x.shape) == ("phases" if one_phase else "subpixel")
        assert_close(op(x), expected)
        assert_close(op(x), expected)  # replayed
        kernels = op._phase_kernels if one_phase else op._subpixel_kernels
        assert [key[0] for key in kernels] == ["gemm1x1"]
        pads_given = vkconv.ConvTranspose(w, b, strides=k, pads=[1] * (2 * len(k)), group=group)
        assert pads_given.method_for(x.shape) != "subpixel"
        pads_given.close()


def test_infinities_stay_where_they_belong():
    """Inf at the input edges (where the shader clamps addresses) reaches only the outputs that
    depend on it; padded taps of other outputs contribute an exact 0."""
    rng = np.random.default_rng(7)
    for k, s, d, pads in [(3, 1, 1, (0, 0)), (3, 2, 1, (2, 1)), (2, 3, 2, (0, 2)), (4, 2, 1, (3, 3))]:
        x = rng.standard_normal((1, 2, 9)).astype(np.float32)
        x[0, 0, 0] = np.inf
        x[0, 1, -1] = -np.inf
        w = (rng.uniform(0.5, 1.5, (2, 3, k)) * rng.choice([-1, 1], (2, 3, k))).astype(np.float32)
        expected = scatter_reference(x, w, None, [s], [d], [0], pads, 1)
        actual = vkconv.conv_transpose(x, w, strides=s, dilations=d, pads=list(pads))
        finite = np.isfinite(expected)
        assert (~np.isfinite(actual) == ~finite).all(), (k, s, d, pads)
        assert_close(actual[finite], expected[finite])


# -- the stride-phase decomposition ------------------------------------------------------------
PHASE_CASES = [  # x shape, w shape [C_in, C_out/g, *k], strides, pads, output_padding, group, dilations
    ((2, 8, 13, 11), (8, 5, 4, 4), 2, (1, 1, 1, 1), 0, 1, 1),       # k4 s2 p1, batch 2, odd sizes
    ((1, 6, 7, 9), (6, 4, 3, 3), 2, (1, 1, 1, 1), 1, 1, 1),         # k3 s2: 2x2, 2x1, 1x2, 1x1 phases
    ((2, 6, 9, 10), (6, 3, 4, 4), 2, (1, 2, 0, 1), 1, 2, 1),        # groups, asymmetric pads
    ((1, 4, 8, 8), (4, 6, 5, 5), 3, (1, 1, 1, 1), 2, 1, 1),         # stride 3, output_padding 2
    ((1, 6, 5, 7), (6, 4, 3, 3), (3, 2), (0, 1, 2, 0), (1, 1), 3, 1),  # unequal strides, 3 groups
    ((1, 4, 7, 12), (4, 5, 3, 3), 2, (1, 1, 1, 1), 0, 1, 3),        # dilation 3, coprime with 2
    ((2, 3, 10), (3, 4, 5), 3, (2, 1), 1, 1, 2),                    # 1-D, dilation 2 with stride 3
    ((1, 4, 4, 5, 6), (4, 3, 4, 3, 2), 2, (1, 1, 0, 1, 0, 1), (1, 0, 1), 1, 1),  # 3-D
    ((1, 8, 16, 16), (8, 20, 4, 4), 2, (1, 1, 1, 1), 0, 1, 1),      # width % 4 == 0: read in place
    ((1, 4, 9, 9), (4, 3, 3, 3), 2, (3, 4, 2, 3), 0, 1, 1),         # pads beyond the kernel: crops
    ((1, 4, 8, 12), (4, 5, 4, 4), 2, (5, 1, 2, 6), 1, 1, 1),        # the same, input read in place
    ((1, 8, 6, 7), (8, 1, 4, 4), 2, (1, 1, 1, 1), 1, 8, 1),         # one channel per group
    ((1, 64, 10, 12), (64, 32, 3, 3), 1, (1, 1, 1, 1), 0, 1, 1),    # stride 1: one phase (Winograd)
    ((1, 8, 9, 9), (8, 1, 3, 3), 1, (0, 0, 0, 0), 0, 8, 1),         # stride 1, depthwise
]


@pytest.mark.parametrize("path", ["phases", "subpixel"])
@pytest.mark.parametrize("x_shape, w_shape, s, pads, a, group, d", PHASE_CASES)
def test_phases_against_onnxruntime_and_gather(x_shape, w_shape, s, pads, a, group, d, path):
    """Both stride-phase paths (one convolution per phase; the sub-pixel convolution and its
    shuffle), forced, against onnxruntime (explicit pads) and against the gather kernel."""
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    nd = len(x_shape) - 2
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal(w_shape) / 4).astype(np.float32)
    b = rng.standard_normal(w_shape[1] * group).astype(np.float32)
    per_axis = [[v] * nd if isinstance(v, int) else list(v) for v in (s, a, d)]
    attrs = dict(strides=per_axis[0], pads=list(pads), output_padding=per_axis[1], dilations=per_axis[2],
                 group=group)
    expected = onnxruntime_reference("ConvTranspose", {"x": x, "w": w, "b": b}, attrs)
    kwargs = dict(strides=s, pads=pads, output_padding=a, group=group, dilations=d, activation="Relu")
    with vkconv.ConvTranspose(w, b, method=TransposeCandidate(path), **kwargs) as op:
        assert op.method_for(x.shape) == path
        actual = op(x)
        assert_close(actual, np.maximum(expected, 0))
        assert_close(op(x), actual)  # replayed
        assert op._gather is None  # the gather kernel's weight copy is made only where it runs
        if path == "phases" and all(v == 1 for v in per_axis[0]):  # the kernel a Conv of this shape takes
            (name, *_), = op._phase_kernels
            assert name == ("depthwise" if w_shape[1] == 1 else "winograd")
    with vkconv.ConvTranspose(w, b, method="gather", **kwargs) as op:
        assert op.method_for(x.shape) == "gather"
        assert_close(actual, op(x), what="phases vs gather")


@pytest.mark.parametrize("cin, cout, k, s, p, size, path", [
    (128, 32, 4, 2, 1, (13, 11), "subpixel"),  # 4 phases x 2.25 = 9 multiplications per output of 16 taps
    (128, 16, 4, 2, 1, (8, 12), "subpixel"),   # input width % 4 == 0
    (64, 32, 4, 2, 1, (13, 11), "phases"),     # 64 input channels: the phases
    (128, 64, 5, 3, 1, (9, 10), "phases"),     # 9 phases: left to the tuner
    (128, 32, 5, 2, 2, (15, 20), "subpixel"),  # taps 3 and 2 per axis: 9 of 25
    (128, 16, 4, 2, 1, (112, 114), "subpixel"),  # >= 112: Winograd F(6,3)
])
def test_auto_takes_the_subpixel_winograd_where_it_saves_multiplications(monkeypatch, cin, cout, k, s, p, size, path):
    """The heuristic rule's Winograd case on a CPU device, against onnxruntime (Winograd's float32
    error is about 1e-5 x max|y|, inside the suite's 1e-4), batch 2 and odd sizes."""
    monkeypatch.setenv("VKCONV_TUNE", "0")
    rng = np.random.default_rng(cin + k)
    x = rng.standard_normal((2, cin, *size)).astype(np.float32)
    w = (rng.standard_normal((cin, cout, k, k)) / 8).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    expected = onnxruntime_reference("ConvTranspose", {"x": x, "w": w, "b": b}, dict(strides=[s, s], pads=[p] * 4))
    with vkconv.ConvTranspose(w, b, strides=s, pads=p) as op:
        if vkconv.get_context().info.type == "cpu":
            assert op.method_for(x.shape) == path
        assert_close(op(x), expected)
        if op.method_for(x.shape) == "subpixel":
            (name, *_), = op._subpixel_kernels
            assert name == ("winograd63" if min(size) >= 112 else "winograd")


def test_phases_with_output_shape_and_auto_pad():
    """output_shape above the natural size (negative ONNX pads: extra outputs of bias only) and
    SAME_LOWER, against the specification's scatter."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 5, 6, 7)).astype(np.float32)
    w = rng.standard_normal((5, 4, 4, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    for kwargs in (dict(output_shape=(15, 17)), dict(output_shape=(11, 12), auto_pad="SAME_UPPER"),
                   dict(auto_pad="SAME_LOWER"), dict(auto_pad="VALID", output_padding=1)):
        with vkconv.ConvTranspose(w, b, strides=2, method="phases", **kwargs) as op:
            assert op.method_for(x.shape) == "phases"
            pads = op.resolved_pads(x.shape)
            a = kwargs.get("output_padding", 0)
            assert_close(op(x), scatter_reference(x, w, b, [2, 2], [1, 1], [a, a], pads, 1), what=str(kwargs))


@pytest.mark.parametrize("k, s, d, method", [
    (4, 2, 1, "phases"), (3, 2, 1, "phases"), (5, 3, 2, "phases"), (3, 1, 2, "phases"),
    (2, 2, 1, "subpixel"),  # kernel == stride: the sub-pixel convolution is a 1x1 GEMM
    (3, 2, 2, "gather"),    # dilation and stride share a factor: odd phases get no tap
    (2, 3, 1, "gather"),    # kernel shorter than the stride: a phase with no tap
])
def test_method_choice(monkeypatch, k, s, d, method):
    x_shape = (1, 4, 6, 6)
    w = np.ones((4, 2, k, k), np.float32)
    with vkconv.ConvTranspose(w, strides=s, dilations=d, method="phases") as op:
        assert op.method_for(x_shape) == method
    with vkconv.ConvTranspose(w, strides=s, dilations=d, method="gather") as op:
        assert op.method_for(x_shape) == "gather"
    ctx = vkconv.get_context()
    monkeypatch.setenv("VKCONV_TUNE", "0")  # the heuristic rule, whatever a tuning cache holds
    with vkconv.ConvTranspose(w, strides=s, dilations=d) as op:  # auto
        assert op.method == "auto"
        assert op.method_for(x_shape) == (method if ctx.info.type == "cpu" or method == "subpixel" else "gather")
        assert op.choice_for(x_shape).source == "heuristic"
    # on a GPU, auto keeps the gather kernel wherever the sub-pixel rule does not apply (a new op:
    # an op chooses once per input shape)
    monkeypatch.setattr(ctx, "info", dataclasses.replace(ctx.info, type="discrete"))
    with vkconv.ConvTranspose(w, strides=s, dilations=d) as op:
        assert op.method_for(x_shape) == ("subpixel" if method == "subpixel" else "gather")
    monkeypatch.undo()
    monkeypatch.setenv("VKCONV_CONVT_METHOD", "gather")
    with vkconv.ConvTranspose(w, strides=s, dilations=d) as op:
        assert op.method == "gather" and op.method_for(x_shape) == "gather"
    monkeypatch.setenv("VKCONV_CONVT_METHOD", "quick")
    with pytest.raises(ValueError, match="^method: .*'quick'"):
        vkconv.ConvTranspose(w, strides=s, dilations=d)


def test_phases_cover_the_sweep():
    """Most of the random sweep takes the phases; the rest (shared dilation/stride factors, kernels
    shorter than the stride) is the gather kernel's, so the sweep tests both."""
    methods = []
    for seed in range(42):
        c = sweep_case(seed)
        w = np.zeros((c["cin_g"] * c["group"], c["cout_g"], *c["kernel"]), np.float32)
        x_shape = (c["batch"], c["cin_g"] * c["group"], *c["in_spatial"])
        with vkconv.ConvTranspose(w, strides=c["strides"], pads=c["pads"], dilations=c["dilations"],
                                  group=c["group"], output_padding=c["output_padding"],
                                  output_shape=c["output_shape"], auto_pad=c["auto_pad"], method="phases") as op:
            try:
                methods.append(op.method_for(x_shape))
            except ValueError:  # pads cropping the whole output: check_sweep_case expects that
                continue
    assert methods.count("phases") >= 15 and methods.count("gather") >= 3, methods


# -- the resident-weights class -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["gather", "phases"])
def test_class_reuses_plans_and_weights(method):
    """One submit per call; the gather kernel's pipeline is made with the op, the phases' dense
    kernels' pipelines with the first plan of a shape; a plan is recorded once per shape."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    ctx = vkconv.get_context()
    live = ctx.live.copy()
    with vkconv.ConvTranspose(w, b, strides=2, pads=(1, 0, 0, 1), group=2, output_padding=1, method=method) as op:
        seen = set()
        for shape in [(1, 6, 5, 7), (3, 6, 4, 4), (1, 6, 5, 7)]:
            x = rng.standard_normal(shape).astype(np.float32)
            assert op.method_for(shape) == method
            before = ctx.stats.copy()
            y = op(x)
            assert ctx.stats["submits"] - before["submits"] == 1
            if method == "gather" or shape in seen:
                assert ctx.stats["pipelines_created"] == before["pipelines_created"]
            seen.add(shape)
            assert y.shape == op.output_shape(shape)
            pads = op.resolved_pads(shape)
            assert pads == (1, 0, 0, 1)
            assert_close(y, scatter_reference(x, w, b, [2, 2], [1, 1], [1, 1], pads, 2))
        w2 = rng.standard_normal(w.shape).astype(np.float32)
        op.set_weights(w2)
        assert_close(op(x), scatter_reference(x, w2, None, [2, 2], [1, 1], [1, 1], pads, 2))
        with pytest.raises(ValueError, match="^w:"):
            op.set_weights(w2[:, :4])
    # everything but the pipelines (cached by the context for later ops) is freed with the op
    live.pop("pipeline")
    assert {k: n for k, n in ctx.live.items() if k != "pipeline"} == live


def test_output_shape_attribute_and_resolved_pads():
    w = np.ones((1, 1, 3, 3), np.float32)
    op = vkconv.ConvTranspose(w, strides=(3, 2), output_shape=(10, 8))
    assert op.output_shape((1, 1, 3, 3)) == (1, 1, 10, 8)
    assert op.resolved_pads((1, 1, 3, 3)) == (0, 0, -1, -1)  # one extra row/column at the end
    op.close()
    op = vkconv.ConvTranspose(w, strides=2, auto_pad="SAME_LOWER")
    assert op.output_shape((2, 1, 5, 4)) == (2, 1, 10, 8)
    assert op.resolved_pads((2, 1, 5, 4)) == (1, 1, 0, 0)
    op.close()


def test_zero_batch():
    w = np.ones((4, 3, 2, 2), np.float32)
    y = vkconv.conv_transpose(np.zeros((0, 4, 5, 5), np.float32), w, strides=2)
    assert y.shape == (0, 3, 10, 10) and y.dtype == np.float32


# -- bad input ----------------------------------------------------------------------------------
X2 = np.zeros((1, 4, 5, 5), np.float32)
W2 = np.zeros((4, 3, 3, 3), np.float32)


@pytest.mark.parametrize("args, kwargs, name", [
    ((np.zeros((1, 4, 5), np.float32), W2), {}, "w"),                        # rank mismatch
    ((np.zeros((4, 5, 5), np.float32), np.zeros((4, 3, 3), np.float32)), {}, "x"),  # channels
    ((np.zeros((1, 1, 1, 4, 5, 5), np.float32), W2), {}, "x"),             # rank 6
    ((X2, np.zeros((4, 3), np.float32)), {}, "w"),                         # rank 2 weights
    ((np.zeros((1, 5, 5, 5), np.float32), W2), {}, "x"),                   # C_in mismatch
    ((X2.astype(np.float64), W2), {}, "x"),
    ((X2, W2.astype(np.float16)), {}, "w"),
    ((X2.tolist(), W2), {}, "x"),
    ((X2, W2, np.zeros(4, np.float32)), {}, "b"),
    ((X2, W2, np.zeros(3, np.int32)), {}, "b"),
    ((X2, W2), {"output_padding": 2, "strides": 2}, "output_padding"),
    ((X2, W2), {"output_padding": 1}, "output_padding"),
    ((X2, W2), {"output_padding": -1, "strides": 2}, "output_padding"),
    ((X2, W2), {"strides": 0}, "strides"),
    ((X2, W2), {"strides": (1, 2, 3)}, "strides"),
    ((X2, W2), {"dilations": (0, 1)}, "dilations"),
    ((X2, W2), {"pads": (1, -1, 0, 0)}, "pads"),
    ((X2, W2), {"pads": (1, 1, 1)}, "pads"),
    ((X2, W2), {"pads": 4}, "pads"),                                       # crops everything
    ((X2, W2), {"group": 3}, "w"),
    ((X2, W2), {"group": 0}, "group"),
    ((X2, W2), {"group": 1.5}, "group"),
    ((X2, W2), {"auto_pad": "SAME"}, "auto_pad"),
    ((X2, W2), {"output_shape": (10,)}, "output_shape"),
    ((X2, W2), {"output_shape": (0, 4)}, "output_shape"),
    ((X2, W2), {"activation": "Softmax"}, "activation"),
    ((X2, W2), {"method": "fast"}, "method"),
    ((np.zeros((1, 4, 0, 5), np.float32), W2), {}, "x"),
])
def test_bad_input(args, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        vkconv.conv_transpose(*args, **kwargs)


def test_zero_channels_follow_onnx():
    """No input channels: every output is the bias (then the activation); no output channels: empty."""
    b = np.array([0.5, -2.0, 1.5], np.float32)
    y = vkconv.conv_transpose(np.zeros((2, 0, 3, 4), np.float32), np.zeros((0, 3, 2, 2), np.float32), b,
                              strides=2, activation="Relu")
    expected = onnxruntime_reference("ConvTranspose", {"x": np.zeros((2, 0, 3, 4), np.float32),
                                                       "w": np.zeros((0, 3, 2, 2), np.float32), "b": b},
                                     {"strides": [2, 2]})
    assert_close(y, np.maximum(expected, 0))
    y = vkconv.conv_transpose(X2, np.zeros((4, 0, 3, 3), np.float32))
    assert y.shape == (X2.shape[0], 0, *y.shape[2:]) and y.size == 0


def test_closed_context_is_refused():
    ctx = vkconv.Context()
    w = np.ones((4, 3, 2, 2), np.float32)
    x = np.ones((1, 4, 5, 5), np.float32)
    op = vkconv.ConvTranspose(w, strides=2, ctx=ctx)
    assert_close(op(x), scatter_reference(x, w, None, [2, 2], [1, 1], [0, 0], (0,) * 4, 1))
    ctx.close()
    assert all(n == 0 for n in ctx.live.values()), ctx.live
    with pytest.raises(vkconv.VkconvError, match="closed"):
        op(x)  # the plan recorded before the close
    with pytest.raises(vkconv.VkconvError, match="closed"):
        vkconv.ConvTranspose(w, ctx=ctx)
    op.close()
