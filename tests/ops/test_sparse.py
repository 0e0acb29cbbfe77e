"""Sparse 3-D convolution (vkconv.SparseTensor, subm_conv3d, sparse_conv3d, sparse_inverse_conv3d,
gather_rows, scatter_add_rows) against dense references -- spconv's own test strategy.

Oracles: the sparse tensor is densified and convolved densely in float64 numpy (``dense_conv3d``,
itself checked against onnx.reference Conv; ``dense_conv_transpose3d`` against onnx.reference
ConvTranspose); activations by onnx.reference.  The expected active sites come from convolving the
occupancy grid with an all-ones kernel, independently of any rulebook.  Tolerance: max abs diff
<= 1e-4 x max|expected| (tests/oracles.assert_close).  The device rulebook is also compared with
the numpy rulebook kept in vkconv/sparse_rulebook.py, and, where spconv is installed, results with
spconv 2.x itself.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import zlib

import numpy as np
import pytest
from oracles import assert_close, onnx_reference

import vkconv
from vkconv.ops.sparse.rulebook import build_rulebook, make_geometry, reference_rulebook

REL = 1e-4


# -- references ---------------------------------------------------------------------------------
def dense_conv3d(x, w, b=None, stride=(1, 1, 1), pad=(0, 0, 0), dil=(1, 1, 1)):
    """Cross-correlation of ``x [B, C, D, H, W]`` with spconv-layout ``w [Cout, kD, kH, kW, Cin]``,
    symmetric zero padding, in float64."""
    kernel = w.shape[1:4]
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(p, p) for p in pad])
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
           for s, k, st, p, d in zip(x.shape[2:], kernel, stride, pad, dil)]
    y = np.zeros((x.shape[0], w.shape[0], *out))
    for tap in itertools.product(*[range(k) for k in kernel]):
        window = tuple(slice(t * d, t * d + (o - 1) * st + 1, st)
                       for t, d, o, st in zip(tap, dil, out, stride))
        y += np.einsum("bcdhw,oc->bodhw", xp[(slice(None), slice(None), *window)],
                       w[(slice(None), *tap)].astype(np.float64))
    if b is not None:
        y += b.reshape(1, -1, 1, 1, 1)
    return y


def dense_conv_transpose3d(x, w, out_shape, stride, pad, dil):
    """Transposed convolution onto a grid of ``out_shape``: every site ``o`` of ``x`` adds
    ``w[:, tap] @ x[:, o]`` to site ``o * stride - pad + tap * dil`` (``w [Cout, kD, kH, kW, Cin]``
    maps the Cin channels of ``x`` to Cout), in float64."""
    y = np.zeros((x.shape[0], w.shape[0], *out_shape))
    for tap in itertools.product(*[range(k) for k in w.shape[1:4]]):
        idx = []
        for axis in range(3):
            o = np.arange(x.shape[2 + axis])
            i = o * stride[axis] - pad[axis] + tap[axis] * dil[axis]
            ok = (i >= 0) & (i < out_shape[axis])
            idx.append((o[ok], i[ok]))
        src = x[:, :, idx[0][0]][:, :, :, idx[1][0]][:, :, :, :, idx[2][0]].astype(np.float64)
        contrib = np.einsum("bcdhw,oc->bodhw", src, w[(slice(None), *tap)].astype(np.float64))
        y[np.ix_(range(y.shape[0]), range(y.shape[1]), idx[0][1], idx[1][1], idx[2][1])] += contrib
    return y


def activate(y, activation):
    """The ONNX activation op, by onnx.reference."""
    if activation is None:
        return y
    name, params = (activation, ()) if isinstance(activation, str) else (activation[0], activation[1:])
    y = y.astype(np.float32)
    if name == "Clip":
        return onnx_reference("Clip", {"x": y, "min": np.array(params[0], np.float32),
                                       "max": np.array(params[1], np.float32)}, {})
    attrs = {"alpha": float(params[0])} if params else {}
    return onnx_reference(name, {"x": y}, attrs)


def random_sites(rng, n, spatial, batch):
    """``n`` distinct (batch, z, y, x) rows in random order."""
    lin = rng.choice(batch * math.prod(spatial), size=n, replace=False)
    b, rest = np.divmod(lin, math.prod(spatial))
    z, rest = np.divmod(rest, spatial[1] * spatial[2])
    y, x = np.divmod(rest, spatial[2])
    return np.column_stack([b, z, y, x]).astype(np.int32)


def occupancy(indices, batch, spatial):
    mask = np.zeros((batch, *spatial), bool)
    mask[tuple(indices.T)] = True
    return mask


def random_tensor(rng, n, spatial, batch, channels):
    idx = random_sites(rng, n, spatial, batch)
    return vkconv.SparseTensor(rng.standard_normal((n, channels)).astype(np.float32), idx, spatial, batch)


def check_against_dense(out: vkconv.SparseTensor, expected_dense, expected_sites, what=""):
    """Sites equal ``expected_sites`` (a boolean grid), features match the dense result there, and
    the densified output is zero everywhere else."""
    got_sites = occupancy(out.indices, out.batch_size, out.spatial_shape)
    assert got_sites.shape == expected_sites.shape, what
    assert np.array_equal(got_sites, expected_sites), f"{what}: active sites differ"
    assert len(np.unique(out.indices, axis=0)) == len(out.indices), f"{what}: duplicate output sites"
    assert_close(out.to_dense(), expected_dense * expected_sites[:, None], REL, what)


def test_dense_references_match_onnx():
    """The float64 numpy references agree with onnx.reference Conv / ConvTranspose."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 5, 6, 7)).astype(np.float32)
    w = rng.standard_normal((4, 3, 2, 3, 3)).astype(np.float32)     # spconv [Cout, k..., Cin]
    b = rng.standard_normal(4).astype(np.float32)
    onnx_w = np.ascontiguousarray(w.transpose(0, 4, 1, 2, 3))       # ONNX [Cout, Cin, k...]
    expected = onnx_reference("Conv", {"x": x, "w": onnx_w, "b": b},
                              dict(strides=[2, 1, 2], pads=[1, 0, 2, 1, 0, 2], dilations=[1, 2, 1]))
    assert_close(dense_conv3d(x, w, b, (2, 1, 2), (1, 0, 2), (1, 2, 1)), expected, 1e-5)
    y = rng.standard_normal((1, 3, 3, 2, 4)).astype(np.float32)
    wt = rng.standard_normal((4, 3, 3, 2, 3)).astype(np.float32)    # maps 3 channels to 4
    onnx_wt = np.ascontiguousarray(wt.transpose(4, 0, 1, 2, 3))     # ONNX ConvTranspose [Cin, Cout, k]
    ref = onnx_reference("ConvTranspose", {"x": y, "w": onnx_wt},
                         dict(strides=[2, 2, 1], pads=[1, 0, 0, 1, 0, 0]))
    assert ref.shape[2:] == (5, 5, 5)
    assert_close(dense_conv_transpose3d(y, wt, (5, 5, 5), (2, 2, 1), (1, 0, 0), (1, 1, 1)), ref, 1e-5)


