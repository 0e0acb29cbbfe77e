"""Sparse convolution compute on the device: one output-stationary dispatch per convolution
(``shaders/sparse/sparse_gemm.comp``) over an output-stationary rulebook, and the standalone row gather /
scatter-add primitives.

Device feature layout: rows of ``ceil(C / 4)`` vec4 (channels zero-padded to a multiple of 4), so
a chain of layers (the cv2.dnn encoder) passes features from one layer to the next on the device.
Weights are spconv 2.x's ``[C_out, kD, kH, kW, C_in]``, repacked per tap as
``[C_in (padded to 4)][C_out padded to 4 * coutp]``, with the bias as one more row.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import struct
from dataclasses import dataclass

import numpy as np

from vkconv.kernels.activation import Activation
from vkconv.ops.sparse.device import Recording, lease, release, texel_capable
from vkconv.ops.sparse.rulebook import Rulebook
from vkconv.ops.tune import Agreement, TuneResult, budget_ms, cached_candidate, search, store_result
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.context import Context
from vkconv.runtime.pipeline import STORAGE, TEXEL1, TEXEL4, texel_fits
from vkconv.runtime.timestamps import Timestamps
from vkconv.runtime.transfer import upload_constant

log = logging.getLogger(__name__)

# n_in, n_out, kv, words, cin4, cout4, coutp, tap_lo, tap_hi, n_rows, act_a, act_b
_GEMM_PUSH = struct.Struct("<10i2f")
_GATHER_PUSH = struct.Struct("<3i")


@dataclass(frozen=True)
class Tile:
    """What one ``sparse_gemm`` invocation computes: ``rows`` output rows x ``cb`` vec4s of output
    channels; ``share``: neighbouring invocations take the other channel blocks of the same rows;
    ``parts``: the taps are summed in that many consecutive ranges (:func:`tap_ranges`), one
    dispatch each, the rows sorted by their taps in each range."""

    rows: int
    cb: int
    share: bool
    subgroup: bool = False  # the lanes of a subgroup share rows, read once and shuffled (sparse_gemm.comp)
    parts: int = 1


def tap_ranges(kv: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` consecutive ranges ``[lo, hi)`` of ``kv`` taps, as equal as whole taps allow (a
    3x3x3 kernel in 3 parts: one kernel plane each)."""
    bounds = [kv * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def choose_tile(ctx: Context, coutp: int, planes: int = 1) -> Tile:
    """The heuristic tile for output rows of ``coutp`` vec4s (:class:`PackedWeights`) and a kernel
    of ``planes`` planes (its depth).

    An invocation walks the union of its rows' taps, so more rows per tile reuse each weight load
    more often but multiply zeros for the rows that lack a tap.  Measured on lavapipe (8 SIMD
    lanes, every texel fetch a gather, a shuffle by a constant lane a register permute) at 30 k
    voxels (docs/PERFORMANCE.md): up to 16 channels one invocation takes every channel of 8 rows;
    wider layers give 16 rows to the lanes of a subgroup, one block of ``coutp / subgroup size``
    vec4s each, each lane reading its rows' features and shuffling them to the others (1.2-1.4x
    faster at 64 channels than each lane reading all 8 rows itself, as devices without subgroup
    shuffles still do, 2 vec4s of channels each), and sum the taps one kernel plane at a time,
    each plane's rows sorted by their taps in it (0.74-0.83x the time of all taps at once: the
    union of 16 rows' taps is 1.4x their useful work over all taps, 1.05x plane by plane).
    GPUs run 32 or more lanes and keep the register tile small (not measured on one yet): a 4-row
    tile shared by the lanes, 1 vec4 each.
    """
    if ctx.info.type != "cpu":
        return Tile(4, 1, True)
    if coutp <= 4:
        return Tile(8, coutp, False)
    sg = max(1, ctx.info.subgroup_size)
    shared = Tile(2 * max(8, sg), coutp // sg, True, subgroup=True, parts=planes)
    if coutp // sg <= 4 and tile_fits(ctx, shared, coutp) is None:
        return shared
    return Tile(8, 2, True)


MAX_TILE_VEC4 = 64  # accumulators per invocation (rows x cb vec4s) a candidate may hold


def tile_fits(ctx: Context, tile: Tile, coutp: int) -> str | None:
    """Why ``tile`` cannot run output rows of ``coutp`` vec4s on this device (None if it can)."""
    if tile.rows < 1 or tile.cb < 1 or coutp % tile.cb:
        return f"{tile.cb} vec4s per block do not divide the {coutp} of a packed row"
    if tile.parts < 1:
        return f"{tile.parts} tap ranges"
    if tile.rows * tile.cb > MAX_TILE_VEC4:
        return f"{tile.rows} x {tile.cb} vec4 accumulators exceed {MAX_TILE_VEC4}"
    if tile.subgroup:
        sg = ctx.info.subgroup_size
        if not ctx.info.subgroup_shuffle:
            return "the device has no subgroup shuffles"
        if not tile.share or coutp != tile.cb * sg or tile.rows % sg or ctx.local_size(64) % sg:
            return f"a subgroup of {sg} lanes cannot share {tile.rows} rows of {coutp} vec4s in blocks of {tile.cb}"
    return None


def tile_candidates(ctx: Context, coutp: int, planes: int = 1) -> list[Tile]:
    """Every tile the tuner may time for ``coutp`` vec4s per output row and a kernel of
    ``planes`` planes: 4 to 16 rows, each lane taking every channel or blocks of 1 to 4 vec4s
    shared by neighbouring lanes, and the subgroup kernel with one or two rows read per lane;
    each with the taps summed at once, in two ranges, or plane by plane."""
    sg = max(1, ctx.info.subgroup_size)
    # the subgroup kernel first: where it runs it is the likeliest winner, and a tight budget
    # (VKCONV_TUNE_BUDGET_MS) times the first candidates only
    shapes = [Tile(rows, coutp // sg, True, subgroup=True) for rows in (sg, 2 * sg)]
    # (sharing rows between the blocks of a row needs more than one block)
    shapes += [Tile(rows, cb, share) for rows in (8, 16, 4) for cb in (1, 2, 4, coutp)
               for share in (False, True) if not (share and cb == coutp)]
    cands = [dataclasses.replace(t, parts=parts) for parts in dict.fromkeys((planes, 1, 2)) for t in shapes]
    unique = list(dict.fromkeys(cands))
    return [t for t in unique if tile_fits(ctx, t, coutp) is None]


def layer_signature(rb: Rulebook, w: PackedWeights, inverse: bool) -> str:
    """The tuning cache key of one layer shape: kind, kernel, channels, whether its rows come
    sorted (:func:`wants_schedule`), texel reads (the cloud itself is not part of it: a layer
    tuned on one scan serves the next)."""
    kind = "inverse" if inverse else "subm" if rb.geom.subm else "strided"
    sched = rb.has_schedule(inverse=inverse) or wants_schedule(w, rb)
    return (f"sparse_conv {kind} k{'x'.join(map(str, rb.geom.kernel))} cin4={w.cin4} coutp={w.coutp} "
            f"schedule={int(sched)} texel={int(texel_capable(w.weight.ctx))}")


def cached_tile(ctx: Context, key: str, coutp: int) -> Tile | None:
    """The tuning cache's tile for ``key``, if it can run here (else None, logged)."""
    def parse(record) -> Tile:
        tile = Tile(**record)
        if not all(isinstance(v, int) for v in dataclasses.astuple(tile)):
            raise TypeError(f"{tile}: expected whole numbers and booleans")
        return tile

    return cached_candidate(ctx, key, parse, lambda tile: tile_fits(ctx, tile, coutp))


class _TimedTile:
    """One tile run on the tuner's features (uploaded once): :meth:`once` times the dispatch between
    GPU timestamps; ``out`` is the first run's output."""

    def __init__(self, rb: Rulebook, features: np.ndarray, w: PackedWeights, act: Activation,
                 inverse: bool, tile: Tile):
        self.rb, self.w, self.act, self.inverse, self.tile = rb, w, act, inverse, tile
        ctx = w.weight.ctx
        self.rec = Recording(ctx)
        self.stamps = Timestamps(ctx, 2)
        try:
            self.x = self.rec.upload(features, "tuning input", texel=texel_capable(ctx))
            self.out = self._run(read=True)
        except BaseException:
            self.close()
            raise

    def _run(self, read: bool = False) -> np.ndarray | None:
        rec = self.rec
        self.stamps.reset(rec.cmd)
        self.stamps.mark(rec.cmd)
        y = record_conv(rec, self.rb, self.x, self.w, self.act, inverse=self.inverse, staged=read, tile=self.tile)
        try:
            self.stamps.mark(rec.cmd)
            if read:
                rec.download(y)
            rec.submit()
            n_out = self.rb.n_in if self.inverse else self.rb.n_out
            return y.read(np.float32, (n_out, 4 * self.w.cout4)).copy() if read else None
        finally:
            release(y)

    def once(self) -> float:
        self._run()
        return self.stamps.intervals()[0][1]

    def close(self) -> None:
        self.rec.close()
        self.stamps.close()


def tune_tile(rb: Rulebook, features: np.ndarray, w: PackedWeights, act: Activation, *, inverse: bool = False,
              budget: float | None = None) -> TuneResult[Tile]:
    """Time this layer's tiles (:func:`tile_candidates`) on its own features (``[n_in][4 * cin4]``
    float32, channels zero-padded) with :func:`vkconv.ops.tune.search`, store the winner in the
    tuning cache under the layer's signature and return the search's result.  Each candidate's
    output must match the heuristic tile's."""
    ctx = w.weight.ctx
    limit = budget_ms(budget)
    planes = rb.geom.kernel[0]
    baseline = choose_tile(ctx, w.coutp, planes)
    agreement = Agreement(str(baseline), 1e-4)
    cands = tile_candidates(ctx, w.coutp, planes)

    def measure(tile: Tile) -> _TimedTile:
        timed = _TimedTile(rb, features, w, act, inverse, tile)
        assert timed.out is not None
        try:
            agreement.check(timed.out, f"tile {tile}")
        except ValueError:
            timed.close()
            raise
        return timed

    def arrangement_stage(best: Tile) -> list[Tile]:
        return [t for t in cands if (t.rows == best.rows or t.subgroup) and t.parts == best.parts]

    def rows_stage(best: Tile) -> list[Tile]:
        return [t for t in cands if dataclasses.replace(t, rows=best.rows) == best]

    def parts_stage(best: Tile) -> list[Tile]:
        return [t for t in cands if dataclasses.replace(t, parts=best.parts) == best]

    result = search(baseline, [arrangement_stage, rows_stage, parts_stage], measure, limit)
    store_result(ctx, layer_signature(rb, w, inverse), result, dataclasses.asdict, limit)
    return result


def wants_schedule(w: PackedWeights, rb: Rulebook) -> bool:
    """Whether to sort a rulebook's rows by tap mask for this layer (about 10 ns per row on the
    host, once per rulebook).  Measured on lavapipe at 30 k voxels: it pays from 32 x 32 channels
    (a tenth of what it saves), and for strided rulebooks at any width (scattered rows group by
    their one tap); 16-channel SubM layers over surfaces lost a little (the sort scatters
    neighbouring rows, whose features share cache lines), so those keep the rows in order.  A
    rulebook once sorted stays sorted for every later layer."""
    return w.cin4 * w.cout4 >= 64 or not rb.geom.subm


@dataclass
class PackedWeights:
    """A layer's weights and bias on the device, in ``sparse_gemm``'s layout: per tap
    ``[4 * cin4][coutp]`` vec4 (zero-padded), then the bias row ``[coutp]``."""

    weight: Buffer
    cin: int
    cout: int
    coutp: int  # vec4s per packed row: a multiple of every channel block choose_tile() picks

    @property
    def cin4(self) -> int:
        return -(-self.cin // 4)

    @property
    def cout4(self) -> int:
        return -(-self.cout // 4)

    def close(self) -> None:
        self.weight.close()


def pack_weights(ctx: Context, weight: np.ndarray, bias: np.ndarray | None) -> PackedWeights:
    """Upload ``weight [C_out, kD, kH, kW, C_in]`` and ``bias [C_out]`` (validated by the caller)."""
    cout, cin = weight.shape[0], weight.shape[4]
    cout4 = -(-cout // 4)
    coutp = cout4 if cout4 <= 4 else -(-cout4 // 8) * 8
    kv = math.prod(weight.shape[1:4])
    cin_p = 4 * -(-cin // 4)
    packed = np.zeros((kv * cin_p + 1, 4 * coutp), np.float32)
    packed[:kv * cin_p].reshape(kv, cin_p, -1)[:, :cin, :cout] = weight.reshape(cout, kv, cin).transpose(1, 2, 0)
    if bias is not None:
        packed[-1, :cout] = bias
    buf = upload_constant(ctx, packed, "sparse conv weights", texel=texel_capable(ctx))
    return PackedWeights(buf, cin, cout, coutp)


def record_conv(rec: Recording, rb: Rulebook, x: Buffer, w: PackedWeights, act: Activation, *,
                inverse: bool = False, staged: bool = False, tile: Tile | None = None,
                use_cache: bool = True) -> Buffer:
    """Record one sparse convolution over ``rb`` on device features ``x``; returns the output
    features buffer (``[n_out][cout4]`` vec4, leased: the caller releases it).

    ``x`` and the returned buffer are texel-capable on devices with texel buffers (features go
    from one layer to the next).  ``inverse``: run the rulebook backwards (spconv's
    SparseInverseConv3d): outputs are the rulebook's input sites.  One dispatch per range of taps
    (``tile.parts``) computes every output row, the last adding bias and activation; a row
    without taps gets ``act(bias)``.  Rows are taken in the rulebook's tap-mask order (per
    range) when there are several ranges, when it has one, or when the layer is wide enough to
    want one (:func:`wants_schedule`); results do not depend on the order or the ranges.  ``tile``: the register
    tile, else the tuning cache's for this layer shape (unless ``use_cache`` is False, see
    :func:`tune_tile`), else :func:`choose_tile`'s.
    """
    ctx = rec.ctx
    n_in, n_out = (rb.n_out, rb.n_in) if inverse else (rb.n_in, rb.n_out)
    table, masks = rb.tables(inverse=inverse)
    if tile is None and use_cache:
        tile = cached_tile(ctx, layer_signature(rb, w, inverse), w.coutp)
    if tile is None:
        tile = choose_tile(ctx, w.coutp, rb.geom.kernel[0])
    assert tile_fits(ctx, tile, w.coutp) is None, tile_fits(ctx, tile, w.coutp)
    kv = rb.geom.kv
    ranges = tap_ranges(kv, min(tile.parts, kv))
    sort = len(ranges) > 1 or rb.has_schedule(inverse=inverse) or wants_schedule(w, rb)
    y = lease(ctx, 16 * n_out * w.cout4, "sparse conv output", staged=staged, texel=texel_capable(ctx))
    blocks = w.coutp // tile.cb
    texel = (x.texel and w.weight.texel and table.texel and texel_fits(ctx, x.size)
             and texel_fits(ctx, w.weight.size) and texel_fits(ctx, table.size, TEXEL1))
    for taps in ranges:
        sched, n_rows = rb.schedule(taps, inverse=inverse) if sort else (None, n_out)
        if n_rows == 0:  # no row has taps in this range (and it is not the last)
            continue
        tiles = -(-n_rows // tile.rows)
        rows = sched or table  # bound either way; read only with a schedule
        shader = "sparse_gemm_subgroup" if tile.subgroup else "sparse_gemm"
        if texel and rows.texel and texel_fits(ctx, rows.size, TEXEL1):
            shader, kinds = shader + "_texel", (TEXEL4, TEXEL4, TEXEL1, STORAGE, STORAGE, TEXEL1)
        else:
            kinds = None
        push = _GEMM_PUSH.pack(n_in, n_out, kv, rb.words, w.cin4, w.cout4, w.coutp, *taps, n_rows, act.a, act.b)
        rec.dispatch(shader, [x, w.weight, table, masks, y, rows], push,
                     tiles * (blocks if tile.share else 1), kinds=kinds,
                     spec=(act.kind, tile.rows, tile.cb, int(tile.share), int(sched is not None),
                           ctx.info.subgroup_size),
                     z=1 if tile.share else blocks)
        rec.barrier()  # the next range reads the partial sums this one stored
    return y


def gather_on_device(ctx: Context, src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``src[idx]`` for float32 rows ``src [M, C]`` and valid int32 ``idx [K]``."""
    k, c = len(idx), src.shape[1]
    with Recording(ctx) as rec:
        s = rec.upload(src, "gather source")
        i = rec.upload(idx, "gather indices")
        out = rec.scratch(4 * k * c, "gather output", staged=True)
        rec.dispatch("sparse_gather", [s, i, out], _GATHER_PUSH.pack(k, c, len(src)), k * c)
        rec.download(out)
        rec.submit()
        return out.read(np.float32, (k, c))


def scatter_add_on_device(ctx: Context, dst: np.ndarray, src: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``dst`` with ``src[r]`` added to row ``idx[r]`` for every r, in increasing r per row."""
    n_dst, c = dst.shape
    order = np.argsort(idx, kind="stable").astype(np.int32)
    start = np.zeros(n_dst + 1, np.int32)
    np.cumsum(np.bincount(idx, minlength=n_dst), out=start[1:])
    with Recording(ctx) as rec:
        bufs = [rec.upload(src, "scatter source"), rec.upload(order, "scatter order"),
                rec.upload(start, "scatter row starts"), rec.upload(dst, "scatter destination")]
        rec.dispatch("sparse_scatter_add", bufs, _GATHER_PUSH.pack(n_dst, c, len(src)), n_dst * c)
        rec.download(bufs[3])
        rec.submit()
        return bufs[3].read(np.float32, (n_dst, c))
