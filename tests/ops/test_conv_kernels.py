"""Every dense-convolution kernel path, forced, against independent references.

Each case runs one kernel (``kernel=``) in both operand modes (uniform texel buffers, and storage
buffers via ``VKCONV_CONV_TEXEL=0``) and compares with onnxruntime's CPU ``Conv`` followed by the
ONNX activation node.  Tolerance: max abs difference <= 1e-4 x max|expected| for every path,
Winograd F(4x4, 3x3) and F(6x6, 3x3) included (their float32 transform errors are about 1e-5 and
2e-5 of that scale at 512 input channels against a float64 direct convolution, less at the channel
counts here).  Sizes are chosen so that the register
tiles have partial last blocks (channels not multiples of 4/8/16, widths not multiples of the pixel
tile, image sizes not multiples of 4).  The ONNX Conv3d conformance models run through
``vkconv.conv``; a context with ``VKCONV_LIMITS=mobile`` checks every kernel under a 128-invocation,
16 KiB shared-memory device.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import conformance_root
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close

import vkconv
from vkconv.runtime.context import Context

REL = 1e-4

_ACT_NODES = {  # vkconv activation spelling -> (ONNX op, attributes)
    "Relu": ("Relu", {}),
    "Sigmoid": ("Sigmoid", {}),
    "Tanh": ("Tanh", {}),
    "HardSwish": ("HardSwish", {}),
    "HardSigmoid": ("HardSigmoid", {}),
    ("LeakyRelu", 0.1): ("LeakyRelu", {"alpha": 0.1}),
}


def reference(x, w, b, *, strides, pads, dilations, group, activation=None) -> np.ndarray:
    """onnxruntime: a Conv node, then the activation node (Clip takes min/max as inputs)."""
    import onnxruntime as ort

    inputs = {"x": x, "w": w, "b": b}
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=list(strides), pads=list(pads),
                            dilations=list(dilations), group=group, kernel_shape=list(w.shape[2:]))
    nodes, init = [conv], []
    if activation is None:
        nodes[0].output[0] = "y"
    elif isinstance(activation, tuple) and activation[0] == "Clip":
        init = [numpy_helper.from_array(np.float32(activation[1]), "lo"),
                numpy_helper.from_array(np.float32(activation[2]), "hi")]
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"]))
    else:
        op, attrs = _ACT_NODES[activation]
        nodes.append(helper.make_node(op, ["c"], ["y"], **attrs))
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


@dataclass(frozen=True)
class Case:
    x_shape: tuple[int, ...]
    cout: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1
    activation: object = None

    def geometry(self) -> dict:
        nd = len(self.x_shape) - 2
        return dict(strides=self.strides or (1,) * nd, pads=self.pads or (0,) * (2 * nd),
                    dilations=self.dilations or (1,) * nd, group=self.group)

    def arrays(self, seed: int):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(self.x_shape).astype(np.float32)
        cin_g = self.x_shape[1] // self.group
        scale = 1.0 / math.sqrt(cin_g * math.prod(self.kernel))
        w = (rng.standard_normal((self.cout, cin_g, *self.kernel)) * scale).astype(np.float32)
        b = rng.standard_normal(self.cout).astype(np.float32)
        return x, w, b

    def __str__(self) -> str:
        g = self.geometry()
        act = self.activation if not isinstance(self.activation, tuple) else self.activation[0]
        return (f"x{'x'.join(map(str, self.x_shape))}-o{self.cout}-k{''.join(map(str, self.kernel))}"
                f"-s{''.join(map(str, g['strides']))}-p{''.join(map(str, g['pads']))}"
                f"-d{''.join(map(str, g['dilations']))}-g{self.group}-{act}")


CASES = {
    "implicit_gemm": [
        Case((2, 6, 9, 11), 4, (3, 2), (2, 1), (1, 0, 0, 1), (1, 2), 2, "Relu"),
        Case((1, 5, 13), 7, (3,), pads=(1, 2)),
        Case((1, 3, 5, 6, 7), 5, (2, 3, 3), (1, 2, 1), (1, 0, 1, 0, 1, 1)),
        Case((1, 24, 19, 37), 20, (3, 3), pads=(1, 1, 1, 1), activation=("LeakyRelu", 0.1)),
        Case((2, 16, 12, 16), 32, (3, 3), (2, 2), (0, 1, 1, 0), activation="HardSwish"),
        Case((1, 8, 10, 10), 8, (5, 5), pads=(4, 4, 4, 4), dilations=(2, 2), group=2, activation="Sigmoid"),
        Case((1, 4, 7, 9), 3, (1, 4), (3, 2)),
        # widths that are multiples of 4: read in place with the padding masked, column shifts 0..3
        Case((1, 5, 12), 7, (3,), pads=(1, 2)),
        Case((1, 3, 5, 6, 8), 5, (2, 3, 3), (1, 2, 1), (1, 0, 1, 0, 1, 1), activation="Relu"),
        Case((1, 4, 9, 16), 6, (3, 7), pads=(1, 3, 1, 3)),
        Case((1, 6, 11, 20), 5, (3, 3), (2, 2), (2, 2, 2, 2), (2, 2)),
        Case((1, 8, 10, 12), 6, (5, 5), pads=(2, 2, 2, 2), group=2, activation="Tanh"),
    ],
    "gemm1x1": [
        Case((1, 8, 7, 5), 12, (1, 1), activation="Relu"),
        Case((2, 16, 8, 6), 20, (1, 1), activation=("Clip", -0.5, 0.5)),
        Case((1, 12, 17), 6, (1,), group=3),
        Case((1, 6, 3, 4, 5), 9, (1, 1, 1)),
        Case((1, 32, 28, 28), 64, (1, 1), activation="Tanh"),
    ],
    "depthwise": [
        Case((1, 8, 9, 9), 8, (3, 3), pads=(1, 1, 1, 1), group=8),
        Case((2, 6, 11, 13), 12, (3, 3), (2, 2), (0, 1, 1, 0), group=6, activation="Relu"),
        Case((1, 4, 10, 17), 12, (3, 5), pads=(2, 2, 2, 2), dilations=(2, 1), group=4,
             activation="HardSigmoid"),
        Case((1, 5, 23), 5, (7,), pads=(3, 3), group=5),
        Case((1, 3, 4, 6, 7), 3, (3, 3, 3), pads=(1,) * 6, group=3),
        Case((1, 16, 30, 30), 16, (3, 3), pads=(1, 1, 1, 1), group=16, activation=("Clip", 0.0, 6.0)),
        # widths that are multiples of 4: read in place (no padded copy), every column shift 0..3
        Case((1, 8, 9, 12), 8, (3, 3), pads=(1, 1, 1, 1), group=8),
        Case((2, 6, 11, 16), 12, (3, 3), (2, 2), (0, 1, 1, 0), group=6, activation="Relu"),
        Case((1, 4, 10, 20), 12, (3, 5), pads=(2, 2, 2, 2), dilations=(2, 1), group=4),
        Case((1, 5, 24), 5, (7,), pads=(3, 3), group=5),
        Case((1, 3, 4, 6, 8), 3, (3, 3, 3), pads=(1,) * 6, group=3),
        Case((1, 16, 30, 32), 16, (5, 5), (2, 2), (2, 2, 2, 2), group=16),
        Case((1, 6, 7, 8), 6, (3, 3), group=6),
    ],
    "winograd": [
        Case((1, 5, 9, 11), 7, (3, 3), pads=(1, 1, 1, 1)),
        Case((2, 16, 17, 23), 20, (3, 3), pads=(0, 1, 2, 0), activation="Relu"),
        Case((1, 3, 30, 40), 4, (3, 3), pads=(1, 1, 1, 1)),
        Case((1, 64, 14, 14), 64, (3, 3), pads=(1, 1, 1, 1), activation=("Clip", 0.0, 6.0)),
        Case((1, 2, 3, 3), 1, (3, 3)),
        Case((1, 512, 8, 8), 32, (3, 3), pads=(1, 1, 1, 1)),  # the transform error grows with C_in
        # widths that are multiples of 4: read in place, the pads masked (pad_w 0..4), no pack pass
        Case((2, 9, 13, 20), 6, (3, 3), pads=(1, 1, 2, 3), activation="Relu"),
        Case((1, 7, 10, 8), 5, (3, 3)),
        Case((2, 4, 7, 12), 3, (3, 3), pads=(3, 4, 0, 1)),
        Case((1, 4, 6, 4), 4, (3, 3), pads=(2, 5, 1, 0)),  # pad_w 5: the padded copy
        # rows of 14 tiles (pitch 14: rows start at even, not multiple-of-4 tile numbers) and of 7
        # (pitch 8, one padding tile a row), batch 2: the output transform's groups span two rows
        Case((2, 8, 24, 56), 8, (3, 3), pads=(1, 1, 1, 1), activation="Relu"),
        Case((2, 8, 12, 28), 8, (3, 3), pads=(1, 1, 1, 1)),
    ],
    "winograd63": [  # F(6x6, 3x3): 8x8 input tiles, 4 tiles (24 columns) per group along a row
        Case((1, 5, 9, 11), 7, (3, 3), pads=(1, 1, 1, 1)),
        Case((2, 16, 25, 37), 20, (3, 3), pads=(0, 1, 2, 0), activation="Relu"),
        Case((1, 3, 30, 50), 4, (3, 3), pads=(1, 1, 1, 1), activation=("LeakyRelu", 0.1)),
        Case((1, 64, 14, 14), 64, (3, 3), pads=(1, 1, 1, 1), activation=("Clip", 0.0, 6.0)),
        Case((1, 2, 3, 3), 1, (3, 3)),
        Case((1, 512, 8, 8), 32, (3, 3), pads=(1, 1, 1, 1)),  # the transform error grows with C_in
        # widths that are multiples of 4: read in place, the pads masked (pad_w 0..4), no pack pass
        Case((2, 9, 13, 28), 6, (3, 3), pads=(1, 1, 2, 3), activation="Relu"),
        Case((1, 7, 10, 8), 5, (3, 3)),
        Case((2, 4, 7, 12), 3, (3, 3), pads=(3, 4, 0, 1)),
        Case((1, 4, 6, 4), 4, (3, 3), pads=(2, 5, 1, 0)),  # pad_w 5: the padded copy
        Case((2, 6, 26, 48), 5, (3, 3), pads=(2, 2, 2, 2), activation="Tanh"),  # 2 groups of 4 tiles
        # rows of 10 tiles (pitch 10) and of 5 (pitch 6, one padding tile a row), batch 2
        Case((2, 8, 24, 56), 8, (3, 3), pads=(1, 1, 1, 1), activation="Relu"),
        Case((2, 8, 12, 28), 8, (3, 3), pads=(1, 1, 1, 1)),
    ],
    "direct": [
        Case((2, 6, 9, 11), 4, (3, 2), (2, 1), (1, 0, 0, 1), (1, 2), 2, "Relu"),
        Case((1, 5, 13), 7, (3,), pads=(1, 2)),
        Case((1, 3, 5, 6, 7), 5, (2, 3, 3), (1, 2, 1), (1, 0, 1, 0, 1, 1), activation="Tanh"),
    ],
}
_PARAMS = [(k, c) for k, cases in CASES.items() for c in cases]


def _run(case: Case, kernel: str, seed: int, ctx: Context | None = None) -> None:
    x, w, b = case.arrays(seed)
    g = case.geometry()
    expected = reference(x, w, b, activation=case.activation, **g)
    with vkconv.Conv(w, b, activation=case.activation, kernel=kernel, ctx=ctx, **g) as op:
        assert op.kernel_for(x.shape) == kernel
        y = op(x)
        assert_close(y, expected, REL, what=f"{kernel} {case}")
        assert_close(op(x), expected, REL, what=f"{kernel} {case} (replayed)")


@pytest.mark.parametrize("mode", ["texel", "ssbo"])
@pytest.mark.parametrize("kernel, case", _PARAMS, ids=[f"{k}-{c}" for k, c in _PARAMS])
def test_forced_kernel_matches_onnxruntime(kernel, case, mode, monkeypatch):
    monkeypatch.setenv("VKCONV_CONV_TEXEL", "1" if mode == "texel" else "0")
    _run(case, kernel, seed=hash(str(case)) % 1000)


@pytest.fixture(scope="module")
def mobile_ctx():
    """A context whose limits are capped at a small mobile GPU's (VKCONV_LIMITS=mobile)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VKCONV_LIMITS", "mobile")
        ctx = Context()
    yield ctx
    ctx.close()