# -- the parameter grid -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    kernel: tuple
    stride: int
    padding: int
    dilation: int
    batch: int
    cin: int
    cout: int
    spatial: tuple
    points: int
    bias: bool
    activation: object

    @property
    def id(self):
        act = self.activation if self.activation is None or isinstance(self.activation, str) \
            else self.activation[0]
        return (f"k{''.join(map(str, self.kernel))}-s{self.stride}-p{self.padding}-d{self.dilation}"
                f"-b{self.batch}-c{self.cin}to{self.cout}-{'x'.join(map(str, self.spatial))}"
                f"-n{self.points}{'-bias' if self.bias else ''}-{act}")


def _grid_cases():
    """Every kernel x stride x padding x dilation combination the issue lists (stride > 1 with
    dilation > 1 skipped), with batch, channels, grid size and epilogue varied along the sweep."""
    rng = np.random.default_rng(2026)
    channels = [(1, 1), (3, 5), (16, 16), (4, 64), (64, 32), (7, 2), (32, 64), (2, 9)]
    grids = [((19, 18, 17), 1500), ((9, 10, 11), 300), ((12, 7, 15), 500), ((5, 6, 4), 60)]
    acts = [None, "Relu", ("LeakyRelu", 0.1), "Sigmoid", None, ("Clip", -0.5, 0.5)]
    cases = []
    for i, (k, s, p, d) in enumerate(itertools.product((1, 2, 3), (1, 2, 3), (0, 1, 2), (1, 2))):
        if s > 1 and d > 1:
            continue
        spatial, n = grids[i % len(grids)]
        if any(sz + 2 * p - d * (k - 1) - 1 < 0 for sz in spatial):
            continue
        cin, cout = channels[i % len(channels)]
        batch = 1 + i % 2
        kernel = (k, k, k) if i % 5 else (k, max(1, k - 1), k)
        cases.append(Case(kernel, s, p, d, batch, cin, cout, spatial, n * batch // (1 + (cin >= 32)),
                          bool(rng.integers(2)), acts[i % len(acts)]))
    return cases


GRID = _grid_cases()


@pytest.mark.parametrize("case", GRID, ids=[c.id for c in GRID])
def test_sparse_conv3d_matches_dense(case: Case):
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    st = random_tensor(rng, case.points, case.spatial, case.batch, case.cin)
    w = (rng.standard_normal((case.cout, *case.kernel, case.cin)) / math.sqrt(case.cin)).astype(np.float32)
    b = rng.standard_normal(case.cout).astype(np.float32) if case.bias else None
    out = vkconv.sparse_conv3d(st, w, b, stride=case.stride, padding=case.padding,
                               dilation=case.dilation, activation=case.activation)
    geom = dict(stride=(case.stride,) * 3, pad=(case.padding,) * 3, dil=(case.dilation,) * 3)
    expected = activate(dense_conv3d(st.to_dense(), w, b, **geom), case.activation)
    occ = occupancy(st.indices, case.batch, case.spatial).astype(np.float64)[:, None]
    sites = dense_conv3d(occ, np.ones((1, *case.kernel, 1)), **geom)[:, 0] > 0.5
    assert out.features.shape == (int(sites.sum()), case.cout) and out.features.dtype == np.float32
    assert out.indices.dtype == np.int32 and out.batch_size == case.batch
    check_against_dense(out, expected, sites, case.id)


