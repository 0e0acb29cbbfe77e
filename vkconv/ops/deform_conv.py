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

Execution, recorded once per input shape and submitted once per call: ``deform_conv_pack``
copies ``x`` into blocks of 4 channels of one offset group (vec4 per pixel) inside a one-pixel zero
border; then, per chunk of images (or of one image's pixels), ``deform_conv_sample`` writes the
masked bilinear samples ("columns": row ``tap * C_in/g + channel`` of its conv group's GEMM
operand) and the dense convolution's GEMM (``conv_rows`` through
:meth:`vkconv.ops.conv.kernels.RowsKernel.tiled_operand`) multiplies them by the weights reordered to
``[C_out][tap][C_in/g]``, adding the bias and the fused activation.  The columns are tile-major,
``[image][group][pixel tile][row][PB pixels]`` (PB: the GEMM's pixel tile), which made the sampling
stage's stores 2x faster on lavapipe than one long row per channel.  A sampling invocation reads
the offsets and mask of its 4 pixels once (as one vec4 each when the output size is a multiple of
4), computes the 4 points' corners and weights once, and reuses them for every channel block of
its offset group; the zero border lets it blend the 4 fetched corners without testing them.
Operands are read through texel buffers where the device's ``maxTexelBufferElements`` allows, else
(and with ``VKCONV_CONV_TEXEL=0``) through storage buffers.  Chunks keep the column buffer within
``maxStorageBufferRange``; a chunk that is not the whole batch, or whose pixels do not fill whole
GEMM tiles, is multiplied into a scratch output and copied into place.

Measured on lavapipe (2 shared cores, bench/deform.py; docs/PERFORMANCE.md has the table and the
analysis): the GEMM runs at the dense 1x1 GEMM's rate; the sampling stage costs about 1.8 ns of
one thread per sampled value, the column stores (a per-lane loop per store on Mesa 22.3) its
largest part, so its share of the device time falls with C_out: about 10 % at 256 output
channels, 17-20 % at 128, 28-38 % at 64 (the GEMM does only 2 * C_out FLOPs per sampled value).
Against the dense 3x3 convolution of the same size (implicit GEMM; bench/deform.py's efficiency,
the same on Mesa 22.3 and 25.0 within noise): 0.56-0.64 of its GFLOP/s at 64 channels, 0.69-0.79
at 128 and 256.  The GEMM alone takes about 1.15x the dense conv's time: the dense kernel reuses
each loaded input row for its 3 kernel columns, the columns have nothing to reuse (1.4x the
texel fetches per FMA); the rest is the sampling stage.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.tiling import tuning
from vkconv.ops.base import WeightedOp
from vkconv.ops.conv.kernels import RowsKernel
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, vk
from vkconv.runtime.dispatch import grid
from vkconv.runtime.errors import VkconvError
from vkconv.runtime.pipeline import STORAGE, TEXEL1, TEXEL4, DescriptorSet, get_pipeline, texel_fits
from vkconv.runtime.plan import Plan, closed_on_error

_PACK_PUSH = struct.Struct("<6i")
_SAMPLE_PUSH = struct.Struct("<24i")
_CHUNK_ALIGN = 32  # pixels: a multiple of every GEMM pixel tile (vkconv.kernels.tiling.ROWS_SPEED)
# Offset groups of at most this many 4-channel blocks get the sampling stage's block loop unrolled
# (specialization constants): 1.1x faster sampling at 4 blocks, no gain at 16, and 64 unrolled blocks
# took lavapipe 25 s to compile.
_UNROLL_BLOCKS = 4


@dataclass(frozen=True)
class Chunk:
    """Pixels whose columns are sampled and multiplied together: ``images`` whole images from
    ``n0`` (``q0 == 0``, ``pixels == oH * oW``), or pixels ``q0 .. q0 + pixels - 1`` of image ``n0``."""

    n0: int
    images: int
    q0: int
    pixels: int


class DeformConv(WeightedOp):
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
        super().__init__(w, ranks=4, strides=strides, pads=pads, dilations=dilations, group=group,
                         activation=activation, ctx=ctx)
        self.offset_group = shapes.positive_int("offset_group", offset_group)
        self.tune = tuning(self.ctx)
        self._gemm: RowsKernel | None = None
        self.set_weights(w, b)

    # -- weights -------------------------------------------------------------------------------
    def _prepare_weights(self, w: np.ndarray, b: np.ndarray | None) -> RowsKernel:
        cout, cin_g, kh, kw = w.shape
        if cout < 1 or cin_g < 1:
            raise ValueError(f"w: every dimension must be >= 1, got shape {w.shape}")
        cin = cin_g * self.group
        if cin % self.offset_group:
            raise ValueError(f"offset_group: {cin} input channels (w {w.shape} x group={self.group}) "
                             f"are not divisible by offset_group={self.offset_group}")
        # The GEMM's input channels are the column rows, tap-major: row = tap * C_in/g + channel.
        rows = np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(cout, kh * kw * cin_g, 1, 1, 1)
        return RowsKernel(self.ctx, rows, b, self.group, self.activation, self.tune, flat=True)

    def _adopt_weights(self, state: RowsKernel) -> None:
        self._gemm = state

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
            return self._plan(x.shape, mask is not None).run(arrays)[0]

    def plan(self, x_shape: Sequence[int], has_mask: bool) -> Plan:
        """The recorded plan for inputs x of ``x_shape``, offset and (with ``has_mask``) mask of the
        shapes :meth:`offset_shape` / :meth:`mask_shape` give; its inputs are in that order, and
        its ``body`` records the dispatches alone (device graphs replay it)."""
        x_shape = tuple(int(s) for s in x_shape)
        self.output_shape(x_shape)
        with self._lock:
            return self._plan(x_shape, has_mask)

    def _plan(self, x_shape: tuple[int, ...], has_mask: bool) -> Plan:
        self._open_gemm()
        return self._plans.get((x_shape, has_mask),
                               lambda: self._build_plan(x_shape, self.output_shape(x_shape), has_mask))

    def chunks(self, n: int, out_hw: int) -> list[Chunk]:
        """How ``n`` images of ``out_hw`` output pixels are split so that one chunk's columns
        (and, when chunked, its scratch output) fit the column budget: whole images while one
        image fits, else runs of whole GEMM tiles of one image."""
        gemm = self._open_gemm()
        limit = self.ctx.info.max_storage_buffer_range
        budget = min(limit, self.column_budget) if self.column_budget else limit

        def nbytes(images: int, pixels: int) -> int:
            geo, _, lay = gemm.tiled_operand(images, pixels)
            return max(lay.nbytes, 4 * math.prod(geo.y_shape))

        per_image = nbytes(1, out_hw)
        if per_image <= budget:
            step = min(n, budget // per_image)
            return [Chunk(n0, min(step, n - n0), 0, out_hw) for n0 in range(0, n, step)]
        step = budget // nbytes(1, _CHUNK_ALIGN) * _CHUNK_ALIGN
        if step == 0:
            kh, kw = self.weight_shape[2:]
            raise VkconvError(
                f"w: {gemm.cin_g // (kh * kw)} input channels per group x {kh}x{kw} taps need "
                f"{nbytes(1, _CHUNK_ALIGN)} bytes of columns per {_CHUNK_ALIGN} pixels, more than "
                f"the {budget} bytes a chunk may use (maxStorageBufferRange on {self.ctx.info.name})")
        return [Chunk(n0, 1, q0, min(step, out_hw - q0)) for n0 in range(n) for q0 in range(0, out_hw, step)]

    def _build_plan(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...], has_mask: bool) -> Plan:
        ctx, gemm, tune = self.ctx, self._open_gemm(), self.tune
        n, cin, in_h, in_w = x_shape
        _, cout, out_h, out_w = y_shape
        kh, kw = self.weight_shape[2:]
        taps, og = kh * kw, self.offset_group
        cin_og, out_hw = cin // og, out_h * out_w
        og_blocks = -(-cin_og // 4)  # packed blocks of 4 channels per offset group
        chunks = self.chunks(n, out_hw)
        first_geo, _, first = gemm.tiled_operand(chunks[0].images, chunks[0].pixels)
        # The GEMM writes [images][C_out][tiles * PB]: the output itself when that is all of it.
        whole = len(chunks) == 1 and first_geo.y_shape[2] * first_geo.y_shape[3] == out_hw
        limit = ctx.info.max_workgroup_count
        if og > limit[1] or n > limit[2]:
            raise VkconvError(f"x: {n} images and {og} offset groups exceed the device's "
                              f"maxComputeWorkGroupCount {limit}")

        inputs = [("deform_conv input x", x_shape), ("deform_conv offset", self.offset_shape(x_shape))]
        if has_mask:
            inputs.append(("deform_conv mask", self.mask_shape(x_shape)))
        plan = Plan(ctx, [], [("deform_conv output", y_shape)])
        with closed_on_error(plan):
            # Inputs that the shaders may read through texel-buffer views.
            for name, shape in inputs:
                plan.inputs.append(Buffer(ctx, 4 * math.prod(shape), staged=True, texel=True, name=name))
                plan.input_shapes.append(tuple(shape))
            x_buf, offset_buf = plan.inputs[:2]
            mask_buf = plan.inputs[2] if has_mask else offset_buf  # never read when has_mask == 0
            packed = Buffer(ctx, 16 * n * og * og_blocks * (in_h + 2) * (in_w + 2), texel=True,
                            name="deform_conv packed input")
            columns = Buffer(ctx, first.nbytes, texel=True, name="deform_conv columns")
            plan.keep += [packed, columns]
            scratch: Buffer | None = None
            if not whole:
                scratch = Buffer(ctx, 4 * math.prod(first_geo.y_shape),
                                 name="deform_conv chunk output")
                plan.keep.append(scratch)

            ls = tune.local_size
            texel_x = tune.texel and texel_fits(ctx, x_buf.size, TEXEL1)
            pack = get_pipeline(ctx, "deform_conv_pack" if texel_x else "deform_conv_pack_ssbo",
                                (TEXEL1 if texel_x else STORAGE, STORAGE), _PACK_PUSH.size, (ls, 1, 1))
            # Output sizes that are multiples of 4 read 4 pixels' offsets and mask as one vec4.
            quad = out_hw % 4 == 0
            per_pixel = TEXEL4 if quad else TEXEL1
            texel_s = (tune.texel and texel_fits(ctx, packed.size, TEXEL4)
                       and all(texel_fits(ctx, b.size, per_pixel) for b in (offset_buf, mask_buf)))
            kinds = (TEXEL4, per_pixel, per_pixel) if texel_s else (STORAGE,) * 3
            unroll = og_blocks <= _UNROLL_BLOCKS
            sample = get_pipeline(ctx, "deform_conv_sample" if texel_s else "deform_conv_sample_ssbo",
                                  (*kinds, STORAGE), _SAMPLE_PUSH.size,
                                  (ls, 1, 1, 0, og_blocks if unroll else 0, cin_og if unroll else 0, int(quad)))
            texel_g = tune.texel and texel_fits(ctx, columns.size) and texel_fits(ctx, gemm.weights.size)
            pack_set = DescriptorSet(pack, [x_buf, packed])
            sample_set = DescriptorSet(sample, [packed, offset_buf, mask_buf, columns])
            plan.keep += [pack_set, sample_set]

            pack_push = _PACK_PUSH.pack(cin, in_h, in_w, og, cin_og, og_blocks)
            pack_groups = (min(-(-((in_h + 2) * (in_w + 2)) // ls), limit[0]), og, n)
            steps = []
            for c in chunks:
                geo, pb, lay = gemm.tiled_operand(c.images, c.pixels)
                tiles = geo.out[1]
                # The sampling grid: (pixel quads rounded to workgroups) x offset groups x taps.
                quad_groups = -(-(c.images * tiles * pb // 4) // ls)
                groups = grid(ctx, quad_groups * og * taps * ls, ls, 1, "x (deform_conv columns)")
                push = _SAMPLE_PUSH.pack(in_h, in_w, out_w, out_hw, kw, taps, *self.strides, *self.pads[:2],
                                         *self.dilations, og, cin_og, og_blocks, gemm.cin_g // taps,
                                         self.group, c.n0, c.q0, c.images, c.pixels, tiles, pb // 4,
                                         int(has_mask))
                multiply = gemm.rows_dispatch(plan, geo, pb, lay, columns,
                                              plan.outputs[0] if scratch is None else scratch, texel_g)
                place = None if scratch is None else self._placement(scratch, plan.outputs[0], c, cout,
                                                                     out_hw, tiles * pb)
                steps.append((groups, push, multiply, place))

        def body(cmd: CommandBuffer) -> None:
            self._stage(cmd, "begin")
            cmd.dispatch(pack, pack_set, pack_push, pack_groups)
            cmd.barrier()
            self._stage(cmd, "pack")
            for groups, push, multiply, place in steps:
                cmd.dispatch(sample, sample_set, push, groups)
                cmd.barrier()
                self._stage(cmd, "sample")
                multiply(cmd)
                cmd.barrier()
                if place is not None:
                    place(cmd)
                    cmd.barrier()
                self._stage(cmd, "gemm")

        with closed_on_error(plan):
            plan.record(body)
        return plan

    @staticmethod
    def _placement(scratch: Buffer, output: Buffer, c: Chunk, cout: int, out_hw: int,
                   padded: int) -> Callable[[CommandBuffer], None]:
        """The recorder of the copy of a chunk's scratch output ``[images][C_out][padded]``
        (``padded`` >= ``c.pixels``: whole GEMM tiles) into the output."""
        if padded == c.pixels == out_hw:  # whole images: one contiguous run
            regions = [vk.VkBufferCopy(srcOffset=0, dstOffset=4 * c.n0 * cout * out_hw,
                                       size=4 * c.images * cout * out_hw)]
        else:
            regions = [vk.VkBufferCopy(srcOffset=4 * (i * cout + k) * padded,
                                       dstOffset=4 * (((c.n0 + i) * cout + k) * out_hw + c.q0), size=4 * c.pixels)
                       for i in range(c.images) for k in range(cout)]
        return lambda cmd: vk.vkCmdCopyBuffer(cmd.handle, scratch.buffer, output.buffer, len(regions), regions)

    def _open_gemm(self) -> RowsKernel:
        if self._gemm is None:
            raise VkconvError("this DeformConv was closed")
        return self._gemm

    def _stage(self, cmd, name: str) -> None:
        """Recording hook, called at "begin" and after each stage's barrier ("pack", then "sample"
        and "gemm" per chunk); cv_plugin.bench.deform.TimedDeformConv overrides it to write GPU timestamps."""

    # -- lifetime ------------------------------------------------------------------------------
    def _release(self) -> None:
        self._plans.clear()
        if self._gemm is not None:
            self._gemm.close()
        self._gemm = None


def deform_conv(x: np.ndarray, w: np.ndarray, offset: np.ndarray, b: np.ndarray | None = None,
                mask: np.ndarray | None = None, *, strides=1, pads=0, dilations=1, group: int = 1,
                offset_group: int = 1) -> np.ndarray:
    """ONNX ``DeformConv`` (opset 19/22) on the Vulkan device; inputs in ONNX order X, W, offset, B, mask.

    ``x`` ``[N, C_in, H, W]``, ``w`` ``[C_out, C_in/group, kH, kW]``, ``offset``
    ``[N, offset_group*2*kH*kW, oH, oW]`` ((dy, dx) per offset group and tap), ``b`` ``[C_out]``,
    ``mask`` ``[N, offset_group*kH*kW, oH, oW]`` (DCNv2; None = DCNv1).  ``strides``/``dilations``:
    an int or 2 ints; ``pads``: an int, 2 ints or ONNX ``(top, left, bottom, right)``.
    Returns ``[N, C_out, oH, oW]`` float32; see :mod:`vkconv.ops.deform_conv` for the sampling rule
    and NaN handling.  Raises ValueError naming the bad argument.
    """
    with DeformConv(w, b, strides=strides, pads=pads, dilations=dilations, group=group,
                    offset_group=offset_group) as op:
        return op(x, offset, mask)
