"""Sparse convolution rulebooks (spconv's ``get_indice_pairs``): built on the device, and in numpy
as the reference.

A rulebook maps, for every kernel tap ``t`` (``t = (kz * kH + ky) * kW + kx``, the order of the
spconv 2.x weight ``[C_out, kD, kH, kW, C_in]``), input rows to output rows:

* regular (strided) convolution: input site ``i`` feeds output site ``o`` through ``t`` when
  ``i = o * stride - padding + t * dilation`` per axis; the output sites are every site some input
  reaches, numbered by (smallest input row reaching it, tap) -- deterministic;
* submanifold (SubM): the output sites are the input sites, ``padding = (kernel // 2) * dilation``
  and stride 1; only odd kernels (as in spconv);
* inverse convolution reuses a regular convolution's rulebook with inputs and outputs swapped.

Device pipeline (``shaders/sparse_rulebook.comp``, ``sparse_scan.comp``): an int32 hash table on
linearized coordinates (open addressing over 2-slot buckets, compare-and-swap inserts, no float or
64-bit atomics) -> per-tap lists of (input row, output row) pairs, appended with one atomic counter
per tap.  A regular convolution reads one int (the number of output sites) back between its two
submissions; a SubM rulebook is one submission.  docs/SPARSE.md describes the stages.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from . import shapes
from .buffer import Buffer
from .context import Context
from .sparse_device import INT32_MAX, Recording

_RB_PUSH = struct.Struct("<32i")
_SCAN_PUSH = struct.Struct("<2i")
_SCAN_ITEMS = 8
_SCAN_LOCAL = 128


@dataclass(frozen=True)
class Geometry:
    """Everything a rulebook depends on besides the indices (all per-axis values are (D, H, W))."""

    subm: bool
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    dilation: tuple[int, int, int]
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    batch_size: int

    @property
    def kv(self) -> int:
        return math.prod(self.kernel)

    def describe(self) -> str:
        kind = "SubM" if self.subm else "sparse"
        return (f"{kind} conv kernel {self.kernel} stride {self.stride} padding {self.padding} "
                f"dilation {self.dilation} on {self.in_shape}")


def make_geometry(spatial_shape, batch_size: int, kernel, *, subm: bool, stride=1, padding=0,
                  dilation=1) -> Geometry:
    """Validated geometry; ValueError names the argument (the output would be empty, an even SubM
    kernel, or a grid whose linear index does not fit int32)."""
    kernel = shapes.spatial("kernel", tuple(kernel), 3, minimum=1)
    dilation = shapes.spatial("dilation", dilation, 3, minimum=1)
    in_shape = tuple(spatial_shape)
    if subm:
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"weight: SubM convolution needs odd kernel sizes (as spconv), got {kernel}")
        stride = (1, 1, 1)
        padding = tuple(k // 2 * d for k, d in zip(kernel, dilation))
        out_shape = in_shape
    else:
        stride = shapes.spatial("stride", stride, 3, minimum=1)
        padding = shapes.spatial("padding", padding, 3, minimum=0)
        out_shape = tuple(shapes.conv_out_size(s, k, st, p, p, d)
                          for s, k, st, p, d in zip(in_shape, kernel, stride, padding, dilation))
        if any(o < 1 for o in out_shape):
            raise ValueError(f"spatial_shape {in_shape} with padding {padding} is smaller than the dilated "
                             f"kernel {kernel} (dilation {dilation}): output shape would be {out_shape}")
    for name, grid in (("spatial_shape", in_shape), ("output spatial shape", out_shape)):
        if batch_size * math.prod(grid) > INT32_MAX:
            raise ValueError(f"{name}: batch_size x {grid} = {batch_size * math.prod(grid)} sites; the "
                             f"rulebook's hash keys are int32 (at most {INT32_MAX})")
    return Geometry(subm, kernel, stride, padding, dilation, in_shape, out_shape, int(batch_size))


def _linear(indices: np.ndarray, grid) -> np.ndarray:
    """int64 linear index of (batch, z, y, x) rows on a (D, H, W) grid."""
    d, h, w = grid
    i = indices.astype(np.int64)
    return ((i[:, 0] * d + i[:, 1]) * h + i[:, 2]) * w + i[:, 3]


def _taps(kernel) -> np.ndarray:
    """``[kv, 3]`` (kz, ky, kx) in tap order."""
    return np.stack(np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij"), -1).reshape(-1, 3)


def reference_rulebook(indices: np.ndarray,
                       geom: Geometry) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The rulebook in numpy: ``(out_indices [n_out, 4] int32, [(in_rows, out_rows)] per tap)``.

    Output rows follow the device's numbering (by smallest input row reaching the site, then tap).
    """
    indices = np.asarray(indices, np.int32).reshape(-1, 4)
    taps = _taps(geom.kernel)
    dil, pad, stride = (np.array(v) for v in (geom.dilation, geom.padding, geom.stride))
    coords = indices[:, 1:].astype(np.int64)
    if geom.subm:
        keys = _linear(indices, geom.in_shape)
        order = np.argsort(keys)
        pairs = []
        for tap in taps:
            q = coords - pad + tap * dil
            ok = np.all((q >= 0) & (q < np.array(geom.in_shape)), axis=1)
            out_rows = np.nonzero(ok)[0]
            qk = _linear(np.column_stack([indices[out_rows, 0], q[out_rows]]), geom.in_shape)
            at = np.minimum(np.searchsorted(keys, qk, sorter=order), max(len(keys) - 1, 0))
            hit = keys[order[at]] == qk if len(keys) else np.zeros(0, bool)
            pairs.append((order[at[hit]].astype(np.int32), out_rows[hit].astype(np.int32)))
        return indices, pairs
    # Every (input row, tap) candidate in row-major order, so the first occurrence of a site is its
    # owner (smallest input row, then tap).
    q = coords[:, None, :] + pad - taps[None] * dil                  # [n, kv, 3]
    o = q // stride
    ok = np.all((q >= 0) & (q % stride == 0) & (o < np.array(geom.out_shape)), axis=2)
    rows, tap_of = np.nonzero(ok)
    sites = np.column_stack([indices[rows, 0], o[rows, tap_of]]).astype(np.int32)
    keys = _linear(sites, geom.out_shape)
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    numbering = np.empty(len(uniq), np.int64)
    numbering[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    out_rows = numbering[inverse.reshape(-1)]
    out_indices = sites[np.sort(first)] if len(first) else np.zeros((0, 4), np.int32)
    pairs = []
    for t in range(geom.kv):
        sel = tap_of == t
        pairs.append((rows[sel].astype(np.int32), out_rows[sel].astype(np.int32)))
    return np.ascontiguousarray(out_indices, np.int32), pairs


class Rulebook:
    """A rulebook resident on the device: per-tap pair lists plus the host-side bookkeeping.

    Tap ``t``'s pairs are ``pair_buf[t * per_tap : t * per_tap + counts[t]]``, a device buffer of
    int32 (input row, output row) pairs (``None`` without pairs).  A SubM rulebook leaves out the
    centre tap, which pairs every row with itself.
    ``in_indices`` / ``out_indices`` are the host arrays of the sites (SubM: the same array);
    ``in_idx`` / ``out_idx`` their device copies.  Device memory is freed by :meth:`close` or when
    the rulebook is garbage-collected.
    """

    def __init__(self, geom: Geometry, in_indices: np.ndarray, out_indices: np.ndarray,
                 per_tap: int, counts: np.ndarray, in_idx: Buffer | None, out_idx: Buffer | None,
                 pairs: Buffer | None):
        self.geom = geom
        self.in_indices, self.out_indices = in_indices, out_indices
        self.per_tap, self.counts = per_tap, counts
        self.in_idx, self.out_idx = in_idx, out_idx
        self.pair_buf = pairs

    @property
    def n_in(self) -> int:
        return len(self.in_indices)

    @property
    def n_out(self) -> int:
        return len(self.out_indices)

    def pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(in_rows, out_rows)]`` per tap, read back from the device (tests, debugging); the
        SubM centre tap is listed explicitly."""
        kv = self.geom.kv
        lists = [(np.zeros(0, np.int32), np.zeros(0, np.int32)) for _ in range(kv)]
        if self.pair_buf is not None and self.counts.any():
            size = 8 * kv * self.per_tap
            with Recording(self.pair_buf.ctx) as rec:
                copy = rec.scratch(size, "rulebook pairs readback", staged=True)
                rec.copy(self.pair_buf, 0, copy, 0, size)
                rec.download(copy)
                rec.submit()
                pairs = copy.read(np.int32, (kv, self.per_tap, 2))
            lists = [(pairs[t, :n, 0], pairs[t, :n, 1]) for t, n in enumerate(self.counts)]
        if self.geom.subm:
            rows = np.arange(self.n_in, dtype=np.int32)
            lists[kv // 2] = (rows, rows)
        return lists

    def close(self) -> None:
        for buf in {id(b): b for b in (self.in_idx, self.out_idx, self.pair_buf)
                    if b is not None}.values():
            buf.close()


def _buckets(keys: int) -> int:
    """Power-of-two number of 2-slot hash buckets, at most a quarter of the slots used."""
    return max(8, 1 << max(1, 2 * keys - 1).bit_length())


def _axis_reach(k: int, s: int, d: int) -> tuple[int, int]:
    """(gcd(d, s), most taps of one axis that reach an output: every (s / gcd)-th tap)."""
    g = math.gcd(d, s)
    return g, -(-k // (s // g))


def _push(geom: Geometry, n_in: int, n_out: int, mask: int, cap: int) -> bytes:
    axes = [_axis_reach(k, s, d) for k, s, d in zip(geom.kernel, geom.stride, geom.dilation)]
    gcd = [g for g, _ in axes]
    # modular inverse of d / g modulo s / g (0 when s / g == 1: every tap qualifies)
    inv = [pow(d // g, -1, s // g) if s // g > 1 else 0
           for (g, _), s, d in zip(axes, geom.stride, geom.dilation)]
    reach = math.prod(r for _, r in axes)
    return _RB_PUSH.pack(*geom.in_shape, n_in, *geom.out_shape, n_out, *geom.kernel, geom.kv,
                         *geom.padding, mask, *geom.dilation, cap, *geom.stride, reach, *gcd, 0,
                         *inv, 0)


def _reach(geom: Geometry) -> int:
    """Most output sites one input site can reach."""
    return math.prod(_axis_reach(k, s, d)[1] for k, s, d in zip(geom.kernel, geom.stride, geom.dilation))


def record_scan(rec: Recording, src: Buffer, n: int, dst: Buffer) -> None:
    """Record ``dst[0:n+1]`` = exclusive prefix sum of ``src[0:n]`` (grand total at ``dst[n]``);
    ``dst`` may be ``src``."""
    local = rec.ctx.local_size(_SCAN_LOCAL)
    block = local * _SCAN_ITEMS
    # constant_id 3 is the activation slot every shader reserves; the scan's own start at 4
    spec = (0, _SCAN_ITEMS)
    levels = [(src, n)]  # (values, count) from the bottom of the tree up
    while levels[-1][1] > block:
        count = -(-levels[-1][1] // block)
        sums = rec.scratch(4 * (count + 1), "sparse scan block sums")
        values, m = levels[-1]
        rec.dispatch("sparse_scan_reduce", [values, sums, values], _SCAN_PUSH.pack(m, 0),
                     -(-m // _SCAN_ITEMS), spec=spec, local=local)
        rec.barrier()
        levels.append((sums, count))
    parent = None
    for depth in range(len(levels) - 1, -1, -1):
        values, m = levels[depth]
        out = dst if depth == 0 else values
        rec.dispatch("sparse_scan_downsweep", [values, out, parent or values],
                     _SCAN_PUSH.pack(m, int(parent is not None)), -(-m // _SCAN_ITEMS), spec=spec,
                     local=local)
        rec.barrier()
        parent = values


def build_rulebook(ctx: Context, indices: np.ndarray, geom: Geometry,
                   in_idx: Buffer | None = None) -> Rulebook:
    """The rulebook of ``geom`` for the (validated, duplicate-free) ``indices [n, 4]`` int32.

    ``in_idx``: the indices already on the device (a previous layer's output), else uploaded;
    either way the rulebook refers to it and :meth:`Rulebook.close` closes it.
    """
    n_in = len(indices)
    kv = geom.kv
    if n_in == 0:
        empty = np.zeros((0, 4), np.int32)
        return Rulebook(geom, indices, indices if geom.subm else empty, 0, np.zeros(kv, np.int64),
                        None, None, None)
    with Recording(ctx) as rec:
        if in_idx is None:
            in_idx = rec.upload(np.ascontiguousarray(indices, np.int32), "sparse indices", keep=False)
        unused = rec.scratch(16, "unused binding")
        counts = rec.scratch(4 * kv, "rulebook pairs per tap", staged=True)
        rec.fill(counts, 0)
        if geom.subm:
            buckets = _buckets(n_in)
            table = rec.scratch(16 * buckets, "hash table")
            pairs = _pair_buffer(ctx, kv, n_in)
            rec.fill(table, -1)
            rec.barrier()
            buffers = [in_idx, table, unused, unused, unused, unused, counts, pairs, unused]
            push = _push(geom, n_in, n_in, buckets - 1, n_in)
            rec.dispatch("sparse_subm_insert", buffers, push, n_in)
            rec.barrier()
            rec.dispatch("sparse_subm_pairs", buffers, push, n_in)
            out_indices, out_idx, per_tap = indices, in_idx, n_in
        else:
            reach = _reach(geom)
            buckets = _buckets(min(n_in * reach, geom.batch_size * math.prod(geom.out_shape)))
            table = rec.scratch(16 * buckets, "hash table")
            cand = rec.scratch(4 * n_in * reach, "rulebook candidates")
            base = rec.scratch(4 * (n_in + 1), "rulebook row bases")
            owner = rec.scratch(8 * buckets, "hash slot owners")
            slot_row = rec.scratch(8 * buckets, "rulebook slot rows")
            total = rec.scratch(4, "rulebook output count", staged=True)
            for buf in (table, cand, owner, slot_row):
                rec.fill(buf, -1)
            rec.barrier()
            buffers = [in_idx, table, cand, base, unused, owner, counts, unused, slot_row]
            push = _push(geom, n_in, 0, buckets - 1, 0)
            rec.dispatch("sparse_conv_candidates", buffers, push, n_in)
            rec.barrier()
            rec.dispatch("sparse_conv_count", buffers, push, n_in)
            rec.barrier()
            record_scan(rec, base, n_in, base)
            rec.copy(base, 4 * n_in, total, 0, 4)
            rec.download(total)
            rec.submit()
            n_out = int(total.read(np.int32, (1,))[0])
            if n_out == 0:
                return Rulebook(geom, indices, np.zeros((0, 4), np.int32), 0, np.zeros(kv, np.int64),
                                in_idx, None, None)
            per_tap = min(n_in, n_out)
            out_idx = Buffer(ctx, 16 * n_out, staged=True, name="sparse output indices")
            pairs = _pair_buffer(ctx, kv, per_tap)
            buffers = [in_idx, table, cand, base, out_idx, owner, counts, pairs, slot_row]
            push = _push(geom, n_in, n_out, buckets - 1, per_tap)
            rec.dispatch("sparse_conv_assign", buffers, push, n_in)
            rec.barrier()
            rec.dispatch("sparse_conv_pairs", buffers, push, n_in)
            rec.download(out_idx)
        rec.download(counts)
        rec.submit()
        if not geom.subm:
            out_indices = out_idx.read(np.int32, (n_out, 4))
        per_tap_counts = np.minimum(counts.read(np.int32, (kv,)), per_tap).astype(np.int64)
        if geom.subm:  # the device counted the taps before the centre; the mirrored ones match
            per_tap_counts[kv // 2 + 1:] = per_tap_counts[:kv // 2][::-1]
    return Rulebook(geom, indices, out_indices, per_tap, per_tap_counts, in_idx, out_idx, pairs)


def _pair_buffer(ctx: Context, kv: int, per_tap: int) -> Buffer:
    return Buffer(ctx, 8 * kv * per_tap, name="rulebook pairs")
