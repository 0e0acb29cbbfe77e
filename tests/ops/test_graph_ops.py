"""The non-conv kernels of device-resident graphs (vkconv.ops.elementwise, vkconv.ops.pool, vkconv.ops.resize,
vkconv.ops.copies, vkconv.ops.transpose) against onnx.reference one-node models, max abs diff <= 1e-5 x
max|expected|."""
from __future__ import annotations

import numpy as np
import pytest
from oracles import assert_close, onnx_reference

import vkconv
from vkconv.graph.steps import run_step
from vkconv.ops.copies import Concat, Slice
from vkconv.ops.elementwise import Binary, Unary
from vkconv.ops.pool import Pool
from vkconv.ops.resize import Resize
from vkconv.ops.transpose import Transpose

REL = 1e-5


def _rand(rng, *shape, low=-2.0, high=2.0):
    return rng.uniform(low, high, shape).astype(np.float32)


BROADCASTS = [
    ((2, 3, 5, 7), (2, 3, 5, 7)),      # same shape
    ((2, 3, 5, 7), (3, 1, 1)),         # per channel
    ((1, 3, 1, 7), (2, 1, 5, 1)),      # both sides broadcast
    ((7,), (2, 3, 5, 7)),              # lower rank on the left
    ((2, 1, 3, 1, 5), (1, 4, 1, 6, 1)),  # rank 5
    ((), (3, 4)),                      # scalar
    ((1, 1), (1, 1)),
]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("a_shape,b_shape", BROADCASTS)
def test_binary_matches_onnx(op, a_shape, b_shape):
    rng = np.random.default_rng(hash((op, a_shape, b_shape)) % 2**32)
    a = _rand(rng, *a_shape)
    b = _rand(rng, *b_shape, low=0.5, high=2.0) * rng.choice([-1, 1], b_shape).astype(np.float32)
    got = run_step(Binary(op), [a, b])[0]
    assert_close(got, onnx_reference(op, {"a": a, "b": b}, {}), REL)


def test_binary_fused_activation():
    rng = np.random.default_rng(1)
    a, b = _rand(rng, 1, 4, 9, 11), _rand(rng, 4, 1, 1)
    got = run_step(Binary("Mul", ("HardSigmoid", 0.3, 0.4)), [a, b])[0]
    expected = onnx_reference("HardSigmoid", {"x": onnx_reference("Mul", {"a": a, "b": b}, {})},
                              {"alpha": 0.3, "beta": 0.4})
    assert_close(got, expected, REL)


def test_binary_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="B: shape"):
        Binary("Add").output_shapes([(2, 3), (4,)])
    with pytest.raises(ValueError, match="op"):
        Binary("Pow")


UNARY = [("Relu", {}, ()), ("LeakyRelu", {"alpha": 0.07}, (0.07,)), ("HardSwish", {}, ()),
         ("HardSigmoid", {"alpha": 0.25, "beta": 0.45}, (0.25, 0.45)), ("Sigmoid", {}, ()),
         ("Tanh", {}, ()), ("Clip", None, (-0.5, 1.25))]


@pytest.mark.parametrize("shape", [(2, 3, 7, 13), (2, 3, 4, 16)])  # one element / 4 per invocation
@pytest.mark.parametrize("name,attrs,params", UNARY)
def test_unary_matches_onnx(name, attrs, params, shape):
    rng = np.random.default_rng(2)
    x = _rand(rng, *shape, low=-6, high=6)
    got = run_step(Unary((name, *params)), [x])[0]
    if name == "Clip":
        feeds = {"x": x, "min": np.float32(params[0]), "max": np.float32(params[1])}
        expected = onnx_reference("Clip", feeds, {})
    else:
        expected = onnx_reference(name, {"x": x}, attrs)
    assert_close(got, expected, REL)


POOLS = [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("MaxPool", dict(kernel_shape=[3, 2], strides=[2, 1], pads=[0, 1, 1, 0], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2])),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 3], strides=[2, 2], pads=[0, 1, 0, 1], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[2, 3], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1,
                         count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[5, 5])),
    # windows that tile the rows along W: the vec4 variant on widths that are multiples of 4
    ("MaxPool", dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 0])),
    ("AveragePool", dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 0], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 4], strides=[1, 4], pads=[0, 0, 1, 0])),
    ("GlobalAveragePool", {}),
    ("GlobalMaxPool", {}),
]