@pytest.mark.parametrize("kernel", list(CASES))
def test_every_kernel_runs_under_mobile_limits(kernel, mobile_ctx):
    info = mobile_ctx.info
    assert info.max_workgroup_invocations <= 128 and info.max_shared_memory <= 16384
    for i, case in enumerate(CASES[kernel][:3]):
        _run(case, kernel, seed=i, ctx=mobile_ctx)
    for key in mobile_ctx.pipelines:
        local = key[3][:3]
        assert math.prod(local) <= info.max_workgroup_invocations, key


def test_storage_buffers_replace_texels_past_the_texel_limit():
    """A device whose maxTexelBufferElements is too small gets the storage-buffer variants."""
    case = CASES["implicit_gemm"][3]
    with Context() as ctx:
        ctx.info = dataclasses.replace(ctx.info, max_texel_buffer_elements=64)
        _run(case, "implicit_gemm", seed=3, ctx=ctx)
        names = {key[0] for key in ctx.pipelines}
        assert names == {"conv_pack_ssbo", "conv_rows_ssbo"}, names


@pytest.mark.parametrize("mode", ["texel", "ssbo"])
def test_winograd_reads_inputs_of_whole_vec4_rows_in_place(mode, monkeypatch):
    """Widths that are multiples of 4 (pad_w <= 4) skip the pack pass; the others keep it (F(4,3), F(6,3))."""
    monkeypatch.setenv("VKCONV_CONV_TEXEL", "1" if mode == "texel" else "0")
    suffix = "" if mode == "texel" else "_ssbo"
    for case, packs in ((Case((2, 64, 9, 28), 32, (3, 3), pads=(1, 1, 1, 1)), False),
                        (Case((1, 64, 9, 10), 32, (3, 3), pads=(1, 1, 1, 1)), True),
                        (Case((1, 64, 9, 8), 32, (3, 3), pads=(0, 5, 0, 0)), True)):
        for kernel in ("winograd", "winograd63"):
            with Context() as ctx:
                _run(case, kernel, seed=7, ctx=ctx)
                names = {key[0] for key in ctx.pipelines}
                assert ("conv_pack" + suffix in names or "conv_pack" in names) == packs, (case, names)
                assert "conv_" + kernel + "_in" + suffix in names


