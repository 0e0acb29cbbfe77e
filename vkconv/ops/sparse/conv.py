"""Sparse convolution compute on the device: one output-stationary dispatch per convolution
(``shaders/sparse/sparse_gemm.comp``) over an output-stationary rulebook, and the standalone row gather /
scatter-add primitives.

Device feature layout: rows of ``ceil(C / 4)`` vec4 (channels zero-padded to a multiple of 4), so
a chain of layers (the cv2.dnn encoder) passes features from one layer to the next on the device.
Weights are spconv 2.x's ``[C_out, kD, kH, kW, C_in]``, repacked per tap as
``[C_in (padded to 4)][C_out padded to 4 * coutp]``, with the bias as one more row.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from vkconv.kernels.activation import Activation
from vkconv.ops.sparse.device import Recording, lease, texel_capable
from vkconv.ops.sparse.rulebook import Rulebook
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.context import Context
from vkconv.runtime.pipeline import STORAGE, TEXEL1, TEXEL4, texel_fits
from vkconv.runtime.transfer import upload_constant

# n_in, n_out, kv, words, cin4, cout4, coutp, act_a, act_b
_GEMM_PUSH = struct.Struct("<7i2f")
_GATHER_PUSH = struct.Struct("<3i")


@dataclass(frozen=True)
class Tile:
    """What one ``sparse_gemm`` invocation computes: ``rows`` output rows x ``cb`` vec4s of output
    channels; ``share``: neighbouring invocations take the other channel blocks of the same rows."""

    rows: int
    cb: int
    share: bool
    subgroup: bool = False  # the lanes of a subgroup share rows, read once and shuffled (sparse_gemm.comp)


def choose_tile(ctx: Context, coutp: int, *, scheduled: bool) -> Tile:
    """The tile for output rows of ``coutp`` vec4s (:class:`PackedWeights`); ``scheduled``: the
    rows come sorted by tap mask (:func:`wants_schedule`).

    An invocation walks the union of its rows' taps, so more rows per tile reuse each weight load
    more often but multiply zeros for the rows that lack a tap.  Measured on lavapipe (8 SIMD
    lanes, every texel fetch a gather, a shuffle by a constant lane a register permute) at 30 k
    voxels (docs/PERFORMANCE.md): up to 16 channels one invocation takes every channel of 8 rows
    (16 once sorted); wider layers give the same 8 rows to the lanes of a subgroup, one block of
    ``coutp / subgroup size`` vec4s each, each lane reading one row's features and shuffling it
    to the others (1.2-1.4x faster at 64 channels than each lane reading all 8 rows itself, as
    devices without subgroup shuffles still do, 2 vec4s of channels each).  GPUs run 32 or more
    lanes and keep the register tile small (not measured on one yet): a 4-row tile shared by the
    lanes, 1 vec4 each.
    """
    if ctx.info.type != "cpu":
        return Tile(4, 1, True)
    if coutp <= 4:
        return Tile(16 if scheduled else 8, coutp, False)
    sg = ctx.info.subgroup_size
    if ctx.info.subgroup_shuffle and sg in (1, 2, 4, 8, 16) and coutp % sg == 0 and coutp // sg <= 4:
        return Tile(max(8, sg), coutp // sg, True, subgroup=True)
    return Tile(8, 2, True)


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
                inverse: bool = False, staged: bool = False) -> Buffer:
    """Record one sparse convolution over ``rb`` on device features ``x``; returns the output
    features buffer (``[n_out][cout4]`` vec4, leased: the caller releases it).

    ``x`` and the returned buffer are texel-capable on devices with texel buffers (features go
    from one layer to the next).  ``inverse``: run the rulebook backwards (spconv's
    SparseInverseConv3d): outputs are the rulebook's input sites.  One dispatch computes every
    output row, bias and activation included; a row without taps gets ``act(bias)``.  Rows are
    taken in the rulebook's tap-mask order when it has one or the layer is wide enough to want
    one (:func:`wants_schedule`); results do not depend on the order.
    """
    ctx = rec.ctx
    n_in, n_out = (rb.n_out, rb.n_in) if inverse else (rb.n_in, rb.n_out)
    table, masks = rb.tables(inverse=inverse)
    sched = (rb.schedule(inverse=inverse) if rb.has_schedule(inverse=inverse) or wants_schedule(w, rb)
             else None)
    tile = choose_tile(ctx, w.coutp, scheduled=sched is not None)
    assert w.coutp % tile.cb == 0, "pack_weights pads to a multiple of every block choose_tile picks"
    y = lease(ctx, 16 * n_out * w.cout4, "sparse conv output", staged=staged, texel=texel_capable(ctx))
    rows = sched or table  # bound either way; read only with a schedule
    texel = (x.texel and w.weight.texel and table.texel and rows.texel and texel_fits(ctx, x.size)
             and texel_fits(ctx, w.weight.size) and texel_fits(ctx, table.size, TEXEL1)
             and texel_fits(ctx, rows.size, TEXEL1))
    shader = "sparse_gemm_subgroup" if tile.subgroup else "sparse_gemm"
    shader, kinds = ((shader + "_texel", (TEXEL4, TEXEL4, TEXEL1, STORAGE, STORAGE, TEXEL1)) if texel
                     else (shader, None))
    push = _GEMM_PUSH.pack(n_in, n_out, rb.geom.kv, rb.words, w.cin4, w.cout4, w.coutp, act.a, act.b)
    tiles, blocks = -(-n_out // tile.rows), w.coutp // tile.cb
    rec.dispatch(shader, [x, w.weight, table, masks, y, rows], push,
                 tiles * (blocks if tile.share else 1), kinds=kinds,
                 spec=(act.kind, tile.rows, tile.cb, int(tile.share), int(sched is not None),
                       ctx.info.subgroup_size),
                 z=1 if tile.share else blocks)
    rec.barrier()
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
