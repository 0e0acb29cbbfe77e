"""Transposed convolution (ONNX ``ConvTranspose``) for 1-D, 2-D and 3-D inputs: host side of
``shaders/conv/conv_transpose.comp``.

Layouts: input ``x`` is NCW, NCHW or NCDHW; weights ``w`` are ``[C_in, C_out / group, *kernel]``
(ONNX's, the transpose of Conv's); bias ``b`` is ``[C_out]``; the output is ``[N, C_out, *out]``;
all float32.  1-D and 2-D inputs run as 3-D ones with unit leading spatial dims.

A layer whose kernel equals its stride, with no dilation, padding or output padding (the 2x2
stride-2 upsamplers of PP-OCR and U-Net), writes every output from exactly one tap per input
channel: it runs as a 1x1 GEMM to ``C_out * taps`` channels (the conv kernels' ``gemm1x1``) and a
pass that moves each tap's plane into place (``shaders/conv/conv_transpose_shuffle.comp``), which on
lavapipe measured 2-4x faster than the gather kernel on those layers.

Any other layer runs by the stride-phase (sub-pixel) decomposition (``method="phases"``): along an
axis of stride ``s``, the outputs ``o = q * s + r`` of phase ``r`` take only the taps ``k`` with
``k * d = r + pad_begin (mod s)``, which for ``gcd(s, d) == 1`` are ``k0, k0 + s, ...``, and read
inputs ``q + c - d * t`` for tap ``k0 + s * t``: an ordinary stride-1 convolution (dilation ``d``)
of the input with that sub-kernel flipped.  Each of the ``prod(strides)`` phases runs on the dense
convolution's implicit-GEMM kernel (``conv_rows``) and stores its pixels straight into every
``s``-th output (a strided store), so there is no scratch output and no interleave pass; with all
strides 1 the one phase takes the kernel a ``Conv`` of its shape would.  A layer the decomposition
does not cover runs on the gather kernel (``shaders/conv/conv_transpose.comp``): a dilation sharing a
factor with its stride (some residues then get no taps), a kernel shorter than its stride where a
phase gets no tap, or no input channels.  docs/PERFORMANCE.md has the measurements behind
``method="auto"``.
"""
from __future__ import annotations

import itertools
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.divide import magic
from vkconv.kernels.tiling import fitting_tile, tuning
from vkconv.ops.base import WeightedOp
from vkconv.ops.conv.kernels import ConvPlan, Geometry, Kernel, OutputMap, RowsKernel, make_kernel, pack_bias_blocks
from vkconv.ops.conv.selection import select
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context
from vkconv.runtime.dispatch import LOOP_LOCAL, looped_grid
from vkconv.runtime.errors import VkconvError
from vkconv.runtime.pipeline import DescriptorSet, get_pipeline
from vkconv.runtime.plan import Plan, closed_on_error
from vkconv.runtime.transfer import upload_constant

# in_size, cin_g, out_size, cout_g, kernel, groups, stride, oc_blocks, dil, w_blocks, tap_step,
# act_a, off, act_b, lift: std430 ivec3s are 16-byte aligned, hence the interleaved scalars.
_PUSH = struct.Struct("<3ii3ii3ii3ii3ii3if3if3i")
_SHUFFLE_PUSH = struct.Struct("<6I7i")
# Compiled tiles: (output pixels of one W phase, vec4s of output channels) per invocation.
TILES = ((4, 1), (4, 2), (8, 1), (8, 2), (8, 4), (8, 8))
_INT32_MAX = 2**31 - 1
METHODS = ("auto", "gather", "phases")


@dataclass(frozen=True)
class Phase:
    """One stride phase of a transposed convolution, per axis (D, H, W): output offset ``r``, output
    count ``count`` (outputs ``r, r + s, ...``), first tap ``k0``, taps ``taps`` (``k0 + s * t``) and
    the pads of the equivalent stride-1 convolution (which may be negative: a crop)."""

    r: tuple[int, int, int]
    count: tuple[int, int, int]
    k0: tuple[int, int, int]
    taps: tuple[int, int, int]
    pad_begin: tuple[int, int, int]
    pad_end: tuple[int, int, int]


