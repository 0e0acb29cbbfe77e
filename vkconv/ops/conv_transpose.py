"""Transposed convolution (ONNX ``ConvTranspose``) for 1-D, 2-D and 3-D inputs: host side of
``shaders/conv/conv_transpose.comp``.

Layouts: input ``x`` is NCW, NCHW or NCDHW; weights ``w`` are ``[C_in, C_out / group, *kernel]``
(ONNX's, the transpose of Conv's); bias ``b`` is ``[C_out]``; the output is ``[N, C_out, *out]``;
all float32.  1-D and 2-D inputs run as 3-D ones with unit leading spatial dims.

Two paths run a layer on the dense convolution kernels, both built on the stride-phase
decomposition: along an axis of stride ``s``, the outputs ``o = q * s + r`` of phase ``r`` take
only the taps ``k`` with ``k * d = r + pad_begin (mod s)``, which for ``gcd(s, d) == 1`` are
``k0, k0 + s, ...``, and read inputs ``q + c - d * t`` for tap ``k0 + s * t``: an ordinary stride-1
convolution (dilation ``d``) of the input with that sub-kernel flipped.

* ``phases``: each of the ``prod(strides)`` phases runs on the dense convolution's implicit-GEMM
  kernel (``conv_rows``) and stores its pixels straight into every ``s``-th output (a strided
  store), so there is no scratch output and no interleave pass; with all strides 1 the one phase
  takes the kernel a ``Conv`` of its shape would.
* ``subpixel``: all phases as one stride-1 convolution.  Phase ``r`` reads inputs that all lie in
  one window ``q - B .. q - B + K - 1`` (``B`` the largest phase begin pad, ``K`` spanning every
  phase's taps), so a convolution with that ``K``-wide kernel and ``C_out * prod(strides)`` output
  channels (channel ``co * P + r``: the phase's taps at their places in the window, zeros
  elsewhere) computes every phase at once; a Winograd kernel's output transform stores each phase
  straight into place, after any other kernel a shuffle pass
  (``shaders/conv/conv_transpose_shuffle.comp``) moves each phase's plane there (the
  depth-to-space of ESPCN).  A kernel equal to its stride (the 2x2 stride-2 upsamplers of PP-OCR
  and U-Net) makes it a 1x1 GEMM, 2-4x faster than the gather kernel on lavapipe; the 4x4 stride-2
  pad-1 upsampler makes it a 3x3 convolution, which the Winograd kernels run with 0.56x the phases'
  multiplications despite the window's zeros.

A layer the decomposition does not cover runs on the gather kernel
(``shaders/conv/conv_transpose.comp``): a dilation sharing a factor with its stride (some residues
then get no taps), a kernel shorter than its stride where a phase gets no tap, or no input
channels.  docs/PERFORMANCE.md has the measurements behind ``method="auto"``.

With ``method="auto"`` the path (and the dense kernels' register tile) of each input shape comes,
as for :class:`vkconv.Conv`, from the tuning cache, the tuner (``tune=True`` / ``VKCONV_TUNE=1``:
:func:`vkconv.ops.tune.search` over :class:`TransposeCandidate`) or the heuristic rule of
:meth:`ConvTranspose.method_for`; :meth:`ConvTranspose.choice_for` says which.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.divide import magic
from vkconv.kernels.tiling import Tuning, fitting_tile, tuning
from vkconv.ops.base import WeightedOp
from vkconv.ops.conv.kernels import (
    ConvPlan,
    Geometry,
    Kernel,
    OutputMap,
    RowsKernel,
    WinogradKernel,
    make_kernel,
    pack_bias_blocks,
)
from vkconv.ops.conv.selection import register_tiles, select
from vkconv.ops.launch import heuristic_launch
from vkconv.ops.tune import (
    Agreement,
    Choice,
    TimedPlan,
    TuneResult,
    budget_ms,
    cached_candidate,
    measured_choice,
    search,
    store_result,
    tune_mode,
)
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context
from vkconv.runtime.errors import VkconvError
from vkconv.runtime.pipeline import DescriptorSet, get_pipeline
from vkconv.runtime.plan import Plan, closed_on_error
from vkconv.runtime.transfer import upload_constant

log = logging.getLogger(__name__)

# in_size, cin_g, out_size, cout_g, kernel, groups, stride, oc_blocks, dil, w_blocks, tap_step,
# act_a, off, act_b, lift: std430 ivec3s are 16-byte aligned, hence the interleaved scalars.
_PUSH = struct.Struct("<3ii3ii3ii3ii3ii3if3if3i")
_SHUFFLE_PUSH = struct.Struct("<6I7i")
# Compiled tiles: (output pixels of one W phase, vec4s of output channels) per invocation.
TILES = ((4, 1), (4, 2), (8, 1), (8, 2), (8, 4), (8, 8))
_INT32_MAX = 2**31 - 1
METHODS = ("auto", "gather", "phases")
RUN_METHODS = ("subpixel", "phases", "gather")  # what runs a shape (method_for's answers)
# The dense kernel family whose register tiles a path's candidates take (the rows kernels share
# one tile table, whichever of them the sub-pixel convolution selects).
_ROWS_FAMILY = {"subpixel": "implicit_gemm", "phases": "implicit_gemm"}
_TUNED_TILES = 6  # register tiles the tuner tries per path: the fastest of the speed table


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


@dataclass(frozen=True)
class TransposeCandidate:
    """One way to run a ConvTranspose shape: ``method`` (``subpixel``, ``phases`` or ``gather``, see
    :meth:`ConvTranspose.method_for`) and, for ``subpixel`` and ``phases``, the dense kernels' ``mb`` x
    ``pb`` register tile (output channels x pixels per invocation; 0: the heuristics' choice, as in
    :class:`vkconv.ops.conv.selection.Candidate`).  The gather kernel's tile follows the device."""

    method: str
    mb: int = 0
    pb: int = 0

    def __post_init__(self):
        if self.method not in RUN_METHODS:
            raise ValueError(f"candidate: method must be one of {', '.join(RUN_METHODS)}, got {self.method!r}")
        if self.mb % 4 or self.pb % 4 or min(self.mb, self.pb) < 0:
            raise ValueError(f"candidate: mb and pb must be multiples of 4, got {self}")
        if self.method == "gather" and (self.mb or self.pb):
            raise ValueError(f"candidate: the gather kernel takes no register tile, got {self}")

    def label(self) -> str:
        """Short text for tables and logs, e.g. ``phases 8x28``."""
        return f"{self.method} {self.mb}x{self.pb}" if self.mb or self.pb else self.method

    def to_json(self) -> dict:
        return {"method": self.method} | {k: v for k, v in (("mb", self.mb), ("pb", self.pb)) if v}

    @classmethod
    def from_json(cls, record: object) -> TransposeCandidate:
        """The candidate :meth:`to_json` wrote; ValueError for anything else."""
        if not isinstance(record, dict) or record.get("method") not in RUN_METHODS:
            raise ValueError(f"not a ConvTranspose candidate: {record!r}")
        return cls(record["method"], int(record.get("mb", 0)), int(record.get("pb", 0)))


