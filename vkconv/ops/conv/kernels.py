"""Convolution kernels and their selection by shape: host side of ``shaders/conv/conv_*.comp``.

Every kernel computes ONNX ``Conv`` on NC[D][H]W float32 data lifted to 3-D (a 1-D convolution has
unit depth and height, a 2-D one unit depth) and fuses bias and activation:

``direct`` (conv_direct.comp)
    4 output channels x 4 pixels per invocation, reading the input in place with bounds checks.
    Slow, but needs no scratch memory: the fallback when a padded copy would not fit.
``implicit_gemm`` (conv_pack.comp + conv_rows.comp)
    the input is first copied zero-padded with 4-aligned rows; then each invocation computes an
    MB output channels x PB pixels register tile from aligned vec4 row segments.  Its store can be
    strided (:class:`OutputMap`): the stride phases of a transposed convolution write in place; or
    a ConvLSTM2D time step (:meth:`RowsKernel.gate_steps`, the conv_rows_lstm variant): gates
    activated, cell state updated and h_t written in the store.
``gemm1x1`` (conv_rows.comp)
    1x1, stride 1, no padding: the same kernel over the whole image seen as one row, a plain GEMM
    (no padded copy when the image size is a multiple of 4).
``depthwise`` (conv_pack.comp + conv_depthwise.comp)
    group == input channels, any channel multiplier.
``winograd`` (conv_winograd.comp)
    F(4x4, 3x3) for 3x3 stride-1 undilated 2-D convolutions: input transform, 36 batched GEMMs,
    output transform.
``winograd63`` (conv_winograd.comp, TILE_M = 6)
    F(6x6, 3x3), the same passes over 8x8 input tiles: 64 GEMMs, 21 % fewer multiplications than
    F(4x4, 3x3), with about 5x its float32 rounding error (see :class:`Winograd63Kernel`).
``tiled`` (conv_tiled.comp)
    GPU-style implicit GEMM: a TM output channels x TN pixels tile per workgroup, K walked in
    strips through shared memory, an RM x RN register tile per invocation, the input read in place.
    Chosen instead of ``implicit_gemm`` on non-CPU devices.

The ``conv_rows`` kernels take ``Tuning.unroll`` input rows a step (:func:`rows_unroll`: 4 for the 1x1
GEMMs, Winograd's included) and, with ``Tuning.shared``, share each input row segment between the
lanes of a subgroup (the conv_rows_shared variants); :mod:`vkconv.ops.conv.selection` decides both.
Tile sizes and local sizes are specialization constants chosen from the device (:func:`tuning`).
The operands are read through uniform texel buffers where the device allows
(:mod:`vkconv.runtime.pipeline` says why), else through storage buffers; ``VKCONV_CONV_TEXEL=0``
forces storage buffers.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import struct
from dataclasses import dataclass

import numpy as np

from vkconv.kernels.activation import Activation
from vkconv.kernels.tiling import DEPTHWISE_TILES, Tuning, choose_mb, choose_pb, choose_tiles, rows_unroll
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context
from vkconv.runtime.dispatch import grid
from vkconv.runtime.errors import VkconvError
from vkconv.runtime.pipeline import STORAGE, TEXEL1, TEXEL4, TEXEL4H, DescriptorSet, get_pipeline, texel_fits
from vkconv.runtime.plan import Plan, closed_on_error
from vkconv.runtime.transfer import upload_constant

log = logging.getLogger(__name__)

KERNELS = ("direct", "implicit_gemm", "gemm1x1", "depthwise", "winograd", "winograd63", "tiled")

_PUSH_DIRECT = struct.Struct("<22i2f")
_PUSH_ROWS = struct.Struct("<20i2f4i")
_PUSH_GATES = struct.Struct("<4i2f")  # conv_rows_lstm's push constants after _PUSH_ROWS'
_PUSH_DEPTHWISE = struct.Struct("<18i2f")
_PUSH_PACK = struct.Struct("<10i")
_PUSH_TILED = struct.Struct("<18i2f")


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """One convolution at one input shape, lifted to 3-D: every triple is (depth, height, width)."""

    n: int
    group: int
    cin_g: int
    cout_g: int
    size: tuple[int, int, int]
    kernel: tuple[int, int, int]
    strides: tuple[int, int, int]
    dilations: tuple[int, int, int]
    pad_begin: tuple[int, int, int]
    pad_end: tuple[int, int, int]
    out: tuple[int, int, int]
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]

    @classmethod
    def lift(cls, x_shape, weight_shape, group: int, strides, dilations, pads, y_shape) -> Geometry:
        nd = len(x_shape) - 2

        def three(values, unit):
            return (unit,) * (3 - nd) + tuple(int(v) for v in values)

        return cls(n=int(x_shape[0]), group=group, cin_g=int(weight_shape[1]),
                   cout_g=int(weight_shape[0]) // group, size=three(x_shape[2:], 1),
                   kernel=three(weight_shape[2:], 1), strides=three(strides, 1),
                   dilations=three(dilations, 1), pad_begin=three(pads[:nd], 0),
                   pad_end=three(pads[nd:], 0), out=three(y_shape[2:], 1),
                   x_shape=tuple(x_shape), y_shape=tuple(y_shape))

    @property
    def pointwise(self) -> bool:
        """1x1 kernel, stride 1, no padding: the output pixels are the input pixels."""
        return (self.kernel == (1, 1, 1) and self.strides == (1, 1, 1)
                and self.pad_begin == (0, 0, 0) and self.pad_end == (0, 0, 0))

    @property
    def winograd_shape(self) -> bool:
        """3x3 2-D (or 1x3x3 3-D with unit depth), stride 1, no dilation."""
        return (self.kernel == (1, 3, 3) and self.strides == (1, 1, 1)
                and self.dilations == (1, 1, 1) and self.size[0] == 1)


@dataclass(frozen=True)
class OutputMap:
    """Where a ``conv_rows`` dispatch stores its output in a larger array (floats): pixel (z, y, x)
    of output channel ``c`` at ``c * plane + offset + z * step_z + y * step_y + x * step_x``.  One
    stride phase of a transposed convolution is written this way straight into its output."""

    plane: int
    offset: int
    step_z: int
    step_y: int
    step_x: int

    @classmethod
    def dense(cls, out: tuple[int, int, int]) -> OutputMap:
        """The plain ``[C][D][H][W]`` output of ``out`` = (D, H, W)."""
        return cls(math.prod(out), 0, out[1] * out[2], out[2], 1)


class DeviceWeights:
    """Packed weights kept on the device for texel or storage reads.

    With ``fp16`` the device copy is float16, read through an RGBA16F view (half the memory and
    weight bandwidth; each weight rounded once, accumulation stays fp32); a float32 copy is made only
    if a plan has to fall back to storage buffers, which cannot convert halves.
    """

    def __init__(self, ctx: Context, packed: np.ndarray, name: str, fp16: bool):
        self.ctx, self.name, self.size = ctx, name, packed.nbytes  # size: fp32 bytes, for texel_fits
        self._packed: np.ndarray | None = packed if fp16 else None
        self.half = upload_constant(ctx, packed.astype(np.float16), name + " (fp16)", texel=True) \
            if fp16 else None
        self.full = None if fp16 else upload_constant(ctx, packed, name, texel=True)

    def binding(self, texel: bool) -> tuple[Buffer, str]:
        """The buffer and binding kind a plan reading through texels (or not) binds."""
        if texel and self.half is not None:
            return self.half, TEXEL4H
        if self.full is None:
            assert self._packed is not None
            self.full = upload_constant(self.ctx, self._packed, self.name, texel=True)
            self._packed = None
        return self.full, TEXEL4 if texel else STORAGE

    def close(self) -> None:
        for buf in (self.half, self.full):
            if buf is not None:
                buf.close()
        self.half = self.full = None



def pack_oc_blocks(w: np.ndarray, group: int, mb: int) -> np.ndarray:
    """``[C_out, C_in/g, kd, kh, kw]`` -> ``[g][ceil(C_out/g / mb)][C_in/g][kd][kh][kw][mb]``,
    output channels zero-padded to whole blocks, so kernels load ``mb / 4`` vec4s per tap."""
    cout, cin_g = w.shape[:2]
    k = w.shape[2:]
    cout_g = cout // group
    blocks = -(-cout_g // mb)
    padded = np.zeros((group, blocks * mb, cin_g, *k), np.float32)
    padded[:, :cout_g] = w.reshape(group, cout_g, cin_g, *k)
    padded = padded.reshape(group, blocks, mb, cin_g, *k)
    return np.ascontiguousarray(np.moveaxis(padded, 2, -1))


def pack_bias_blocks(b: np.ndarray | None, cout: int, group: int, mb: int) -> np.ndarray:
    """``[C_out]`` -> ``[g][blocks * mb]``, zero-padded like :func:`pack_oc_blocks`."""
    cout_g = cout // group
    blocks = -(-cout_g // mb)
    packed = np.zeros((group, blocks * mb), np.float32)
    if b is not None:
        packed[:, :cout_g] = b.reshape(group, cout_g)
    return packed


class ConvPlan(Plan):
    """A :class:`Plan` whose input can also be read as a texel buffer, with ``slack`` spare bytes
    after it (row-segment loads of a last partial tile stay inside the buffer)."""

    def __init__(self, ctx: Context, x_shape, y_shape, slack: int = 0):
        super().__init__(ctx, [], [("conv output", y_shape)])
        with closed_on_error(self):
            self.inputs.append(Buffer(ctx, 4 * math.prod(x_shape) + slack, staged=True, texel=True,
                                      name="conv input x"))
        self.input_shapes.append(tuple(x_shape))


# ---------------------------------------------------------------------------------------------
class Kernel:
    """A kernel with resident packed weights; :meth:`plan` records one input shape."""

    name = ""

    def __init__(self, ctx: Context, w: np.ndarray, b: np.ndarray | None, group: int,
                 activation: Activation, tune: Tuning):
        self.ctx, self.group, self.act, self.tune = ctx, group, activation, tune
        self.cout, self.cin_g = w.shape[:2]
        self.cout_g = self.cout // group
        self.buffers: list[Buffer | DeviceWeights] = []

    def fits(self, geo: Geometry) -> bool:
        """Whether this kernel's scratch buffers fit the device's limits at this shape."""
        return True

    def plan(self, geo: Geometry) -> ConvPlan:
        raise NotImplementedError

    def close(self) -> None:
        for buf in self.buffers:
            buf.close()
        self.buffers.clear()


class DirectKernel(Kernel):
    name = "direct"

    def __init__(self, ctx, w, b, group, activation, tune):
        super().__init__(ctx, w, b, group, activation, tune)
        self.weights = upload_constant(ctx, pack_oc_blocks(w, group, 4), "conv weights")
        self.bias = upload_constant(ctx, pack_bias_blocks(b, self.cout, group, 4), "conv bias")
        self.buffers += [self.weights, self.bias]
        self.pipeline = get_pipeline(ctx, "conv_direct", 4, _PUSH_DIRECT.size,
                                     (tune.local_size, 1, 1, activation))

    def plan(self, geo: Geometry) -> ConvPlan:
        ctx, ls = self.ctx, self.tune.local_size
        plan = ConvPlan(ctx, geo.x_shape, geo.y_shape)
        with closed_on_error(plan):
            dset = DescriptorSet(self.pipeline, [plan.inputs[0], self.weights, self.bias, plan.outputs[0]])
            plan.keep.append(dset)
            blocks = -(-self.cout_g // 4)
            groups = grid(ctx, -(-math.prod(geo.out) // 4), ls, geo.n * geo.group * blocks,
                                       "x (conv output size)")
            push = _PUSH_DIRECT.pack(geo.cin_g, *geo.size, geo.cout_g, *geo.out, *geo.kernel, *geo.strides,
                                     *geo.pad_begin, *geo.dilations, geo.group, blocks,
                                     self.act.a, self.act.b)
            plan.record(lambda cmd: cmd.dispatch(self.pipeline, dset, push, groups))
        return plan


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Padded:
    """Layout of the zero-padded, row-aligned input copy (conv_pack.comp); with ``pad`` (begin
    pads D, H, W), the input itself read in place, its padding masked (dims then the input's)."""

    planes: int
    pd: int
    ph: int
    pw4: int
    tiles_w: int
    pad: tuple[int, int, int] | None = None

    @property
    def nbytes(self) -> int:
        return 16 * self.planes * self.pd * self.ph * self.pw4


def _padded(geo: Geometry, pb: int) -> _Padded:
    """Padded dims such that every row segment of every tile (including the partial last one)
    is inside its row: width >= last segment start + its vec4s, rounded to 4."""
    kw, sw, dw = geo.kernel[2], geo.strides[2], geo.dilations[2]
    tiles_w = -(-geo.out[2] // pb)
    segv = ((pb - 1) * sw + (kw - 1) * dw + 4) // 4
    width = geo.size[2] + geo.pad_begin[2] + geo.pad_end[2]
    pw4 = max(-(-width // 4), (tiles_w - 1) * pb * sw // 4 + segv)
    pd = geo.size[0] + geo.pad_begin[0] + geo.pad_end[0]
    ph = geo.size[1] + geo.pad_begin[1] + geo.pad_end[1]
    return _Padded(geo.n * geo.group * geo.cin_g, pd, ph, pw4, tiles_w)


class _PaddedInputKernel(Kernel):
    """Shared by the kernels that read the padded copy: the pack pass and texel/storage choice."""

    def _use_texel(self, plan_bytes: list[int], texel_buffers: list[Buffer | DeviceWeights]) -> bool:
        if not self.tune.texel:
            return False
        return (all(texel_fits(self.ctx, n) for n in plan_bytes)
                and all(texel_fits(self.ctx, b.size) for b in texel_buffers))

    def _pack(self, plan: Plan, geo: Geometry, lay: _Padded, texel: bool, x: Buffer):
        """A padded texel buffer kept by the plan, and the recorder of the pass that fills it from
        ``x``."""
        ctx, ls = self.ctx, self.tune.local_size
        padded = Buffer(ctx, lay.nbytes, texel=True, name="conv padded input")
        plan.keep.append(padded)
        texel_x = texel and texel_fits(ctx, x.size, TEXEL1)
        pipe = get_pipeline(ctx, "conv_pack" if texel_x else "conv_pack_ssbo",
                                (TEXEL1 if texel_x else STORAGE, STORAGE), _PUSH_PACK.size, (ls, 1, 1))
        dset = DescriptorSet(pipe, [x, padded])
        plan.keep.append(dset)
        groups = grid(ctx, lay.planes * lay.pd * lay.ph, ls, 1, "x (padded input size)")
        push = _PUSH_PACK.pack(lay.planes, *geo.size, lay.pd, lay.ph, lay.pw4, *geo.pad_begin)

        def record(cmd: CommandBuffer) -> None:
            cmd.dispatch(pipe, dset, push, groups)
            cmd.barrier()
        return padded, record


class RowsKernel(_PaddedInputKernel):
    """``implicit_gemm``, or ``gemm1x1`` (``flat``): conv_rows.comp, see the module docstring."""

    def __init__(self, ctx, w, b, group, activation, tune, flat: bool = False):
        super().__init__(ctx, w, b, group, activation, tune)
        self.name = "gemm1x1" if flat else "implicit_gemm"
        self.flat = flat
        self.mb = choose_mb(self.cout_g, tune)
        self.weights = DeviceWeights(ctx, pack_oc_blocks(w, group, self.mb), "conv weights", tune.fp16)
        self.bias = upload_constant(ctx, pack_bias_blocks(b, self.cout, group, self.mb), "conv bias")
        self.buffers += [self.weights, self.bias]

    def _geometry(self, geo: Geometry) -> Geometry:
        if not self.flat:
            return geo
        if not geo.pointwise:
            raise VkconvError("gemm1x1 needs a 1x1 kernel, stride 1 and no padding")
        pixels = math.prod(geo.size)
        one = (1, 1, 1)
        return Geometry(geo.n, geo.group, geo.cin_g, geo.cout_g, (1, 1, pixels), one, one, one,
                        (0, 0, 0), (0, 0, 0), (1, 1, pixels), geo.x_shape, geo.y_shape)

    def _layout(self, geo: Geometry):
        g = self._geometry(geo)
        pb = choose_pb(self.mb, g.out[2], self.tune)
        lay = _padded(g, pb)
        # An image whose rows are whole vec4s is read in place: flat (a plain GEMM over one long
        # row, the last tile reading slack past it) or with its padding masked by the shader.
        in_place = g.size[2] % 4 == 0
        if in_place:
            lay = _Padded(lay.planes, 1, 1, g.size[2] // 4, lay.tiles_w) if self.flat else \
                _Padded(lay.planes, *g.size[:2], g.size[2] // 4, lay.tiles_w, g.pad_begin)
        return g, pb, lay, in_place

    def fits(self, geo: Geometry) -> bool:
        _, _, lay, in_place = self._layout(geo)
        return in_place or lay.nbytes <= self.ctx.info.max_storage_buffer_range

    def plan(self, geo: Geometry) -> ConvPlan:
        _, pb, lay, in_place = self._layout(geo)
        # Flat in place, the last tile's segment may run past the image: give the input buffer slack.
        plan = ConvPlan(self.ctx, geo.x_shape, geo.y_shape, self.slack(pb, lay) if in_place and self.flat else 0)
        with closed_on_error(plan):
            plan.record(self.record(plan, geo, plan.inputs[0], plan.outputs[0]))
        return plan

    def record(self, plan: Plan, geo: Geometry, x: Buffer, y: Buffer, out_map: OutputMap | None = None):
        """Bind input ``x`` (a texel-capable buffer of ``geo.x_shape``) and output ``y`` in ``plan``
        (which keeps the scratch buffers and descriptor sets); the recorder of the pack pass, if the
        input needs its padded copy, and the convolution.  ``out_map``: where the output goes in
        ``y`` (default: ``geo.y_shape`` dense)."""
        g, pb, lay, in_place = self._layout(geo)
        texel = self._use_texel([x.size if in_place else lay.nbytes], [self.weights])
        if in_place:
            source, pack = x, None
        else:
            source, pack = self._pack(plan, g, lay, texel, x)
        rows = self.rows_dispatch(plan, g, pb, lay, source, y, texel, out_map)

        def body(cmd: CommandBuffer) -> None:
            if pack is not None:
                pack(cmd)
            rows(cmd)
        return body

    def tiled_operand(self, images: int, pixels: int) -> tuple[Geometry, int, _Padded]:
        """A plain GEMM over an operand that its caller writes (deform_conv's sampled columns), laid
        out tile-major: ``[images][group][tile][K][PB]`` floats, one invocation's K x PB block
        contiguous (writers then fill whole cache lines; K is C_in/g of this ``flat`` kernel).

        Put to the implicit-GEMM loop as a 1-channel input of ``tiles * K`` rows of PB pixels
        convolved by a K x 1 kernel at stride K along H: kernel row ``ky`` of output row ``oy``
        reads operand row ``ky`` of tile ``oy``, and the packed weights of a flat kernel
        (``[C_out, K, 1, 1, 1]``) are already in that order.  Returns the geometry, PB and layout
        for :meth:`rows_dispatch`, whose output is then ``[images][C_out][tiles * PB]``."""
        pb = choose_pb(self.mb, pixels, self.tune)
        tiles, k = -(-pixels // pb), self.cin_g
        one, zero = (1, 1, 1), (0, 0, 0)
        geo = Geometry(images, self.group, 1, self.cout_g, (1, tiles * k, pb), (1, k, 1), (1, k, 1), one,
                       zero, zero, (1, tiles, pb), (images, self.group, tiles * k, pb),
                       (images, self.cout, tiles, pb))
        return geo, pb, _padded(geo, pb)

    @staticmethod
    def slack(pb: int, lay: _Padded) -> int:
        """Bytes past a flat (``gemm1x1``) source that its last partial tile reads."""
        return 16 * max(0, (lay.tiles_w - 1) * pb // 4 + pb // 4 - lay.pw4)

    def rows_dispatch(self, plan: Plan, g: Geometry, pb: int, lay: _Padded, source: Buffer,
                      output: Buffer, texel: bool, out_map: OutputMap | None = None):
        """Bind ``source`` (``lay``) and ``output`` (``out_map``, default dense) for conv_rows; the
        recorder of its dispatch."""
        out_map = out_map or OutputMap.dense(g.out)
        vec_out = out_map == OutputMap.dense(g.out) and g.out[2] % 4 == 0
        pipe, weights, groups = self._rows_pipeline(g, pb, lay, texel, vec_out, out_map.step_x)
        dset = DescriptorSet(pipe, [source, weights, self.bias, output])
        plan.keep.append(dset)
        push = self._rows_push(g, lay, out_map, lay.pad or (0, 0, 0))
        return lambda cmd: cmd.dispatch(pipe, dset, push, groups)

    def gate_steps(self, plan: Plan, g: Geometry, pb: int, lay: _Padded, states: tuple[Buffer, Buffer],
                   gates: Buffer, cell: Buffer, output: Buffer, recurrent: Activation):
        """The recurrent convolution of a ConvLSTM2D time step with the gates fused into its store
        (conv_rows_lstm, see conv_rows.comp): this kernel's weights are ``[4F, F, kh, kw]``, output
        channel ``4 * filter + gate`` (i, f, c, o), its activation the cell activation and
        ``recurrent`` the gates'.  ``g``: the 2-D, one-group, stride-1 convolution of the hidden
        state ``[N, F, H, W]``; ``lay``: the padded layout (:meth:`padded_layout`) of both
        ``states`` buffers, whose padding the caller keeps at zero; ``gates``: ``[N, T, 4F, H, W]``;
        ``cell``: ``[N, F, H, W]``.  Returns the recorder ``step(cmd, src, gx_n, gx_off, y_n, y_off,
        has_state)`` of one step reading ``states[src]`` and writing ``states[1 - src]``, the cell
        state, and h_t at ``output[n * y_n + y_off]`` (floats; ``gates`` likewise at ``gx_n``,
        ``gx_off``)."""
        if self.mb % 4 or self.group != 1 or lay.pad is not None:
            raise VkconvError("gate_steps needs whole filters per register tile, one group and a padded input")
        texel = self._use_texel([lay.nbytes], [self.weights])
        pipe, weights, groups = self._rows_pipeline(g, pb, lay, texel, False, 1, recurrent)
        sets = [DescriptorSet(pipe, [states[i], weights, gates, output, cell, states[1 - i]]) for i in (0, 1)]
        plan.keep += sets
        hw = g.out[1] * g.out[2]

        def step(cmd: CommandBuffer, src: int, gx_n: int, gx_off: int, y_n: int, y_off: int,
                 has_state: bool) -> None:
            out_map = OutputMap(hw, y_off, hw, g.out[2], 1)
            push = self._rows_push(g, lay, out_map, g.pad_begin) + _PUSH_GATES.pack(
                gx_n, gx_off, y_n, int(has_state), recurrent.a, recurrent.b)
            cmd.dispatch(pipe, sets[src], push, groups)
        return step

    def pack(self, plan: Plan, geo: Geometry, lay: _Padded, x: Buffer):
        """The padded copy (``lay``) of ``x`` kept by ``plan``, and the recorder of the pass that
        fills it, padding included (it ends with a barrier)."""
        return self._pack(plan, geo, lay, self._use_texel([lay.nbytes], [self.weights]), x)

    def padded_layout(self, geo: Geometry) -> tuple[int, _Padded]:
        """(PB, the zero-padded row-aligned input layout) of ``geo``, never read in place."""
        pb = choose_pb(self.mb, geo.out[2], self.tune)
        return pb, _padded(geo, pb)

    def _rows_pipeline(self, g: Geometry, pb: int, lay: _Padded, texel: bool, vec_out: bool, step_x: int,
                       recurrent: Activation | None = None):
        """The conv_rows pipeline (conv_rows_lstm with a ``recurrent`` activation, conv_rows_shared
        with ``Tuning.shared``), the weights buffer it binds and its grid of workgroups."""
        kind = TEXEL4 if texel else STORAGE
        weights, weight_kind = self.weights.binding(texel)
        pads = lay.pad or (0, 0, 0)
        unroll = rows_unroll(g.cin_g * g.kernel[0] * g.kernel[1], g.kernel[2], self.tune)
        spec: tuple = (self.tune.local_size, 1, 1, self.act, self.mb, pb, g.kernel[2], g.strides[2],
                       g.dilations[2], int(vec_out), int(lay.pad is not None), -pads[2] % 4, step_x,
                       recurrent.kind if recurrent is not None else 0, self.ctx.info.subgroup_size, unroll)
        name, push_size = "conv_rows", _PUSH_ROWS.size
        kinds: tuple[str, ...] = (kind, weight_kind, STORAGE, STORAGE)
        shared = self.tune.shared and recurrent is None  # the LSTM variants have no shared form
        if recurrent is not None:
            name, kinds = "conv_rows_lstm", kinds + (STORAGE, STORAGE)
            push_size += _PUSH_GATES.size
        elif shared:
            name = "conv_rows_shared"
        pipe = get_pipeline(self.ctx, name if texel else name + "_ssbo", kinds, push_size, spec)
        blocks = -(-self.cout_g // self.mb)
        if shared:  # a subgroup per (tile, group of sg blocks)
            sg = self.ctx.info.subgroup_size
            blocks = -(-blocks // sg) * sg
        groups = grid(self.ctx, lay.tiles_w * g.out[1] * g.out[0] * blocks, self.tune.local_size,
                      g.n * g.group, "x (conv output size)")
        return pipe, weights, groups

    def _rows_push(self, g: Geometry, lay: _Padded, out_map: OutputMap, pads) -> bytes:
        return _PUSH_ROWS.pack(g.cin_g, g.cout_g, g.group, -(-self.cout_g // self.mb), lay.pd, lay.ph, lay.pw4,
                               *pads, g.kernel[0], g.kernel[1], g.strides[0], g.strides[1],
                               g.dilations[0], g.dilations[1], *g.out, lay.tiles_w,
                               self.act.a, self.act.b, out_map.plane, out_map.offset, out_map.step_z,
                               out_map.step_y)


class DepthwiseKernel(_PaddedInputKernel):
    """``depthwise``: group == C_in (one input channel per group), any multiplier."""

    name = "depthwise"

    def __init__(self, ctx, w, b, group, activation, tune):
        super().__init__(ctx, w, b, group, activation, tune)
        if self.cin_g != 1:
            raise VkconvError(f"depthwise needs one input channel per group, got {self.cin_g}")
        kd, kh, kw = w.shape[2:]
        kwv = -(-kw // 4)
        packed = np.zeros((self.cout, kd, kh, 4 * kwv), np.float32)
        packed[..., :kw] = w[:, 0]
        self.weights = DeviceWeights(ctx, packed, "depthwise weights", tune.fp16)
        bias = np.zeros(self.cout, np.float32) if b is None else b
        self.bias = upload_constant(ctx, bias, "depthwise bias")
        self.buffers += [self.weights, self.bias]

    def _layout(self, geo: Geometry):
        """(PB, the padded copy's layout, or None to read the input in place: its rows are whole
        vec4s when the width is a multiple of 4)."""
        pb = choose_pb(0, geo.out[2], self.tune, DEPTHWISE_TILES)
        return pb, None if geo.size[2] % 4 == 0 else _padded(geo, pb)

    def fits(self, geo: Geometry) -> bool:
        lay = self._layout(geo)[1]
        return lay is None or lay.nbytes <= self.ctx.info.max_storage_buffer_range

    def plan(self, geo: Geometry) -> ConvPlan:
        ctx, ls = self.ctx, self.tune.local_size
        pb, lay = self._layout(geo)
        plan = ConvPlan(ctx, geo.x_shape, geo.y_shape)
        with closed_on_error(plan):
            if lay is None:
                texel = self._use_texel([plan.inputs[0].size], [self.weights])
                source, pack = plan.inputs[0], None
                dims = (*geo.size[:2], geo.size[2] // 4)
                tiles_w = -(-geo.out[2] // pb)
            else:
                texel = self._use_texel([lay.nbytes], [self.weights])
                source, pack = self._pack(plan, geo, lay, texel, plan.inputs[0])
                dims, tiles_w = (lay.pd, lay.ph, lay.pw4), lay.tiles_w
            kind = TEXEL4 if texel else STORAGE
            weights, weight_kind = self.weights.binding(texel)
            kw, sw, dw = geo.kernel[2], geo.strides[2], geo.dilations[2]
            shift = -geo.pad_begin[2] % 4 if lay is None else 0
            pipe = get_pipeline(ctx, "conv_depthwise" if texel else "conv_depthwise_ssbo",
                                (kind, weight_kind, STORAGE, STORAGE), _PUSH_DEPTHWISE.size,
                                (ls, 1, 1, self.act, 0, pb, kw, sw, dw, int(geo.out[2] % 4 == 0), int(lay is None),
                                 shift))
            dset = DescriptorSet(pipe, [source, weights, self.bias, plan.outputs[0]])
            plan.keep.append(dset)
            groups = grid(ctx, tiles_w * geo.out[1] * geo.out[0] * self.cout, ls,
                                               geo.n, "x (conv output size)")
            push = _PUSH_DEPTHWISE.pack(geo.group, self.cout_g, *dims, *geo.pad_begin,
                                        geo.kernel[0], geo.kernel[1], geo.strides[0], geo.strides[1],
                                        geo.dilations[0], geo.dilations[1], *geo.out, tiles_w,
                                        self.act.a, self.act.b)

            def body(cmd: CommandBuffer) -> None:
                if pack is not None:
                    pack(cmd)
                cmd.dispatch(pipe, dset, push, groups)
            plan.record(body)
        return plan


# Winograd F(4x4, 3x3): y = A^T [ (G g G^T) . (B^T d B) ] A over 6x6 input / 4x4 output tiles.
_WINOGRAD_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
# F(6x6, 3x3) over 8x8 input tiles, points 0, +-1, +-2, +-1/2, infinity (ncnn's winograd63).
_WINOGRAD63_G = np.array([[1, 0, 0], [-2 / 9, -2 / 9, -2 / 9], [-2 / 9, 2 / 9, -2 / 9],
                          [1 / 90, 1 / 45, 2 / 45], [1 / 90, -1 / 45, 2 / 45],
                          [32 / 45, 16 / 45, 8 / 45], [32 / 45, -16 / 45, 8 / 45], [0, 0, 1]])
_PUSH_WINOGRAD_IN = struct.Struct("<8i")
_PUSH_WINOGRAD_OUT = struct.Struct("<8i2f2i")


@dataclass(frozen=True)
class _WinogradLayout:
    tiles_h: int
    tiles_w: int
    pitch: int        # tile numbers per row of tiles: tiles_w rounded up to even
    ntp: int          # values per transformed plane: n * tiles_h * pitch rounded up to 4
    padded: _Padded   # the input copy the input transform reads (in_place: the input's dims)
    in_place: bool    # the input transform reads the input itself, its pads masked (no pack pass)
    gemm: Geometry    # the 36 GEMMs as one grouped 1x1 convolution over ntp pixels
    pb: int
    gemm_lay: _Padded


def winograd_tiles(geo: Geometry, m: int = 4) -> tuple[int, int, int, int]:
    """(tile rows, tile columns, row pitch, values per transformed plane) of F(m x m, 3x3): the
    tiles of all images numbered row by row, each row from an even number (the transforms move
    pairs of tiles), the count rounded up to whole vec4s (shaders/conv/conv_winograd.comp)."""
    tiles_h, tiles_w = -(-geo.out[1] // m), -(-geo.out[2] // m)
    pitch = tiles_w + tiles_w % 2
    return tiles_h, tiles_w, pitch, -(-geo.n * tiles_h * pitch // 4) * 4


class WinogradKernel(_PaddedInputKernel):
    """``winograd``: input transform, 36 GEMMs (the ``gemm1x1`` kernel, grouped), output transform;
    see shaders/conv_winograd.comp."""

    name = "winograd"
    m = 4  # output tile
    g_matrix = _WINOGRAD_G

    @property
    def points(self) -> int:
        """Transformed values per tile: (m + 2)^2, the number of GEMMs."""
        return (self.m + 2) ** 2

    def __init__(self, ctx, w, b, group, activation, tune):
        super().__init__(ctx, w, b, group, activation, tune)
        if w.shape[2:] != (1, 3, 3) or group != 1:
            raise VkconvError(f"{self.name} needs 3x3 2-D weights and group 1, got {w.shape}, group={group}")
        # U[a = (m+2) i + k][co][ci] = (G g G^T)[i][k], in float64 then rounded once.
        g = self.g_matrix
        u = np.einsum("ij,ocjk,lk->iloc", g, w[:, :, 0].astype(np.float64), g)
        u = u.reshape(self.points * self.cout, self.cin_g, 1, 1, 1).astype(np.float32)
        # fp32 even with fp16 weights requested: F(4,3)'s output transform multiplies the rounding
        # of the transformed weights (measured: 4e-3 of the output's scale with fp16, 1e-5 with fp32).
        self.gemm = RowsKernel(ctx, u, None, self.points, Activation(), dataclasses.replace(tune, fp16=False),
                               flat=True)
        bias = np.zeros(self.cout, np.float32) if b is None else b
        self.bias = upload_constant(ctx, bias, "winograd bias")
        self.buffers += [self.bias]

    def _layout(self, geo: Geometry) -> _WinogradLayout:
        tiles_h, tiles_w, pitch, ntp = winograd_tiles(geo, self.m)
        tiles_q = -(-tiles_w // 4)
        h, w = geo.size[1:]
        # Rows of whole vec4s are read in place, the pads masked by the input transform (it reads
        # a strip of 4 tiles as vec4s from 4 columns before it, so pad_w <= 4): no pack pass.
        in_place = w % 4 == 0 and geo.pad_begin[2] <= 4
        if in_place:
            padded = _Padded(geo.n * geo.cin_g, 1, h, w // 4, tiles_q, geo.pad_begin)
        else:
            # Tile rows start at padded row m ty and column m tx (the image sits at the pads), and
            # the last group of 4 tiles reads m + 2 rows x m + 1 vec4s from vec4 column m (tiles_q - 1).
            m = self.m
            ph = max(h + geo.pad_begin[1] + geo.pad_end[1], m * tiles_h + 2)
            pw4 = max(-(-(w + geo.pad_begin[2] + geo.pad_end[2]) // 4), m * tiles_q + 1)
            padded = _Padded(geo.n * geo.cin_g, 1, ph, pw4, tiles_q)
        one = (1, 1, 1)
        gemm = Geometry(1, self.points, geo.cin_g, self.cout, (1, 1, ntp), one, one, one, (0, 0, 0), (0, 0, 0),
                        (1, 1, ntp), geo.x_shape, geo.y_shape)
        pb = choose_pb(self.gemm.mb, ntp, self.tune)
        gemm_lay = _Padded(self.points * geo.cin_g, 1, 1, ntp // 4, -(-ntp // pb))
        return _WinogradLayout(tiles_h, tiles_w, pitch, ntp, padded, in_place, gemm, pb, gemm_lay)

    def _sizes(self, geo: Geometry, lay: _WinogradLayout) -> list[int]:
        """Bytes of the padded input (in place: the input), transformed input (with GEMM slack) and
        GEMM output."""
        source = 4 * math.prod(geo.x_shape) if lay.in_place else lay.padded.nbytes
        return [source, 4 * self.points * geo.cin_g * lay.ntp + RowsKernel.slack(lay.pb, lay.gemm_lay),
                4 * self.points * self.cout * lay.ntp]

    def fits(self, geo: Geometry) -> bool:
        return all(n <= self.ctx.info.max_storage_buffer_range for n in self._sizes(geo, self._layout(geo)))

    def plan(self, geo: Geometry) -> ConvPlan:
        plan = ConvPlan(self.ctx, geo.x_shape, geo.y_shape)
        with closed_on_error(plan):
            plan.record(self.record(plan, geo, plan.inputs[0], plan.outputs[0]))
        return plan

    def record(self, plan: Plan, geo: Geometry, x: Buffer, y: Buffer,
               phases: tuple[int, int, int, int] | None = None):
        """Bind input ``x`` (a texel-capable buffer of ``geo.x_shape``) and output ``y`` in ``plan``
        (which keeps the scratch buffers and descriptor sets); the recorder of the four passes.
        ``phases`` ``(sh, sw, h, w)``: this is a transposed convolution's sub-pixel convolution,
        channel ``co * sh * sw + rh * sw + rw`` phase ``(rh, rw)`` of output channel ``co`` of the
        ``h x w`` output ``y`` (shaders/conv/conv_winograd.comp stores it there)."""
        ctx, ls = self.ctx, self.tune.local_size
        sh, sw, y_h, y_w = phases or (1, 1, *geo.out[1:])
        lay = self._layout(geo)
        sizes = self._sizes(geo, lay)
        texel = self._use_texel(sizes, [self.gemm.weights])
        if lay.in_place:
            padded, pack = x, None
        else:
            padded, pack = self._pack(plan, geo, lay.padded, texel, x)
        v = Buffer(ctx, sizes[1], texel=True, name="winograd transformed input")
        m = Buffer(ctx, sizes[2], texel=True, name="winograd transformed output")
        plan.keep += [v, m]
        kind = TEXEL4 if texel else STORAGE
        suffix = "" if texel else "_ssbo"
        shader = "conv_winograd" if self.m == 4 else f"conv_winograd{self.m}3"
        pipe_in = get_pipeline(ctx, shader + "_in" + suffix, (kind, STORAGE), _PUSH_WINOGRAD_IN.size,
                               (ls, 1, 1, 0, 0, 0, 0, 0, 0, 0, int(lay.in_place),
                                geo.pad_begin[2] if lay.in_place else 0, int(lay.pitch % 4 != 0)))
        pipe_out = get_pipeline(ctx, shader + "_out" + suffix, (kind, STORAGE, STORAGE),
                                _PUSH_WINOGRAD_OUT.size,
                                (ls, 1, 1, self.act, 0, 0, 0, 0, 0, int(geo.out[2] % 4 == 0), sh, sw))
        set_in = DescriptorSet(pipe_in, [padded, v])
        set_out = DescriptorSet(pipe_out, [m, self.bias, y])
        plan.keep += [set_in, set_out]
        tile_rows = geo.n * lay.tiles_h
        groups_in = grid(ctx, geo.cin_g * tile_rows, ls, 1, "x (winograd input tiles)")
        groups_out = grid(ctx, self.cout * tile_rows, ls, 1, "x (winograd output tiles)")
        push_in = _PUSH_WINOGRAD_IN.pack(geo.cin_g, lay.tiles_h, lay.pitch, tile_rows, lay.padded.ph,
                                         lay.padded.pw4, lay.ntp,
                                         geo.pad_begin[1] if lay.in_place else 0)
        push_out = _PUSH_WINOGRAD_OUT.pack(self.cout, lay.tiles_h, lay.tiles_w, lay.pitch, tile_rows,
                                           *geo.out[1:], lay.ntp, self.act.a, self.act.b, y_h, y_w)
        gemm = self.gemm.rows_dispatch(plan, lay.gemm, lay.pb, lay.gemm_lay, v, m, texel)

        def body(cmd: CommandBuffer) -> None:
            if pack is not None:
                pack(cmd)
            cmd.dispatch(pipe_in, set_in, push_in, groups_in)
            cmd.barrier()
            gemm(cmd)
            cmd.barrier()
            cmd.dispatch(pipe_out, set_out, push_out, groups_out)
        return body

    def close(self) -> None:
        self.gemm.close()
        super().close()


class Winograd63Kernel(WinogradKernel):
    """``winograd63``: F(6x6, 3x3), the passes of :class:`WinogradKernel` over 8x8 input tiles and
    64 GEMMs.  Its float32 error, measured against a float64 direct convolution (He-scaled weights,
    64-512 input channels): 0.7-2.4e-5 x max|y|, 1.3-1.5x F(4x4, 3x3)'s, within the 1e-4 the tests
    allow every kernel.  Chosen by the heuristic only on large images (selection.winograd63_pays)."""

    name = "winograd63"
    m = 6
    g_matrix = _WINOGRAD63_G


class TiledKernel(Kernel):
    """``tiled``: conv_tiled.comp, see the module docstring.  Weights are packed
    ``[g][oc tile][K padded to TK][TM]`` (float32 even with ``fp16``: the kernel reads storage
    buffers), with a table splitting each k into (input channel, dilated tap offsets)."""

    name = "tiled"

    def __init__(self, ctx, w, b, group, activation, tune):
        super().__init__(ctx, w, b, group, activation, tune)
        t = self.tile = tune.tile or choose_tiles(ctx)
        kernel = w.shape[2:]
        self.k_total = self.cin_g * math.prod(kernel)
        self.oc_tiles = -(-self.cout_g // t.tm)
        k_pad = -(-self.k_total // t.tk) * t.tk
        packed = np.zeros((group, self.oc_tiles * t.tm, k_pad), np.float32)
        packed[:, :self.cout_g, :self.k_total] = w.reshape(group, self.cout_g, self.k_total)
        packed = packed.reshape(group, self.oc_tiles, t.tm, k_pad).transpose(0, 1, 3, 2)
        self.weights = upload_constant(ctx, np.ascontiguousarray(packed), "tiled conv weights")
        bias = np.zeros(self.cout, np.float32) if b is None else b
        self.bias = upload_constant(ctx, bias, "tiled conv bias")
        self.buffers += [self.weights, self.bias]
        self._taps: dict[tuple[int, int, int], Buffer] = {}  # by dilations

    def taps(self, geo: Geometry) -> Buffer:
        """``[K]`` ivec4 (input channel, kz * d_d, ky * d_h, kx * d_w) in the weights' k order."""
        buf = self._taps.get(geo.dilations)
        if buf is None:
            ci, kz, ky, kx = np.meshgrid(np.arange(self.cin_g), *(np.arange(k) for k in geo.kernel),
                                         indexing="ij")
            table = np.stack([ci, kz * geo.dilations[0], ky * geo.dilations[1], kx * geo.dilations[2]], -1)
            buf = self._taps[geo.dilations] = upload_constant(
                self.ctx, np.ascontiguousarray(table.reshape(-1, 4), np.int32), "tiled conv taps")
            self.buffers.append(buf)
        return buf

    def plan(self, geo: Geometry) -> ConvPlan:
        ctx, t = self.ctx, self.tile
        plan = ConvPlan(ctx, geo.x_shape, geo.y_shape)
        with closed_on_error(plan):
            pipe = get_pipeline(ctx, "conv_tiled", 5, _PUSH_TILED.size,
                                (t.invocations, 1, 1, self.act, t.tm, t.tn, t.tk, t.rm, t.rn))
            dset = DescriptorSet(pipe, [plan.inputs[0], self.weights, self.taps(geo), self.bias,
                                        plan.outputs[0]])
            plan.keep.append(dset)
            pix_tiles = -(-math.prod(geo.out) // t.tn)
            groups = grid(ctx, self.oc_tiles * pix_tiles, 1, geo.n * geo.group,
                                       "x (conv output size)")
            push = _PUSH_TILED.pack(geo.cin_g, geo.cout_g, geo.group, self.k_total, *geo.size, *geo.out,
                                    *geo.strides, *geo.pad_begin, self.oc_tiles, pix_tiles,
                                    self.act.a, self.act.b)
            plan.record(lambda cmd: cmd.dispatch(pipe, dset, push, groups))
        return plan

    def close(self) -> None:
        super().close()
        self._taps.clear()


def make_kernel(name: str, ctx: Context, w: np.ndarray, b: np.ndarray | None, group: int,
                activation: Activation, tune: Tuning) -> Kernel:
    """Kernel ``name`` with weights ``w`` ``[C_out, C_in/g, kd, kh, kw]`` packed and uploaded."""
    if name == "direct":
        return DirectKernel(ctx, w, b, group, activation, tune)
    if name in ("implicit_gemm", "gemm1x1"):
        return RowsKernel(ctx, w, b, group, activation, tune, flat=name == "gemm1x1")
    if name == "depthwise":
        return DepthwiseKernel(ctx, w, b, group, activation, tune)
    if name == "winograd":
        return WinogradKernel(ctx, w, b, group, activation, tune)
    if name == "winograd63":
        return Winograd63Kernel(ctx, w, b, group, activation, tune)
    if name == "tiled":
        return TiledKernel(ctx, w, b, group, activation, tune)
    raise ValueError(f"kernel: unknown {name!r}; expected one of {', '.join(KERNELS)}")


