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

Device pipeline (``shaders/sparse/sparse_rulebook.comp``, ``sparse_scan.comp``): an int32 hash table on
linearized coordinates (open addressing over 2-slot buckets, compare-and-swap inserts, no float or
64-bit atomics) -> an output-stationary rulebook: per output row a bit mask of the taps that pair it
with an input row, and a ``[n_out][kv]`` table of those input rows.  A regular convolution reads one
int (the number of output sites) back between its two submissions; a SubM rulebook is one
submission.  docs/SPARSE.md describes the stages.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from vkconv.kernels import shapes
from vkconv.ops.sparse.device import INT32_MAX, Recording, lease, release, texel_capable
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.context import Context
from vkconv.runtime.errors import VkconvError
from vkconv.runtime.plan import closed_on_error
from vkconv.runtime.transfer import upload

_RB_PUSH = struct.Struct("<9i")
# Rows are stored as float32 in the rulebook table (read through texel buffers): exact up to 2^24.
MAX_ROWS = 1 << 24
_SCAN_PUSH = struct.Struct("<3i")
_SCAN_LOCAL = 128
# Values per invocation at most: one block of 128 x 1024 runs as one workgroup (one CPU core on
# lavapipe, about 0.2 ms for 30 k values), one dispatch for every cloud below 131 k voxels.
_SCAN_MAX_ITEMS = 1024


@dataclass(frozen=True)
class SparseGeometry:
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
                  dilation=1) -> SparseGeometry:
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
    return SparseGeometry(subm, kernel, stride, padding, dilation, in_shape, out_shape, int(batch_size))


def _linear(indices: np.ndarray, grid) -> np.ndarray:
    """int64 linear index of (batch, z, y, x) rows on a (D, H, W) grid."""
    d, h, w = grid
    i = indices.astype(np.int64)
    return ((i[:, 0] * d + i[:, 1]) * h + i[:, 2]) * w + i[:, 3]


def _taps(kernel) -> np.ndarray:
    """``[kv, 3]`` (kz, ky, kx) in tap order."""
    return np.stack(np.meshgrid(*[np.arange(k) for k in kernel], indexing="ij"), -1).reshape(-1, 3)


