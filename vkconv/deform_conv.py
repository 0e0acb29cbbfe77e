"""Deformable convolution (ONNX ``DeformConv``, torchvision ``deform_conv2d``, DCNv1 / DCNv2).

Layouts (all float32, 2-D only):

* ``x``: ``[N, C_in, H, W]``; ``w``: ``[C_out, C_in / group, kH, kW]``; ``b``: ``[C_out]``.
* ``offset``: ``[N, offset_group * 2 * kH * kW, oH, oW]``: for offset group ``og`` and kernel tap
  ``(i, j)`` (``t = i * kW + j``) channel ``(og * kH * kW + t) * 2`` holds ``dy`` and the next one
  ``dx`` (the torchvision / mmcv layout that ONNX adopted).
* ``mask`` (DCNv2, optional): ``[N, offset_group * kH * kW, oH, oW]``, channel ``og * kH * kW + t``.
* output ``[N, C_out, oH, oW]`` with ``oH = (H + pad_top + pad_bottom - dil_h * (kH - 1) - 1)
  // stride_h + 1`` (same for W), as for ``Conv``.

Semantics: tap ``(i, j)`` of output pixel ``(oy, ox)`` samples input channel ``c`` at
``y = oy * stride_h - pad_top + i * dil_h + dy`` and ``x = ox * stride_w - pad_left + j * dil_w + dx``
with the offsets of ``c``'s offset group (``c // (C_in / offset_group)``), bilinearly, using
torchvision's boundary rule: a point with ``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W`` samples
0; otherwise each of the four neighbouring pixels that lies outside the image contributes 0.  The
sample is multiplied by the mask value of its offset group and tap, then by the weight, and summed
as in a grouped ``Conv``; conv groups and offset groups are independent.

Non-finite offsets: a NaN ``dy`` or ``dx`` makes that sample NaN, so NaN reaches every output
channel that reads it: a broken offset predictor shows up instead of passing for plausible numbers
(torchvision's CPU kernel also yields NaN there, ONNX Runtime samples 0, onnx.reference raises).
``+-Inf`` moves the point out of the image, so it samples 0.  NaN or Inf in ``x`` or ``mask``
propagate by IEEE arithmetic; the mask multiplies the finished sample.

Execution (``shaders/deform_conv_*.comp``), recorded once per input shape and submitted once per
call: ``pack`` copies ``x`` into blocks of 4 channels that share a conv group and an offset group;
then, per chunk of pixel tiles, ``sample`` writes the masked bilinear samples ("columns") and
``gemm`` multiplies them by the packed weights, adding the bias and the fused activation.  Chunks
keep the column buffer within the device's ``maxStorageBufferRange``.
"""
from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import shapes
from .activation import Activation
from .buffer import Buffer, upload_constant
from .context import Context, get_context
from .errors import VkconvError
from .pipeline import DescriptorSet
from .plan import Plan, PlanCache

_PACK_PUSH = struct.Struct("<5i")
_SAMPLE_PUSH = struct.Struct("<20i")
_GEMM_PUSH = struct.Struct("<9i2f")
_VEC4 = 16  # bytes


@dataclass(frozen=True)
class _Tiling:
    """Workgroup shapes; lavapipe (CPU) wants big register tiles, GPUs smaller ones."""

    sample_local: int
    gemm_local: int
    pixels: int      # pixels per GEMM invocation (PX)
    max_oc_tile: int

    @property
    def tile_px(self) -> int:
        return self.gemm_local * self.pixels


def _tiling(ctx: Context) -> _Tiling:
    info = ctx.info
    cap = min(info.max_workgroup_invocations, info.max_workgroup_size[0], 128)
    if info.type == "cpu":
        # Measured on lavapipe (64 and 256 channels, 3x3): one 8-wide SIMD group per workgroup
        # keeps each group's loads and stores contiguous, and 16 channels x 16 pixels per GEMM
        # invocation gave the most FMAs per loaded float (about 13 GFLOP/s per core).
        return _Tiling(min(8, cap), min(8, cap), 16, 16)
    return _Tiling(min(64, cap), min(64, cap), 4, 8)