SUBM = [((3, 3, 3), 1, 1, 16, 16, (19, 18, 17), 1500, "Relu"),
        ((3, 3, 3), 2, 2, 3, 32, (19, 18, 17), 1200, None),
        ((1, 1, 1), 1, 1, 8, 8, (9, 10, 11), 300, None),
        ((3, 1, 5), 1, 2, 5, 7, (12, 7, 15), 500, ("LeakyRelu", 0.2)),
        ((5, 5, 5), 1, 1, 2, 24, (9, 10, 11), 400, "Sigmoid"),
        ((3, 3, 3), 1, 2, 64, 64, (19, 18, 17), 700, "Relu")]


@pytest.mark.parametrize("kernel,dilation,batch,cin,cout,spatial,n,activation", SUBM)
def test_subm_conv3d_matches_dense(kernel, dilation, batch, cin, cout, spatial, n, activation):
    rng = np.random.default_rng(cin * 7 + cout)
    st = random_tensor(rng, n, spatial, batch, cin)
    w = (rng.standard_normal((cout, *kernel, cin)) / math.sqrt(cin)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    out = vkconv.subm_conv3d(st, w, b, dilation=dilation, activation=activation)
    assert np.array_equal(out.indices, st.indices), "SubM output sites must be the input sites"
    assert out.spatial_shape == st.spatial_shape
    pad = tuple(k // 2 * dilation for k in kernel)
    expected = activate(dense_conv3d(st.to_dense(), w, b, pad=pad, dil=(dilation,) * 3), activation)
    check_against_dense(out, expected, occupancy(st.indices, batch, spatial))


@pytest.mark.parametrize("kernel,stride,padding,cin,cout", [
    ((3, 3, 3), 2, 1, 16, 16), ((2, 2, 2), 2, 0, 5, 3), ((3, 3, 3), 1, 0, 4, 4), ((3, 2, 3), 3, 2, 8, 1)])
def test_inverse_conv_restores_input_sites(kernel, stride, padding, cin, cout):
    rng = np.random.default_rng(11)
    st = random_tensor(rng, 900, (19, 18, 17), 2, cin)
    w = (rng.standard_normal((cout, *kernel, cin)) / math.sqrt(cin)).astype(np.float32)
    down = vkconv.sparse_conv3d(st, w, stride=stride, padding=padding, indice_key="down")
    wi = (rng.standard_normal((cin + 1, *kernel, cout)) / math.sqrt(cout)).astype(np.float32)
    bi = rng.standard_normal(cin + 1).astype(np.float32)
    up = vkconv.sparse_inverse_conv3d(down, wi, bi, indice_key="down", activation="Relu")
    assert np.array_equal(up.indices, st.indices)
    assert up.spatial_shape == st.spatial_shape and up.features.shape == (len(st.indices), cin + 1)
    geom = ((stride,) * 3, (padding,) * 3, (1, 1, 1))
    expected = (dense_conv_transpose3d(down.to_dense(), wi, st.spatial_shape, *geom)
                + bi.reshape(1, -1, 1, 1, 1))
    check_against_dense(up, activate(expected, "Relu"), occupancy(st.indices, 2, st.spatial_shape))


def test_rulebook_device_equals_numpy():
    """Same output sites in the same order, and the same (input, output) pairs per tap, as sets
    (5 x 5 x 5: 125 taps, four mask words per row)."""
    rng = np.random.default_rng(5)
    idx = random_sites(rng, 1400, (19, 18, 17), 2)
    ctx = vkconv.get_context()
    for subm, kernel, stride, pad, dil in [(True, (3, 3, 3), 1, 0, 1), (True, (3, 5, 1), 1, 0, 2),
                                           (False, (3, 3, 3), 2, 1, 1), (False, (2, 3, 2), 3, 2, 1),
                                           (False, (3, 3, 3), 1, 2, 2), (False, (1, 1, 1), 1, 0, 1),
                                           (True, (5, 5, 5), 1, 0, 1), (False, (5, 5, 3), 2, 2, 1)]:
        geom = make_geometry((19, 18, 17), 2, kernel, subm=subm, stride=stride, padding=pad, dilation=dil)
        rb = build_rulebook(ctx, idx, geom)
        ref_out, ref_pairs = reference_rulebook(idx, geom)
        assert np.array_equal(rb.out_indices, ref_out), geom
        for t, ((gi, go), (ri, ro)) in enumerate(zip(rb.pairs(), ref_pairs)):
            assert set(zip(gi.tolist(), go.tolist())) == set(zip(ri.tolist(), ro.tolist())), (geom, t)
        rb.close()


@pytest.mark.parametrize("n", [1, 7, 1024, 1025, 5000, 128 * 1024, 128 * 1024 + 1, 1024 * 1024 + 3])
def test_device_prefix_scan(n):
    """The rulebook's exclusive scan over one and two levels of blocks (128 x 1024 values per
    block; the tree code is the same at every level), in place."""
    from vkconv.ops.sparse.device import Recording
    from vkconv.ops.sparse.rulebook import record_scan

    values = np.random.default_rng(n).integers(0, 5, n).astype(np.int32)
    with Recording(vkconv.get_context()) as rec:
        buf = rec.upload(np.append(values, np.int32(-7)), "scan test")
        record_scan(rec, buf, n, buf)
        out = rec.scratch(4 * (n + 1), "scan readback", staged=True)
        rec.copy(buf, 0, out, 0, 4 * (n + 1))
        rec.download(out)
        rec.submit()
        got = out.read(np.int32, (n + 1,))
    assert np.array_equal(got, np.concatenate([[0], np.cumsum(values)]))


def test_rulebook_cache_shared_and_checked():
    rng = np.random.default_rng(6)
    st = random_tensor(rng, 500, (9, 10, 11), 1, 4)
    w3 = rng.standard_normal((4, 3, 3, 3, 4)).astype(np.float32)
    a = vkconv.subm_conv3d(st, w3, indice_key="subm1")
    b = vkconv.subm_conv3d(a, w3, indice_key="subm1")
    assert b.indice_dict["subm1"] is a.indice_dict["subm1"], "SubM layers of one key share a rulebook"
    assert "subm1" not in st.indice_dict
    with pytest.raises(ValueError, match="indice_key 'subm1'"):
        vkconv.subm_conv3d(a, w3, dilation=2, indice_key="subm1")
    with pytest.raises(ValueError, match="indice_key 'subm1'"):
        vkconv.sparse_conv3d(a, w3, stride=2, indice_key="subm1")
    down = vkconv.sparse_conv3d(b, w3, stride=2, padding=1, indice_key="down")
    assert down.indice_dict["subm1"] is a.indice_dict["subm1"]
    with pytest.raises(ValueError, match="SubM"):
        vkconv.sparse_inverse_conv3d(down, w3, indice_key="subm1")
    with pytest.raises(ValueError, match="kernel"):
        vkconv.sparse_inverse_conv3d(down, rng.standard_normal((4, 2, 2, 2, 4)).astype(np.float32),
                                     indice_key="down")
    with pytest.raises(ValueError, match="no rulebook"):
        vkconv.sparse_inverse_conv3d(down, w3, indice_key="missing")
    other = vkconv.SparseTensor(down.features[:-1], down.indices[:-1], down.spatial_shape, 1)
    other.indice_dict["down"] = down.indice_dict["down"]
    with pytest.raises(ValueError, match="not the output"):
        vkconv.sparse_inverse_conv3d(other, w3, indice_key="down")
    down.indice_dict.clear()
    assert "down" not in down.indice_dict


def test_results_are_bitwise_reproducible():
    rng = np.random.default_rng(7)
    st = random_tensor(rng, 1500, (19, 18, 17), 2, 16)
    w = rng.standard_normal((16, 3, 3, 3, 16)).astype(np.float32)
    first = vkconv.sparse_conv3d(st, w, stride=2, padding=1)
    second = vkconv.sparse_conv3d(st, w, stride=2, padding=1)
    assert np.array_equal(first.indices, second.indices)
    assert np.array_equal(first.features, second.features)


# Tile shapes of the compute kernel (sparse_conv.choose_tile picks per device and layer; the GPU
# one and the odd ones never run on lavapipe unless forced), with and without the tap-mask
# schedule, its storage-buffer variant, and the subgroup-shuffle kernel (cb None: one block of
# coutp / subgroup size vec4s per lane; rows a multiple of the subgroup size: one or two rows read
# per lane); parts: the taps summed in that many ranges (3: one kernel plane each; 2: ranges that
# split a plane), each range's rows sorted by its own taps.
TILES = [(2, 4, False, False, True, False, 1), (1, 8, False, False, True, False, 2), (8, 2, True, True, True, False, 1),
         (4, 1, True, True, True, False, 3), (1, 1, True, False, True, False, 1), (3, 2, True, True, False, False, 2),
         (1, 8, False, False, False, False, 1), (16, 4, False, True, True, False, 3),
         (8, None, True, True, True, True, 1), (16, None, True, False, True, True, 3),
         (8, None, True, True, False, True, 2), (16, None, True, True, True, True, 2)]


@pytest.mark.parametrize("rows,cb,share,scheduled,texel,subgroup,parts", TILES)
def test_every_tile_shape_matches_dense(monkeypatch, rows, cb, share, scheduled, texel, subgroup, parts):
    """SubM, strided and inverse convolutions with the tile forced: 6 input channels (not a whole
    vec4), 40 output channels (10 vec4, packed to 16, so some channel blocks hold no channel),
    against the dense references."""
    import vkconv.ops.sparse.conv as sparse_conv
    import vkconv.ops.sparse.tensor as sparse_module

    info = vkconv.get_context().info
    if subgroup:
        if not info.subgroup_shuffle or info.subgroup_size > 16:
            pytest.skip(f"{info.name}: no subgroup shuffles, or subgroups of more than 16 lanes")
        rows = max(rows, info.subgroup_size)

    def tile(ctx, coutp, planes):
        # up to 16 output channels the weights are packed to cout4 vec4s, which the block must divide
        if subgroup:  # the inverse convolution's 6 output channels (2 vec4s) cannot share a subgroup
            return sparse_conv.Tile(rows, coutp // info.subgroup_size, True, True, parts) if \
                coutp % info.subgroup_size == 0 else sparse_conv.Tile(2, coutp, False, parts=parts)
        return sparse_conv.Tile(rows, cb if coutp > 4 else coutp, share, parts=parts)

    monkeypatch.setattr(sparse_conv, "choose_tile", tile)
    monkeypatch.setattr(sparse_conv, "wants_schedule", lambda w, rb: scheduled)
    scheduled = scheduled or parts > 1  # every range of several is taken in its own mask order
    if not texel:  # features uploaded as plain storage buffers: the kernel's storage variant
        monkeypatch.setattr(sparse_module, "texel_capable", lambda ctx: False)
    rng = np.random.default_rng(rows * 10 + (cb or 0))
    st = random_tensor(rng, 300, (9, 10, 11), 2, 6)
    w = (rng.standard_normal((40, 3, 3, 3, 6)) / math.sqrt(6)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    occ = occupancy(st.indices, 2, st.spatial_shape)
    subm = vkconv.subm_conv3d(st, w, b, activation="Relu")
    check_against_dense(subm, activate(dense_conv3d(st.to_dense(), w, b, pad=(1, 1, 1)), "Relu"), occ)
    down = vkconv.sparse_conv3d(st, w, b, stride=2, padding=1, indice_key="down")
    assert down.indice_dict["down"].has_schedule() == scheduled
    sites = dense_conv3d(occ.astype(np.float64)[:, None], np.ones((1, 3, 3, 3, 1)), stride=(2,) * 3,
                         pad=(1,) * 3)[:, 0] > 0.5
    check_against_dense(down, dense_conv3d(st.to_dense(), w, b, (2,) * 3, (1,) * 3), sites)
    wi = (rng.standard_normal((6, 3, 3, 3, 40)) / math.sqrt(40)).astype(np.float32)
    up = vkconv.sparse_inverse_conv3d(down, wi, indice_key="down")
    expected = dense_conv_transpose3d(down.to_dense(), wi, st.spatial_shape, (2,) * 3, (1,) * 3, (1,) * 3)
    check_against_dense(up, expected, occ)


def test_schedule_changes_no_bit():
    """Rows taken in tap-mask order (and the 8-row tiles that come with it) give bitwise the
    results of rows taken in order: each output row is summed by one invocation, in tap order."""
    rng = np.random.default_rng(12)
    st = random_tensor(rng, 1500, (19, 18, 17), 2, 8)
    w = rng.standard_normal((16, 3, 3, 3, 8)).astype(np.float32)   # 2 x 4 vec4s: no schedule wanted
    first = vkconv.subm_conv3d(st, w, indice_key="k")
    rb = first.indice_dict["k"]
    assert not rb.has_schedule()
    rb.schedule((0, 27))  # sorted now: every later layer of the key takes the rows in mask order
    again = vkconv.SparseTensor(st.features, st.indices, st.spatial_shape, 2)
    again.indice_dict["k"] = rb
    assert np.array_equal(vkconv.subm_conv3d(again, w, indice_key="k").features, first.features)


@pytest.mark.parametrize("kernel,stride", [((5, 5, 5), 1), ((3, 3, 3), 2)])
def test_tap_ranges_change_no_bit(monkeypatch, kernel, stride):
    """Taps summed in ranges (one dispatch each, each with its own row order, partial sums carried
    in the output) give bitwise the results of all taps at once, for SubM (a 5x5x5 kernel: 125
    taps, four mask words, ranges that cross words), strided and inverse convolutions; and match
    the dense reference."""
    import vkconv.ops.sparse.conv as sparse_conv

    rng = np.random.default_rng(31)
    st = random_tensor(rng, 600, (11, 12, 13), 2, 12)
    w = (rng.standard_normal((20, *kernel, 12)) / math.sqrt(12 * math.prod(kernel))).astype(np.float32)
    wi = (rng.standard_normal((12, *kernel, 20)) / math.sqrt(20)).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    results = {}
    for parts in (1, 2, 3, kernel[0], 7):
        monkeypatch.setattr(sparse_conv, "choose_tile",
                            lambda ctx, coutp, planes, parts=parts: sparse_conv.Tile(8, 1, True, parts=parts))
        if stride == 1:
            out = vkconv.subm_conv3d(st, w, b, activation="Relu")
            results[parts] = out.features
        else:
            down = vkconv.sparse_conv3d(st, w, b, stride=2, padding=1, indice_key="d")
            up = vkconv.sparse_inverse_conv3d(down, wi, indice_key="d")
            results[parts] = np.concatenate([down.features.ravel(), up.features.ravel()])
    for parts, got in results.items():
        assert np.array_equal(got, results[1]), f"{parts} ranges"
    if stride == 1:
        pad = tuple(k // 2 for k in kernel)
        check_against_dense(out, activate(dense_conv3d(st.to_dense(), w, b, pad=pad), "Relu"),
                            occupancy(st.indices, 2, st.spatial_shape))


def test_buffer_pool_reuses_and_evicts(monkeypatch):
    """Released buffers come back for a request of their size class; past POOL_BYTES the least
    recently released are closed."""
    from vkconv.ops.sparse import device as sparse_device

    ctx = vkconv.get_context()
    a = sparse_device.lease(ctx, 100_000, "a")
    assert a.size >= 100_000 and a.size <= 100_000 * 9 // 8 + 4096
    sparse_device.release(a)
    sparse_device.release(a)  # a second release is ignored
    b = sparse_device.lease(ctx, 99_000, "b")
    assert b is a and b.name == "b"
    assert sparse_device.lease(ctx, 99_000, "c", texel=True) is not a  # another kind of buffer
    monkeypatch.setattr(sparse_device, "POOL_BYTES", b.size)
    c = sparse_device.lease(ctx, 99_000, "c")
    sparse_device.release(b)
    sparse_device.release(c)  # over budget: b, released first, is closed
    assert not b._handles and c._handles
    assert sparse_device.lease(ctx, 99_000, "d") is c


# -- primitives -----------------------------------------------------------------------------------
def test_gather_rows():
    rng = np.random.default_rng(8)
    src = rng.standard_normal((300, 7)).astype(np.float32)
    idx = rng.integers(0, 300, 1000)
    assert np.array_equal(vkconv.gather_rows(src, idx), src[idx])
    assert vkconv.gather_rows(src, np.zeros(0, np.int32)).shape == (0, 7)


def test_gather_rows_past_one_grid_row():
    """More invocations than maxComputeWorkGroupCount[0] x the local size: the 2-D grid path."""
    ctx = vkconv.get_context()
    rows = ctx.info.max_workgroup_count[0] * 64 // 8 + 1000
    src = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    idx = np.arange(rows) % 16
    assert np.array_equal(vkconv.gather_rows(src, idx), src[idx])


def test_scatter_add_rows_is_deterministic_and_ordered():
    rng = np.random.default_rng(9)
    src = rng.standard_normal((2000, 5)).astype(np.float32)
    idx = rng.integers(0, 40, 2000)
    expected = np.zeros((40, 5), np.float32)
    np.add.at(expected, idx, src)  # float32, one addition at a time in increasing source row
    got = vkconv.scatter_add_rows(40, src, idx)
    assert np.array_equal(got, expected), "each row must add its sources in increasing row order"
    init = rng.standard_normal((40, 5)).astype(np.float32)
    expected_init = init.copy()
    np.add.at(expected_init, idx, src)
    assert np.array_equal(vkconv.scatter_add_rows(init, src, idx), expected_init)
    assert np.array_equal(vkconv.scatter_add_rows(3, np.zeros((0, 5), np.float32), np.zeros(0, np.int64)),
                          np.zeros((3, 5), np.float32))


def test_primitive_errors():
    src = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="idx"):
        vkconv.gather_rows(src, np.array([0, 4]))
    with pytest.raises(ValueError, match="idx"):
        vkconv.gather_rows(src, np.array([-1]))
    with pytest.raises(ValueError, match="idx"):
        vkconv.gather_rows(src, np.array([0.0]))
    with pytest.raises(ValueError, match="idx"):
        vkconv.scatter_add_rows(2, src, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="idx"):
        vkconv.scatter_add_rows(2, src, np.array([0, 1]))
    with pytest.raises(ValueError, match="dst_rows"):
        vkconv.scatter_add_rows(-1, src, np.array([0, 0, 0, 0]))
    with pytest.raises(ValueError, match="src"):
        vkconv.gather_rows(src.astype(np.float64), np.array([0]))


# -- bad input and empty tensors ------------------------------------------------------------------
def _idx(*rows):
    return np.array(rows, np.int32)


@pytest.mark.parametrize("features,indices,spatial,batch,match", [
    (np.zeros((2, 3), np.float32), _idx([0, 1, 1, 1], [0, 1, 1, 1]), (4, 4, 4), 1, "same site"),
    (np.zeros((1, 3), np.float32), _idx([0, 4, 0, 0]), (4, 4, 4), 1, "outside spatial_shape"),
    (np.zeros((1, 3), np.float32), _idx([0, 0, -1, 0]), (4, 4, 4), 1, "outside spatial_shape"),
    (np.zeros((1, 3), np.float32), _idx([-1, 0, 0, 0]), (4, 4, 4), 1, "negative batch"),
    (np.zeros((1, 3), np.float32), _idx([2, 0, 0, 0]), (4, 4, 4), 2, "batch_size"),
    (np.zeros((3, 3), np.float32), _idx([0, 0, 0, 0], [0, 0, 0, 1]), (4, 4, 4), 1, "features: 3 rows"),
    (np.zeros((1, 3), np.float64), _idx([0, 0, 0, 0]), (4, 4, 4), 1, "features: dtype"),
    (np.zeros((1, 3), np.float32), np.zeros((1, 4), np.float32), (4, 4, 4), 1, "indices: dtype"),
    (np.zeros((1, 3), np.float32), _idx([0, 0, 0]), (4, 4, 4), 1, r"indices: expected shape"),
    (np.zeros((1, 3), np.float32), _idx([0, 0, 0, 0]), (4, 4), 1, "spatial_shape"),
    (np.zeros((1, 3), np.float32), _idx([0, 0, 0, 0]), (4, 0, 4), 1, "spatial_shape"),
    (np.zeros((1, 3), np.float32), _idx([0, 0, 0, 0]), (4, 4, 4), 0, "batch_size"),
    (np.zeros((1, 0), np.float32), _idx([0, 0, 0, 0]), (4, 4, 4), 1, "channel"),
])
def test_bad_tensor(features, indices, spatial, batch, match):
    with pytest.raises(ValueError, match=match):
        vkconv.SparseTensor(features, indices, spatial, batch)


def test_bad_layer_arguments():
    st = vkconv.SparseTensor(np.ones((2, 3), np.float32), _idx([0, 1, 1, 1], [0, 2, 2, 2]), (5, 5, 5), 1)
    w = np.ones((4, 3, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="weight: .*C_in"):
        vkconv.subm_conv3d(st, np.ones((4, 3, 3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="odd"):
        vkconv.subm_conv3d(st, np.ones((4, 2, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="weight: expected rank 5"):
        vkconv.sparse_conv3d(st, np.ones((4, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="bias"):
        vkconv.sparse_conv3d(st, w, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="stride"):
        vkconv.sparse_conv3d(st, w, stride=0)
    with pytest.raises(ValueError, match="padding"):
        vkconv.sparse_conv3d(st, w, padding=(1, 1))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        vkconv.sparse_conv3d(st, np.ones((4, 7, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="activation"):
        vkconv.sparse_conv3d(st, w, activation="Swish")
    with pytest.raises(ValueError, match="int32"):
        big = vkconv.SparseTensor(np.ones((1, 3), np.float32), _idx([0, 0, 0, 0]), (2000, 2000, 1000), 1)
        vkconv.subm_conv3d(big, w)


def test_empty_tensor_gives_empty_results():
    st = vkconv.SparseTensor(np.zeros((0, 3), np.float32), np.zeros((0, 4), np.int32), (6, 7, 8), 2)
    assert st.to_dense().shape == (2, 3, 6, 7, 8) and not st.to_dense().any()
    w = np.ones((5, 3, 3, 3, 3), np.float32)
    b = np.ones(5, np.float32)
    sub = vkconv.subm_conv3d(st, w, b, indice_key="s")
    assert sub.features.shape == (0, 5) and sub.indices.shape == (0, 4)
    down = vkconv.sparse_conv3d(st, w, b, stride=2, indice_key="d")
    assert down.features.shape == (0, 5) and down.spatial_shape == (2, 3, 3)
    assert not down.to_dense().any()
    up = vkconv.sparse_inverse_conv3d(down, np.ones((3, 3, 3, 3, 5), np.float32), indice_key="d")
    assert up.features.shape == (0, 3) and up.spatial_shape == (6, 7, 8)
    assert vkconv.gather_rows(np.zeros((0, 2), np.float32), np.zeros(0, np.int32)).shape == (0, 2)


def test_vanished_points_give_bias_only_inverse_rows():
    """With padding 0 and stride 2, a site on the last plane of an odd axis reaches no output; the
    inverse convolution still returns it (spconv keeps every input site), holding act(bias)."""
    st = vkconv.SparseTensor(np.ones((2, 1), np.float32), _idx([0, 0, 0, 0], [0, 4, 4, 4]), (5, 5, 5), 1)
    w = np.ones((2, 2, 2, 2, 1), np.float32)
    down = vkconv.sparse_conv3d(st, w, stride=2, indice_key="d")
    assert down.indices.tolist() == [[0, 0, 0, 0]]
    up = vkconv.sparse_inverse_conv3d(down, np.ones((1, 2, 2, 2, 2), np.float32),
                                      np.full(1, -3.0, np.float32), indice_key="d", activation="Relu")
    assert up.indices.tolist() == st.indices.tolist()
    assert up.features.tolist() == [[0.0], [0.0]]  # relu(2 - 3), relu(0 - 3)


# -- spconv itself, where installed -----------------------------------------------------------------
def test_matches_spconv_where_installed():
    spconv = pytest.importorskip("spconv.pytorch")
    import torch

    torch.set_num_threads(1)  # spconv's CPU kernels are wrong with more threads (#679, #719)
    rng = np.random.default_rng(12)
    st = random_tensor(rng, 800, (19, 18, 17), 2, 8)
    sp = spconv.SparseConvTensor(torch.from_numpy(st.features), torch.from_numpy(st.indices),
                                 list(st.spatial_shape), st.batch_size)
    layers = [spconv.SubMConv3d(8, 16, 3, indice_key="s1"),
              spconv.SparseConv3d(16, 8, 3, stride=2, padding=1, indice_key="d1"),
              spconv.SparseInverseConv3d(8, 4, 3, indice_key="d1")]
    theirs = []
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_()
            layer.bias.normal_()
            sp = layer(sp)
            theirs.append(sp.dense().numpy())
    params = [(layer.weight.detach().numpy(), layer.bias.detach().numpy()) for layer in layers]
    ours = vkconv.subm_conv3d(st, *params[0], indice_key="s1")
    assert_close(ours.to_dense(), theirs[0], REL, "SubMConv3d")
    ours = vkconv.sparse_conv3d(ours, *params[1], stride=2, padding=1, indice_key="d1")
    assert_close(ours.to_dense(), theirs[1], REL, "SparseConv3d")
    ours = vkconv.sparse_inverse_conv3d(ours, *params[2], indice_key="d1")
    assert_close(ours.to_dense(), theirs[2], REL, "SparseInverseConv3d")


def test_every_tuner_candidate_matches_dense(monkeypatch):
    """Each tile the tuner may pick (vkconv.ops.sparse.conv.tile_candidates), forced, on a SubM layer
    of 5 -> 36 channels (neither a whole vec4 in nor a whole block out), against the dense reference."""
    import vkconv.ops.sparse.conv as sparse_conv

    rng = np.random.default_rng(21)
    st = random_tensor(rng, 250, (8, 9, 10), 1, 5)
    w = (rng.standard_normal((36, 3, 3, 3, 5)) / math.sqrt(5)).astype(np.float32)
    b = rng.standard_normal(36).astype(np.float32)
    expected = activate(dense_conv3d(st.to_dense(), w, b, pad=(1, 1, 1)), "Relu")
    occ = occupancy(st.indices, 1, st.spatial_shape)
    cands = sparse_conv.tile_candidates(vkconv.get_context(), 16)  # 36 channels: 9 vec4s, packed to 16
    assert len(cands) > 5
    for tile in cands:
        monkeypatch.setattr(sparse_conv, "choose_tile", lambda ctx, coutp, planes, tile=tile: tile)
        check_against_dense(vkconv.subm_conv3d(st, w, b, activation="Relu", tune=False), expected, occ)


def test_tuning_stores_a_tile_that_later_calls_use(monkeypatch, tmp_path):
    """tune=True times the tiles on the call's features and caches the winner under the layer's
    shape; a later call (VKCONV_TUNE unset: the cache) takes it without timing, tune=False does not."""
    import vkconv.ops.sparse.conv as sparse_conv
    from vkconv.runtime.tunecache import cache_for

    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("VKCONV_TUNE", raising=False)
    rng = np.random.default_rng(22)
    st = random_tensor(rng, 400, (9, 10, 11), 1, 8)
    w = (rng.standard_normal((32, 3, 3, 3, 8)) / math.sqrt(8)).astype(np.float32)
    expected = dense_conv3d(st.to_dense(), w, None, (2,) * 3, (1,) * 3)
    sites = dense_conv3d(occupancy(st.indices, 1, st.spatial_shape).astype(np.float64)[:, None],
                         np.ones((1, 3, 3, 3, 1)), stride=(2,) * 3, pad=(1,) * 3)[:, 0] > 0.5
    tuned = vkconv.sparse_conv3d(st, w, stride=2, padding=1, tune=True)
    check_against_dense(tuned, expected, sites)
    entries = {k: v for k, v in cache_for(vkconv.get_context()).entries().items() if k.startswith("sparse_conv")}
    assert len(entries) == 1
    (key, entry), = entries.items()
    assert key.startswith("sparse_conv strided k3x3x3 cin4=2 coutp=8") and entry["ms"] > 0
    stored = sparse_conv.Tile(**entry["candidate"])

    picked = []
    real = sparse_conv.record_conv

    def spy(*args, **kwargs):
        picked.append(sparse_conv.cached_tile(vkconv.get_context(), key, 8) if kwargs.get("use_cache") else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse_module_of(sparse_conv), "record_conv", spy)
    monkeypatch.setattr(sparse_conv, "tune_tile", lambda *a, **k: pytest.fail("timed again"))
    again = vkconv.sparse_conv3d(st, w, stride=2, padding=1)
    assert np.array_equal(again.features, tuned.features)
    vkconv.sparse_conv3d(st, w, stride=2, padding=1, tune=False)
    assert picked == [stored, None]
    with pytest.raises(ValueError, match="tune"):
        vkconv.sparse_conv3d(st, w, stride=2, padding=1, tune="sometimes")


def sparse_module_of(conv_module):
    """vkconv.ops.sparse.tensor, which calls the compute through its own imported names."""
    import vkconv.ops.sparse.tensor as sparse_tensor

    assert sparse_tensor.record_conv is conv_module.record_conv
    return sparse_tensor


def test_a_bad_cached_tile_is_ignored(monkeypatch, tmp_path):
    """A cache entry naming a tile that cannot run here (or no tile at all) falls back to the
    heuristic tile, with a warning in the log, never an error."""
    import vkconv.ops.sparse.conv as sparse_conv
    from vkconv.runtime.tunecache import cache_for

    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    ctx = vkconv.get_context()
    rng = np.random.default_rng(23)
    st = random_tensor(rng, 200, (8, 8, 8), 1, 4)
    w = (rng.standard_normal((4, 3, 3, 3, 4)) / 4).astype(np.float32)  # 4 -> 4: coutp 1
    expected = dense_conv3d(st.to_dense(), w, None, pad=(1, 1, 1))
    occ = occupancy(st.indices, 1, st.spatial_shape)
    first = vkconv.subm_conv3d(st, w, indice_key="k")
    rb = first.indice_dict["k"]
    packed = sparse_conv.pack_weights(ctx, w, None)
    key = sparse_conv.layer_signature(rb, packed, False)
    packed.close()
    again = vkconv.SparseTensor(st.features, st.indices, st.spatial_shape, 1)
    again.indice_dict["k"] = rb
    for bad in ({"rows": 8, "cb": 3, "share": True, "subgroup": False}, {"rows": "8", "cb": 1, "share": False},
                {"tile": 1}):
        cache_for(ctx).put(key, {"candidate": bad, "ms": 1.0})
        assert sparse_conv.cached_tile(ctx, key, 1) is None
        check_against_dense(vkconv.subm_conv3d(again, w, indice_key="k"), expected, occ)