@pytest.mark.parametrize("shape", [(2, 3, 11, 13), (2, 3, 10, 16)])
@pytest.mark.parametrize("kind,attrs", POOLS)
def test_pool_matches_onnx(kind, attrs, shape):
    rng = np.random.default_rng(3)
    x = _rand(rng, *shape)
    kw = {k: v for k, v in attrs.items() if k != "kernel_shape"}
    got = run_step(Pool(kind, attrs.get("kernel_shape"), **kw), [x])[0]
    assert_close(got, onnx_reference(kind, {"x": x}, attrs), REL)


@pytest.mark.parametrize("kind", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("shape", [(2, 3, 12, 20), (1, 5, 40, 41), (1, 2, 1, 1)])  # vec4 / scalar loads
def test_global_pools_reduce_whole_planes(kind, shape):
    rng = np.random.default_rng(8)
    x = _rand(rng, *shape)
    x[0, 1, 0, -1] = np.nan if kind == "GlobalMaxPool" else x[0, 1, 0, -1]  # NaN propagates through max
    got = run_step(Pool(kind), [x])[0]
    expected = onnx_reference(kind, {"x": x}, {})
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert_close(np.nan_to_num(got), np.nan_to_num(expected), REL)


def test_pool_refuses_bad_input():
    with pytest.raises(ValueError, match="4-D"):
        Pool("MaxPool", [2, 2]).output_shapes([(1, 3, 8)])
    with pytest.raises(ValueError, match="window"):
        Pool("MaxPool", [5, 5]).output_shapes([(1, 3, 3, 3)])
    with pytest.raises(ValueError, match="kernel_shape"):
        Pool("AveragePool")


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1])
def test_concat_matches_onnx(axis):
    rng = np.random.default_rng(4)
    base = [2, 3, 5, 7]
    xs = []
    for extent in (1, 4, 2):
        shape = list(base)
        shape[axis] = extent
        xs.append(_rand(rng, *shape))
    got = run_step(Concat(axis), xs)[0]
    assert_close(got, onnx_reference("Concat", {f"x{i}": x for i, x in enumerate(xs)}, {"axis": axis}), REL)


def test_concat_refuses_mismatch():
    with pytest.raises(ValueError, match="input 1"):
        Concat(1).output_shapes([(1, 2, 3), (1, 2, 4)])


@pytest.mark.parametrize("axis, start, end", [(1, 0, 18), (1, 18, 27), (1, -9, 2**62), (3, 2, -1), (0, 1, 3),
                                              (-3, -100, 3)])
def test_slice_matches_onnx(axis, start, end):
    """One axis, step 1, ONNX clamping (INT64_MAX as "to the end", negative starts and ends)."""
    x = _rand(np.random.default_rng(5), 3, 27, 6, 7)
    expected = onnx_reference("Slice", {"x": x, "starts": np.array([start], np.int64),
                                        "ends": np.array([end], np.int64), "axes": np.array([axis], np.int64)}, {})
    assert_close(run_step(Slice(axis, start, min(end, 2**31 - 1)), [x])[0], expected, REL)


def test_slice_refuses_an_empty_result():
    with pytest.raises(ValueError, match="no elements"):
        run_step(Slice(2, 4, 2), [np.ones((1, 2, 6, 3), np.float32)])


TRANSPOSES = [
    ((5, 7), (1, 0)),
    ((3, 5, 7), (2, 0, 1)),
    ((3, 5, 7), (0, 2, 1)),
    ((2, 5, 3, 7), (0, 2, 3, 1)),           # NCHW -> NHWC
    ((2, 9, 11, 3), (0, 3, 1, 2)),          # NHWC -> NCHW
    ((3, 5, 7, 2), None),                   # the default: axes reversed
    ((2, 3, 5, 7, 9), (0, 1, 4, 2, 3)),     # the Keras converter's [N, T, H, W, C] -> [N, T, C, H, W]
    ((2, 3, 5, 7, 9), (0, 2, 1, 3, 4)),     # [N, T, C, H, W] <-> [N, C, T, H, W]
    ((3, 5, 2, 7, 3), (4, 2, 0, 3, 1)),     # nothing merges: five axes in the shader
    ((2, 1, 5, 1, 7), (3, 0, 4, 1, 2)),     # size-1 axes dropped before the shader
]


@pytest.mark.parametrize("shape, perm", TRANSPOSES, ids=lambda v: "x".join(map(str, v)) if v else "default")
def test_transpose_matches_onnx(shape, perm):
    x = _rand(np.random.default_rng(len(shape) * 10 + sum(shape)), *shape)
    expected = onnx_reference("Transpose", {"x": x}, {} if perm is None else {"perm": list(perm)})
    got = run_step(Transpose(perm), [x])[0]
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)  # a gather: exact


