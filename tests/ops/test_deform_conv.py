"""vkconv.deform_conv / DeformConv against independent oracles.

Every test runs twice: with the heuristic method (the fused kernel where it can run: conv groups of
1 on a device with subgroup shuffles, as lavapipe) and with the columns method everywhere.

Oracles: the ONNX conformance data, onnx.reference (tiny shapes: it loops in Python and divides
by zero when H or W is 1), onnxruntime's CPU DeformConv (opset 19 and 22), ONNX Conv for the
cases where a deformable conv reduces to a plain one, and tests/deform_reference.py (float64
numpy, written from the specification).  Tolerance: max abs error <= 1e-4 x max|expected|.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from deform_reference import deform_conv_ref
from onnx import numpy_helper
from oracles import assert_close, onnx_reference, onnxruntime_reference

import vkconv
from vkconv.ops.deform_conv import Chunk, DeformCandidate, DeformConv, deform_conv

REL = 1e-4
COLUMNS = DeformCandidate(method="columns")


@pytest.fixture(autouse=True, params=["heuristic", "columns"])
def method(request, monkeypatch):
    if request.param == "columns":
        monkeypatch.setattr(DeformConv, "_heuristic_method", lambda self, local_size: "columns")
    return request.param


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _out_size(size, k, s, p0, p1, d):
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


def _problem(seed, n=1, cin=4, cout=4, h=6, w=6, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1),
             dilations=(1, 1), group=1, offset_group=1, mask=True, bias=True, scale=1.5):
    """Random inputs in ONNX order plus the keyword arguments of deform_conv."""
    rng = np.random.default_rng(seed)
    oh = _out_size(h, k[0], strides[0], pads[0], pads[2], dilations[0])
    ow = _out_size(w, k[1], strides[1], pads[1], pads[3], dilations[1])
    taps = k[0] * k[1]
    inputs = dict(
        x=_rand(rng, n, cin, h, w),
        w=_rand(rng, cout, cin // group, *k),
        offset=_rand(rng, n, offset_group * 2 * taps, oh, ow, scale=scale),
        b=_rand(rng, cout) if bias else None,
        mask=rng.random((n, offset_group * taps, oh, ow)).astype(np.float32) if mask else None)
    attrs = dict(strides=strides, pads=pads, dilations=dilations, group=group,
                 offset_group=offset_group)
    return inputs, attrs


def _run(inputs, attrs):
    return deform_conv(inputs["x"], inputs["w"], inputs["offset"], inputs["b"], inputs["mask"], **attrs)


def _ref(inputs, attrs):
    return deform_conv_ref(inputs["x"], inputs["w"], inputs["offset"], inputs["b"], inputs["mask"],
                           **attrs)


def _onnx_inputs(inputs):
    return {"X": inputs["x"], "W": inputs["w"], "offset": inputs["offset"], "B": inputs["b"],
            "mask": inputs["mask"]}


def _onnx_attrs(inputs, attrs):
    return {"kernel_shape": list(inputs["w"].shape[2:]), "strides": list(attrs["strides"]),
            "pads": list(attrs["pads"]), "dilations": list(attrs["dilations"]),
            "group": attrs["group"], "offset_group": attrs["offset_group"]}


# -- conformance -------------------------------------------------------------------------------
def _load_pb(path):
    t = onnx.TensorProto()
    t.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(t)


@pytest.mark.parametrize("name", ["test_basic_deform_conv_with_padding", "test_deform_conv_with_mask_bias"])
def test_onnx_conformance(conformance, name):
    case = conformance / "onnx-node" / name
    model = onnx.load(case / "model.onnx")
    node = model.graph.node[0]
    assert node.op_type == "DeformConv"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    data = case / "test_data_set_0"
    feeds = {i.name: _load_pb(data / f"input_{k}.pb") for k, i in enumerate(model.graph.input)}
    args = [feeds.get(name) if name else None for name in node.input]
    args += [None] * (5 - len(args))
    expected = _load_pb(data / "output_0.pb")
    kwargs = {k: attrs[k] for k in ("strides", "pads", "dilations", "group", "offset_group") if k in attrs}
    got = deform_conv(args[0], args[1], args[2], args[3], args[4], **kwargs)
    assert_close(got, expected, rel=REL, what=name)


# -- randomized against onnx.reference (tiny) -----------------------------------------------------
@pytest.mark.parametrize("seed, kw", [
    (0, dict(cin=2, cout=2, h=3, w=4, k=(2, 2), pads=(0, 0, 0, 0))),
    (1, dict(cin=2, cout=2, h=4, w=3, k=(2, 2), pads=(1, 0, 0, 1), mask=False)),
    (2, dict(cin=4, cout=2, h=4, w=4, k=(2, 2), group=2, offset_group=2, strides=(2, 1), pads=(1, 1, 1, 1))),
    (3, dict(cin=2, cout=2, h=5, w=4, k=(3, 2), dilations=(1, 2), pads=(1, 1, 1, 1), bias=False)),
])
def test_against_onnx_reference(seed, kw):
    inputs, attrs = _problem(seed, **kw)
    expected = onnx_reference("DeformConv", _onnx_inputs(inputs), _onnx_attrs(inputs, attrs))
    assert_close(_run(inputs, attrs), expected, rel=REL)


def test_numpy_reference_matches_onnx_reference():
    """The float64 reference itself agrees with onnx.reference, so the grid below is anchored."""
    inputs, attrs = _problem(7, cin=4, cout=2, h=4, w=5, k=(2, 3), group=2, offset_group=2,
                             pads=(1, 0, 0, 1), scale=2.5)
    expected = onnx_reference("DeformConv", _onnx_inputs(inputs), _onnx_attrs(inputs, attrs))
    assert_close(_ref(inputs, attrs).astype(np.float32), expected, rel=1e-5)


# -- randomized against the numpy reference -----------------------------------------------------
GRID = [
    dict(),
    dict(strides=(2, 2), pads=(0, 0, 0, 0)),
    dict(strides=(2, 1), dilations=(2, 1), pads=(2, 1, 0, 1), h=9, w=7),
    dict(k=(1, 1), pads=(0, 0, 0, 0)),
    dict(k=(5, 3), pads=(2, 1, 2, 1), h=8, w=5),
    dict(cin=8, cout=6, group=2),
    dict(cin=12, cout=6, group=3, offset_group=2),        # conv groups straddle offset groups
    dict(cin=12, cout=12, group=4, offset_group=4, mask=False),
    dict(cin=6, cout=4, group=2, offset_group=3, bias=False),
    dict(cin=12, cout=3, group=3, offset_group=2, n=2),   # padding blocks in one group
    dict(cin=5, cout=7, offset_group=5),                  # 1-channel offset groups
    dict(cin=9, cout=4, offset_group=3, mask=False, bias=False),
    dict(cin=3, cout=20, n=3, h=5, w=9),                  # several output-channel tiles
    dict(cin=36, cout=17, h=11, w=13, group=1, offset_group=4),
    dict(cin=8, cout=16, group=8, offset_group=2),         # one channel block spans 4 conv groups
    dict(cin=10, cout=4, group=2, offset_group=2, n=2, h=5, w=7),  # blocks straddle conv groups
    dict(cin=4, cout=4, h=2, w=2, pads=(1, 1, 1, 1), scale=3.0),
    dict(cin=20, cout=8, h=8, w=6, scale=3.0),            # 5 blocks per offset group: block loop not unrolled
    dict(cin=24, cout=6, h=7, w=5, group=2, mask=False),  # the same with per-pixel offset reads (35 pixels)
]


@pytest.mark.parametrize("kw", GRID, ids=[str(i) for i in range(len(GRID))])
def test_against_numpy_reference(kw):
    inputs, attrs = _problem(100 + len(str(kw)), **kw)
    assert_close(_run(inputs, attrs), _ref(inputs, attrs), rel=REL)


@pytest.mark.parametrize("opset", [19, 22])
def test_against_onnxruntime(opset):
    inputs, attrs = _problem(11, n=2, cin=8, cout=6, h=9, w=7, group=2, offset_group=4,
                             strides=(1, 2), pads=(1, 2, 0, 1), scale=2.0)
    expected = onnxruntime_reference("DeformConv", _onnx_inputs(inputs), _onnx_attrs(inputs, attrs),
                                     opset=opset)
    assert_close(_run(inputs, attrs), expected, rel=REL)


ORT_GRID = [
    dict(cin=64, cout=64, h=56, w=56),                    # the benchmark's 64 -> 64 layer, DCNv2
    dict(cin=64, cout=64, h=56, w=56, offset_group=4, mask=False),  # ... DCNv1, 4 offset groups
    dict(n=3, cin=16, cout=24, h=13, w=11, group=2, offset_group=4),  # 143 pixels: not a multiple of 4
    dict(n=2, cin=32, cout=16, h=9, w=15, offset_group=2, mask=False, bias=False),
    dict(n=2, cin=12, cout=8, h=11, w=7, group=4, offset_group=3, strides=(2, 2), dilations=(2, 1),
         pads=(2, 1, 1, 1)),
    # 136 outputs: two chunks of the fused kernel's output channels (8 lanes x 4 vec4s each)
    dict(n=2, cin=16, cout=136, h=7, w=9, offset_group=2, strides=(2, 1)),
    dict(n=2, cin=24, cout=72, h=10, w=6, offset_group=3, dilations=(1, 2), pads=(1, 2, 1, 2)),
]


@pytest.mark.parametrize("kw", ORT_GRID, ids=[str(i) for i in range(len(ORT_GRID))])
def test_against_onnxruntime_grid(kw):
    """Real layer sizes and odd ones (batch > 1, conv and offset groups, with and without mask)
    against onnxruntime's CPU DeformConv (opset 19)."""
    inputs, attrs = _problem(300 + len(str(kw)), **kw)
    expected = onnxruntime_reference("DeformConv", _onnx_inputs(inputs), _onnx_attrs(inputs, attrs), opset=19)
    assert_close(_run(inputs, attrs), expected, rel=REL)