def transpose_candidates(ctx: Context) -> list[TransposeCandidate]:
    """Every candidate the tuner may time on this device: each path, and the sub-pixel
    convolution's and the phases' register tiles (the fastest :data:`_TUNED_TILES` of the dense kernels' speed table
    within the device's accumulator bound).  Which can run a shape, :meth:`ConvTranspose.choice_for`
    finds out."""
    base = tuning(ctx, False)
    found = [TransposeCandidate(method) for method in RUN_METHODS]
    for method, family in _ROWS_FAMILY.items():
        found += [TransposeCandidate(method, mb, pb) for mb, pb in register_tiles(family, base)[:_TUNED_TILES]]
    return found


def _tile(kernel: str, cand: TransposeCandidate) -> tuple[int, int]:
    """``cand``'s register tile as dense kernel ``kernel`` takes it: the rows kernels' (MB, PB);
    none for the others (a single phase on ``depthwise`` or ``tiled``, whose tiles are their own)."""
    return (cand.mb, cand.pb) if kernel in ("implicit_gemm", "gemm1x1", "winograd", "winograd63") else (0, 0)


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

    ``method``: ``"phases"`` (the stride-phase decomposition on the dense convolution kernels: the
    sub-pixel convolution where the heuristic rule of :meth:`method_for` takes it, else one
    convolution per phase; the gather kernel where the decomposition does not apply), ``"gather"`` (the
    gather kernel always) or ``"auto"``; None reads ``VKCONV_CONVT_METHOD``, default ``auto``; a
    :class:`TransposeCandidate` forces a path and register tile (ValueError for a shape it cannot
    run).
    With ``auto``, each input shape's path and register tile come from the tuning cache, the tuner
    or the heuristic rule (:meth:`method_for`), as :class:`vkconv.Conv`'s kernel does.

    ``tune``: True measures the candidates (:class:`TransposeCandidate`: each path that can run the
    shape, then the register tiles of the fastest) of each new input shape the tuning cache lacks,
    within ``VKCONV_TUNE_BUDGET_MS``, and stores the fastest; False uses the heuristic rule only;
    None (the default) follows ``VKCONV_TUNE`` (``cache``: a cached choice where there is one,
    never timing).  A forced ``method`` (``gather``, ``phases``) is never tuned.
    """

    weight_shape: tuple[int, ...]  # set by set_weights

    def __init__(self, w: np.ndarray, b: np.ndarray | None = None, *, strides=1, pads=0,
                 dilations=1, group: int = 1, output_padding=0, output_shape=None,
                 auto_pad: str = "NOTSET", activation=None, method: str | TransposeCandidate | None = None,
                 ctx: Context | None = None, tune: bool | str | None = None):
        self.forced = method if isinstance(method, TransposeCandidate) else None
        method = default_method() if method is None else method
        if self.forced is not None:
            method = self.forced.method
        elif method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        self.method = method
        self.tune_mode = tune_mode(tune)
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
        # The sub-pixel convolution's and the phases' dense kernels, made on first use, by (kernel
        # name, register tile ((mb, pb); (0, 0) the heuristics')) and, for the phases, (k0, taps).
        self._subpixel_kernels: dict[tuple, Kernel] = {}
        self._phase_kernels: dict[tuple, Kernel] = {}
        self._choices: dict[tuple[int, ...], Choice[TransposeCandidate]] = {}  # by input shape
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

    def _subpixel(self, x_shape, y_shape) -> tuple[Geometry, tuple] | None:
        """The sub-pixel convolution of this layer at this input (lifted to 3-D; output
        ``[N, C_out * P, *J]``, ``J`` the outputs of phase 0 per axis) and the key of its weights
        (window ``K``, begin pad ``B`` and the phases' ``(k0, taps, c)`` per axis); None where the
        phases do not apply or some residue has no output (an output shorter than the stride)."""
        per_axis = self._axis_phases(x_shape, y_shape)
        if per_axis is None:
            return None
        size3 = _lift3(x_shape[2:], 1, self.nd)
        window, begin, out, pad_end, axes = [], [], [], [], []
        for phases, size, stride, dil in zip(per_axis, size3, _lift3(self.strides, 1, self.nd),
                                             _lift3(self.dilations, 1, self.nd)):
            if len(phases) != stride:
                return None
            # phase (r, count, k0, taps, conv begin, conv end) reads inputs q + c - d * t
            c = [dil * (taps - 1) - b for _, _, _, taps, b, _ in phases]
            b_max = max(b for *_, b, _ in phases)
            window.append(max(c) + b_max + 1)
            begin.append(b_max)
            out.append(phases[0][1])
            pad_end.append(out[-1] - size - b_max + window[-1] - 1)
            axes.append(tuple((k0, taps, ci) for (_, _, k0, taps, _, _), ci in zip(phases, c)))
        x5 = tuple(x_shape[:2]) + tuple(size3)
        cout_p = self.weight_shape[1] * self.group * math.prod(self.strides)
        geo = Geometry.lift(x5, (cout_p, x_shape[1] // self.group, *window), self.group, (1, 1, 1), (1, 1, 1),
                            (*begin, *pad_end), (x5[0], cout_p, *out))
        return geo, (tuple(window), tuple(begin), tuple(axes))

    def _tuning(self, cand: TransposeCandidate) -> Tuning:
        """The dense kernels' launch choices: fp32 weights, ``cand``'s register tile."""
        return dataclasses.replace(tuning(self.ctx, False), mb=cand.mb, pb=cand.pb)

    def _subpixel_family(self, geo: Geometry) -> str:
        """The dense kernel family of the sub-pixel convolution ``geo``: the one a ``Conv`` of its
        shape would take, ``implicit_gemm`` where its pads crop."""
        return select(geo, self.ctx.info.type) if min(geo.pad_begin + geo.pad_end) >= 0 else "implicit_gemm"

    def _subpixel_kernel(self, geo: Geometry, key: tuple, cand: TransposeCandidate) -> Kernel:
        """The dense kernel of the sub-pixel convolution (:meth:`_subpixel_family`) with ``cand``'s
        register tile.  Weights ``[C_out * P, C_in/g, *K]``: phase ``r`` of output channel ``co`` is
        channel ``co * P + r`` (``r`` numbered (rd, rh, rw) row-major, as the Winograd store and the
        shuffle read it), tap ``k0 + s * t`` at window place ``B + c - d * t``."""
        name = self._subpixel_family(geo)
        kernel_key = (name, *_tile(name, cand), key)
        kernel = self._subpixel_kernels.get(kernel_key)
        if kernel is None:
            window, begin, axes = key
            cin, cout_g = self.weight_shape[:2]
            cin_g = cin // self.group
            s = _lift3(self.strides, 1, self.nd)
            d = _lift3(self.dilations, 1, self.nd)
            w5 = self._host_weights().reshape(self.group, cin_g, cout_g, *_lift3(self.weight_shape[2:], 1, self.nd))
            wu = np.zeros((self.group, cout_g, math.prod(s), cin_g, *window), np.float32)
            for r in itertools.product(*(range(si) for si in s)):
                phase = (r[0] * s[1] + r[1]) * s[2] + r[2]
                (k0d, td, cd), (k0h, th, ch), (k0w, tw, cw) = (axes[a][r[a]] for a in range(3))
                for t in itertools.product(range(td), range(th), range(tw)):
                    k = (k0d + s[0] * t[0], k0h + s[1] * t[1], k0w + s[2] * t[2])
                    u = tuple(begin[a] + (cd, ch, cw)[a] - d[a] * t[a] for a in range(3))
                    wu[:, :, phase, :, u[0], u[1], u[2]] = w5[:, :, :, k[0], k[1], k[2]].transpose(0, 2, 1)
            bias = None if self._b is None else np.repeat(self._b, math.prod(s))
            kernel = self._subpixel_kernels[kernel_key] = make_kernel(
                name, self.ctx, wu.reshape(-1, cin_g, *window), bias, self.group, self.activation,
                self._tuning(TransposeCandidate(cand.method, *_tile(name, cand))))
        return kernel

    def _build_subpixel_plan(self, geo: Geometry, kernel: Kernel, y_shape) -> Plan:
        """The sub-pixel convolution's plan.  A Winograd kernel stores each phase straight into ``y``
        from its output transform; any other kernel's output is kept as scratch and ``y`` takes its
        place, the plan re-recorded with the shuffle pass after the convolution."""
        if isinstance(kernel, WinogradKernel):  # 2-D: phases (rh, rw) of a 3x3 window
            plan = ConvPlan(self.ctx, geo.x_shape, y_shape)
            with closed_on_error(plan):
                phases = (*self.strides[-2:], *y_shape[-2:])
                plan.record(kernel.record(plan, geo, plan.inputs[0], plan.outputs[0], phases))
            return plan
        plan = kernel.plan(geo)
        with closed_on_error(plan):
            columns, conv = plan.outputs[0], plan.body
            assert conv is not None
            plan.keep.append(columns)
            plan.outputs[0] = Buffer(self.ctx, 4 * math.prod(y_shape), staged=True, name="conv_transpose output")
            plan.output_shapes[0] = tuple(y_shape)
            out = (1,) * (3 - self.nd) + tuple(y_shape[2:])
            strides = (1,) * (3 - self.nd) + self.strides
            # 4 columns of each column-phase plane at a time where the phase planes tile the output
            vec4 = geo.out[2] % 4 == 0 and out[2] == geo.out[2] * strides[2]
            lanes = 4 * strides[2] if vec4 else 1
            total = math.prod(y_shape) // lanes
            launch = heuristic_launch(self.ctx, "conv_transpose_shuffle")  # not tuned: a convolution's tail
            local = launch.local
            pipe = get_pipeline(self.ctx, "conv_transpose_shuffle", 2, _SHUFFLE_PUSH.size,
                                (local, 1, 1, 0, *strides, int(vec4)))
            dset = DescriptorSet(pipe, [columns, plan.outputs[0]])
            plan.keep.append(dset)
            push = _SHUFFLE_PUSH.pack(*magic(out[2] // lanes), *magic(out[1]), *magic(out[0]), *geo.out, *out, total)
            groups = launch.groups(self.ctx, total)

            def body(cmd: CommandBuffer) -> None:
                conv(cmd)
                cmd.barrier()
                cmd.dispatch(pipe, dset, push, groups)
            plan.record(body)
        return plan

    def _axis_phases(self, x_shape, y_shape) -> list[list[tuple[int, int, int, int, int, int]]] | None:
        """:func:`axis_phases` of each axis (D, H, W) of this layer at this input; None where the
        decomposition does not apply to an axis, or the layer has no input channels."""
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
        return axes

    def _phases(self, x_shape, y_shape) -> list[Phase] | None:
        """The stride phases of this layer at this input (all axes' combinations), None where the
        decomposition does not apply (:meth:`_axis_phases`)."""
        axes = self._axis_phases(x_shape, y_shape)
        if axes is None:
            return None
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

    def _phase_kernel(self, phase: Phase, geo: Geometry, cand: TransposeCandidate) -> Kernel:
        """The dense kernel of one phase, its weights the phase's taps flipped, as Conv's
        ``[C_out, C_in/g, kd, kh, kw]``.  Several phases write one output through strided stores,
        which only the implicit-GEMM kernel has; a single phase (all strides 1) takes whatever kernel
        a convolution of its shape would (Winograd for a 3x3, say), where its pads are no crop."""
        single = all(s == 1 for s in self.strides)
        name = "implicit_gemm"
        if single and min(geo.pad_begin + geo.pad_end) >= 0:
            name = select(geo, self.ctx.info.type)
        key = (name, phase.k0, phase.taps, *_tile(name, cand))
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
                self._b, self.group, self.activation, self._tuning(TransposeCandidate(cand.method, *key[3:])))
        return kernel

    def method_for(self, x_shape) -> str:
        """The path taken for inputs of ``x_shape``: ``"subpixel"`` (one convolution to every phase,
        each stored into place), ``"phases"`` (one convolution per phase) or ``"gather"``.  The heuristic
        rule (``method="auto"`` without a tuned choice) takes the sub-pixel convolution where it is
        a 1x1 GEMM (kernel == stride) or runs on a Winograd kernel (:meth:`_subpixel_pays`), else
        the phases on CPU devices, where they measured faster than the gather kernel on every layer
        tried (docs/PERFORMANCE.md); on other devices, where the phases were not measured yet, the
        gather kernel.  :meth:`choice_for` gives the register tile too, and where the choice came
        from."""
        return self.choice_for(x_shape).candidate.method

    def choice_for(self, x_shape) -> Choice[TransposeCandidate]:
        """The candidate a call with input shape ``x_shape`` runs and where it came from
        (``forced``, ``cache``, ``tuner``, ``heuristic``); with ``tune`` on, a shape the cache lacks
        is tuned here.  Made once per shape and op."""
        x_shape = tuple(int(v) for v in x_shape)
        y_shape = self.output_shape(x_shape)
        with self._lock:
            return self._choice(x_shape, y_shape)

    def choices(self) -> dict[tuple[int, ...], Choice[TransposeCandidate]]:
        """Input shape -> choice, for every shape this op has chosen a path for."""
        with self._lock:
            return dict(self._choices)

    def signature(self, x_shape) -> str:
        """The tuning cache's key for input shape ``x_shape``: everything the paths' speed depends on."""
        x_shape = tuple(int(v) for v in x_shape)
        return self._signature(x_shape, self.output_shape(x_shape))

    def _signature(self, x_shape, y_shape) -> str:
        def t(v) -> str:
            return ",".join(map(str, v))
        return (f"ConvTranspose x={t(x_shape)} w={t(self.weight_shape)} g={self.group} s={t(self.strides)} "
                f"d={t(self.dilations)} pad={t(self.resolved_pads(x_shape))} out={t(y_shape[2:])} "
                f"texel={int(tuning(self.ctx, False).texel)}")

    def _choice(self, x_shape, y_shape) -> Choice[TransposeCandidate]:
        choice = self._choices.get(x_shape)
        if choice is None:
            choice = self._choices[x_shape] = self._choose(x_shape, y_shape)
            log.debug("conv_transpose %s x%s: %s", self.weight_shape, x_shape, choice)
        return choice

    def _choose(self, x_shape, y_shape) -> Choice[TransposeCandidate]:
        if self.forced is not None:
            if self._runs(self.forced, x_shape, y_shape) is None:
                raise ValueError(f"method: {self.forced.label()!r} cannot run x of shape {x_shape}")
            return Choice(self.forced, "forced")
        if self.method != "auto":
            return Choice(self._heuristic(x_shape, y_shape), "forced")
        return measured_choice(self.tune_mode, lambda: self._cached(x_shape, y_shape),
                               lambda: self._autotune(x_shape, y_shape, budget_ms()).best,
                               lambda: self._heuristic(x_shape, y_shape))

    def _heuristic(self, x_shape, y_shape) -> TransposeCandidate:
        """The rule of :meth:`method_for` (with ``method="phases"``: the phases on any device)."""
        tried = {"gather": (), "phases": ("subpixel", "phases")}.get(self.method)
        if tried is None:  # auto
            tried = ("subpixel", "phases") if self.ctx.info.type == "cpu" else ("subpixel",)
        for method in tried:
            cand = TransposeCandidate(method)
            if method == "subpixel" and not self._subpixel_pays(x_shape, y_shape):
                continue
            if self._runs(cand, x_shape, y_shape) is not None:
                return cand
        return TransposeCandidate("gather")

    def _subpixel_pays(self, x_shape, y_shape) -> bool:
        """Whether the heuristic rule takes the sub-pixel convolution (never with all strides 1): where
        it is a 1x1 GEMM (kernel == stride, no pads: no zeros in its window), and where a Winograd
        kernel runs it (a 3x3 window) from 128 input channels on, for at most 4 phases (strides up
        to 2), with at most 0.6x the multiplications of the phases' direct convolutions (``P``
        phases x 2.25 or 1.78 per output against the phases' taps).  Measured on lavapipe, in turns
        with the phases (docs/PERFORMANCE.md): k4 s2 p1 and k5 s2 p2 (0.56x and 0.36x the
        multiplications) in 0.77-0.98x their time from 128 to 512 input channels, but 0.73-1.06x at
        64-96 (the transforms, over P x C_out output channels, weigh against a short GEMM); with 9
        phases the output transform decides (k5 s3 p1 0.87-0.95x, k6 s3 p1 1.06x), which the rule
        leaves to the tuner; windows with zeros on the implicit-GEMM kernel took 1.2-2.4x."""
        found = self._subpixel(x_shape, y_shape)
        if found is None:
            return False
        geo, (_, _, axes) = found
        if math.prod(self.strides) == 1:
            return False  # one phase: the phases path runs the same convolution, with no shuffle
        if geo.pointwise:
            return True
        name = self._subpixel_family(geo)
        if name not in ("winograd", "winograd63"):
            return False
        phases = math.prod(self.strides)
        per_output = 64 / 36 if name == "winograd63" else 36 / 16
        taps = math.prod(sum(t for _, t, _ in axis) for axis in axes)
        return geo.cin_g >= 128 and phases <= 4 and phases * per_output <= 0.6 * taps

    def _cached(self, x_shape, y_shape) -> TransposeCandidate | None:
        """The cache's candidate for this shape, if it can run here."""
        return cached_candidate(self.ctx, self._signature(x_shape, y_shape), TransposeCandidate.from_json,
                                lambda cand: None if self._runs(cand, x_shape, y_shape) is not None
                                else "its path does not apply or its buffers do not fit")

    def _runs(self, cand: TransposeCandidate, x_shape, y_shape) -> tuple | None:
        """What :meth:`_build_plan` takes to run ``cand`` at this shape: ``(geometry, kernel)`` of the
        sub-pixel convolution, ``(phase runs,)`` (each a (phase, geometry, kernel) triple) or ``()``
        for the gather kernel;
        None where ``cand`` cannot run it (its path does not apply, or its scratch buffers would
        not fit the device)."""
        if cand.method == "gather":
            return ()
        if cand.method == "subpixel":
            found = self._subpixel(x_shape, y_shape)
            if found is None:
                return None
            kernel = self._subpixel_kernel(*found, cand)
            return (found[0], kernel) if kernel.fits(found[0]) else None
        phases = self._phases(x_shape, y_shape)
        if phases is None:
            return None
        runs = []
        for phase in phases:
            geo = self._phase_geometry(phase, x_shape, y_shape)
            kernel = self._phase_kernel(phase, geo, cand)
            if not kernel.fits(geo):
                return None
            runs.append((phase, geo, kernel))
        return (runs,)

    def autotune(self, x_shape, budget: float | None = None) -> TuneResult[TransposeCandidate]:
        """Measure the candidates for inputs of ``x_shape`` now (whatever the cache holds and
        ``tune`` says), store the fastest in the tuning cache and use it from the next call on.
        ``budget``: ms of wall time (default ``VKCONV_TUNE_BUDGET_MS``, else 2000)."""
        x_shape = tuple(int(v) for v in x_shape)
        y_shape = self.output_shape(x_shape)
        limit = budget_ms(budget)
        with self._lock:
            result = self._autotune(x_shape, y_shape, limit)
            self._choices[x_shape] = Choice(result.best, "tuner")
            self._plans.drop(x_shape)
        return result

    def _autotune(self, x_shape, y_shape, limit: float) -> TuneResult[TransposeCandidate]:
        """:func:`vkconv.ops.tune.search` over this shape's paths, then the register tiles of the
        fastest, on seeded random data; each candidate's output must match the heuristic choice's
        (a wrong one is never chosen)."""
        x = np.random.default_rng(0).standard_normal(x_shape, dtype=np.float32)
        subpixel_before, phases_before = set(self._subpixel_kernels), set(self._phase_kernels)

        def measure(cand: TransposeCandidate) -> TimedPlan | None:
            runs = self._runs(cand, x_shape, y_shape)
            if runs is None:
                return None
            return agreement.timed(self.ctx, self._build(cand, runs, x_shape, y_shape), [x], cand.label())

        def methods(best: TransposeCandidate) -> list[TransposeCandidate]:
            return [TransposeCandidate(m) for m in RUN_METHODS if m != best.method]

        def tiles(best: TransposeCandidate) -> list[TransposeCandidate]:
            return [c for c in transpose_candidates(self.ctx) if c.method == best.method and (c.mb or c.pb)]

        def prior(cand: TransposeCandidate) -> float:
            # the gather kernel ran 1.4-3x the phases' time on lavapipe (docs/PERFORMANCE.md)
            return 3.0 if cand.method == "gather" and self.ctx.info.type == "cpu" else 1.0

        baseline = self._heuristic(x_shape, y_shape)
        agreement = Agreement(baseline.label(), 1e-3)
        result = search(baseline, [methods, tiles], measure, limit, prior)
        best = result.best
        for key in set(self._subpixel_kernels) - subpixel_before:  # the losers' weights
            if best.method != "subpixel" or key[1:3] != _tile(key[0], best):
                self._subpixel_kernels.pop(key).close()
        for phase_key in set(self._phase_kernels) - phases_before:
            if best.method != "phases" or phase_key[3:] != _tile(phase_key[0], best):
                self._phase_kernels.pop(phase_key).close()
        store_result(self.ctx, self._signature(x_shape, y_shape), result, TransposeCandidate.to_json, limit)
        return result

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
        cand = self._choice(x_shape, y_shape).candidate
        runs = self._runs(cand, x_shape, y_shape)
        if runs is None:
            raise VkconvError(f"ConvTranspose: {cand.label()} cannot run x of shape {x_shape} here")
        return self._build(cand, runs, x_shape, y_shape)

    def _build(self, cand: TransposeCandidate, runs: tuple, x_shape, y_shape) -> Plan:
        """The plan of ``cand`` from :meth:`_runs`' result."""
        if cand.method == "subpixel":
            return self._build_subpixel_plan(runs[0], runs[1], y_shape)
        if cand.method == "phases":
            return self._build_phase_plan(runs[0], x_shape, y_shape)
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
        for buf in (*(self._gather or ()), *self._subpixel_kernels.values(), *self._phase_kernels.values()):
            buf.close()
        self._subpixel_kernels.clear()
        self._phase_kernels.clear()
        self._gather = None
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