@pytest.mark.parametrize("shape, perm, axes", [
    ((2, 1, 5, 1, 7), (1, 0, 3, 2, 4), 1),  # only size-1 axes move: the memory order is kept
    ((2, 3, 5), (0, 1, 2), 1),              # the identity
    ((1, 3, 5, 7), (1, 0, 2, 3), 1),
    ((2, 3, 5, 7), (0, 2, 3, 1), 3),        # (H, W) stay together: one axis
    ((2, 3, 5, 7), (3, 2, 1, 0), 4),
])
def test_transpose_collapses_to_a_copy_where_memory_order_is_kept(shape, perm, axes):
    """Axes the shader walks (one or none: a plain buffer copy), and the result still right."""
    t = Transpose(perm)
    assert len(t.collapse(shape)) == axes
    x = _rand(np.random.default_rng(6), *shape)
    assert np.array_equal(run_step(t, [x])[0], onnx_reference("Transpose", {"x": x}, {"perm": list(perm)}))


def test_transpose_refuses_bad_perm_and_rank():
    with pytest.raises(ValueError, match="perm"):
        Transpose((0, 2, 2)).output_shapes([(2, 3, 4)])
    with pytest.raises(ValueError, match="perm"):
        Transpose((1, 0)).output_shapes([(2, 3, 4)])
    with pytest.raises(ValueError, match="rank 6"):
        Transpose().output_shapes([(1, 2, 1, 2, 1, 2)])


RESIZES = [
    ("nearest", "asymmetric", "floor", [1, 1, 2, 2], None),
    ("nearest", "half_pixel", "round_prefer_floor", [1, 1, 1.7, 2.3], None),
    # no sample position lands within rounding error of a tie: the reference and any float
    # implementation may break such near-ties differently
    ("nearest", "half_pixel", "round_prefer_ceil", None, [2, 3, 16, 8]),
    ("nearest", "asymmetric", "round_prefer_ceil", [1, 1, 2, 0.5], None),  # exact ties
    ("nearest", "align_corners", "ceil", None, [2, 3, 4, 21]),
    ("nearest", "pytorch_half_pixel", "round_prefer_floor", [1, 1, 0.6, 1.5], None),
    ("linear", "half_pixel", "round_prefer_floor", [1, 1, 2, 2], None),
    ("linear", "align_corners", "round_prefer_floor", None, [2, 3, 19, 5]),
    ("linear", "asymmetric", "round_prefer_floor", [1, 1, 1.5, 3], None),
    ("linear", "pytorch_half_pixel", "round_prefer_floor", None, [2, 3, 1, 16]),
    # whole-factor nearest upsampling: indices computed, not read (4 outputs per invocation when
    # the output width is a multiple of 4); ties that do not give o / f keep the tables
    ("nearest", "half_pixel", "round_prefer_floor", [1, 1, 4, 4], None),
    ("nearest", "asymmetric", "floor", [1, 1, 3, 2], None),
    ("nearest", "asymmetric", "round_prefer_ceil", [1, 1, 2, 2], None),
]


@pytest.mark.parametrize("mode,coord,nearest,scales,sizes", RESIZES)
def test_resize_matches_onnx(mode, coord, nearest, scales, sizes):
    rng = np.random.default_rng(5)
    x = _rand(rng, 2, 3, 7, 10)
    scales_a = None if scales is None else np.array(scales, np.float32)
    sizes_a = None if sizes is None else np.array(sizes, np.int64)
    got = run_step(Resize(mode, coord, nearest, scales=scales_a, sizes=sizes_a), [x])[0]
    feeds = {"x": x, "roi": None, "scales": scales_a, "sizes": sizes_a}
    expected = onnx_reference("Resize", feeds, dict(mode=mode, coordinate_transformation_mode=coord,
                                                    nearest_mode=nearest), opset=19)
    assert_close(got, expected, REL)


def test_upsample_matches_onnx():
    rng = np.random.default_rng(6)
    x = _rand(rng, 1, 2, 5, 3)
    scales = np.array([1, 1, 2, 3], np.float32)
    got = run_step(Resize("nearest", "asymmetric", "floor", scales=scales), [x])[0]
    assert_close(got, onnx_reference("Upsample", {"x": x, "scales": scales}, {"mode": "nearest"}, opset=9), REL)


