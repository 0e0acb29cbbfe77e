"""Sparse convolution compute on the device: gather -> GEMM -> scatter-add per kernel tap
(``shaders/sparse_gemm.comp``), and the standalone row gather / scatter-add primitives.

Device feature layout: rows of ``ceil(C / 4)`` vec4 (channels zero-padded to a multiple of 4), so
a chain of layers (the cv2.dnn encoder) passes features from one layer to the next on the device.
Weights are spconv 2.x's ``[C_out, kD, kH, kW, C_in]``, repacked per tap as
``[C_in (padded to 4)][C_out padded to 4 * CB]``.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from .activation import Activation
from .buffer import Buffer, upload_constant
from .context import Context
from .pipeline import STORAGE, TEXEL4, texel_fits
from .sparse_device import Recording, texel_capable
from .sparse_rulebook import Rulebook

# start, count, tap, cin4, cout4, coutp, n_in, n_out, act_a, act_b
_GEMM_PUSH = struct.Struct("<8i2f")
_GATHER_PUSH = struct.Struct("<3i")


def choose_tile(ctx: Context, cout4: int) -> tuple[int, int]:
    """(pairs, vec4s of output channels) per invocation of ``sparse_gemm``.

    lavapipe runs invocations 8 at a time in SIMD lanes and pays a lane-by-lane loop for every
    buffer access, so a big tile wins there, up to the point where LLVM spills it: measured at
    64 -> 64 channels, 8 x 4 ran 1.15x faster than 4 x 4 and 5x faster than 8 x 8 or 16 x 4
    (docs/SPARSE.md).  GPUs keep the register tile small for occupancy (not measured on one yet).
    """
    rows, widths = (8, (1, 2, 4)) if ctx.info.type == "cpu" else (4, (1, 2, 4))
    return rows, next((v for v in widths if v >= cout4), widths[-1])


@dataclass
class PackedWeights:
    """A layer's weights and bias on the device, in ``sparse_gemm``'s layout: per tap
    ``[4 * cin4][4 * coutp]`` floats (zero-padded), bias ``[4 * coutp]``."""

    weight: Buffer
    bias: Buffer
    has_bias: bool
    cin: int
    cout: int
    rows: int  # pairs per invocation
    cb: int    # vec4s of output channels per invocation

    @property
    def cin4(self) -> int:
        return -(-self.cin // 4)

    @property
    def cout4(self) -> int:
        return -(-self.cout // 4)

    @property
    def coutp(self) -> int:
        """vec4s per packed weight row: output channels padded to a whole number of blocks."""
        return -(-self.cout4 // self.cb) * self.cb

    def close(self) -> None:
        self.weight.close()
        self.bias.close()


def pack_weights(ctx: Context, weight: np.ndarray, bias: np.ndarray | None) -> PackedWeights:
    """Upload ``weight [C_out, kD, kH, kW, C_in]`` and ``bias [C_out]`` (validated by the caller)."""
    cout, cin = weight.shape[0], weight.shape[4]
    rows, cb = choose_tile(ctx, -(-cout // 4))
    cin_p = 4 * -(-cin // 4)
    cout_p = 4 * cb * -(-cout // (4 * cb))
    packed = np.zeros((math.prod(weight.shape[1:4]), cin_p, cout_p), np.float32)
    packed[:, :cin, :cout] = weight.reshape(cout, -1, cin).transpose(1, 2, 0)
    b = np.zeros(cout_p, np.float32)
    if bias is not None:
        b[:cout] = bias
    return PackedWeights(upload_constant(ctx, packed, "sparse conv weights", texel=texel_capable(ctx)),
                         upload_constant(ctx, b, "sparse conv bias"), bias is not None, cin, cout,
                         rows, cb)


def record_conv(rec: Recording, rb: Rulebook, x: Buffer, w: PackedWeights, act: Activation, *,
                inverse: bool = False, staged: bool = False) -> Buffer:
    """Record one sparse convolution over ``rb`` on device features ``x``; returns the output
    features buffer (``[n_out][cout4]`` vec4, owned by the caller).

    ``x`` and the returned buffer are texel-capable on devices with texel buffers (features go
    from one layer to the next).  ``inverse``: run the rulebook backwards (spconv's
    SparseInverseConv3d): outputs are the rulebook's input sites.  Taps run one after another with a
    barrier between them (each tap writes an output row at most once, so the read-modify-write
    needs no atomics and the float additions happen in a fixed order).  SubM's centre tap pairs
    every row with itself and covers every output row, so it runs last and applies bias and
    activation in the same pass; otherwise an epilogue pass does, when there is a bias or an
    activation.
    """
    geom = rb.geom
    n_in, n_out = (rb.n_out, rb.n_in) if inverse else (rb.n_in, rb.n_out)
    ctx = rec.ctx
    y = Buffer(ctx, 16 * n_out * w.cout4, staged=staged, texel=texel_capable(ctx),
               name="sparse conv output")
    texel = x.texel and w.weight.texel and texel_fits(ctx, x.size) and texel_fits(ctx, w.weight.size)
    shader, kinds = (("sparse_gemm_texel", (TEXEL4, TEXEL4) + (STORAGE,) * 3) if texel
                     else ("sparse_gemm", None))
    rec.fill(y, 0)
    rec.barrier()
    z = w.coutp // w.cb
    centre = geom.kv // 2 if geom.subm else -1

    def gemm(mode: int, pairs: int, start: int, count: int, tap: int, cin4: int, rows_in: int) -> None:
        push = _GEMM_PUSH.pack(start, count, tap, cin4, w.cout4, w.coutp, rows_in, n_out, act.a, act.b)
        pair_source = rb.pair_buf if pairs else y
        assert pair_source is not None  # a rulebook with pairs holds them on the device
        buffers = [x, w.weight, w.bias, pair_source, y]
        rec.dispatch(shader, buffers, push, -(-count // w.rows), kinds=kinds,
                     spec=(act.kind if mode else 0, mode, pairs, w.rows, w.cb), z=z)
        rec.barrier()

    for t, count in enumerate(rb.counts):
        if count and t != centre:
            gemm(0, 2 if inverse else 1, t * rb.per_tap, int(count), t, w.cin4, n_in)
    # Final pass over every output row: SubM's centre tap (row r -> row r), or, reading no input
    # channel, just bias + activation.
    if geom.subm or w.has_bias or act.kind:
        gemm(1, 0, 0, n_out, max(centre, 0), w.cin4 if geom.subm else 0, n_out)
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
