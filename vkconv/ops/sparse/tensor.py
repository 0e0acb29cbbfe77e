"""Sparse 3-D convolution with spconv 2.x semantics: the numpy-facing API.

A :class:`SparseTensor` is ``features [N, C]`` float32 + ``indices [N, 4]`` int32 rows
``(batch, z, y, x)`` + ``spatial_shape (D, H, W)`` + ``batch_size``.  Convolutions take spconv
2.x weights ``[C_out, kD, kH, kW, C_in]`` and return a new SparseTensor:

* :func:`subm_conv3d` -- submanifold: output sites = input sites (odd kernels);
* :func:`sparse_conv3d` -- every site some input reaches, ``out = (in + 2p - d(k-1) - 1) // s + 1``;
* :func:`sparse_inverse_conv3d` -- back to the input sites of the :func:`sparse_conv3d` that
  stored its rulebook under the same ``indice_key``.

Rulebook cache: a rulebook built with ``indice_key=...`` is stored in the output tensor's
``indice_dict`` (a dict ``key -> Rulebook``, like spconv's), which every later output of the chain
inherits; SubM layers with the same key share one rulebook, an inverse convolution finds its
forward convolution's there.  Clear it with ``st.indice_dict.clear()`` (the rulebooks' device
memory is freed when no tensor refers to them any more, or at once with ``Rulebook.close()``).

Bad input (duplicate or out-of-range coordinates, a negative batch index, features / indices row
mismatch, wrong dtypes or shapes) raises ValueError naming the argument; ``N = 0`` is valid.
"""
from __future__ import annotations

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.activation import Activation
from vkconv.ops.sparse.conv import (
    cached_tile,
    gather_on_device,
    layer_signature,
    pack_weights,
    record_conv,
    scatter_add_on_device,
    tune_tile,
)
from vkconv.ops.sparse.device import Recording, release, texel_capable
from vkconv.ops.sparse.rulebook import Rulebook, SparseGeometry, build_rulebook, make_geometry
from vkconv.ops.tune import tune_mode
from vkconv.runtime.context import get_context


def _int_array(name: str, value, ndim: int) -> np.ndarray:
    """An integer ndarray as int32 (values are range-checked by the caller against int32)."""
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name}: expected a numpy.ndarray, got {type(value).__name__}")
    if not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"{name}: dtype must be an integer type (int32), got {value.dtype}")
    if value.ndim != ndim:
        raise ValueError(f"{name}: expected rank {ndim}, got shape {value.shape}")
    if value.size and (value.min() < np.iinfo(np.int32).min or value.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name}: values do not fit int32")
    return np.ascontiguousarray(value, np.int32)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


class SparseTensor:
    """Active sites and their features on a ``batch_size x D x H x W`` grid.

    ``features [N, C]`` float32; ``indices [N, 4]`` integer ``(batch, z, y, x)`` (stored as
    int32); ``spatial_shape (D, H, W)``.  Every coordinate must lie inside the grid and occur once.
    ``indice_dict``: the rulebook cache (see the module docstring).
    """

    def __init__(self, features: np.ndarray, indices: np.ndarray, spatial_shape, batch_size: int):
        features = shapes.as_float32("features", features, 2)
        indices = _int_array("indices", indices, 2)
        if indices.shape[1] != 4:
            raise ValueError(f"indices: expected shape [N, 4] (batch, z, y, x), got {indices.shape}")
        if features.shape[0] != indices.shape[0]:
            raise ValueError(f"features: {features.shape[0]} rows but indices has {indices.shape[0]}; "
                             "there must be one feature row per active site")
        if features.shape[1] < 1:
            raise ValueError(f"features: expected at least one channel, got shape {features.shape}")
        if not isinstance(spatial_shape, (tuple, list, np.ndarray)) or len(spatial_shape) != 3:
            raise ValueError(f"spatial_shape: expected (D, H, W), got {spatial_shape!r}")
        spatial_shape = tuple(_positive("spatial_shape", int(s) if isinstance(s, np.integer) else s)
                              for s in spatial_shape)
        batch_size = _positive("batch_size", batch_size)
        _check_sites(indices, spatial_shape, batch_size)
        self._init(features, indices, spatial_shape, batch_size, {})

    def _init(self, features, indices, spatial_shape, batch_size, indice_dict) -> None:
        self.features = features
        self.indices = indices
        self.spatial_shape = tuple(spatial_shape)
        self.batch_size = batch_size
        self.indice_dict: dict[str, Rulebook] = indice_dict

    @classmethod
    def _trusted(cls, features, indices, spatial_shape, batch_size, indice_dict) -> SparseTensor:
        """A tensor whose sites come from a rulebook (valid and unique by construction)."""
        st = cls.__new__(cls)
        st._init(features, indices, spatial_shape, batch_size, indice_dict)
        return st

    @property
    def num_channels(self) -> int:
        return self.features.shape[1]

    def to_dense(self) -> np.ndarray:
        """``[batch_size, C, D, H, W]`` float32, zero at inactive sites."""
        dense = np.zeros((self.batch_size, *self.spatial_shape, self.num_channels), np.float32)
        b, z, y, x = self.indices.T
        dense[b, z, y, x] = self.features
        return np.ascontiguousarray(dense.transpose(0, 4, 1, 2, 3))

    def __repr__(self) -> str:
        return (f"SparseTensor(N={len(self.indices)}, C={self.num_channels}, "
                f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, "
                f"indice_keys={sorted(self.indice_dict)})")