@dataclass(frozen=True)
class BlockLayout:
    """Input channels grouped in blocks of at most 4 that share one conv group and offset group.

    Each conv group has ``group_blocks`` blocks; groups with fewer real blocks get empty ones
    (``length`` 0: zero input, zero weights).  Block ``b`` holds input channels ``source[b] ..
    source[b] + length[b] - 1``.  Blocks are numbered group-major and their offset groups never
    decrease, so offset group ``og`` samples exactly blocks ``og_start[og] .. og_start[og+1] - 1``.
    An empty block belongs to the offset group of its group's last real block: if that offset
    group's point is NaN, the group's outputs there are NaN anyway.
    """

    group_blocks: int
    source: np.ndarray    # [group * group_blocks] int32
    length: np.ndarray    # [group * group_blocks] int32
    og_start: np.ndarray  # [offset_group + 1] int32

    @classmethod
    def build(cls, cin: int, group: int, offset_group: int) -> "BlockLayout":
        cin_g, cin_og = cin // group, cin // offset_group
        per_group = []
        for g in range(group):
            blocks, c, end = [], g * cin_g, (g + 1) * cin_g
            while c < end:
                og = c // cin_og
                seg_end = min(end, (og + 1) * cin_og)
                blocks += [(s, min(4, seg_end - s), og) for s in range(c, seg_end, 4)]
                c = seg_end
            per_group.append(blocks)
        nb = max(len(b) for b in per_group)
        rows = [blocks + [(blocks[-1][0], 0, blocks[-1][2])] * (nb - len(blocks)) for blocks in per_group]
        source, length, owner = (np.array([[blk[i] for blk in r] for r in rows], np.int64).reshape(-1)
                                 for i in range(3))
        counts = np.bincount(owner, minlength=offset_group)
        og_start = np.concatenate([[0], np.cumsum(counts)])
        return cls(nb, source.astype(np.int32), length.astype(np.int32), og_start.astype(np.int32))

    def tables(self) -> tuple[np.ndarray, dict[str, int]]:
        """One int32 array holding every table (og_start first), and each table's offset in it."""
        parts = {"og_start": self.og_start, "source": self.source, "length": self.length}
        offsets, pos = {}, 0
        for name, arr in parts.items():
            offsets[name] = pos
            pos += arr.size
        return np.concatenate(list(parts.values())).astype(np.int32), offsets