# -- kernel choice ----------------------------------------------------------------------------
_SELECTION = [
    (Case((1, 32, 20, 20), 32, (3, 3), pads=(1, 1, 1, 1), group=32), "depthwise"),
    (Case((1, 32, 20, 20), 64, (1, 1)), "gemm1x1"),
    (Case((1, 64, 20, 20), 64, (3, 3), pads=(1, 1, 1, 1)), "winograd"),
    (Case((1, 64, 112, 112), 64, (3, 3), pads=(1, 1, 1, 1)), "winograd63"),
    (Case((1, 64, 56, 56), 64, (3, 3), pads=(1, 1, 1, 1)), "winograd"),
    (Case((1, 3, 20, 20), 16, (3, 3), pads=(1, 1, 1, 1)), "implicit_gemm"),
    (Case((1, 32, 20, 20), 64, (3, 3), (2, 2), (1, 1, 1, 1)), "implicit_gemm"),
    (Case((1, 32, 20, 20), 64, (1, 1), (2, 2)), "implicit_gemm"),
    (Case((1, 8, 5, 6, 7), 8, (3, 3, 3)), "implicit_gemm"),
]


@pytest.mark.parametrize("case, expected", _SELECTION, ids=[f"{e}-{c}" for c, e in _SELECTION])
def test_auto_selection_by_shape(case, expected, monkeypatch):
    monkeypatch.delenv("VKCONV_CONV_KERNEL", raising=False)
    x, w, b = case.arrays(0)
    with vkconv.Conv(w, b, **case.geometry()) as op:
        assert op.kernel_for(x.shape) == expected