def _check_sites(indices: np.ndarray, spatial_shape, batch_size: int) -> None:
    """ValueError naming the first bad row: negative batch, outside the grid, or a duplicate."""
    if not len(indices):
        return
    limits = np.array([batch_size, *spatial_shape])
    bad = np.nonzero(np.any((indices < 0) | (indices >= limits), axis=1))[0]
    if len(bad):
        row = indices[bad[0]]
        what = ("a negative batch index" if row[0] < 0 else
                f"a batch index >= batch_size {batch_size}" if row[0] >= batch_size else
                f"coordinates outside spatial_shape {tuple(spatial_shape)}")
        raise ValueError(f"indices: row {bad[0]} = {row.tolist()} has {what}")
    d, h, w = spatial_shape
    keys = ((indices[:, 0].astype(np.int64) * d + indices[:, 1]) * h + indices[:, 2]) * w + indices[:, 3]
    order = np.argsort(keys, kind="stable")
    same = np.nonzero(keys[order[1:]] == keys[order[:-1]])[0]
    if len(same):
        first, second = sorted(order[same[0]:same[0] + 2])
        raise ValueError(f"indices: rows {first} and {second} are the same site "
                         f"{indices[first].tolist()}; every active site must occur once "
                         "(merge duplicate voxels before building the tensor)")


def _weights(st: SparseTensor, weight, bias) -> tuple[np.ndarray, np.ndarray | None]:
    weight = shapes.as_float32("weight", weight, 5)
    if weight.shape[4] != st.num_channels:
        raise ValueError(f"weight: {weight.shape} is [C_out, kD, kH, kW, C_in] with C_in = "
                         f"{weight.shape[4]}, but the features have {st.num_channels} channels")
    if min(weight.shape) < 1:
        raise ValueError(f"weight: every dimension must be >= 1, got {weight.shape}")
    if bias is not None:
        bias = shapes.as_float32("bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected {weight.shape[0]} values (one per output channel), "
                             f"got {bias.shape[0]}")
    return weight, bias


def _same_sites(rb_indices: np.ndarray, indices: np.ndarray) -> bool:
    return rb_indices is indices or (rb_indices.shape == indices.shape
                                     and np.array_equal(rb_indices, indices))


def _rulebook(st: SparseTensor, geom: SparseGeometry, indice_key: str | None) -> tuple[Rulebook, dict]:
    """The cached rulebook for ``geom`` on ``st`` or a new one, and the output's indice_dict."""
    if indice_key is not None and not isinstance(indice_key, str):
        raise ValueError(f"indice_key: expected a str or None, got {indice_key!r}")
    cached = st.indice_dict.get(indice_key) if indice_key is not None else None
    if cached is not None:
        if cached.geom != geom or not _same_sites(cached.in_indices, st.indices):
            raise ValueError(
                f"indice_key {indice_key!r} holds the rulebook of a {cached.geom.describe()} over "
                f"{cached.n_in} sites; this layer is a {geom.describe()} over {len(st.indices)} sites. "
                "Layers may share a key only when they have the same geometry and input sites "
                "(SubM layers of one resolution); use another key")
        return cached, st.indice_dict
    rb = build_rulebook(get_context(), st.indices, geom)
    out_dict = dict(st.indice_dict)
    if indice_key is not None:
        out_dict[indice_key] = rb
    return rb, out_dict