def axis_phases(size: int, out: int, k: int, s: int, d: int,
                pad: int) -> list[tuple[int, int, int, int, int, int]] | None:
    """The phases of one axis: ``(r, count, k0, taps, conv pad_begin, conv pad_end)`` for each residue
    ``r`` that has outputs, or None when a phase with outputs gets no tap (the gather kernel's
    case): ``gcd(s, d) > 1``, or a kernel shorter than the stride.

    Output ``o = q * s + r`` takes tap ``k`` from input ``i`` where ``i * s + k * d = o + pad``; with
    ``d`` invertible mod ``s`` the taps are ``k = k0 + s * t`` for ``k0 = (r + pad) / d mod s``, and
    ``i = q + c - d * t`` with ``c = (r + pad - k0 * d) / s``: flipped (``u = taps - 1 - t``), a
    stride-1 convolution with dilation ``d`` and begin pad ``d * (taps - 1) - c``."""
    if math.gcd(s, d) != 1:
        return None
    inverse = pow(d, -1, s) if s > 1 else 0
    phases = []
    for r in range(s):
        count = -(-(out - r) // s)
        if count <= 0:
            continue
        k0 = (r + pad) * inverse % s
        if k0 >= k:
            return None
        taps = -(-(k - k0) // s)
        c = (r + pad - k0 * d) // s
        begin = d * (taps - 1) - c
        phases.append((r, count, k0, taps, begin, count - size - begin + d * (taps - 1)))
    return phases


def default_method() -> str:
    """``VKCONV_CONVT_METHOD`` (auto, gather or phases), else ``auto``."""
    return os.environ.get("VKCONV_CONVT_METHOD", "") or "auto"


def _three(values: tuple[int, ...]) -> tuple[int, int, int]:
    a, b, c = values
    return a, b, c


def _lift3(values, unit: int, nd: int) -> tuple[int, int, int]:
    """Per-axis values of an ``nd``-D op as (D, H, W): missing leading axes get ``unit``."""
    return (unit,) * (3 - nd) + tuple(values)


def choose_tile(ctx: Context, cout_g: int) -> tuple[int, int]:
    """(pixels, vec4s of output channels) per invocation, one of :data:`TILES`.

    A CPU implementation (lavapipe) runs 8 invocations per SIMD instruction and pays a gather for
    every lane-varying load, so the biggest register tile wins: measured on lavapipe, 8 pixels x 32
    channels took 0.8x the CPU time of 8 x 16 and 0.55x that of 4 x 8.  On GPUs 4 x 8 keeps 32
    accumulators per invocation, leaving registers for occupancy (not measured on a GPU yet).
    Narrow layers get the smallest channel block that holds them, to waste no padded channels.
    """
    tiles = TILES[2:] if ctx.info.type == "cpu" else TILES[:2]
    return fitting_tile(tiles, cout_g, lambda tile: 4 * tile[1])


def pack_weights(w: np.ndarray, group: int, oc_block: int) -> np.ndarray:
    """``[C_in, C_out/g, *k]`` -> ``[g, ceil(C_out/g / oc_block), prod(k), C_in/g, oc_block]``,
    zero-padded."""
    cin, cout_g = w.shape[:2]
    cin_g = cin // group
    blocks = -(-cout_g // oc_block)
    taps = int(np.prod(w.shape[2:]))
    packed = np.zeros((group, cin_g, blocks * oc_block, taps), np.float32)
    packed[:, :, :cout_g] = w.reshape(group, cin_g, cout_g, taps)
    packed = packed.reshape(group, cin_g, blocks, oc_block, taps)
    return np.ascontiguousarray(packed.transpose(0, 2, 4, 1, 3))


class ConvTranspose(WeightedOp):
    """A transposed convolution whose weights stay on the device; call it with inputs of any
    batch/size (``[N, C_in, *spatial]`` -> ``[N, C_out, *out]``).

    ``output_shape`` (spatial dims only) or ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID decide
    the pads per input shape, as in ONNX; then ``pads`` is ignored.  ``output_padding`` must be
    below the stride on each axis.  The first call at a new input shape records a
    command buffer; later calls at that shape reuse it (one submit each).

    ``method``: ``"phases"`` (the stride-phase decomposition on the dense convolution kernels, or
    the 1x1 GEMM where kernel == stride; the gather kernel where neither applies), ``"gather"`` (the
    gather kernel always) or ``"auto"`` (:meth:`method_for` says the rule); None reads
    ``VKCONV_CONVT_METHOD``, default ``auto``.
    """

    weight_shape: tuple[int, ...]  # set by set_weights

    def __init__(self, w: np.ndarray, b: np.ndarray | None = None, *, strides=1, pads=0,
                 dilations=1, group: int = 1, output_padding=0, output_shape=None,
                 auto_pad: str = "NOTSET", activation=None, method: str | None = None,
                 ctx: Context | None = None):
        method = default_method() if method is None else method
        if method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        super().__init__(w, ranks=(3, 4, 5), strides=strides, pads=pads, dilations=dilations, group=group,
                         activation=activation, ctx=ctx)
        w = np.asarray(w)
        self.output_padding = shapes.spatial("output_padding", output_padding, self.nd, minimum=0)
        # The spec's "less than stride/dilation" is ambiguous; onnx.reference and onnxruntime both
        # reject output_padding >= stride, so we do too.
        if any(a >= s for a, s in zip(self.output_padding, self.strides)):
            raise ValueError(f"output_padding: each value must be < its stride; got "
                             f"{self.output_padding} with strides {self.strides}")
        self.target_shape = (None if output_shape is None
                             else shapes.spatial("output_shape", output_shape, self.nd, minimum=1))
        ones = (1,) * self.nd
        shapes.resolve_conv_transpose_pads(auto_pad, ones, ones, ones, ones, ones)  # validates the name
        self.auto_pad = auto_pad
        self.local_size = self.ctx.local_size()
        self.pix, ocv = choose_tile(self.ctx, w.shape[1])
        self.oc_block = 4 * ocv
        self.pipeline = get_pipeline(self.ctx, f"conv_transpose_{self.pix}x{self.oc_block}", 4, _PUSH.size,
                                          (self.local_size, 1, 1, self.activation))
        self._w: np.ndarray | None = None  # the host weights and bias (None once closed)
        self._b: np.ndarray | None = None
        self._gather: tuple[Buffer, Buffer] | None = None  # the gather kernel's packed weights, bias
        self._gemm: Kernel | None = None  # the 1x1 GEMM of the kernel == stride path, made on first use
        self._phase_kernels: dict[tuple, Kernel] = {}  # by (kernel name, k0, taps), made on first use
        self.set_weights(w, b)

    first_axis = "input"

    def output_channels(self, w_shape: tuple[int, ...]) -> int:
        return w_shape[1] * self.group  # W is [C_in, C_out / group, *k]

    # -- weights -------------------------------------------------------------------------------
    def _adopt_weights(self, state) -> None:
        # The device copies are made by the first plan that needs them, in its method's layout.
        self._w, self._b = state

    def _host_weights(self) -> np.ndarray:
        if self._w is None:
            raise VkconvError("this ConvTranspose was closed")
        return self._w

    def _gather_weights(self) -> tuple[Buffer, Buffer]:
        if self._gather is None:
            w = self._host_weights()
            cout = self.output_channels(w.shape)
            weights = upload_constant(self.ctx, pack_weights(w, self.group, self.oc_block), "conv_transpose weights")
            try:
                bias = upload_constant(self.ctx, pack_bias_blocks(self._b, cout, self.group, self.oc_block),
                                       "conv_transpose bias")
            except BaseException:
                weights.close()
                raise
            self._gather = (weights, bias)
        return self._gather

    # -- shapes --------------------------------------------------------------------------------
    def _shapes(self, x_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return shapes.conv_transpose_output_shape(x_shape, self.weight_shape, self.strides, self.pads,
                                                  self.dilations, self.group, self.output_padding,
                                                  self.target_shape, self.auto_pad)

    def resolved_pads(self, x_shape) -> tuple[int, ...]:
        """ONNX pads ``(begin..., end...)`` used for an input of ``x_shape`` (may be negative when
        ``output_shape`` asks for more than the natural size)."""
        return self._shapes(x_shape)[1]

    def output_shape(self, x_shape) -> tuple[int, ...]:
        """Output shape ``[N, C_out, *out]`` for an input of ``x_shape``; ValueError if it does not fit."""
        return self._shapes(x_shape)[0]

    # -- execution -----------------------------------------------------------------------------
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``[N, C_in, *spatial]`` float32 -> ``[N, C_out, *out]`` float32."""
        x = shapes.as_float32("x", x, self.nd + 2)
        y_shape = self.output_shape(x.shape)
        if 0 in y_shape:  # zero input channels still give the bias: only an empty output skips the device
            return np.zeros(y_shape, np.float32)
        with self._lock:
            return self._plan(x.shape, y_shape).run([x])[0]

    def plan(self, x_shape) -> Plan:
        """The recorded plan for inputs of ``x_shape`` (built on first use, then cached); its ``body``
        records the dispatches alone (a device-resident graph replays them)."""
        x_shape = tuple(int(s) for s in x_shape)
        y_shape = self.output_shape(x_shape)
        with self._lock:
            return self._plan(x_shape, y_shape)

    def _plan(self, x_shape, y_shape) -> Plan:
        return self._plans.get(tuple(x_shape), lambda: self._build_plan(x_shape, y_shape))

    def _dispatch_geometry(self, x_shape, y_shape) -> tuple[bytes, tuple[int, int, int]]:
        """Push constants and workgroup counts, checked against the device before anything is
        allocated."""
        nd = self.nd
        cin, cout_g, *kernel = self.weight_shape
        pads = self.resolved_pads(x_shape)
        in_size = _lift3(x_shape[2:], 1, nd)
        out_size = _lift3(y_shape[2:], 1, nd)
        k = _lift3(kernel, 1, nd)
        s = _lift3(self.strides, 1, nd)
        d = _lift3(self.dilations, 1, nd)
        pad_begin = _lift3(pads[:nd], 0, nd)
        tap_step = tuple(si // math.gcd(si, di) for si, di in zip(s, d))
        # Shift every tap's numerator o + pad_begin - k * d to >= 0 by whole strides (see shader).
        lift = tuple(max(0, -(-(di * (ki - 1) - pb) // si)) for ki, si, di, pb in zip(k, s, d, pad_begin))
        off = tuple(pb + li * si for pb, li, si in zip(pad_begin, lift, s))
        oc_blocks = -(-cout_g // self.oc_block)
        w_cols = -(-out_size[2] // s[2])  # output columns per stride phase, rounded up
        w_blocks = -(-w_cols // self.pix)
        items = s[0] * s[1] * s[2] * -(-out_size[0] // s[0]) * -(-out_size[1] // s[1]) * w_blocks
        act = self.activation
        push = _PUSH.pack(*in_size, cin // self.group, *out_size, cout_g, *k, self.group, *s, oc_blocks,
                          *d, w_blocks, *tap_step, act.a, *off, act.b, *lift)
        groups = (-(-items // self.local_size), self.group * oc_blocks, x_shape[0])
        limit = self.ctx.info.max_workgroup_count
        if items > _INT32_MAX - self.local_size or max(off) + max(out_size) > _INT32_MAX:
            raise ValueError(f"x: shape {x_shape} gives output {y_shape}, too large for 32-bit indexing")
        for axis, (g, m) in enumerate(zip(groups, limit)):
            if g > m:
                what = ("x", "w", "x")[axis]
                raise ValueError(f"{what}: {groups} workgroups for x {x_shape} and w {self.weight_shape} "
                                 f"exceed the device's maxComputeWorkGroupCount {limit}")
        return push, groups

    def _gemm_geometry(self, x_shape, y_shape) -> Geometry | None:
        """The 1x1 GEMM (lifted to 3-D) of the kernel == stride path for this input, None when the
        layer is not of that kind or the GEMM does not fit the device."""
        kernel = self.weight_shape[2:]
        if self.weight_shape[0] == 0 or tuple(kernel) != self.strides or any(d != 1 for d in self.dilations) \
                or any(self.resolved_pads(x_shape)) \
                or tuple(y_shape[2:]) != tuple(i * s for i, s in zip(x_shape[2:], self.strides)):
            return None
        taps = math.prod(kernel)
        x5 = tuple(x_shape[:2]) + (1,) * (3 - self.nd) + tuple(x_shape[2:])
        cout = self.weight_shape[1] * self.group
        one, zero = (1, 1, 1), (0,) * 6
        geo = Geometry.lift(x5, (cout * taps, x_shape[1] // self.group, 1, 1, 1), self.group, one, one, zero,
                            (x5[0], cout * taps, *x5[2:]))
        return geo if self._gemm_kernel().fits(geo) else None

    def _gemm_kernel(self) -> Kernel:
        if self._gemm is None:
            # w [C_in, C_out/g, *k] -> [g, C_out/g, taps, C_in/g]: output channel (co, tap) of the GEMM
            cin, cout_g, *kernel = self.weight_shape
            taps, cin_g = math.prod(kernel), cin // self.group
            w2 = self._host_weights().reshape(self.group, cin_g, cout_g, taps).transpose(0, 2, 3, 1)
            b2 = None if self._b is None else np.repeat(self._b, taps)
            self._gemm = make_kernel("gemm1x1", self.ctx, w2.reshape(-1, cin_g, 1, 1, 1), b2, self.group,
                                     self.activation, tuning(self.ctx, False))
        return self._gemm

    def _build_gemm_plan(self, geo: Geometry, x_shape, y_shape) -> Plan:
        """The GEMM's plan, its output kept as scratch and ``y`` in its place, re-recorded with the
        shuffle pass after the GEMM."""
        plan = self._gemm_kernel().plan(geo)
        with closed_on_error(plan):
            columns, gemm = plan.outputs[0], plan.body
            assert gemm is not None
            plan.keep.append(columns)
            plan.outputs[0] = Buffer(self.ctx, 4 * math.prod(y_shape), staged=True, name="conv_transpose output")
            plan.output_shapes[0] = tuple(y_shape)
            out = (1,) * (3 - self.nd) + tuple(y_shape[2:])
            vec4 = geo.size[2] % 4 == 0
            lanes = 4 * out[2] // geo.size[2] if vec4 else 1  # 4 columns of each column-tap plane
            total = math.prod(y_shape) // lanes
            local = self.ctx.local_size(LOOP_LOCAL)
            pipe = get_pipeline(self.ctx, "conv_transpose_shuffle", 2, _SHUFFLE_PUSH.size,
                                     (local, 1, 1, 0, *((1,) * (3 - self.nd) + self.strides), int(vec4)))
            dset = DescriptorSet(pipe, [columns, plan.outputs[0]])
            plan.keep.append(dset)
            push = _SHUFFLE_PUSH.pack(*magic(out[2] // lanes), *magic(out[1]), *magic(out[0]), *geo.size, *out, total)
            groups = looped_grid(self.ctx, total, local)

            def body(cmd: CommandBuffer) -> None:
                gemm(cmd)
                cmd.barrier()
                cmd.dispatch(pipe, dset, push, groups)
            plan.record(body)
        return plan

    def _phases(self, x_shape, y_shape) -> list[Phase] | None:
        """The stride phases of this layer at this input (all axes' combinations), None where the
        decomposition does not apply (:func:`axis_phases`, or no input channels)."""
        if self.weight_shape[0] == 0:
            return None
        pads = self.resolved_pads(x_shape)
        axes = []
        for args in zip(_lift3(x_shape[2:], 1, self.nd), _lift3(y_shape[2:], 1, self.nd),
                        _lift3(self.weight_shape[2:], 1, self.nd), _lift3(self.strides, 1, self.nd),
                        _lift3(self.dilations, 1, self.nd), _lift3(pads[:self.nd], 0, self.nd)):
            phases = axis_phases(*args)
            if phases is None:
                return None
            axes.append(phases)
        combos = []
        for combo in itertools.product(*axes):
            r, count, k0, taps, begin, end = (tuple(int(v) for v in values) for values in zip(*combo))
            combos.append(Phase(_three(r), _three(count), _three(k0), _three(taps), _three(begin), _three(end)))
        return combos

    def _phase_geometry(self, phase: Phase, x_shape, y_shape) -> Geometry:
        """The stride-1 convolution of one phase; a single phase (all strides 1) keeps the op's own
        shapes, so that the dense kernel's plan serves as this op's."""
        cin, cout_g = self.weight_shape[:2]
        size = _lift3(x_shape[2:], 1, self.nd)
        single = all(s == 1 for s in self.strides)
        y = tuple(y_shape) if single else (y_shape[0], y_shape[1], *phase.count)
        return Geometry(x_shape[0], self.group, cin // self.group, cout_g, size, phase.taps, (1, 1, 1),
                        _lift3(self.dilations, 1, self.nd), phase.pad_begin, phase.pad_end, phase.count,
                        tuple(x_shape), y)

    def _phase_kernel(self, phase: Phase, geo: Geometry) -> Kernel:
        """The dense kernel of one phase, its weights the phase's taps flipped, as Conv's
        ``[C_out, C_in/g, kd, kh, kw]``.  Several phases write one output through strided stores,
        which only the implicit-GEMM kernel has; a single phase (all strides 1) takes whatever kernel
        a convolution of its shape would (Winograd for a 3x3, say), where its pads are no crop."""
        single = all(s == 1 for s in self.strides)
        name = "implicit_gemm"
        if single and min(geo.pad_begin + geo.pad_end) >= 0:
            name = select(geo, self.ctx.info.type)
        key = (name, phase.k0, phase.taps)
        kernel = self._phase_kernels.get(key)
        if kernel is None:
            cin, cout_g = self.weight_shape[:2]
            w5 = self._host_weights().reshape(cin, cout_g, *_lift3(self.weight_shape[2:], 1, self.nd))
            s = _lift3(self.strides, 1, self.nd)
            idx = [k0 + si * np.arange(t)[::-1] for k0, si, t in zip(phase.k0, s, phase.taps)]
            sub = w5[:, :, idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]]
            cin_g = cin // self.group
            wc = sub.reshape(self.group, cin_g, cout_g, *phase.taps).transpose(0, 2, 1, 3, 4, 5)
            kernel = self._phase_kernels[key] = make_kernel(
                name, self.ctx, np.ascontiguousarray(wc.reshape(self.group * cout_g, cin_g, *phase.taps)),
                self._b, self.group, self.activation, tuning(self.ctx, False))
        return kernel

    def method_for(self, x_shape) -> str:
        """The path taken for inputs of ``x_shape``: ``"gemm"`` (kernel == stride: a 1x1 GEMM and a
        shuffle), ``"phases"`` or ``"gather"``.  ``auto`` takes the GEMM wherever it applies and the
        phases on CPU devices, where they measured faster than the gather kernel on every layer
        tried (docs/PERFORMANCE.md); on other devices, where the phases were not measured yet, the
        gather kernel."""
        x_shape = tuple(int(v) for v in x_shape)
        y_shape = self.output_shape(x_shape)
        with self._lock:
            return self._method(x_shape, y_shape)[0]

    def _method(self, x_shape, y_shape) -> tuple[str, Geometry | list[tuple[Phase, Geometry, Kernel]] | None]:
        """(method, what its plan builder takes): the GEMM's geometry, the phases' (phase, geometry,
        kernel) triples, or None for the gather kernel."""
        if self.method == "gather":
            return "gather", None
        gemm = self._gemm_geometry(x_shape, y_shape)
        if gemm is not None:
            return "gemm", gemm
        if self.method == "auto" and self.ctx.info.type != "cpu":
            return "gather", None
        phases = self._phases(x_shape, y_shape)
        if phases is None:
            return "gather", None
        runs = []
        for phase in phases:
            geo = self._phase_geometry(phase, x_shape, y_shape)
            kernel = self._phase_kernel(phase, geo)
            if not kernel.fits(geo):
                return "gather", None
            runs.append((phase, geo, kernel))
        return "phases", runs

    def _build_phase_plan(self, runs, x_shape, y_shape) -> Plan:
        """One dense convolution per phase, each storing into every s-th output of ``y``; the phases
        write disjoint outputs, so they need no barrier between them."""
        if len(runs) == 1 and all(s == 1 for s in self.strides):
            _, geo, kernel = runs[0]
            return kernel.plan(geo)
        plan = ConvPlan(self.ctx, x_shape, y_shape)
        with closed_on_error(plan):
            od, oh, ow = _lift3(y_shape[2:], 1, self.nd)
            sd, sh, sw = _lift3(self.strides, 1, self.nd)
            recorders = []
            for phase, geo, kernel in runs:
                rd, rh, rw = phase.r
                out_map = OutputMap(od * oh * ow, (rd * oh + rh) * ow + rw, sd * oh * ow, sh * ow, sw)
                assert isinstance(kernel, RowsKernel)
                recorders.append(kernel.record(plan, geo, plan.inputs[0], plan.outputs[0], out_map))

            def body(cmd: CommandBuffer) -> None:
                for record in recorders:
                    record(cmd)
            plan.record(body)
        return plan

    def _build_plan(self, x_shape, y_shape) -> Plan:
        arg = self._method(x_shape, y_shape)[1]
        if isinstance(arg, Geometry):
            return self._build_gemm_plan(arg, x_shape, y_shape)
        if arg is not None:
            return self._build_phase_plan(arg, x_shape, y_shape)
        push, groups = self._dispatch_geometry(x_shape, y_shape)
        weights, bias = self._gather_weights()
        plan = Plan(self.ctx, [("conv_transpose input x", x_shape)], [("conv_transpose output", y_shape)])
        dset = DescriptorSet(self.pipeline, [plan.inputs[0], weights, bias, plan.outputs[0]])
        plan.keep.append(dset)
        plan.record(lambda cmd: cmd.dispatch(self.pipeline, dset, push, groups))
        return plan

    # -- lifetime ------------------------------------------------------------------------------
    def _release(self) -> None:
        self._plans.clear()
        for buf in (*(self._gather or ()), self._gemm, *self._phase_kernels.values()):
            if buf is not None:
                buf.close()
        self._phase_kernels.clear()
        self._gather = self._gemm = None
        self._w = self._b = None


def conv_transpose(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, strides=1, pads=0,
                   dilations=1, group: int = 1, output_padding=0, output_shape=None,
                   auto_pad: str = "NOTSET", activation=None, method: str | None = None) -> np.ndarray:
    """ONNX ``ConvTranspose`` on the Vulkan device for NCW, NCHW or NCDHW float32 input.

    ``w`` is ``[C_in, C_out / group, *kernel]``, ``b`` ``[C_out]``. ``strides``/``dilations``/
    ``output_padding``: an int or one per spatial dim. ``pads``: an int, one per spatial dim
    (symmetric), or ONNX order ``(begin..., end...)``. ``output_shape``: the spatial output size
    (pads are then derived from it, as ONNX says). ``auto_pad``: NOTSET, SAME_UPPER, SAME_LOWER or
    VALID. ``activation``: see :meth:`vkconv.kernels.activation.Activation.parse`. ``method``:
    see :class:`ConvTranspose`.  Returns ``[N, C_out, *out]`` float32. Raises ValueError naming the bad argument.
    """
    x, w = shapes.input_and_weights(x, w)
    with ConvTranspose(w, b, strides=strides, pads=pads, dilations=dilations, group=group,
                       output_padding=output_padding, output_shape=output_shape, auto_pad=auto_pad,
                       activation=activation, method=method) as op:
        return op(x)