def test_falls_back_to_direct_when_the_padded_copy_does_not_fit():
    case = Case((1, 4, 64, 63), 4, (3, 3), pads=(1, 1, 1, 1))
    x, w, b = case.arrays(4)
    with Context() as ctx:
        # Room for the input and output (63 KiB) but not the padded copy (66 x 68 floats a channel).
        ctx.info = dataclasses.replace(ctx.info, max_storage_buffer_range=4 * 4 * 64 * 66)
        with vkconv.Conv(w, b, ctx=ctx, **case.geometry()) as op:
            assert op.kernel_for(x.shape) == "direct"
            assert_close(op(x), reference(x, w, b, **case.geometry()), REL)
            # a width that is a multiple of 4 needs no copy: read in place
            assert op.kernel_for((1, 4, 64, 64)) == "implicit_gemm"


def test_env_var_forces_a_kernel(monkeypatch):
    case = CASES["winograd"][0]
    x, w, b = case.arrays(1)
    monkeypatch.setenv("VKCONV_CONV_KERNEL", "direct")
    with vkconv.Conv(w, b, **case.geometry()) as op:
        assert op.kernel_for(x.shape) == "direct"


def test_bad_kernel_requests_name_the_argument():
    x, w, b = CASES["implicit_gemm"][3].arrays(2)
    with pytest.raises(ValueError, match="^kernel: unknown 'fast'"):
        vkconv.Conv(w, b, kernel="fast")
    for kernel in ("gemm1x1", "depthwise", "winograd", "winograd63"):
        with vkconv.Conv(w, b, strides=2, kernel=kernel) as op:
            with pytest.raises(ValueError, match=f"^kernel: '{kernel}' cannot run"):
                op(x)