def _convolve(st: SparseTensor, geom: SparseGeometry, indice_key, weight, bias, act: Activation, tune):
    """Features ``[n_out, C_out]`` of ``st`` convolved with ``geom``, its rulebook and the output's
    indice_dict; a rulebook no key keeps is freed at once."""
    rb, out_dict = _rulebook(st, geom, indice_key)
    try:
        return _run(st, rb, weight, bias, act, inverse=False, tune=tune), rb, out_dict
    finally:
        if rb not in out_dict.values():
            rb.close()


def _run(st: SparseTensor, rb: Rulebook, weight: np.ndarray, bias, act: Activation, *,
         inverse: bool, tune) -> np.ndarray:
    """Output features ``[n_out, C_out]`` of one convolution over ``rb``; ``tune`` as
    :func:`vkconv.ops.tune.tune_mode` takes it (``"1"``: a layer shape the tuning cache lacks is
    tuned on these features first, :func:`vkconv.ops.sparse.conv.tune_tile`)."""
    mode = tune_mode(tune)
    n_out = rb.n_in if inverse else rb.n_out
    cout = weight.shape[0]
    if n_out == 0:
        return np.zeros((0, cout), np.float32)
    ctx = get_context()
    w = pack_weights(ctx, weight, bias)
    try:
        with Recording(ctx) as rec:
            x = st.features
            if w.cin % 4:
                x = np.zeros((len(x), w.cin4 * 4), np.float32)
                x[:, :w.cin] = st.features
            if mode == "1" and cached_tile(ctx, layer_signature(rb, w, inverse), w.coutp) is None:
                tune_tile(rb, x, w, act, inverse=inverse)
            x_buf = rec.upload(x, "sparse conv input", texel=texel_capable(ctx))
            y = record_conv(rec, rb, x_buf, w, act, inverse=inverse, staged=True, use_cache=mode != "0")
            try:
                rec.download(y)
                rec.submit()
                out = y.read(np.float32, (n_out, w.cout4 * 4))
            finally:
                release(y)
    finally:
        w.close()
    return out if w.cout4 * 4 == cout else np.ascontiguousarray(out[:, :cout])


def subm_conv3d(st: SparseTensor, weight: np.ndarray, bias: np.ndarray | None = None, *, dilation=1,
                activation=None, indice_key: str | None = None, tune: bool | str | None = None) -> SparseTensor:
    """Submanifold sparse convolution (spconv ``SubMConv3d``): output sites = ``st``'s sites.

    ``weight [C_out, kD, kH, kW, C_in]`` with odd kernel sizes; ``bias [C_out]``; ``dilation`` an
    int or 3 ints; ``activation`` as :meth:`vkconv.Activation.parse`.  A tap contributes only where
    the neighbour ``site - (k // 2) * d + tap * d`` is active.  Layers sharing ``indice_key`` share
    one rulebook.  ``tune`` (like :class:`vkconv.Conv`'s): True times the compute's register tiles
    on this call's features when the tuning cache lacks the layer shape and stores the fastest;
    None (``VKCONV_TUNE``, default ``cache``) uses a cached choice, never timing anything; False
    ignores the cache.  The same for :func:`sparse_conv3d` and :func:`sparse_inverse_conv3d`.
    """
    tune = tune_mode(tune)  # a bad value fails before any work
    weight, bias = _weights(st, weight, bias)
    act = Activation.parse(activation)
    geom = make_geometry(st.spatial_shape, st.batch_size, weight.shape[1:4], subm=True, dilation=dilation)
    out, _, out_dict = _convolve(st, geom, indice_key, weight, bias, act, tune)
    return SparseTensor._trusted(out, st.indices, st.spatial_shape, st.batch_size, out_dict)


def sparse_conv3d(st: SparseTensor, weight: np.ndarray, bias: np.ndarray | None = None, *, stride=1,
                  padding=0, dilation=1, activation=None, indice_key: str | None = None,
                  tune: bool | str | None = None) -> SparseTensor:
    """Regular sparse convolution (spconv ``SparseConv3d``).

    Output spatial shape ``(in + 2 * padding - dilation * (k - 1) - 1) // stride + 1`` per axis;
    output sites = every site that some active input reaches, ordered by (first input row reaching
    it, tap).  ``stride`` / ``padding`` / ``dilation``: an int or 3 ints.  With ``indice_key`` the
    rulebook is kept for :func:`sparse_inverse_conv3d`.
    """
    tune = tune_mode(tune)  # a bad value fails before any work
    weight, bias = _weights(st, weight, bias)
    act = Activation.parse(activation)
    geom = make_geometry(st.spatial_shape, st.batch_size, weight.shape[1:4], subm=False, stride=stride,
                         padding=padding, dilation=dilation)
    out, rb, out_dict = _convolve(st, geom, indice_key, weight, bias, act, tune)
    return SparseTensor._trusted(out, rb.out_indices, geom.out_shape, st.batch_size, out_dict)


