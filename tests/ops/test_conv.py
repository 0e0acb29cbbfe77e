"""Dense convolution through the public API (vkconv.conv / vkconv.Conv), 1-D and 2-D.

Oracle: onnx.reference (ONNX Conv, then the ONNX activation op), and the ONNX conformance data.
Tolerance: max abs diff <= 1e-4 x max|expected| (tests/oracles.assert_close).
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conformance_root
from onnx import helper, numpy_helper
from oracles import assert_close, onnx_reference

import vkconv

REL = 1e-4

# vkconv's activation names (None: no epilogue); the sweep cycles through all of them
_ACTIVATIONS = [None, "Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh"]


def reference(x, w, b=None, *, strides, pads, dilations, group, activation=None, auto_pad=None):
    """ONNX Conv (explicit pads, or ``auto_pad``) followed by the ONNX activation op, run by
    onnx.reference.  ``activation`` uses vkconv's spelling: a name or (name, *params)."""
    nd = x.ndim - 2
    attrs = dict(strides=list(strides), dilations=list(dilations), group=group,
                 kernel_shape=list(w.shape[2:]))
    if auto_pad is None:
        attrs["pads"] = list(pads)
    else:
        attrs["auto_pad"] = auto_pad
    assert len(attrs["strides"]) == nd
    y = onnx_reference("Conv", {"x": x, "w": w, "b": b}, attrs)
    if activation is None:
        return y
    name, params = (activation, ()) if isinstance(activation, str) else (activation[0], activation[1:])
    if name == "Clip":
        bounds = [np.array(p, np.float32) for p in params]
        return onnx_reference("Clip", {"x": y, "min": bounds[0] if bounds else None,
                                       "max": bounds[1] if len(bounds) > 1 else None}, {})
    keys = {"LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta")}.get(name, ())
    return onnx_reference(name, {"x": y}, {k: float(v) for k, v in zip(keys, params)})