@pytest.mark.parametrize("kernel", list(CASES))
def test_repeated_calls_allocate_nothing_and_submit_once(kernel):
    case = CASES[kernel][1]
    x, w, b = case.arrays(5)
    ctx = vkconv.get_context()
    with vkconv.Conv(w, b, kernel=kernel, **case.geometry()) as op:
        first = op(x)
        live, stats = dict(ctx.live), dict(ctx.stats)
        for _ in range(5):
            np.testing.assert_array_equal(op(x), first)
        assert dict(ctx.live) == live
        assert ctx.stats["pipelines_created"] == stats["pipelines_created"]
        assert ctx.stats["submits"] - stats["submits"] == 5


# -- ONNX Conv3d conformance models -----------------------------------------------------------
def _conv3d_dirs() -> list[str]:
    root = conformance_root()
    if root is None:
        return ["test_Conv3d"]  # the fixture skips with a message
    return sorted(p.name for p in (root / "onnx-pytorch").glob("test_Conv3d*"))


@pytest.mark.parametrize("kernel", [None, "implicit_gemm", "direct"])
@pytest.mark.parametrize("name", _conv3d_dirs())
def test_conv3d_conformance(name, kernel, conformance, monkeypatch):
    if kernel is not None:
        monkeypatch.setenv("VKCONV_CONV_KERNEL", kernel)
    else:
        monkeypatch.delenv("VKCONV_CONV_KERNEL", raising=False)
    folder = Path(conformance) / "onnx-pytorch" / name
    model = onnx.load(folder / "model.onnx")
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def tensor(path: Path) -> np.ndarray:
        proto = onnx.TensorProto()
        proto.ParseFromString(path.read_bytes())
        return numpy_helper.to_array(proto)

    data = folder / "test_data_set_0"
    x = tensor(data / "input_0.pb")
    w = consts[node.input[1]]
    b = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
    expected = tensor(data / "output_0.pb")
    y = vkconv.conv(x, w, b, strides=tuple(attrs.get("strides", (1,) * 3)),
                    pads=tuple(attrs.get("pads", (0,) * 6)),
                    dilations=tuple(attrs.get("dilations", (1,) * 3)), group=attrs.get("group", 1))
    assert_close(y, expected, REL, what=name)


# -- fp16 weight storage ---------------------------------------------------------------------------
# Tolerance: each weight is rounded to float16 once (relative error <= 2^-11 = 4.9e-4) and the sums
# stay float32, so the output may move by a few 1e-4 of its scale: max abs diff <= 2e-3 x max|y|.
FP16_REL = 2e-3