def sparse_inverse_conv3d(st: SparseTensor, weight: np.ndarray, bias: np.ndarray | None = None, *,
                          indice_key: str, activation=None, tune: bool | str | None = None) -> SparseTensor:
    """Inverse of the :func:`sparse_conv3d` stored under ``indice_key`` (spconv
    ``SparseInverseConv3d``): output sites and spatial shape are that convolution's input's.

    ``st`` must be that convolution's output (same sites, any features); ``weight`` must have its
    kernel size.  Output site ``i`` sums ``W[t]^T x[o]`` over the forward pairs ``(i, o, t)``.
    """
    tune = tune_mode(tune)  # a bad value fails before any work
    weight, bias = _weights(st, weight, bias)
    act = Activation.parse(activation)
    rb = st.indice_dict.get(indice_key) if isinstance(indice_key, str) else None
    if rb is None:
        raise ValueError(f"indice_key: no rulebook stored under {indice_key!r} in this tensor "
                         f"(has {sorted(st.indice_dict)}); pass the key of the sparse_conv3d to invert")
    if rb.geom.subm:
        raise ValueError(f"indice_key {indice_key!r} holds a SubM rulebook; an inverse convolution "
                         "needs a sparse_conv3d's")
    if tuple(weight.shape[1:4]) != rb.geom.kernel:
        raise ValueError(f"weight: kernel {tuple(weight.shape[1:4])} differs from the kernel "
                         f"{rb.geom.kernel} of the convolution stored under {indice_key!r}")
    if st.spatial_shape != rb.geom.out_shape or not _same_sites(rb.out_indices, st.indices):
        raise ValueError(f"st: its sites ({len(st.indices)} on {st.spatial_shape}) are not the output of "
                         f"the convolution stored under {indice_key!r} ({rb.n_out} on {rb.geom.out_shape})")
    out = _run(st, rb, weight, bias, act, inverse=True, tune=tune)
    return SparseTensor._trusted(out, rb.in_indices, rb.geom.in_shape, st.batch_size, dict(st.indice_dict))


def gather_rows(src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``src[idx]`` on the device: ``src [M, C]`` float32, ``idx [K]`` integers in ``[0, M)``;
    returns ``[K, C]`` float32."""
    src = shapes.as_float32("src", src, 2)
    idx = _int_array("idx", idx, 1)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(src)):
        bad = int(np.nonzero((idx < 0) | (idx >= len(src)))[0][0])
        raise ValueError(f"idx: idx[{bad}] = {idx[bad]} is outside [0, {len(src)})")
    if len(idx) == 0 or src.shape[1] == 0:
        return np.zeros((len(idx), src.shape[1]), np.float32)
    return gather_on_device(get_context(), src, idx)


def scatter_add_rows(dst_rows, src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Deterministic row scatter-add on the device (no float atomics).

    ``dst_rows``: the number of output rows R (the result starts at zero), or an initial
    ``[R, C]`` float32 array (not modified).  ``src [M, C]`` float32, ``idx [M]`` integers in
    ``[0, R)``.  Returns ``[R, C]`` with ``src[r]`` added to row ``idx[r]``; each row adds its
    contributions in increasing ``r``, so the result is bitwise reproducible.
    """
    src = shapes.as_float32("src", src, 2)
    idx = _int_array("idx", idx, 1)
    if isinstance(dst_rows, np.ndarray):
        dst = shapes.as_float32("dst_rows", dst_rows, 2)
        if dst.shape[1] != src.shape[1]:
            raise ValueError(f"dst_rows: {dst.shape[1]} channels but src has {src.shape[1]}")
    else:
        if isinstance(dst_rows, bool) or not isinstance(dst_rows, (int, np.integer)) or dst_rows < 0:
            raise ValueError(f"dst_rows: expected a row count >= 0 or a float32 array, got {dst_rows!r}")
        dst = np.zeros((int(dst_rows), src.shape[1]), np.float32)
    if len(idx) != len(src):
        raise ValueError(f"idx: {len(idx)} entries but src has {len(src)} rows (one index per row)")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(dst)):
        bad = int(np.nonzero((idx < 0) | (idx >= len(dst)))[0][0])
        raise ValueError(f"idx: idx[{bad}] = {idx[bad]} is outside [0, {len(dst)})")
    if len(idx) == 0 or dst.size == 0:
        return dst.copy()
    return scatter_add_on_device(get_context(), dst, src, idx)