def pack_weights(w: np.ndarray, group: int, layout: BlockLayout, oc_tile: int) -> np.ndarray:
    """``[C_out, C_in/g, kH, kW]`` -> ``[g, oc_tiles, group_blocks * kH * kW, oc_tile, 4]``.

    Row ``block * taps + tap`` holds, for each output channel of the tile, the weights of the
    block's (up to) 4 input channels at that tap; missing channels and output channels are 0.
    """
    cout, cin_g, kh, kw = w.shape
    cout_g, taps, nb = cout // group, kh * kw, layout.group_blocks
    local = (layout.source.reshape(group, nb) - np.arange(group)[:, None] * cin_g)[..., None] \
        + np.arange(4)                                                  # [g, nb, 4]
    valid = np.arange(4) < layout.length.reshape(group, nb)[..., None]
    wt = w.reshape(group, cout_g, cin_g, taps).transpose(0, 2, 1, 3)    # [g, cin_g, cout_g, taps]
    picked = wt[np.arange(group)[:, None, None], np.where(valid, local, 0)]  # [g, nb, 4, cout_g, taps]
    picked = np.where(valid[..., None, None], picked, 0.0)
    oc_tiles = -(-cout_g // oc_tile)
    out = np.zeros((group, oc_tiles * oc_tile, nb, taps, 4), np.float32)
    out[:, :cout_g] = picked.transpose(0, 3, 1, 4, 2)
    out = out.reshape(group, oc_tiles, oc_tile, nb * taps, 4).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(out)


def _oc_tile(cout_g: int, limit: int) -> int:
    """Smallest of 4, 8, 16 (up to ``limit``) holding a group's output channels."""
    for t in (4, 8, 16):
        if cout_g <= t or t >= limit:
            return t
    return 16


class DeformConv:
    """A 2-D deformable convolution whose weights stay on the device (see the module docstring).

    Call it as ``op(x, offset, mask=None)``.  The first call at a new (input shape, mask or not)
    records a command buffer; later calls at that shape reuse it (one submit each).
    """

    #: Upper bound, in bytes, on the column buffer of one chunk; None means the device's
    #: maxStorageBufferRange.  Lowering it only makes more, smaller chunks (tests use that).
    column_budget: int | None = None

    def __init__(self, w: np.ndarray, b: np.ndarray | None = None, *, strides=1, pads=0,
                 dilations=1, group: int = 1, offset_group: int = 1, activation=None,
                 ctx: Context | None = None):
        w = shapes.as_float32("w", w, 4)
        for name, value in (("group", group), ("offset_group", offset_group)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.group, self.offset_group = int(group), int(offset_group)
        self.strides = shapes.spatial("strides", strides, 2, minimum=1)
        self.dilations = shapes.spatial("dilations", dilations, 2, minimum=1)
        self.pads = shapes.pads(pads, 2)
        self.activation = Activation.parse(activation)
        self.ctx = ctx or get_context()
        self.tiling = _tiling(self.ctx)
        self._plans = PlanCache()
        self._lock = threading.Lock()
        self._resident: list[Buffer] = []
        self.weight_shape: tuple[int, ...] | None = None
        self.set_weights(w, b)

    # -- weights -------------------------------------------------------------------------------
    def set_weights(self, w: np.ndarray, b: np.ndarray | None = None) -> None:
        """Replace the weights (and bias) by arrays of the same layout; plans are rebuilt."""
        w = shapes.as_float32("w", w, 4)
        if self.weight_shape is not None and w.shape != self.weight_shape:
            raise ValueError(f"w: shape {w.shape} differs from this DeformConv's {self.weight_shape}")
        cout, cin_g, kh, kw = w.shape
        if min(w.shape) < 1:
            raise ValueError(f"w: every dimension must be >= 1, got shape {w.shape}")
        if cout % self.group:
            raise ValueError(f"w: {cout} output channels are not divisible by group={self.group}")
        cin = cin_g * self.group
        if cin % self.offset_group:
            raise ValueError(f"offset_group: {cin} input channels (w {w.shape} x group={self.group}) "
                             f"are not divisible by offset_group={self.offset_group}")
        if b is not None:
            b = shapes.as_float32("b", b, 1)
            if b.shape[0] != cout:
                raise ValueError(f"b: expected {cout} values (one per output channel), got {b.shape[0]}")
        layout = BlockLayout.build(cin, self.group, self.offset_group)
        cout_g = cout // self.group
        oc_tile = _oc_tile(cout_g, self.tiling.max_oc_tile)
        oc_tiles = -(-cout_g // oc_tile)
        bias = np.zeros((self.group, oc_tiles * oc_tile), np.float32)
        if b is not None:
            bias[:, :cout_g] = b.reshape(self.group, cout_g)
        tables, table_offsets = layout.tables()
        with self._lock:
            self._release()
            self._table_offsets = table_offsets
            self.weight_shape = w.shape
            self.layout, self.oc_tile, self.oc_tiles = layout, oc_tile, oc_tiles
            self._resident = [
                upload_constant(self.ctx, pack_weights(w, self.group, layout, oc_tile), "deform_conv weights"),
                upload_constant(self.ctx, bias, "deform_conv bias"),
                upload_constant(self.ctx, tables, "deform_conv tables"),
            ]

    # -- shapes --------------------------------------------------------------------------------
    def output_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]:
        """Output shape for an input of ``x_shape``; ValueError if the input does not fit."""
        if len(x_shape) != 4:
            raise ValueError(f"x: expected rank 4 (N, C, H, W), got shape {tuple(x_shape)}")
        out, _ = shapes.conv_output_shape(x_shape, self.weight_shape, self.strides, self.pads,
                                          self.dilations, self.group)
        return out

    def offset_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]:
        """The ``offset`` shape an input of ``x_shape`` needs."""
        n, _, oh, ow = self.output_shape(x_shape)
        taps = self.weight_shape[2] * self.weight_shape[3]
        return (n, self.offset_group * 2 * taps, oh, ow)

    def mask_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]:
        """The ``mask`` shape an input of ``x_shape`` needs."""
        n, c2, oh, ow = self.offset_shape(x_shape)
        return (n, c2 // 2, oh, ow)

    def _check(self, name: str, arr: np.ndarray, want: tuple[int, ...]) -> None:
        if arr.shape[1] != want[1]:
            kh, kw = self.weight_shape[2:]
            per = "2 * kH * kW" if name == "offset" else "kH * kW"
            raise ValueError(f"{name}: {arr.shape[1]} channels, expected offset_group * {per} = {want[1]} "
                             f"(offset_group={self.offset_group}, kernel {kh}x{kw})")
        if arr.shape != want:
            raise ValueError(f"{name}: shape {arr.shape} does not match [N, C, oH, oW] = {want} "
                             f"for x of this shape")

    # -- execution -----------------------------------------------------------------------------
    def __call__(self, x: np.ndarray, offset: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        x = shapes.as_float32("x", x, 4)
        offset = shapes.as_float32("offset", offset, 4)
        y_shape = self.output_shape(x.shape)
        self._check("offset", offset, self.offset_shape(x.shape))
        if mask is not None:
            mask = shapes.as_float32("mask", mask, 4)
            self._check("mask", mask, self.mask_shape(x.shape))
        if x.size == 0 or 0 in y_shape:
            return np.zeros(y_shape, np.float32)
        arrays = [x, offset] if mask is None else [x, offset, mask]
        with self._lock:
            if self.weight_shape is None or not self._resident:
                raise VkconvError("this DeformConv was closed")
            plan = self._plans.get((x.shape, mask is not None),
                                   lambda: self._build_plan(x.shape, y_shape, mask is not None))
            return plan.run(arrays)[0]

    def _chunk_tiles(self, tiles: int, rows: int) -> int:
        """Pixel tiles per chunk so that one chunk's columns fit the budget and dispatch limits."""
        info = self.ctx.info
        limit = info.max_storage_buffer_range
        budget = min(limit, self.column_budget) if self.column_budget else limit
        per_tile = self.group * rows * self.tiling.tile_px * _VEC4
        if per_tile > limit:
            raise VkconvError(
                f"w: {self.weight_shape[1]} input channels per group x {self.weight_shape[2]}x"
                f"{self.weight_shape[3]} taps need {per_tile} bytes of columns per pixel tile, more "
                f"than this device's maxStorageBufferRange ({limit} bytes on {info.name})")
        by_groups = info.max_workgroup_count[0] * self.tiling.sample_local // self.tiling.tile_px
        return max(1, min(tiles, budget // per_tile, info.max_workgroup_count[0], by_groups))

    def _build_plan(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...], has_mask: bool) -> Plan:
        ctx, t, layout = self.ctx, self.tiling, self.layout
        n, cin, in_h, in_w = x_shape
        _, cout, out_h, out_w = y_shape
        kh, kw = self.weight_shape[2:]
        taps, nb = kh * kw, layout.group_blocks
        blocks, rows = self.group * nb, nb * taps
        total = n * out_h * out_w
        tiles = -(-total // t.tile_px)
        chunk = self._chunk_tiles(tiles, rows)
        inputs = [("deform_conv input x", x_shape), ("deform_conv offset", self.offset_shape(x_shape))]
        if has_mask:
            inputs.append(("deform_conv mask", self.mask_shape(x_shape)))
        plan = Plan(ctx, inputs, [("deform_conv output", y_shape)])
        weights, bias, tables = self._resident
        packed = Buffer(ctx, n * blocks * in_h * in_w * _VEC4, name="deform_conv packed input")
        columns = Buffer(ctx, self.group * chunk * rows * t.tile_px * _VEC4, name="deform_conv columns")
        plan.keep += [packed, columns]

        pack = ctx.pipeline("deform_conv_pack", 3, _PACK_PUSH.size, (t.sample_local, 1, 1))
        sample = ctx.pipeline("deform_conv_sample", 5, _SAMPLE_PUSH.size, (t.sample_local, 1, 1))
        gemm = ctx.pipeline("deform_conv_gemm", 4, _GEMM_PUSH.size,
                            (t.gemm_local, 1, 1, self.activation.kind, self.oc_tile, t.pixels))
        mask_buf = plan.inputs[2] if has_mask else tables  # never read when has_mask == 0
        sets = [DescriptorSet(pack, [plan.inputs[0], tables, packed]),
                DescriptorSet(sample, [packed, plan.inputs[1], mask_buf, tables, columns]),
                DescriptorSet(gemm, [columns, weights, bias, plan.outputs[0]])]
        plan.keep += sets
        off = self._table_offsets
        pack_push = _PACK_PUSH.pack(cin, in_h * in_w, blocks, off["source"], off["length"])
        pack_groups = min(-(-(in_h * in_w) // t.sample_local), ctx.info.max_workgroup_count[0])
        sh, sw = self.strides
        dh, dw = self.dilations
        act = self.activation

        def body(cmd):
            self._stage(cmd, "begin")
            cmd.dispatch(pack, sets[0], pack_push, (pack_groups, blocks, n))
            cmd.barrier()
            self._stage(cmd, "pack")
            for tile0 in range(0, tiles, chunk):
                count = min(chunk, tiles - tile0)
                pixels = min(count * t.tile_px, total - tile0 * t.tile_px)
                push = _SAMPLE_PUSH.pack(in_h, in_w, out_h, out_w, kw, taps, sh, sw,
                                         self.pads[0], self.pads[1], dh, dw, self.offset_group,
                                         blocks, nb, tile0 * t.tile_px, pixels, t.tile_px, count,
                                         int(has_mask))
                cmd.dispatch(sample, sets[1], push,
                             (-(-pixels // t.sample_local), taps, self.offset_group))
                cmd.barrier()
                self._stage(cmd, "sample")
                push = _GEMM_PUSH.pack(rows, t.tile_px, count, tile0, total, out_h * out_w,
                                       cout // self.group, self.group, self.oc_tiles, act.a, act.b)
                cmd.dispatch(gemm, sets[2], push, (count, self.oc_tiles, self.group))
                cmd.barrier()
                self._stage(cmd, "gemm")

        plan.record(body)
        return plan

    def _stage(self, cmd, name: str) -> None:
        """Recording hook, called at "begin" and after each stage's barrier ("pack", then "sample"
        and "gemm" per chunk); bench/deform.py overrides it to write GPU timestamps."""

    # -- lifetime ------------------------------------------------------------------------------
    def _release(self) -> None:
        self._plans.clear()
        for buf in self._resident:
            buf.close()
        self._resident = []

    def close(self) -> None:
        """Free the device buffers and recorded plans (the shared pipelines stay cached)."""
        with self._lock:
            self._release()

    def __enter__(self) -> "DeformConv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def deform_conv(x: np.ndarray, w: np.ndarray, offset: np.ndarray, b: np.ndarray | None = None,
                mask: np.ndarray | None = None, *, strides=1, pads=0, dilations=1, group: int = 1,
                offset_group: int = 1) -> np.ndarray:
    """ONNX ``DeformConv`` (opset 19/22) on the Vulkan device; inputs in ONNX order X, W, offset, B, mask.

    ``x`` ``[N, C_in, H, W]``, ``w`` ``[C_out, C_in/group, kH, kW]``, ``offset``
    ``[N, offset_group*2*kH*kW, oH, oW]`` ((dy, dx) per offset group and tap), ``b`` ``[C_out]``,
    ``mask`` ``[N, offset_group*kH*kW, oH, oW]`` (DCNv2; None = DCNv1).  ``strides``/``dilations``:
    an int or 2 ints; ``pads``: an int, 2 ints or ONNX ``(top, left, bottom, right)``.
    Returns ``[N, C_out, oH, oW]`` float32; see :mod:`vkconv.deform_conv` for the sampling rule
    and NaN handling.  Raises ValueError naming the bad argument.
    """
    with DeformConv(w, b, strides=strides, pads=pads, dilations=dilations, group=group,
                    offset_group=offset_group) as op:
        return op(x, offset, mask)