@pytest.mark.parametrize("kernel", ["implicit_gemm", "gemm1x1", "depthwise", "winograd", "winograd63"])
def test_fp16_weights_match_within_the_stated_tolerance(kernel, monkeypatch):
    """Winograd keeps fp32 weights (its transform magnifies their rounding) and the fp32 tolerance."""
    if not vkconv.get_context().info.fp16_texel:
        pytest.skip("this device cannot read RGBA16F texel buffers")
    monkeypatch.setenv("VKCONV_CONV_TEXEL", "1")
    case = CASES[kernel][0]
    x, w, b = case.arrays(5)
    g = case.geometry()
    expected = reference(x, w, b, activation=case.activation, **g)
    with vkconv.Conv(w, b, activation=case.activation, kernel=kernel, fp16=True, **g) as op:
        y = op(x)
        kern = op._kernel(op.choice_for(x.shape).candidate)
        if kernel in ("winograd", "winograd63"):
            assert kern.gemm.weights.half is None
            assert_close(y, expected, REL, f"{kernel} {case}")
            return
        assert_close(y, expected, FP16_REL, f"{kernel} fp16 {case}")
        assert kern.weights.half is not None and kern.weights.full is None  # only the fp16 copy
        assert 2 * kern.weights.half.nbytes == kern.weights.size


def test_fp16_weights_fall_back_to_fp32_for_storage_reads(monkeypatch):
    """Without texel reads (VKCONV_CONV_TEXEL=0) fp16 is not used: results are fp32-exact."""
    if not vkconv.get_context().info.fp16_texel:
        pytest.skip("this device cannot read RGBA16F texel buffers")
    monkeypatch.setenv("VKCONV_CONV_TEXEL", "0")
    case = CASES["implicit_gemm"][0]
    x, w, b = case.arrays(6)
    g = case.geometry()
    with vkconv.Conv(w, b, activation=case.activation, kernel="implicit_gemm", fp16=True, **g) as op:
        assert_close(op(x), reference(x, w, b, activation=case.activation, **g), REL)


def test_fp16_refused_where_the_device_cannot_read_it():
    with Context() as ctx:
        ctx.info = dataclasses.replace(ctx.info, fp16_texel=False)
        with pytest.raises(vkconv.VkconvError, match="fp16"):
            vkconv.Conv(np.ones((4, 4, 3, 3), np.float32), fp16=True, ctx=ctx)


# -- tiled (GPU) kernel ----------------------------------------------------------------------------
# conv_tiled.comp forced on every shape above (on lavapipe it compiles slowly, about 2 s per
# activation, but runs these small shapes fast), plus one with several output-channel tiles and
# K strips that do not divide K.  Each case is far smaller than a 64 x 64 tile in some dimension.
_TILED_EXTRA = [Case((1, 10, 5, 7), 70, (3, 3), pads=(1, 1, 1, 1))]
_TILED = [c for cases in CASES.values() for c in cases] + _TILED_EXTRA
# Without activations (one pipeline per context): 1-D with pads, 3-D with stride, stride 3x2,
# groups, several oc tiles.
_TILED_MOBILE = [CASES["implicit_gemm"][1], CASES["implicit_gemm"][2], CASES["implicit_gemm"][6],
                 CASES["depthwise"][0], _TILED_EXTRA[0]]


def test_tiled_kernel_matches_onnxruntime():
    for i, case in enumerate(_TILED):
        _run(case, "tiled", seed=i)


def test_tiled_kernel_under_mobile_limits(mobile_ctx):
    info = mobile_ctx.info
    for i, case in enumerate(_TILED_MOBILE):
        _run(case, "tiled", seed=i, ctx=mobile_ctx)
    for key in mobile_ctx.pipelines:
        if key[0] == "conv_tiled":
            assert math.prod(key[3][:3]) <= info.max_workgroup_invocations, key


def test_tiled_kernel_with_small_tiles():
    """A device with 32 invocations per workgroup gets 16 x 16 tiles in K strips of 8: several
    channel and pixel tiles and strips on the same shapes."""
    from vkconv.kernels.tiling import choose_tiles

    with Context() as ctx:
        ctx.info = dataclasses.replace(ctx.info, max_workgroup_invocations=32)
        tile = choose_tiles(ctx)
        assert (tile.tm, tile.tn, tile.tk, tile.invocations) == (16, 16, 8, 16)
        for i, case in enumerate(_TILED_MOBILE[1:]):
            _run(case, "tiled", seed=10 + i, ctx=ctx)