def reference_rulebook(indices: np.ndarray,
                       geom: SparseGeometry) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
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
    """A rulebook resident on the device, output-stationary (``shaders/sparse/sparse_rulebook.comp``).

    ``masks`` ``[n_out][words]`` uint32 (``words = ceil(kv / 32)``): bit ``t % 32`` of word
    ``t // 32`` is set when tap ``t`` pairs the output row with an input row; ``table``
    ``[n_out][kv]`` float32: that input row (whole numbers below 2^24; only where the mask has the
    tap).  The masks are host-readable too (on a discrete GPU their staging twin is filled by the
    submission that builds them, so :meth:`schedule` costs no submit of its own there either).
    A SubM rulebook lists the centre tap (every row with itself) like the others.  The same
    pairs keyed by input row, for the inverse convolution, are built on first use
    (:meth:`tables`).  ``in_indices`` / ``out_indices`` are the host arrays of the sites (SubM: the
    same array); ``in_idx`` / ``out_idx`` their device copies.  Device buffers go back to the pool
    on :meth:`close` (or are freed when the rulebook is garbage-collected).
    """

    def __init__(self, geom: SparseGeometry, in_indices: np.ndarray, out_indices: np.ndarray):
        self.geom = geom
        self.in_indices, self.out_indices = in_indices, out_indices
        self.in_idx: Buffer | None = None
        self.out_idx: Buffer | None = None
        self._tables: dict[bool, tuple[Buffer, Buffer]] = {}
        self._schedules: dict[tuple[bool, int, int], tuple[Buffer, int]] = {}

    @property
    def n_in(self) -> int:
        return len(self.in_indices)

    @property
    def n_out(self) -> int:
        return len(self.out_indices)

    @property
    def words(self) -> int:
        """32-bit mask words per row."""
        return -(-self.geom.kv // 32)

    def tables(self, *, inverse: bool = False) -> tuple[Buffer, Buffer]:
        """``(table, masks)`` keyed by output row, or (``inverse``) by input row: the forward
        pairs ``(i, o, t)`` as ``table[i][t] = o``, built on the device the first time."""
        if inverse and inverse not in self._tables:
            self._tables[True] = _invert(self)
        return self._tables[inverse]

    def has_schedule(self, *, inverse: bool = False) -> bool:
        """Whether rows of :meth:`tables` (``inverse``) have been sorted for some tap range."""
        return any(key[0] == inverse for key in self._schedules)

    def schedule(self, taps: tuple[int, int], *, inverse: bool = False) -> tuple[Buffer, int]:
        """The rows of :meth:`tables` sorted by their mask bits of the taps ``[lo, hi)`` (the first 32
        of them), as float32 row numbers, so that the rows of a compute tile share their taps in
        that range, and how many there are: every row where the range ends the kernel, else only
        the rows with taps in it.  Sorted on the host the first time (a numpy radix sort of the
        host-readable masks: about 10 ns per row)."""
        key = (inverse, *taps)
        if key not in self._schedules:
            self._schedules[key] = _schedule(self, inverse, taps)
        return self._schedules[key]

    def pairs(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(in_rows, out_rows)]`` per tap, read back from the device (tests, benchmarks)."""
        kv, n_out = self.geom.kv, self.n_out
        if not self._tables:
            empty = np.zeros(0, np.int32)
            return [(empty, empty) for _ in range(kv)]
        table, masks = self._tables[False]
        with Recording(table.ctx) as rec:
            copies = []
            for buf, nbytes in ((table, 4 * kv * n_out), (masks, 4 * self.words * n_out)):
                copy = rec.scratch(nbytes, "rulebook readback", staged=True)
                rec.copy(buf, 0, copy, 0, nbytes)
                rec.download(copy)
                copies.append(copy)
            rec.submit()
            rows = copies[0].read(np.float32, (n_out, kv))  # defined only where the mask has the tap
            words = copies[1].read(np.uint32, (n_out, self.words))
        out = []
        for t in range(kv):
            o = np.nonzero((words[:, t // 32] >> np.uint32(t % 32)) & 1)[0].astype(np.int32)
            out.append((rows[o, t].astype(np.int32), o))
        return out

    def close(self) -> None:
        buffers = [self.in_idx, self.out_idx, *(b for pair in self._tables.values() for b in pair),
                   *(buf for buf, _ in self._schedules.values())]
        for buf in buffers:
            if buf is not None:
                release(buf)
        self._tables.clear()
        self._schedules.clear()
        self.in_idx = self.out_idx = None


def _buckets(keys: int, load: int) -> int:
    """Power-of-two number of 2-slot hash buckets for at most ``keys`` keys, at most 1 / ``load``
    of the slots used."""
    return max(8, 1 << max(1, load * keys // 2 - 1).bit_length())


def _axis_reach(k: int, s: int, d: int) -> tuple[int, int]:
    """(gcd(d, s), most taps of one axis that reach an output: every (s / gcd)-th tap)."""
    g = math.gcd(d, s)
    return g, -(-k // (s // g))


def _push(geom: SparseGeometry, n_in: int, n_out: int, mask: int = 0) -> bytes:
    """The rulebook stages' push constants: grid sizes, row counts, hash buckets - 1."""
    return _RB_PUSH.pack(*geom.in_shape, n_in, *geom.out_shape, n_out, mask)


def _spec(geom: SparseGeometry) -> tuple[int, ...]:
    """The rulebook stages' specialization constants from id 3 (unused there, the activation
    slot): kernel, stride, padding, dilation, gcd(dilation, stride), and the inverse of
    dilation / gcd modulo stride / gcd (0 when stride / gcd is 1: every tap qualifies)."""
    gcd = [_axis_reach(k, s, d)[0] for k, s, d in zip(geom.kernel, geom.stride, geom.dilation)]
    inv = [pow(d // g, -1, s // g) if s // g > 1 else 0 for g, s, d in zip(gcd, geom.stride, geom.dilation)]
    return (0, *geom.kernel, *geom.stride, *geom.padding, *geom.dilation, *gcd, *inv)


def _reach(geom: SparseGeometry) -> int:
    """Most output sites one input site can reach."""
    return math.prod(_axis_reach(k, s, d)[1] for k, s, d in zip(geom.kernel, geom.stride, geom.dilation))


def record_scan(rec: Recording, src: Buffer, n: int, dst: Buffer) -> None:
    """Record ``dst[0:n+1]`` = exclusive prefix sum of ``src[0:n]`` (grand total at ``dst[n]``);
    ``dst`` may be ``src``."""
    local = rec.ctx.local_size(_SCAN_LOCAL)
    block = local * _SCAN_MAX_ITEMS
    levels = [(src, n)]  # (values, count) from the bottom of the tree up
    while levels[-1][1] > block:
        values, m = levels[-1]
        count = -(-m // block)
        sums = rec.scratch(4 * (count + 1), "sparse scan block sums")
        rec.dispatch("sparse_scan_reduce", [values, sums, values], _SCAN_PUSH.pack(m, _SCAN_MAX_ITEMS, 0),
                     -(-m // _SCAN_MAX_ITEMS), local=local)
        rec.barrier()
        levels.append((sums, count))
    parent = None
    for depth in range(len(levels) - 1, -1, -1):
        values, m = levels[depth]
        # the top is one block, as short as its values allow; below, the blocks of the reduce
        items = -(-m // local) if depth == len(levels) - 1 else _SCAN_MAX_ITEMS
        rec.dispatch("sparse_scan_downsweep", [values, dst if depth == 0 else values, parent or values],
                     _SCAN_PUSH.pack(m, items, int(parent is not None)), -(-m // items), local=local)
        rec.barrier()
        parent = values


def _check_rows(name: str, n: int) -> None:
    if n > MAX_ROWS:
        raise VkconvError(f"{name}: {n} sites; the rulebook stores row numbers as float32, exact up "
                          f"to {MAX_ROWS} sites")


def build_rulebook(ctx: Context, indices: np.ndarray, geom: SparseGeometry,
                   in_idx: Buffer | None = None) -> Rulebook:
    """The rulebook of ``geom`` for the (validated, duplicate-free) ``indices [n, 4]`` int32.

    ``in_idx``: the indices already on the device (a previous layer's output), else uploaded;
    either way the rulebook refers to it and :meth:`Rulebook.close` releases it.
    """
    n_in = len(indices)
    kv, words = geom.kv, -(-geom.kv // 32)
    if n_in == 0:
        return Rulebook(geom, indices, indices if geom.subm else np.zeros((0, 4), np.int32))
    _check_rows("indices", n_in)
    texel = texel_capable(ctx)
    rb = Rulebook(geom, indices, indices)
    with closed_on_error(rb), Recording(ctx) as rec:
        rb.in_idx = in_idx if in_idx is not None else rec.upload(
            np.ascontiguousarray(indices, np.int32), "sparse indices", keep=False)
        unused = rec.scratch(16, "unused binding")
        if geom.subm:
            # SubM looks every neighbour up, mostly in vain: a sparse table (1/8 used) ends more
            # lookups at their first bucket (measured: 10 % faster than 1/4 on 30 k voxels)
            buckets = _buckets(n_in, 8)
            htab = rec.scratch(16 * buckets, "hash table")
            table = lease(ctx, 4 * kv * n_in, "rulebook table", texel=texel)
            masks = lease(ctx, 4 * words * n_in, "rulebook masks", staged=True)
            rb.out_idx, rb._tables[False] = rb.in_idx, (table, masks)
            rec.fill(htab, -1)
            rec.fill(masks, 0, 4 * words * n_in)
            rec.barrier()
            buffers = [rb.in_idx, htab, unused, unused, unused, table, masks, unused, unused]
            push, spec = _push(geom, n_in, n_in, buckets - 1), _spec(geom)
            rec.dispatch("sparse_subm_insert", buffers, push, n_in, spec=spec)
            rec.barrier()
            rec.dispatch("sparse_subm_pairs", buffers, push, n_in, spec=spec)
            rec.download(masks)
            rec.submit()
            return rb
        reach = _reach(geom)
        # sized for the most sites the inputs can reach, which few clouds come near: half the slots
        buckets = _buckets(min(n_in * reach, geom.batch_size * math.prod(geom.out_shape)), 2)
        htab = rec.scratch(16 * buckets, "hash table")
        cand = rec.scratch(4 * n_in * reach, "rulebook candidates")
        base = rec.scratch(4 * (n_in + 1), "rulebook row bases")
        total = rec.scratch(4, "rulebook output count", staged=True)
        rec.fill(htab, -1)
        rec.barrier()
        buffers = [rb.in_idx, htab, cand, base, unused, unused, unused, unused, unused]
        push, spec = _push(geom, n_in, 0, buckets - 1), _spec(geom)
        rec.dispatch("sparse_conv_candidates", buffers, push, n_in, spec=spec)
        rec.barrier()
        rec.dispatch("sparse_conv_count", buffers, push, n_in, spec=spec)
        rec.barrier()
        record_scan(rec, base, n_in, base)
        rec.copy(base, 4 * n_in, total, 0, 4)
        rec.download(total)
        rec.submit()
        n_out = int(total.read(np.int32, (1,))[0])
        if n_out == 0:
            rb.out_indices = np.zeros((0, 4), np.int32)
            return rb
        _check_rows("output sites", n_out)
        rb.out_idx = lease(ctx, 16 * n_out, "sparse output indices", staged=True)
        table = lease(ctx, 4 * kv * n_out, "rulebook table", texel=texel)
        masks = lease(ctx, 4 * words * n_out, "rulebook masks", staged=True)
        rb._tables[False] = (table, masks)
        rec.fill(masks, 0, 4 * words * n_out)
        rec.barrier()
        buffers = [rb.in_idx, htab, cand, base, rb.out_idx, table, masks, unused, unused]
        push = _push(geom, n_in, n_out, buckets - 1)
        rec.dispatch("sparse_conv_pairs", buffers, push, n_in, spec=spec)
        rec.download(rb.out_idx)
        rec.download(masks)
        rec.submit()
        rb.out_indices = rb.out_idx.read(np.int32, (n_out, 4))
    return rb


def _invert(rb: Rulebook) -> tuple[Buffer, Buffer]:
    """The rulebook's pairs keyed by input row (``conv_invert``), as ``(table, masks)``; every
    mask is zero when the forward convolution has no output site."""
    assert rb.in_idx is not None  # a rulebook with input rows keeps them on the device
    ctx, kv, words = rb.in_idx.ctx, rb.geom.kv, rb.words
    inv_table = lease(ctx, 4 * kv * rb.n_in, "inverse rulebook table", texel=texel_capable(ctx))
    inv_masks = lease(ctx, 4 * words * rb.n_in, "inverse rulebook masks", staged=True)
    try:
        with Recording(ctx) as rec:
            rec.fill(inv_masks, 0, 4 * words * rb.n_in)
            if False in rb._tables:
                unused = rec.scratch(16, "unused binding")
                rec.barrier()
                rec.dispatch("sparse_conv_invert",
                             [unused, unused, unused, unused, unused, *rb._tables[False], inv_table,
                              inv_masks], _push(rb.geom, rb.n_in, rb.n_out), rb.n_out, spec=_spec(rb.geom))
            rec.download(inv_masks)
            rec.submit()
    except BaseException:
        release(inv_table)
        release(inv_masks)
        raise
    return inv_table, inv_masks


def _has_taps(words: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per row of mask ``words`` (``[n][words]`` uint32): whether any tap in ``[lo, hi)`` is set."""
    found = np.zeros(len(words), bool)
    for wd in range(lo // 32, (hi + 31) // 32):
        bits = ~np.uint32(0)
        if lo > 32 * wd:
            bits &= ~np.uint32((1 << (lo - 32 * wd)) - 1)
        if hi < 32 * (wd + 1):
            bits &= np.uint32((1 << (hi - 32 * wd)) - 1)
        found |= (words[:, wd] & bits) != 0
    return found


# Rows per block of a schedule that stay together when the blocks are shuffled: a multiple of the
# tiles' row counts (4-16 on lavapipe; 32 and 64 for 32-lane subgroups), so no tile straddles two
# blocks (one that did would still be right, only walk more taps).
SCHEDULE_BLOCK = 64


def _schedule(rb: Rulebook, inverse: bool, taps: tuple[int, int]) -> tuple[Buffer, int]:
    """The rows of ``rb.tables(inverse)`` in the Gray-code order of their mask bits of the taps
    ``[lo, hi)`` (the first 32; rows with equal bits keep their order), without the rows that have
    none unless the range ends the kernel, then blocks of :data:`SCHEDULE_BLOCK` rows in a fixed
    pseudo-random order: ``(the rows as float32 row numbers, uploaded with the next submit, their
    count)``.  (A range before the last has nothing to add to a row without taps in it.)"""
    masks = rb.tables(inverse=inverse)[1]
    ctx, n = masks.ctx, rb.n_in if inverse else rb.n_out
    lo, hi = taps
    words = masks.read(np.uint32, (n, rb.words))
    first, shift = divmod(lo, 32)
    key = words[:, first] >> np.uint32(shift)
    if shift and first + 1 < rb.words:
        key |= words[:, first + 1] << np.uint32(32 - shift)
    if hi - lo < 32:
        key &= np.uint32((1 << (hi - lo)) - 1)
    # In Gray-code order (the rank whose Gray code is the mask) neighbouring masks differ in one
    # tap, so a tile that straddles two of them walks one tap more, not up to every tap (the scan
    # cloud's strided layer, 16-row tiles, one plane per range: 1.10x the useful work, 1.16x in
    # plain order)
    for shift_by in (1, 2, 4, 8, 16):
        key ^= key >> np.uint32(shift_by)
    # numpy's stable sort of 16-bit keys is a radix sort: two passes sort 32-bit keys 3-4x faster
    # than one comparison sort, and one pass does for a range of 16 taps or fewer (a plane of 9)
    order = np.argsort((key & 0xFFFF).astype(np.uint16), kind="stable")
    if hi - lo > 16:
        order = order[np.argsort((key[order] >> 16).astype(np.uint16), kind="stable")]
    if hi < rb.geom.kv:
        order = order[_has_taps(words, lo, hi)[order]]
    n = len(order)
    # Sorted, the work per tile climbs with the mask along the schedule, and lavapipe hands each
    # of its threads one contiguous share of a dispatch's workgroups: the thread with the light end
    # idled (tap ranges of one kernel plane, 64 channels: 86-89 ms sorted, 60-66 shuffled).
    # Shuffled blocks give every share the same mix; the seed is fixed so that runs repeat their
    # schedule (the results do not depend on it).
    blocks = n // SCHEDULE_BLOCK
    head = order[:blocks * SCHEDULE_BLOCK].reshape(blocks, SCHEDULE_BLOCK)
    order[:blocks * SCHEDULE_BLOCK] = head[np.random.default_rng(0).permutation(blocks)].reshape(-1)
    order = order.astype(np.float32)
    buf = lease(ctx, max(order.nbytes, 4), "rulebook schedule", staged=True, texel=texel_capable(ctx))
    try:
        upload(buf, order)
    except BaseException:
        release(buf)
        raise
    return buf, n