def test_resize_refuses_bad_arguments():
    with pytest.raises(ValueError, match="scales"):
        Resize(scales=[2, 1, 2, 2])
    with pytest.raises(ValueError, match="coordinate_transformation_mode"):
        Resize(coordinate_transformation_mode="tf_crop_and_resize", scales=[1, 1, 2, 2])
    with pytest.raises(ValueError, match="sizes"):
        Resize(sizes=[1, 4, 8, 8]).output_shapes([(1, 3, 4, 4)])


def test_kernels_refuse_empty_tensors():
    with pytest.raises(ValueError, match="no elements"):
        run_step(Unary("Relu"), [np.zeros((0, 3), np.float32)])


def test_kernels_leave_no_objects():
    ctx = vkconv.get_context()
    before = {k: v for k, v in ctx.live.items() if k not in ("pipeline",)}
    x = np.ones((1, 2, 4, 4), np.float32)
    run_step(Resize("linear", scales=[1, 1, 2, 2]), [x])
    run_step(Binary("Add"), [x, x])
    after = {k: v for k, v in ctx.live.items() if k not in ("pipeline",)}
    assert after == before


def test_magic_division_is_exact():
    from vkconv.kernels.divide import magic

    rng = np.random.default_rng(7)
    for d in [1, 2, 3, 5, 7, 100, 321, 2**16 + 1, 2**30 + 1, 2**31 - 1, *rng.integers(1, 2**31, 200)]:
        m, shift = magic(int(d))
        assert m < 2**32
        for n in [0, 1, int(d) - 1, int(d), int(d) + 1, 2**31 - 1, *rng.integers(0, 2**31, 50)]:
            assert (n * m) >> (31 + shift) == n // int(d), (n, d)
    with pytest.raises(ValueError, match="divisor"):
        magic(0)


def _program_reference(program, arrays):
    """numpy evaluation of an Elementwise program (float64)."""
    from vkconv.kernels.activation import IMMEDIATE, OP_ACTIVATION

    regs = {i: a.astype(np.float64) for i, a in enumerate(arrays)}
    for k, ins in enumerate(program):
        u = ins.fa if ins.a == IMMEDIATE else regs[ins.a]
        v = ins.fa if ins.b == IMMEDIATE else regs[ins.b]
        if ins.op >= OP_ACTIVATION:  # only the activations used below
            assert ins.op - OP_ACTIVATION == 2
            regs[4 + k] = np.clip(u, ins.fa, ins.fb)
        else:
            regs[4 + k] = [np.add, np.subtract, np.multiply, np.divide][ins.op](u, v)
    return regs[3 + len(program)]


@pytest.mark.parametrize("shapes", [
    [(2, 3, 8, 12), (3, 1, 1), (1,), (2, 3, 8, 12)],      # vec4: innermost 12 contiguous or broadcast
    [(2, 3, 7, 5), (3, 1, 1), (2, 1, 7, 5), (5,)],         # scalar path: innermost 5
    [(1, 4, 8), (4, 1), (8,), (1, 1, 1)],                  # innermost 8 split by a broadcast
    [(2, 1, 3, 1, 4), (1, 5, 1, 6, 1), (4,), (1,)],        # five uncollapsible axes
])
def test_elementwise_program_four_inputs(shapes):
    from vkconv.kernels.activation import IMMEDIATE, OP_ACTIVATION, Instruction
    from vkconv.ops.elementwise import Elementwise

    rng = np.random.default_rng(len(shapes[0]))
    arrays = [_rand(rng, *s, low=0.5, high=2.0) for s in shapes]
    program = [Instruction(0, 0, 1),                         # r4 = a + b
               Instruction(3, IMMEDIATE, 4, 2.5),            # r5 = 2.5 / r4
               Instruction(1, 5, 2),                         # r6 = r5 - c
               Instruction(OP_ACTIVATION + 2, 6, 6, -0.5, 0.75),  # r7 = clip(r6)
               Instruction(2, 7, 3),                         # r8 = r7 * d
               Instruction(1, 8, IMMEDIATE, -1.0)]           # r9 = r8 - (-1)
    got = run_step(Elementwise(program, 4), arrays)[0]
    assert_close(got, _program_reference(program, arrays), REL)


def test_elementwise_program_is_checked():
    from vkconv.kernels.activation import Instruction
    from vkconv.ops.elementwise import Elementwise

    with pytest.raises(ValueError, match="register"):
        Elementwise([Instruction(0, 0, 5)], 1)
    with pytest.raises(ValueError, match="instructions"):
        Elementwise([Instruction(0, 0, 0)] * 9, 1)
    with pytest.raises(ValueError, match="n_inputs"):
        Elementwise([Instruction(0, 0, 0)], 5)