def test_samples_off_every_edge():
    """Points beyond each edge, exactly on -1 and H/W, and just inside: all by the boundary rule."""
    inputs, attrs = _problem(21, cin=4, cout=3, h=5, w=6, k=(2, 2), pads=(0, 0, 0, 0))
    h, w = inputs["x"].shape[2:]
    off = inputs["offset"]
    picks = np.array([-h - 3.0, -1.0 - h, -h + 0.25, -0.5, 0.75, h - 1.5, float(h), h + 0.5, 40.0,
                      -float(w), float(w) - 0.25, -1e6, 1e6], np.float32)
    rng = np.random.default_rng(3)
    off[...] = rng.choice(picks, size=off.shape)
    assert_close(_run(inputs, attrs), _ref(inputs, attrs), rel=REL)


def test_all_samples_outside_give_bias():
    inputs, attrs = _problem(22, cin=4, cout=5, h=4, w=4)
    inputs["offset"][:, 0::2] = 4.0 + 1.0     # dy pushes every point below the image
    got = _run(inputs, attrs)
    np.testing.assert_array_equal(got, np.broadcast_to(inputs["b"][None, :, None, None], got.shape))


def test_integer_offsets_equal_shifted_conv():
    """A constant integer offset (dy, dx) is a plain Conv of the input shifted by (dy, dx)."""
    inputs, attrs = _problem(23, cin=6, cout=4, h=7, w=8, group=2, pads=(1, 2, 1, 0), mask=False)
    dy, dx = 2, -3
    inputs["offset"][:, 0::2] = dy
    inputs["offset"][:, 1::2] = dx
    # Padding positions can sample real pixels too, so pad explicitly before shifting.
    top, left, bottom, right = attrs["pads"]
    h, w = inputs["x"].shape[2:]
    margin = 8
    xp = np.pad(inputs["x"], ((0, 0), (0, 0), (margin, margin), (margin, margin)))
    shifted = xp[:, :, margin + dy - top:margin + dy + h + bottom, margin + dx - left:margin + dx + w + right]
    expected = onnx_reference("Conv", {"X": np.ascontiguousarray(shifted), "W": inputs["w"], "B": inputs["b"]},
                              {"group": attrs["group"]})
    assert_close(_run(inputs, attrs), expected, rel=REL)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(cin=8, cout=4, group=4, offset_group=2, strides=(2, 1), dilations=(1, 2), pads=(0, 2, 1, 1), h=9, w=9),
])
def test_zero_offsets_equal_conv(kw):
    inputs, attrs = _problem(24, mask=False, **kw)
    inputs["offset"][...] = 0.0
    expected = onnx_reference("Conv", {"X": inputs["x"], "W": inputs["w"], "B": inputs["b"]},
                              {"pads": list(attrs["pads"]), "strides": list(attrs["strides"]),
                               "dilations": list(attrs["dilations"]), "group": attrs["group"]})
    assert_close(_run(inputs, attrs), expected, rel=REL)


