"""Hypothesis fuzzing of the public numpy ops (and of one-node models with omitted optional inputs
through cv2.dnn): every generated case must end in a result equal to onnxruntime's, or in a
ValueError / VkconvError naming the bad argument — never a crash, a hang (pytest-timeout plus
VKCONV_TIMEOUT) or a silent wrong answer.

Inputs cover zero-size and mismatched shapes, wrong ranks, NaN/Inf, wrong dtypes, non-contiguous and
read-only arrays, negative or oversized attributes, groups that do not divide the channels and
kernels larger than the input.  Failures hypothesis finds are kept below as ``@example`` regression
cases.  Tolerance: max abs diff <= 1e-4 x max |expected| (NaN and Inf must match exactly).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from oracles import onnxruntime_reference

import vkconv

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# Refusals that are documented choices rather than invalid ONNX: onnxruntime would accept these.
DOCUMENTED_REFUSALS = ("dtype must be float32", "expected a numpy.ndarray",
                       "spatial dimensions must be >= 1")  # ConvTranspose of an empty input


@st.composite
def conv_case(draw, transpose: bool):
    nd = draw(st.sampled_from([1, 2, 2, 3] if transpose else [1, 2, 2]))
    rank_x = nd + 2 + draw(st.sampled_from([0] * 12 + [-1, 1]))
    rank_w = nd + 2 + draw(st.sampled_from([0] * 12 + [-1, 1]))
    group = draw(st.sampled_from([1, 1, 1, 2, 3, 4]))
    cin = draw(st.integers(0, 6)) * (group if draw(st.integers(0, 9)) else 1) or draw(st.integers(0, 1))
    cout_g = draw(st.integers(0, 4))
    kernel = [draw(st.integers(1, 5)) for _ in range(nd)]
    spatial = [draw(st.integers(0, 9)) for _ in range(nd)]
    batch = draw(st.integers(0, 2))
    if transpose:
        w_shape = [cin, cout_g] + kernel
    else:
        w_shape = [cout_g * group, max(cin // group, 0) + draw(st.sampled_from([0] * 10 + [1]))] + kernel
    x_shape = [batch, cin] + spatial
    x_shape = (x_shape + [3] * 3)[:rank_x]
    w_shape = (w_shape + [2] * 3)[:rank_w]
    attr = st.integers(-1, 3)
    case = {
        "x_shape": x_shape, "w_shape": w_shape, "group": group,
        "strides": draw(st.sampled_from([1, 2]) | st.lists(attr, min_size=nd, max_size=nd)),
        "dilations": draw(st.sampled_from([1]) | st.lists(attr, min_size=nd, max_size=nd)),
        "pads": draw(st.sampled_from([0, 1]) | st.lists(attr, min_size=2 * nd, max_size=2 * nd)),
        "bias": draw(st.sampled_from(["none", "ok", "ok", "wrong"])),
        "dtype": draw(st.sampled_from(["float32"] * 12 + ["float64", "int32", "float16"])),
        "layout": draw(st.sampled_from(["contiguous"] * 6 + ["strided", "readonly", "list"])),
        "special": draw(st.sampled_from([None] * 8 + ["nan", "inf"])),
        "activation": draw(st.sampled_from([None] * 6 + ["Relu", ("Clip", -0.5, 0.5), ("LeakyRelu", 0.1),
                                                         "HardSwish", "Sigmoid", "Bogus"])),
        "seed": draw(st.integers(0, 2**16)),
    }
    if transpose:
        case["output_padding"] = draw(st.sampled_from([0, 0, 0, 1]))
    return case


def _arrays(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal(case["x_shape"]).astype(np.float32)
    w = rng.standard_normal(case["w_shape"]).astype(np.float32)
    if case["special"] and x.size:
        x.reshape(-1)[rng.integers(0, x.size)] = np.nan if case["special"] == "nan" else np.inf
    cout = (case["w_shape"][1] * case["group"] if case.get("transpose") else case["w_shape"][0]) \
        if len(case["w_shape"]) > 1 else 1
    b = {"none": None, "ok": rng.standard_normal(cout).astype(np.float32),
         "wrong": rng.standard_normal(cout + 1).astype(np.float32)}[case["bias"]]
    return x, w, b


def _present(x: np.ndarray, case):
    """``x`` in the dtype / memory layout the case asks for (values unchanged)."""
    if case["dtype"] != "float32":
        x = x.astype(case["dtype"])
    if case["layout"] == "strided":
        big = np.repeat(x, 2, axis=-1) if x.ndim else x
        x = big[..., ::2] if x.ndim else x
    elif case["layout"] == "readonly":
        x = x.copy()
        x.setflags(write=False)
    elif case["layout"] == "list":
        return x.tolist()
    return x


def _reference(op: str, x, w, b, attrs):
    inputs = {"x": x, "w": w, "b": b}
    try:
        return onnxruntime_reference(op, inputs, attrs, opset=17), None
    except Exception as exc:  # noqa: BLE001 - the oracle refusing the case is information
        return None, exc


def _onnx_attrs(case, nd):
    def ints(v, n):
        return [int(v)] * n if isinstance(v, int) else list(v)
    pads = case["pads"]
    pads = ints(pads, 2 * nd) if isinstance(pads, int) else list(pads)
    attrs = {"strides": ints(case["strides"], nd), "dilations": ints(case["dilations"], nd),
             "pads": pads, "group": case["group"]}
    if "output_padding" in case:
        attrs["output_padding"] = [case["output_padding"]] * nd
    return attrs


def _check(op: str, fn, case):
    x, w, b = _arrays(case)
    nd = max(len(case["w_shape"]) - 2, 1)
    kwargs = dict(strides=case["strides"], pads=case["pads"], dilations=case["dilations"],
                  group=case["group"], activation=case["activation"])
    if "output_padding" in case:
        kwargs["output_padding"] = case["output_padding"]
    try:
        out = fn(_present(x, case), w, b, **kwargs)
        error = None
    except (ValueError, vkconv.VkconvError) as exc:
        out, error = None, exc
    # Anything else (TypeError, IndexError, a cffi error...) propagates and fails the case.
    if error is not None:
        message = str(error)
        assert re.match(r"^(x|w|b|strides|pads|dilations|group|activation|output_padding)\b", message) \
            or "maxStorageBufferRange" in message, f"error does not name the argument: {message!r}"
        if any(r in message for r in DOCUMENTED_REFUSALS) or case["activation"] == "Bogus":
            return
    act = case["activation"]
    if act == "Bogus" and error is None:
        pytest.fail("unknown activation accepted")
    ref, ref_error = _reference(op, x, w, b, _onnx_attrs(case, nd)) if len(case["w_shape"]) > 2 \
        else (None, ValueError("rank"))
    if ref is not None and act is not None and act != "Bogus":
        ref = _apply_activation(ref, act)
    if error is not None:
        assert ref is None or ref.size == 0, f"valid case refused: {error} (onnxruntime gave {ref.shape})"
        return
    if ref is None:
        # onnxruntime refuses empty tensors that ONNX itself allows: an empty result is right then.
        assert out.size == 0 or 0 in case["x_shape"], f"accepted a case onnxruntime refuses: {ref_error}"
        return
    assert out.shape == ref.shape
    assert np.array_equal(np.isnan(out), np.isnan(ref)), "NaN positions differ"
    finite = np.isfinite(ref)
    assert np.array_equal(out[~finite & ~np.isnan(ref)], ref[~finite & ~np.isnan(ref)])
    if finite.any():
        scale = max(float(np.abs(ref[finite]).max()), 1e-6)
        err = float(np.abs(out[finite] - ref[finite]).max())
        assert err <= 1e-4 * scale, f"max abs diff {err} > 1e-4 x {scale}"


def _apply_activation(y: np.ndarray, act) -> np.ndarray:
    from oracles import onnx_reference

    name, params = (act, ()) if isinstance(act, str) else (act[0], act[1:])
    attrs, inputs = {}, {"x": y}
    if name == "Clip":
        inputs.update(lo=np.float32(params[0]), hi=np.float32(params[1]))
    if name == "LeakyRelu":
        attrs["alpha"] = params[0]
    return onnx_reference(name, inputs, attrs)


@pytest.mark.timeout(900)
@FUZZ
@given(conv_case(transpose=False))
@example({"x_shape": [1, 0, 5, 4], "w_shape": [2, 0, 3, 3], "group": 1, "strides": 1, "dilations": 1,
          "pads": 1, "bias": "ok", "dtype": "float32", "layout": "contiguous", "special": None,
          "activation": "Relu", "seed": 0})
def test_fuzz_conv(case):
    _check("Conv", vkconv.conv, case)


@pytest.mark.timeout(900)
@FUZZ
@given(conv_case(transpose=True))
def test_fuzz_conv_transpose(case):
    case = {**case, "transpose": True}
    _check("ConvTranspose", vkconv.conv_transpose, case)


@st.composite
def deform_case(draw):
    """A valid DeformConv case, optionally with one mutation that makes it invalid."""
    group, og = draw(st.sampled_from([1, 1, 2, 3])), draw(st.sampled_from([1, 1, 2, 4]))
    cin = group * og * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    strides = [draw(st.integers(1, 3)) for _ in range(2)]
    dilations = [draw(st.integers(1, 2)) for _ in range(2)]
    pads = [draw(st.integers(0, 2)) for _ in range(4)]
    h = draw(st.integers(max(1, (kh - 1) * dilations[0] + 1 - pads[0] - pads[2]), 9))
    w = draw(st.integers(max(1, (kw - 1) * dilations[1] + 1 - pads[1] - pads[3]), 9))
    return {"n": draw(st.integers(0, 2)), "cin": cin, "cout": group * draw(st.integers(1, 3)),
            "group": group, "og": og, "k": (kh, kw), "hw": (h, w), "strides": strides,
            "dilations": dilations, "pads": pads, "mask": draw(st.booleans()), "bias": draw(st.booleans()),
            "scale": draw(st.sampled_from([0.0, 0.5, 3.0, 20.0])),
            "special": draw(st.sampled_from([None] * 6 + ["nan_x", "inf_x", "nan_offset", "inf_offset"])),
            "mutation": draw(st.sampled_from([None] * 8 + ["offset_channels", "mask_channels", "offset_size",
                                                           "dtype", "rank"])),
            "seed": draw(st.integers(0, 2**16))}


@pytest.mark.timeout(900)
@FUZZ
@given(deform_case())
def test_fuzz_deform_conv(case):
    from deform_reference import deform_conv_ref

    rng = np.random.default_rng(case["seed"])
    (kh, kw), (h, w_) = case["k"], case["hw"]
    oh = (h + case["pads"][0] + case["pads"][2] - case["dilations"][0] * (kh - 1) - 1) // case["strides"][0] + 1
    ow = (w_ + case["pads"][1] + case["pads"][3] - case["dilations"][1] * (kw - 1) - 1) // case["strides"][1] + 1
    n, taps = case["n"], case["og"] * kh * kw
    x = rng.standard_normal((n, case["cin"], h, w_)).astype(np.float32)
    w = rng.standard_normal((case["cout"], case["cin"] // case["group"], kh, kw)).astype(np.float32)
    offset = (rng.standard_normal((n, 2 * taps, oh, ow)) * case["scale"]).astype(np.float32)
    mask = rng.uniform(-0.5, 1.5, (n, taps, oh, ow)).astype(np.float32) if case["mask"] else None
    b = rng.standard_normal(case["cout"]).astype(np.float32) if case["bias"] else None
    special = case["special"]
    if special and x.size and offset.size:
        target = x if special.endswith("_x") else offset
        target.reshape(-1)[rng.integers(0, target.size)] = np.nan if special.startswith("nan") else np.inf
    mutation, bad = case["mutation"], None
    if mutation == "offset_channels":
        offset, bad = offset[:, :-1], "offset"
    elif mutation == "mask_channels" and mask is not None:
        mask, bad = np.concatenate([mask, mask[:, :1]], axis=1), "mask"
    elif mutation == "offset_size":
        offset, bad = offset[:, :, :, :-1], "offset"
    elif mutation == "dtype":
        x, bad = x.astype(np.float64), "x"
    elif mutation == "rank":
        w, bad = w[..., 0], "w"
    kwargs = dict(strides=case["strides"], pads=case["pads"], dilations=case["dilations"],
                  group=case["group"], offset_group=case["og"])
    if bad is not None:
        with pytest.raises(ValueError, match=f"^{bad}:"):
            vkconv.deform_conv(x, w, np.ascontiguousarray(offset), b, mask, **kwargs)
        return
    out = vkconv.deform_conv(x, w, offset, b, mask, **kwargs)
    ref = deform_conv_ref(x, w, offset, b, mask, **kwargs)
    assert out.shape == ref.shape
    assert np.array_equal(np.isnan(out), np.isnan(ref)), "NaN positions differ"
    finite = np.isfinite(ref)
    assert np.array_equal(np.isinf(out), np.isinf(ref))
    if finite.any():
        scale = max(float(np.abs(ref[finite]).max()), 1e-6)
        assert float(np.abs(out[finite] - ref[finite]).max()) <= 1e-4 * scale


SPARSE_FUZZ = settings(FUZZ, max_examples=300)


@st.composite
def sparse_case(draw):
    spatial = tuple(draw(st.integers(1, 7)) for _ in range(3))
    batch = draw(st.integers(1, 2))
    n = draw(st.integers(0, min(40, batch * spatial[0] * spatial[1] * spatial[2])))
    subm = draw(st.booleans())
    kernel = tuple(draw(st.sampled_from([1, 3] if subm else [1, 2, 3])) for _ in range(3))  # SubM: odd
    return {"spatial": spatial, "batch": batch, "n": n, "kernel": kernel, "subm": subm,
            "cin": draw(st.integers(1, 5)), "cout": draw(st.integers(1, 5)),
            "stride": draw(st.integers(1, 3)), "padding": draw(st.integers(0, 2)),
            "bias": draw(st.booleans()),
            "special": draw(st.sampled_from([None] * 6 + ["nan", "inf"])),
            "mutation": draw(st.sampled_from([None] * 8 + ["duplicate", "out_of_range", "negative_batch",
                                                           "rows", "weight_cin", "dtype"])),
            "seed": draw(st.integers(0, 2**16))}


@pytest.mark.timeout(900)
@SPARSE_FUZZ
@given(sparse_case())
def test_fuzz_sparse_conv3d(case):
    from test_sparse import dense_conv3d, occupancy, random_sites

    rng = np.random.default_rng(case["seed"])
    spatial, batch, n = case["spatial"], case["batch"], case["n"]
    idx = random_sites(rng, n, spatial, batch)
    feats = rng.standard_normal((n, case["cin"])).astype(np.float32)
    if case["special"] and n:
        feats.reshape(-1)[rng.integers(0, feats.size)] = np.nan if case["special"] == "nan" else np.inf
    w = rng.standard_normal((case["cout"], *case["kernel"], case["cin"])).astype(np.float32)
    b = rng.standard_normal(case["cout"]).astype(np.float32) if case["bias"] else None
    mutation, bad = case["mutation"], None
    if mutation == "duplicate" and n:
        idx, feats, bad = np.vstack([idx, idx[:1]]), np.vstack([feats, feats[:1]]), "indices"
    elif mutation == "out_of_range" and n:
        idx = idx.copy()
        idx[0, 1 + rng.integers(0, 3)] += 50
        bad = "indices"
    elif mutation == "negative_batch" and n:
        idx = idx.copy()
        idx[0, 0] = -1
        bad = "indices"
    elif mutation == "rows":
        feats, bad = np.vstack([feats, feats[:1] if n else np.zeros((1, case["cin"]), np.float32)]), "features"
    elif mutation == "weight_cin":
        w, bad = np.concatenate([w, w[..., :1]], axis=-1), "weight"
    elif mutation == "dtype":
        feats, bad = feats.astype(np.float64), "features"
    if bad is not None:
        with pytest.raises(ValueError, match=f"^{bad}"):
            tensor = vkconv.SparseTensor(feats, idx, spatial, batch)
            vkconv.subm_conv3d(tensor, w, b) if case["subm"] else vkconv.sparse_conv3d(tensor, w, b)
        return
    tensor = vkconv.SparseTensor(feats, idx, spatial, batch)
    if case["subm"]:
        out = vkconv.subm_conv3d(tensor, w, b)
        geom = dict(pad=tuple(k // 2 for k in case["kernel"]))
        sites = occupancy(idx, batch, spatial)
    else:
        geom = dict(stride=(case["stride"],) * 3, pad=(case["padding"],) * 3)
        if any((s + 2 * case["padding"] - k) // case["stride"] + 1 < 1 for s, k in zip(spatial, case["kernel"])):
            with pytest.raises(ValueError):
                vkconv.sparse_conv3d(tensor, w, b, stride=case["stride"], padding=case["padding"])
            return
        out = vkconv.sparse_conv3d(tensor, w, b, stride=case["stride"], padding=case["padding"])
        occ = occupancy(idx, batch, spatial).astype(np.float64)[:, None]
        sites = dense_conv3d(occ, np.ones((1, *case["kernel"], 1)), **geom)[:, 0] > 0.5
    expected = dense_conv3d(tensor.to_dense(), w, b, **geom)
    got = out.to_dense()
    assert got.shape == expected.shape
    mask = np.broadcast_to(sites[:, None], expected.shape)
    assert np.array_equal(occupancy(out.indices, batch, out.spatial_shape), sites), "active sites differ"
    assert np.array_equal(np.isnan(got[mask]), np.isnan(expected[mask])), "NaN positions differ"
    fin = np.isfinite(expected) & mask
    if fin.any():
        scale = max(float(np.abs(expected[fin]).max()), 1e-6)
        assert float(np.abs(got[fin] - expected[fin]).max()) <= 1e-4 * scale


@st.composite
def lstm_case(draw):
    return {"n": draw(st.integers(0, 2)), "t": draw(st.integers(1, 3)), "c": draw(st.integers(1, 3)),
            "hw": (draw(st.integers(1, 6)), draw(st.integers(1, 6))), "f": draw(st.integers(1, 4)),
            "k": (draw(st.integers(1, 3)), draw(st.integers(1, 3))), "padding": draw(st.sampled_from(["same", "valid"])),
            "strides": draw(st.integers(1, 2)), "return_sequences": draw(st.booleans()),
            "mutation": draw(st.sampled_from([None] * 8 + ["kernel_channels", "gates", "rank", "dtype", "padding"])),
            "seed": draw(st.integers(0, 2**16))}


@pytest.mark.timeout(900)
@SPARSE_FUZZ
@given(lstm_case())
def test_fuzz_conv_lstm2d(case):
    from conv_lstm_reference import conv_lstm2d as reference

    rng = np.random.default_rng(case["seed"])
    (h, w_), (kh, kw), f, c = case["hw"], case["k"], case["f"], case["c"]
    x = rng.standard_normal((case["n"], case["t"], c, h, w_)).astype(np.float32)
    kernel = (rng.standard_normal((kh, kw, c, 4 * f)) * 0.5).astype(np.float32)
    rkernel = (rng.standard_normal((kh, kw, f, 4 * f)) * 0.5).astype(np.float32)
    bias = rng.standard_normal(4 * f).astype(np.float32)
    kwargs = dict(padding=case["padding"], strides=case["strides"], return_sequences=case["return_sequences"])
    bad = None
    if case["mutation"] == "kernel_channels":
        kernel, bad = np.concatenate([kernel, kernel[:, :, :1]], axis=2), "(x|kernel)"
    elif case["mutation"] == "gates":
        bias, bad = bias[:-1], "bias"
    elif case["mutation"] == "rank":
        x, bad = x[:, 0], "x"
    elif case["mutation"] == "dtype":
        x, bad = x.astype(np.float64), "x"
    elif case["mutation"] == "padding":
        kwargs["padding"], bad = "full", "padding"
    valid_size = case["padding"] == "same" or (h >= kh and w_ >= kw)
    if bad is not None or not valid_size:
        with pytest.raises(ValueError, match=f"^{bad}" if bad else "^x"):
            vkconv.conv_lstm2d(x, kernel, rkernel, bias, **kwargs)
        return
    out = vkconv.conv_lstm2d(x, kernel, rkernel, bias, **kwargs)
    ref = reference(x, kernel, rkernel, bias, padding=case["padding"], strides=(case["strides"],) * 2,
                    return_sequences=case["return_sequences"])
    assert out.shape == ref.shape
    if ref.size:
        assert float(np.abs(out - ref).max()) <= 1e-4 * max(float(np.abs(ref).max()), 1e-6)


MODEL_FUZZ = settings(FUZZ, max_examples=80)


@st.composite
def optional_inputs_case(draw):
    """A one-node Conv / ConvTranspose / DeformConv model whose optional inputs (B; DeformConv's B
    and mask) are each given, left out with an empty name, or trailing and dropped."""
    op = draw(st.sampled_from(["Conv", "ConvTranspose", "DeformConv"]))
    group = draw(st.sampled_from([1, 1, 2]))
    return {"op": op, "group": group, "cin": group * draw(st.integers(1, 3)),
            "cout": group * draw(st.integers(1, 3)), "k": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
            "hw": (draw(st.integers(3, 8)), draw(st.integers(3, 8))), "n": draw(st.integers(1, 2)),
            "stride": draw(st.integers(1, 2)), "pad": draw(st.integers(0, 1)),
            "b": draw(st.sampled_from(["given", "empty", "absent"])),
            "mask": draw(st.sampled_from(["given", "empty", "absent"])),
            "w_runtime": draw(st.sampled_from([False] * 4 + [True])),
            "mode": draw(st.sampled_from(["layer", "layer", "subgraph"])),
            "seed": draw(st.integers(0, 2**16))}


@pytest.mark.timeout(900)
@MODEL_FUZZ
@given(optional_inputs_case())
def test_fuzz_empty_optional_inputs_through_cv2(case):
    """Models with omitted optional inputs through cv_plugin.read_net + cv2.dnn, against
    onnxruntime on the same model."""
    import onnxruntime as ort
    from conftest import opencv_problem
    from onnx import TensorProto, helper, numpy_helper

    import cv_plugin

    if opencv_problem() is not None:
        pytest.skip(opencv_problem())
    rng = np.random.default_rng(case["seed"])
    op, g, (kh, kw), (h, w_) = case["op"], case["group"], case["k"], case["hw"]
    x = rng.standard_normal((case["n"], case["cin"], h, w_)).astype(np.float32)
    w_shape = (case["cin"], case["cout"] // g, kh, kw) if op == "ConvTranspose" \
        else (case["cout"], case["cin"] // g, kh, kw)
    w = (rng.standard_normal(w_shape) * 0.5).astype(np.float32)
    attrs = dict(strides=[case["stride"]] * 2, pads=[case["pad"]] * 4, group=g, kernel_shape=[kh, kw])
    feeds, inits = {"x": x}, {}
    (feeds if case["w_runtime"] else inits)["w"] = w
    names = ["x", "w"]
    if op == "DeformConv":
        oh = (h + 2 * case["pad"] - kh) // case["stride"] + 1
        ow = (w_ + 2 * case["pad"] - kw) // case["stride"] + 1
        if oh < 1 or ow < 1:
            return
        feeds["offset"] = (rng.standard_normal((case["n"], 2 * kh * kw, oh, ow)) * 1.5).astype(np.float32)
        names.append("offset")
    slots = []
    for name, how in [("b", case["b"])] + ([("mask", case["mask"])] if op == "DeformConv" else []):
        if how == "given" and name == "b":
            inits["b"] = rng.standard_normal(case["cout"]).astype(np.float32)
        elif how == "given":
            feeds["mask"] = rng.uniform(0, 1, (case["n"], kh * kw, oh, ow)).astype(np.float32)
        slots.append((name if how == "given" else "", how))
    while slots and slots[-1][1] == "absent":  # a trailing omitted input may also not be written at all
        slots.pop()
    names += [name for name, _ in slots]
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph([node], "fuzz", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape)
                                               for k, v in feeds.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, feeds)[0]
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, list(ref.shape)))
    with cv_plugin.read_net(model, mode=case["mode"], min_ops=1) as net:
        for name, value in feeds.items():
            net.setInput(value, name)
        out = np.array(net.forward())
    assert out.shape == ref.shape
    assert float(np.abs(out - ref).max()) <= 1e-4 * max(float(np.abs(ref).max()), 1e-6)