def test_tile_choice_respects_the_device_limits():
    from vkconv.kernels.tiling import choose_tiles

    with Context() as ctx:
        for invocations, shared in [(128, 16384), (64, 8192), (1024, 65536), (32, 4096)]:
            ctx.info = dataclasses.replace(ctx.info, max_workgroup_invocations=invocations,
                                           max_shared_memory=shared)
            tile = choose_tiles(ctx)
            assert tile.invocations <= min(128, invocations)
            assert 4 * (tile.tm * tile.tk + tile.tk * tile.tn) + 16 * tile.tn <= min(16384, shared)
            assert tile.tm % tile.rm == 0 and tile.tn % tile.rn == 0
        ctx.info = dataclasses.replace(ctx.info, max_workgroup_invocations=8)
        with pytest.raises(vkconv.VkconvError, match="tiled"):
            choose_tiles(ctx)


@pytest.mark.parametrize("device_type", ["discrete", "integrated", "virtual", "cpu"])
def test_tiled_is_chosen_for_implicit_gemm_shapes_on_gpus_only(device_type, monkeypatch):
    monkeypatch.delenv("VKCONV_CONV_KERNEL", raising=False)
    gemm_shaped = Case((1, 32, 20, 20), 64, (3, 3), (2, 2), (1, 1, 1, 1))
    with Context() as ctx:
        ctx.info = dataclasses.replace(ctx.info, type=device_type)
        gpu = device_type != "cpu"
        for case, expected in _SELECTION:
            x, w, b = case.arrays(0)
            with vkconv.Conv(w, b, ctx=ctx, **case.geometry()) as op:
                want = "tiled" if gpu and expected == "implicit_gemm" else expected
                assert op.kernel_for(x.shape) == want, case
        x, w, b = gemm_shaped.arrays(0)
        with vkconv.Conv(w, b, ctx=ctx, **gemm_shaped.geometry()) as op:
            assert op.kernel_for(x.shape) == ("tiled" if gpu else "implicit_gemm")


@pytest.mark.parametrize("kernel", [*CASES, "tiled"])
def test_post_activation_program_in_every_kernel(kernel):
    """Activation.post (a graph moves constant elementwise chains after a conv there): HardSwish
    written out as PaddleOCR exports it, then a scale and shift, against numpy on onnxruntime's
    conv."""
    from vkconv.kernels.activation import IMMEDIATE, OP_ACTIVATION, OP_CODES, Activation, Instruction

    case = CASES.get(kernel, CASES["implicit_gemm"])[0]
    x, w, b = case.arrays(11)
    g = case.geometry()
    conv = reference(x, w, b, **g).astype(np.float64)
    clip = Activation.parse(("Clip", 0.0, 6.0))
    program = [Instruction(OP_CODES["Add"], 0, IMMEDIATE, 3.0),
               Instruction(OP_ACTIVATION + clip.kind, 4, 4, clip.a, clip.b),
               Instruction(OP_CODES["Mul"], 0, 5),
               Instruction(OP_CODES["Div"], 6, IMMEDIATE, 6.0),
               Instruction(OP_CODES["Mul"], IMMEDIATE, 7, 0.7),
               Instruction(OP_CODES["Sub"], 8, IMMEDIATE, 0.25)]
    relu = np.maximum(conv, 0)
    expected = 0.7 * (relu * np.clip(relu + 3, 0, 6) / 6) - 0.25
    act = Activation.parse("Relu").with_post(program)
    with vkconv.Conv(w, b, activation=act, kernel=kernel, **g) as op:
        assert_close(op(x), expected, REL, what=f"{kernel} {case}")
    with pytest.raises(ValueError, match="register"):
        Activation().with_post([Instruction(OP_CODES["Add"], 1, 0)])


@pytest.mark.parametrize("kernel", [*CASES, "tiled"])
def test_workgroups_spread_over_two_grid_axes(kernel):
    """A device allowing only 2 workgroups along x: every kernel's dispatch spreads over y as well
    (shaders/include/grid.glsl), and each invocation still finds its own work."""
    case = max(CASES.get(kernel, CASES["implicit_gemm"]), key=lambda c: math.prod(c.x_shape) * c.cout)
    with vkconv.Context() as ctx:
        ctx.info = dataclasses.replace(ctx.info, max_workgroup_count=(2, 65535, 65535))
        _run(case, kernel, seed=21, ctx=ctx)