# -- documented non-finite behaviour -----------------------------------------------------------
def test_nan_offset_propagates():
    """A NaN dy poisons exactly the outputs that read that (offset group, tap, pixel)."""
    inputs, attrs = _problem(25, cin=4, cout=4, group=2, offset_group=2, h=5, w=5)
    inputs["offset"][0, 2 * (9 + 4), 2, 3] = np.nan      # offset group 1, centre tap, pixel (2, 3)
    got = _run(inputs, attrs)
    nan = np.isnan(got)
    expected_nan = np.zeros_like(nan)
    expected_nan[0, 2:, 2, 3] = True                     # conv group 1 reads offset group 1
    np.testing.assert_array_equal(nan, expected_nan)
    ref = _ref(inputs, attrs)
    assert_close(np.where(nan, 0, got), np.where(nan, 0, ref), rel=REL)


def test_infinite_offsets_sample_zero():
    inputs, attrs = _problem(26, cin=4, cout=3, mask=False, bias=False)
    inputs["offset"][:, 0::2] = np.inf
    np.testing.assert_array_equal(_run(inputs, attrs), 0.0)


# -- the layer object --------------------------------------------------------------------------
def test_layer_reuse_shapes_and_one_submit():
    inputs, attrs = _problem(30, n=2, cin=8, cout=8, h=9, w=10, offset_group=2)
    with DeformConv(inputs["w"], inputs["b"], **attrs) as op:
        ctx = op.ctx
        assert op.output_shape(inputs["x"].shape) == (2, 8, 9, 10)
        first = op(inputs["x"], inputs["offset"], inputs["mask"])
        before = ctx.stats["submits"]
        again = op(inputs["x"], inputs["offset"], inputs["mask"])
        assert ctx.stats["submits"] - before == 1
        np.testing.assert_array_equal(first, again)
        assert_close(first, _ref(inputs, attrs), rel=REL)
        small, sattrs = _problem(31, n=1, cin=8, cout=8, h=4, w=5, offset_group=2, mask=False)
        assert_close(op(small["x"], small["offset"]),
                     _ref({**small, "w": inputs["w"], "b": inputs["b"]}, sattrs), rel=REL)
        w2 = inputs["w"][::-1].copy()
        op.set_weights(w2, None)
        assert_close(op(inputs["x"], inputs["offset"], inputs["mask"]),
                     _ref({**inputs, "w": w2, "b": None}, attrs), rel=REL)