# -- the randomized sweep ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    seed: int
    batch: int
    cin: int
    cout: int
    group: int
    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    bias: bool
    activation: object

    @property
    def id(self) -> str:
        act = self.activation if self.activation is None or isinstance(self.activation, str) \
            else "-".join(f"{v:g}" if isinstance(v, float) else v for v in self.activation)
        dims = "x".join(map(str, self.spatial))
        return (f"{len(self.spatial)}d-n{self.batch}-c{self.cin}to{self.cout}-g{self.group}-{dims}"
                f"-k{''.join(map(str, self.kernel))}-s{''.join(map(str, self.strides))}"
                f"-d{''.join(map(str, self.dilations))}-p{''.join(map(str, self.pads))}"
                f"{'-b' if self.bias else ''}-{act}")

    def arrays(self):
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.batch, self.cin, *self.spatial)).astype(np.float32)
        fan_in = self.cin // self.group * math.prod(self.kernel)
        # Unit-scale outputs keep Sigmoid/Tanh/HardSigmoid away from saturation.
        w = (rng.standard_normal((self.cout, self.cin // self.group, *self.kernel))
             / math.sqrt(fan_in)).astype(np.float32)
        b = (0.5 * rng.standard_normal(self.cout)).astype(np.float32) if self.bias else None
        return x, w, b


def _activation(rng, i):
    name = _ACTIVATIONS[i % len(_ACTIVATIONS)]
    if name == "Clip":
        lo, hi = -float(rng.uniform(0, 1)), float(rng.uniform(0.1, 1.5))
        return ("Clip", round(lo, 3)) if rng.random() < 0.25 else ("Clip", round(lo, 3), round(hi, 3))
    if name == "LeakyRelu":
        return ("LeakyRelu", round(float(rng.uniform(0.01, 0.3)), 3))
    if name == "HardSigmoid":
        return ("HardSigmoid", round(float(rng.uniform(0.1, 0.5)), 3), round(float(rng.uniform(0.3, 0.7)), 3))
    return name


def _make_case(rng, i: int, large: bool = False) -> Case:
    """``large``: spatial sizes of a few thousand outputs, so that tiled kernels see several
    workgroups and partial tiles in every dimension."""
    nd = 1 if rng.random() < 0.3 else 2
    kind = ("dense", "grouped", "depthwise")[i % 3]
    if kind == "depthwise":
        mult = int(rng.choice([1, 1, 2, 3]))  # channel multiplier
        cin = int(rng.integers(1, 64 // mult + 1))
        group, cout = cin, cin * mult
    elif kind == "grouped":
        group = int(rng.choice([2, 3, 4, 8]))
        cin = group * int(rng.integers(1, 64 // group + 1))
        cout = group * int(rng.integers(1, 64 // group + 1))
    else:
        group, cin, cout = 1, int(rng.integers(1, 65)), int(rng.integers(1, 65))
    kernel = tuple(int(k) for k in rng.integers(1, 6, nd))
    strides = tuple(int(s) for s in rng.integers(1, 4, nd))
    dilations = tuple(int(d) for d in rng.integers(1, 4, nd))
    pads = tuple(int(p) for p in rng.integers(0, 4, 2 * nd))
    spatial = []
    for j in range(nd):
        extent = dilations[j] * (kernel[j] - 1) + 1  # dilated kernel
        smallest = max(1, extent - pads[j] - pads[j + nd])
        span = (24 if nd == 1 else 14) * (8 if large else 1)
        spatial.append(int(rng.integers(smallest + (span // 2 if large else 0), smallest + span)))
    return Case(seed=1000 + i, batch=int(rng.integers(1, 3)), cin=cin, cout=cout, group=group,
                spatial=tuple(spatial), kernel=kernel, strides=strides, dilations=dilations, pads=pads,
                bias=bool(rng.random() < 0.7), activation=_activation(rng, i))


_rng = np.random.default_rng(20240601)
CASES = [_make_case(_rng, i) for i in range(150)] + [_make_case(_rng, i, large=True) for i in range(150, 162)]


def test_sweep_covers_the_parameter_space():
    """The generator really produces what the sweep claims to cover."""
    seen = lambda f: {f(c) for c in CASES}  # noqa: E731
    assert seen(lambda c: len(c.spatial)) == {1, 2}
    assert seen(lambda c: c.batch) == {1, 2}
    assert {1, 2, 3} <= seen(lambda c: max(c.strides)) and {1, 2, 3} <= seen(lambda c: max(c.dilations))
    assert {1, 2, 3, 4, 5} <= seen(lambda c: max(c.kernel))
    assert True in seen(lambda c: c.pads[: len(c.spatial)] != c.pads[len(c.spatial):])  # asymmetric
    assert True in seen(lambda c: c.group == c.cin and c.cout == c.cin and c.cin > 1)  # depthwise
    assert True in seen(lambda c: c.group == c.cin and c.cout > c.cin)  # channel multiplier
    assert True in seen(lambda c: 1 < c.group < c.cin)  # grouped
    assert min(seen(lambda c: min(c.cin, c.cout))) == 1 and max(seen(lambda c: max(c.cin, c.cout))) >= 60
    assert True in seen(lambda c: math.prod(c.spatial) % 4 != 0)
    names = seen(lambda c: c.activation if c.activation is None or isinstance(c.activation, str)
                 else c.activation[0])
    assert names == set(_ACTIVATIONS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_random_sweep(case):
    x, w, b = case.arrays()
    y = vkconv.conv(x, w, b, strides=case.strides, pads=case.pads, dilations=case.dilations,
                    group=case.group, activation=case.activation)
    expected = reference(x, w, b, strides=case.strides, pads=case.pads, dilations=case.dilations,
                         group=case.group, activation=case.activation)
    assert y.dtype == np.float32
    assert_close(y, expected, REL, what=case.id)


def test_activation_defaults_match_onnx():
    """Omitted parameters take ONNX's defaults (LeakyRelu alpha 0.01, HardSigmoid 0.2/0.5)."""
    rng = np.random.default_rng(7)
    x = (3 * rng.standard_normal((1, 3, 6, 5))).astype(np.float32)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    geometry = dict(strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1)
    for act in ("LeakyRelu", "HardSigmoid", ("clip", -0.5), "hard_swish", "RELU"):
        y = vkconv.conv(x, w, activation=act)
        name = act if isinstance(act, str) else act[0]
        canonical = {"leakyrelu": "LeakyRelu", "hardsigmoid": "HardSigmoid", "clip": "Clip",
                     "hard_swish": "HardSwish", "relu": "Relu"}[name.lower()]
        spec = canonical if isinstance(act, str) else (canonical, *act[1:])
        assert_close(y, reference(x, w, **geometry, activation=spec), REL, what=str(act))


def test_pads_strides_dilations_shorthands():
    """An int means every dim; n pads mean symmetric (begin = end) per dim."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 2, 9, 8)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 2)).astype(np.float32)
    expected = reference(x, w, strides=(2, 2), pads=(1, 2, 1, 2), dilations=(2, 2), group=1)
    assert_close(vkconv.conv(x, w, strides=2, pads=(1, 2), dilations=2), expected, REL)
    expected = reference(x, w, strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=1)
    assert_close(vkconv.conv(x, w, pads=1), expected, REL)


# -- auto_pad ------------------------------------------------------------------------------------
def _auto_pad_cases():
    cases = []
    for mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        for spatial, kernel, strides, dilations in [
                ((7, 8), (3, 3), (2, 2), (1, 1)), ((5, 9), (2, 4), (1, 3), (1, 1)),
                ((8, 7), (3, 2), (3, 2), (2, 1)), ((6,), (4,), (2,), (1,)), ((11,), (3,), (3,), (2,)),
                ((4, 5), (1, 1), (2, 3), (1, 1))]:
            cases.append((mode, spatial, kernel, strides, dilations))
    return cases


@pytest.mark.parametrize("mode, spatial, kernel, strides, dilations", _auto_pad_cases())
def test_auto_pad(mode, spatial, kernel, strides, dilations):
    rng = np.random.default_rng(len(spatial) * 100 + sum(spatial))
    x = rng.standard_normal((2, 3, *spatial)).astype(np.float32)
    w = rng.standard_normal((4, 3, *kernel)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    expected = reference(x, w, b, strides=strides, pads=None, dilations=dilations, group=1, auto_pad=mode)
    pads = vkconv.resolve_auto_pad(mode, spatial, kernel, strides, dilations)
    y = vkconv.conv(x, w, b, strides=strides, pads=pads, dilations=dilations)
    assert_close(y, expected, REL, what=f"resolve_auto_pad {mode} -> {pads}")
    with vkconv.Conv(w, b, strides=strides, dilations=dilations, auto_pad=mode) as op:
        assert op.output_shape(x.shape) == expected.shape
        assert_close(op(x), expected, REL, what=f"Conv(auto_pad={mode})")


def test_resolve_auto_pad_notset_and_bad_mode():
    assert vkconv.resolve_auto_pad("NOTSET", (5, 5), (3, 3), (1, 1), (1, 1)) is None
    with pytest.raises(ValueError, match="auto_pad"):
        vkconv.resolve_auto_pad("SAME", (5, 5), (3, 3), (1, 1), (1, 1))


# -- ONNX conformance data -----------------------------------------------------------------------
def _conformance_cases() -> list[str]:
    root = conformance_root()
    if root is None:
        return ["<no conformance data>"]
    found = []
    for suite, patterns in (("onnx-node", ("test_basic_conv_*", "test_conv_with_*")),
                            ("onnx-pytorch", ("test_Conv1d*", "test_Conv2d*"))):
        for pattern in patterns:
            found += [f"{suite}/{p.name}" for p in (root / suite).glob(pattern) if (p / "model.onnx").exists()]
    return sorted(found)


def _tensor(path: Path) -> np.ndarray:
    t = onnx.TensorProto()
    t.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(t)


@pytest.mark.parametrize("name", _conformance_cases())
def test_conformance(conformance, name):
    case = conformance / name
    model = onnx.load(str(case / "model.onnx"))
    graph = model.graph
    (node,) = graph.node
    assert node.op_type == "Conv"
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    fed = [i.name for i in graph.input if i.name not in values]
    data = case / "test_data_set_0"
    inputs = sorted(data.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    values.update(zip(fed, (_tensor(p) for p in inputs)))
    x, w = values[node.input[0]], values[node.input[1]]
    b = values[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    if x.ndim not in (3, 4):
        pytest.skip(f"{x.ndim - 2}-D input")
    nd = x.ndim - 2
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    strides = tuple(attrs.get("strides", (1,) * nd))
    dilations = tuple(attrs.get("dilations", (1,) * nd))
    group = attrs.get("group", 1)
    auto_pad = attrs.get("auto_pad", b"NOTSET").decode()
    assert tuple(attrs.get("kernel_shape", w.shape[2:])) == w.shape[2:]
    pads = vkconv.resolve_auto_pad(auto_pad, x.shape[2:], w.shape[2:], strides, dilations)
    if pads is None:
        pads = tuple(attrs.get("pads", (0,) * (2 * nd)))
    expected = _tensor(data / "output_0.pb")
    y = vkconv.conv(x, w, b, strides=strides, pads=pads, dilations=dilations, group=group)
    assert_close(y, expected, REL, what=name)
    with vkconv.Conv(w, b, strides=strides, pads=attrs.get("pads", 0), dilations=dilations, group=group,
                     auto_pad=auto_pad) as op:
        assert_close(op(x), expected, REL, what=f"{name} via Conv")


# -- bad input -----------------------------------------------------------------------------------
_X = np.zeros((1, 4, 6, 6), np.float32)
_W = np.zeros((6, 2, 3, 3), np.float32)   # group=2: 4 input channels
_B = np.zeros(6, np.float32)

_BAD = [
    ("x rank 2", dict(x=np.zeros((4, 6), np.float32)), "x"),
    ("x rank 5", dict(x=np.zeros((1, 4, 2, 6, 6), np.float32)), "x"),
    ("w rank differs from x", dict(x=np.zeros((1, 4, 6), np.float32)), "w"),
    ("w rank 2", dict(w=np.zeros((6, 2), np.float32)), "w"),
    ("x channels mismatch", dict(x=np.zeros((1, 6, 6, 6), np.float32)), "x"),
    ("group mismatch", dict(group=1), "x"),
    ("group not dividing C_out", dict(group=4, x=np.zeros((1, 8, 6, 6), np.float32)), "group"),
    ("group zero", dict(group=0), "group"),
    ("group float", dict(group=2.0), "group"),
    ("x float64", dict(x=_X.astype(np.float64)), "x"),
    ("x int32", dict(x=_X.astype(np.int32)), "x"),
    ("w float16", dict(w=_W.astype(np.float16)), "w"),
    ("b float64", dict(b=_B.astype(np.float64)), "b"),
    ("x list", dict(x=_X.tolist()), "x"),
    ("w list", dict(w=_W.tolist()), "w"),
    ("b list", dict(b=[0.0] * 6), "b"),
    ("kernel larger than input", dict(x=np.zeros((1, 4, 2, 6), np.float32)), "x"),
    ("dilated kernel larger than input", dict(dilations=(1, 3)), "x"),
    ("negative pads", dict(pads=(0, -1, 0, 0)), "pads"),
    ("3 pads for 2-D", dict(pads=(1, 1, 1)), "pads"),
    ("zero strides", dict(strides=0), "strides"),
    ("negative stride", dict(strides=(1, -2)), "strides"),
    ("float stride", dict(strides=1.5), "strides"),
    ("3 strides for 2-D", dict(strides=(1, 1, 1)), "strides"),
    ("zero dilations", dict(dilations=(0, 1)), "dilations"),
    ("bias wrong length", dict(b=np.zeros(5, np.float32)), "b"),
    ("bias wrong rank", dict(b=np.zeros((6, 1), np.float32)), "b"),
    ("unknown activation", dict(activation="Gelu"), "activation"),
    ("activation not a name", dict(activation=3), "activation"),
    ("activation bad params", dict(activation=("LeakyRelu", "big")), "activation"),
    ("activation too many params", dict(activation=("Clip", 0.0, 1.0, 2.0)), "activation"),
    ("Clip min > max", dict(activation=("Clip", 1.0, 0.0)), "activation"),
]


@pytest.mark.parametrize("what, change, argument", _BAD, ids=[b[0] for b in _BAD])
def test_bad_input_names_the_argument(what, change, argument):
    kwargs = dict(x=_X, w=_W, b=_B, group=2) | change
    x, w, b = kwargs.pop("x"), kwargs.pop("w"), kwargs.pop("b")
    with pytest.raises(ValueError) as info:
        vkconv.conv(x, w, b, **kwargs)
    # "x: ..." or "group=4": the argument's name, not just a letter somewhere in the text
    assert re.search(rf"\b{argument}[:=]", str(info.value)), \
        f"{what}: message does not name {argument!r}: {info.value}"


def test_conv_class_rejects_bad_auto_pad_and_input():
    with pytest.raises(ValueError, match="^auto_pad:"):
        vkconv.Conv(_W, _B, group=2, auto_pad="SAME")
    with vkconv.Conv(_W, _B, group=2) as op:
        for bad, argument in [(_X[0], "x"), (_X.astype(np.float64), "x"), (np.zeros((1, 3, 6, 6), np.float32), "x")]:
            with pytest.raises(ValueError, match=rf"^{argument}:"):
                op(bad)
        with pytest.raises(ValueError, match="^w:"):
            op.set_weights(np.zeros((6, 2, 2, 2), np.float32))


def _case_arrays(seed=9, shape=(2, 6, 9, 11), cout=4, group=2, k=(3, 2)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((cout, shape[1] // group, *k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    return x, w, b


_GEOMETRY = dict(strides=(2, 1), pads=(1, 0, 0, 1), dilations=(1, 2), group=2)


def test_non_contiguous_inputs_are_accepted():
    x, w, b = _case_arrays()
    expected = reference(x, w, b, **_GEOMETRY)
    y = vkconv.conv(x, w, b, **_GEOMETRY)
    assert_close(y, expected, REL)
    x_t = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # same values, strided
    x_f = np.asfortranarray(x)
    x_s = np.repeat(x, 2, axis=3)[..., ::2]  # a step-2 view
    w_s = np.repeat(w, 2, axis=0)[::2]
    b_s = np.repeat(b, 2)[::2]
    for xi, wi, bi in [(x_t, w, b), (x_f, w, b), (x_s, w_s, b_s)]:
        assert not (xi.flags.c_contiguous and wi.flags.c_contiguous and bi.flags.c_contiguous)
        np.testing.assert_array_equal(vkconv.conv(xi, wi, bi, **_GEOMETRY), y)


def test_read_only_inputs_are_accepted():
    x, w, b = _case_arrays()
    y = vkconv.conv(x, w, b, **_GEOMETRY)
    for a in (x, w, b):
        a.setflags(write=False)
    np.testing.assert_array_equal(vkconv.conv(x, w, b, **_GEOMETRY), y)
    with vkconv.Conv(w, b, **_GEOMETRY) as op:
        np.testing.assert_array_equal(op(x), y)


def test_inputs_are_not_modified():
    x, w, b = _case_arrays()
    copies = [a.copy() for a in (x, w, b)]
    vkconv.conv(x, w, b, **_GEOMETRY, activation="Relu")
    for a, c in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("nd", [1, 2])
def test_zero_size_batch_returns_an_empty_result(nd):
    x, w, b = _case_arrays()
    if nd == 1:
        x, w = x[:, :, 0], w[:, :, 0]
    geometry = dict(strides=2, pads=1, dilations=1, group=2)
    full = vkconv.conv(x, w, b, **geometry)
    y = vkconv.conv(x[:0], w, b, **geometry)
    assert y.shape == (0, *full.shape[1:]) and y.dtype == np.float32


def test_zero_input_channels_follow_onnx():
    """With no input channels ONNX Conv reduces over nothing: the output is the (activated) bias."""
    x = np.zeros((1, 0, 5, 4), np.float32)
    w = np.zeros((3, 0, 3, 3), np.float32)
    b = np.array([-1.0, 0.5, 2.0], np.float32)
    expected = reference(x, w, b, strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=1,
                         activation="Relu")
    assert_close(vkconv.conv(x, w, b, pads=1, activation="Relu"), expected, REL)


# -- Conv objects: plan cache, reuse, no allocation on repeated calls ---------------------------
@pytest.mark.parametrize("nd", [1, 2])
def test_conv_reused_across_shapes(nd):
    rng = np.random.default_rng(10 + nd)
    k = (3,) if nd == 1 else (3, 2)
    w = rng.standard_normal((5, 3, *k)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    geometry = dict(strides=(2,) * nd, pads=(1,) * nd + (0,) * nd, dilations=(1,) * nd, group=1)
    sizes = [(9,), (10,), (3,), (17,), (4,), (12,)] if nd == 1 else \
        [(9, 7), (8, 8), (3, 5), (16, 9), (4, 2), (11, 13)]
    # More shapes than the plan cache holds, then the first ones again (rebuilt after eviction),
    # batch changes, and new data at an already-planned shape.
    shapes = [(1, 3, *s) for s in sizes] + [(2, 3, *sizes[0]), (1, 3, *sizes[1]), (1, 3, *sizes[0])]
    with vkconv.Conv(w, b, activation="Tanh", **geometry) as op:
        for shape in shapes:
            x = rng.standard_normal(shape).astype(np.float32)
            y = op(x)
            assert y.shape == op.output_shape(shape)
            assert_close(y, reference(x, w, b, activation="Tanh", **geometry), REL, what=str(shape))


def test_set_weights_replaces_the_weights():
    x, w, b = _case_arrays()
    w2, b2 = (w[::-1] * 0.5).copy(), -b
    with vkconv.Conv(w, b, **_GEOMETRY) as op:
        assert_close(op(x), reference(x, w, b, **_GEOMETRY), REL)
        op.set_weights(w2, b2)
        assert_close(op(x), reference(x, w2, b2, **_GEOMETRY), REL)


def test_repeated_calls_allocate_nothing():
    x, w, b = _case_arrays()
    ctx = vkconv.get_context()
    with vkconv.Conv(w, b, activation=("Clip", -0.5, 0.5), **_GEOMETRY) as op:
        first = op(x)
        keep = first.copy()
        live, stats = dict(ctx.live), dict(ctx.stats)
        for i in range(50):
            y = op(x)
            np.testing.assert_array_equal(y, keep)
        assert dict(ctx.live) == live, "a repeated call created or destroyed Vulkan objects"
        assert ctx.stats["pipelines_created"] == stats["pipelines_created"]
        assert ctx.stats["submits"] - stats["submits"] == 50, "one submit per call"
        np.testing.assert_array_equal(first, keep)  # results are not views of reused buffers
    assert_close(keep, reference(x, w, b, activation=("Clip", -0.5, 0.5), **_GEOMETRY), REL)