@pytest.mark.parametrize("budget_pixels, expected", [
    (None, [Chunk(0, 2, 0, 437)]),                       # everything in one chunk
    (437, [Chunk(0, 1, 0, 437), Chunk(1, 1, 0, 437)]),   # one whole image per chunk
    (64, None),                                          # runs of 64 pixels of one image
])
def test_column_chunks(budget_pixels, expected):
    """A small column budget splits the work into chunks that are multiplied into a scratch output
    and copied into place; the result does not change."""
    inputs, attrs = _problem(32, n=2, cin=8, cout=6, h=23, w=19, group=2, offset_group=2)
    with DeformConv(inputs["w"], inputs["b"], **attrs) as op:
        if budget_pixels is not None:
            # group x (C_in/g x taps) rows of 4 bytes per pixel, rows padded to 16-pixel tiles
            op.column_budget = 2 * 4 * 9 * 4 * -(-budget_pixels // 16) * 16
        chunks = op.chunks(2, 23 * 19)
        if expected is None:
            assert all(c.images == 1 and c.pixels <= 64 for c in chunks) and len(chunks) == 2 * 7
            assert sum(c.pixels for c in chunks) == 2 * 437
        else:
            assert chunks == expected
        got = op(inputs["x"], inputs["offset"], inputs["mask"])
    assert_close(got, _ref(inputs, attrs), rel=REL)


def test_column_chunks_with_quad_offsets():
    """Chunks of 64 pixels of an image whose size is a multiple of 4: the sampling stage reads
    offsets and mask 4 pixels at a time, also in the last, partly padded tile of each chunk."""
    inputs, attrs = _problem(38, n=2, cin=8, cout=6, h=15, w=20, offset_group=2, scale=3.0)
    with DeformConv(inputs["w"], inputs["b"], candidate=COLUMNS, **attrs) as op:
        op.column_budget = 8 * 9 * 4 * 64  # C_in/g x taps rows of 4 bytes per pixel
        chunks = op.chunks(2, 15 * 20)
        # 4 x 64 + 44 pixels per image; 44 pixels fill 3 tiles of 16, the last with one padding quad
        assert [c.pixels for c in chunks] == [64, 64, 64, 64, 44] * 2
        got = op(inputs["x"], inputs["offset"], inputs["mask"])
    assert_close(got, _ref(inputs, attrs), rel=REL)


def test_chunk_budget_too_small_is_refused():
    inputs, attrs = _problem(36)
    with DeformConv(inputs["w"], inputs["b"], candidate=COLUMNS, **attrs) as op:
        op.column_budget = 1024
        with pytest.raises(vkconv.VkconvError, match="^w: 4 input channels per group x 3x3 taps"):
            op(inputs["x"], inputs["offset"], inputs["mask"])


@pytest.mark.parametrize("h, w", [(9, 7), (8, 8)])  # offsets read per pixel / 4 pixels at a time
def test_storage_buffer_fallback(h, w):
    """A device whose texel buffers are too small for the operands: the storage-buffer variants of
    every stage run (and give the same result)."""
    inputs, attrs = _problem(37, n=2, cin=8, cout=6, h=h, w=w, group=2, offset_group=2)
    with vkconv.Context() as ctx:
        ctx.info = dataclasses.replace(ctx.info, max_texel_buffer_elements=16)
        with DeformConv(inputs["w"], inputs["b"], ctx=ctx, **attrs) as op:
            got = op(inputs["x"], inputs["offset"], inputs["mask"])
        names = {key[0] for key in ctx.pipelines}
    assert {"deform_conv_pack_ssbo", "deform_conv_sample_ssbo", "conv_rows_ssbo"} <= names, names
    assert not names & {"deform_conv_pack", "deform_conv_sample", "conv_rows"}, names
    assert_close(got, _ref(inputs, attrs), rel=REL)


@pytest.mark.parametrize("h, w", [(9, 7), (8, 8)])
def test_fused_storage_buffer_fallback(method, h, w):
    """The fused kernel's storage-buffer variant (texel buffers too small), conv groups of 1."""
    inputs, attrs = _problem(39, n=2, cin=12, cout=20, h=h, w=w, offset_group=3)
    if method == "columns":
        pytest.skip("forces the fused method: once is enough")
    with vkconv.Context() as ctx:
        if not ctx.info.subgroup_shuffle:
            pytest.skip(f"{ctx.info.name}: no subgroup shuffles, which the fused method needs")
        ctx.info = dataclasses.replace(ctx.info, max_texel_buffer_elements=16)
        with DeformConv(inputs["w"], inputs["b"], ctx=ctx, candidate=DeformCandidate(method="fused"), **attrs) as op:
            got = op(inputs["x"], inputs["offset"], inputs["mask"])
        names = {key[0] for key in ctx.pipelines}
    assert {"deform_conv_pack_ssbo", "deform_conv_fused_ssbo"} <= names, names
    assert_close(got, _ref(inputs, attrs), rel=REL)


def test_small_workgroup_count_limit():
    """A device allowing only 16 workgroups per dimension: the pack stage loops over its pixels
    and every chunk holds one tile, instead of a dispatch past the limit."""
    inputs, attrs = _problem(35, n=2, cin=8, cout=4, h=30, w=17, offset_group=2)
    with vkconv.Context() as ctx:
        ctx.info = dataclasses.replace(ctx.info, max_workgroup_count=(16, 65535, 65535))
        with DeformConv(inputs["w"], inputs["b"], ctx=ctx, **attrs) as op:
            got = op(inputs["x"], inputs["offset"], inputs["mask"])
    assert_close(got, _ref(inputs, attrs), rel=REL)


def test_fused_activation():
    inputs, attrs = _problem(33, cin=4, cout=5)
    with DeformConv(inputs["w"], inputs["b"], activation=("LeakyRelu", 0.1), **attrs) as op:
        got = op(inputs["x"], inputs["offset"], inputs["mask"])
    ref = _ref(inputs, attrs)
    assert_close(got, np.where(ref < 0, 0.1 * ref, ref), rel=REL)


def test_empty_batch():
    inputs, attrs = _problem(34, n=0)
    got = _run(inputs, attrs)
    assert got.shape == (0, 4, 6, 6) and got.dtype == np.float32


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("change, name", [
    (lambda i: {"offset": i["offset"][:, :-2]}, "offset"),              # wrong offset channels
    (lambda i: {"offset": i["offset"][:, :, :-1]}, "offset"),           # wrong spatial size
    (lambda i: {"offset": np.concatenate([i["offset"]] * 2)}, "offset"),  # wrong batch
    (lambda i: {"offset": i["offset"][0]}, "offset"),                   # wrong rank
    (lambda i: {"mask": i["mask"][:, :-1]}, "mask"),                    # wrong mask channels
    (lambda i: {"mask": i["mask"][:, :, :, :-1]}, "mask"),
    (lambda i: {"mask": i["mask"].astype(np.float64)}, "mask"),
    (lambda i: {"x": i["x"][0]}, "x"),
    (lambda i: {"x": i["x"][:, :3]}, "x"),                              # channels vs w and group
    (lambda i: {"x": i["x"].astype(np.float16)}, "x"),
    (lambda i: {"x": i["x"][:, :, :1, :1]}, "x"),                       # smaller than the kernel
    (lambda i: {"b": i["b"][:3]}, "b"),
    (lambda i: {"w": i["w"][:, :, :, :, None]}, "w"),
    (lambda i: {"w": i["w"][:3]}, "w"),                                 # C_out not divisible by group
    (lambda i: {"offset_group": 3}, "offset_group"),                    # C_in not divisible
    (lambda i: {"offset_group": 0}, "offset_group"),
    (lambda i: {"group": 0}, "group"),
    (lambda i: {"strides": (0, 1)}, "strides"),
    (lambda i: {"pads": (1, 1, -1, 1)}, "pads"),
    (lambda i: {"dilations": "2"}, "dilations"),
    (lambda i: {"offset": [[0.0]]}, "offset"),
])
def test_bad_input(change, name):
    inputs, attrs = _problem(40, cin=4, cout=4, group=2, offset_group=2)
    for key, value in change(inputs).items():
        (inputs if key in inputs else attrs)[key] = value
    with pytest.raises(ValueError, match=name):
        _run(inputs, attrs)


def test_closed_layer_refuses():
    inputs, attrs = _problem(41)
    op = DeformConv(inputs["w"], inputs["b"], **attrs)
    op.close()
    with pytest.raises(vkconv.VkconvError):
        op(inputs["x"], inputs["offset"], inputs["mask"])
