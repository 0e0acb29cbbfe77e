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

Execution, recorded once per input shape and submitted once per call, one of two methods (a
:class:`DeformCandidate` per input shape, forced, from the tuning cache, measured by the tuner or from
the heuristics, as :class:`vkconv.Conv` chooses its kernel: :meth:`DeformConv.choice_for`).  Both start
with ``deform_conv_pack``, which copies ``x`` into blocks of 4 channels of one offset group (vec4 per
pixel) inside a one-pixel zero border, so that the bilinear corners of 4 channels are 4 vec4 fetches
with no per-corner test.

* ``fused`` (``deform_conv_fused.comp``; conv groups of 1 on devices with subgroup shuffles, the
  heuristic on CPU devices): one dispatch samples and multiplies.  The lanes of a subgroup share a
  tile of output pixels, each lane holding its own block of output channels; per (tap, offset
  group) a lane sets up the corners of its own pixels, per 4-channel block samples them and hands
  the samples to the other lanes by subgroup shuffles.  No sample is stored, and each is computed
  once per chunk of ``subgroup size x mb`` output channels (once in all up to 64 output channels
  on lavapipe's 8 lanes).  Bias and activation are fused into the store.
* ``columns``: per chunk of images (or of one image's pixels), ``deform_conv_sample`` writes the
  masked bilinear samples ("columns": row ``tap * C_in/g + channel`` of its conv group's GEMM
  operand) and the dense convolution's GEMM (``conv_rows`` through
  :meth:`vkconv.ops.conv.kernels.RowsKernel.tiled_operand`) multiplies them by the weights reordered
  to ``[C_out][tap][C_in/g]``, adding the bias and the fused activation.  The columns are
  tile-major, ``[image][group][pixel tile][row][PB pixels]`` (PB: the GEMM's pixel tile), which made
  the sampling stage's stores 2x faster on lavapipe than one long row per channel.  A sampling
  invocation reads the offsets and mask of its 4 pixels once (as one vec4 each when the output
  size is a multiple of 4), computes the 4 points' corners and weights once, and reuses them for
  every channel block of its offset group.  Chunks keep the column buffer within
  ``maxStorageBufferRange``; a chunk that is not the whole batch, or whose pixels do not fill whole
  GEMM tiles, is multiplied into a scratch output and copied into place.

Operands are read through texel buffers where the device's ``maxTexelBufferElements`` allows, else
(and with ``VKCONV_CONV_TEXEL=0``) through storage buffers.

Measured on lavapipe (2 shared cores, bench/deform.py; docs/PERFORMANCE.md has the tables): against
the dense 3x3 convolution of the same size (implicit GEMM; bench/deform.py's efficiency) the fused
method reaches 0.83-0.87 of its GFLOP/s at 64 channels with one offset group, 0.75-0.80 with four,
0.85-0.92 at 256 and 0.74-0.80 at 128 (Mesa 22.3 and 25.0); the columns method 0.48-0.57 at 64
channels: its sampling stage stored every sample (every storage-buffer store is a per-lane loop on
lavapipe), and its GEMM re-read them with none of the dense kernel's input reuse.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.tiling import Tuning, choose_mb, choose_pb, tuning
from vkconv.ops.base import WeightedOp
from vkconv.ops.conv.kernels import RowsKernel
from vkconv.ops.conv.selection import local_sizes, register_tiles, texel_choices
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
from vkconv.runtime.context import Context, vk
from vkconv.runtime.dispatch import grid
from vkconv.runtime.errors import VkconvError
from vkconv.runtime.pipeline import STORAGE, TEXEL1, TEXEL4, DescriptorSet, get_pipeline, texel_fits
from vkconv.runtime.plan import Plan, closed_on_error
from vkconv.runtime.transfer import upload_constant

log = logging.getLogger(__name__)

_PACK_PUSH = struct.Struct("<6i")
_SAMPLE_PUSH = struct.Struct("<24i")
_FUSED_PUSH = struct.Struct("<20i2f")
METHODS = ("columns", "fused")
_MAX_FUSED_VEC4 = 64  # accumulators per lane of the fused kernel (pixels x vec4s of output channels)
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


@dataclass(frozen=True)
class DeformCandidate:
    """One way to run a DeformConv shape (0 / None / "": chosen by the heuristics, as without tuning).

    ``method``: ``"columns"`` (a sampling stage writes the GEMM operand, a GEMM multiplies it) or
    ``"fused"`` (one kernel samples and multiplies, the lanes of a subgroup sharing the samples;
    conv groups of 1 and devices with subgroup shuffles only).  ``mb`` x ``pb``: the register tile
    (output channels x pixels per invocation) of the column GEMM, or of the fused kernel's lanes
    (``pb``: the pixels a subgroup shares, 1 or 2 per lane); ``gemm_local_size``: the GEMM's (or
    the fused kernel's) invocations per workgroup; ``sample_local_size``: the pack and sampling
    stages'; ``texel``: every stage reads its operands through texel buffers where they fit (True)
    or through storage buffers (False).
    """

    mb: int = 0
    pb: int = 0
    gemm_local_size: int = 0
    sample_local_size: int = 0
    texel: bool | None = None
    method: str = ""

    def __post_init__(self):
        if self.mb % 4 or self.pb % 4 or min(self.mb, self.pb, self.gemm_local_size, self.sample_local_size) < 0:
            raise ValueError(f"candidate: mb and pb must be multiples of 4 and local sizes >= 0, got {self}")
        if self.method not in ("", *METHODS):
            raise ValueError(f"candidate: method must be one of {METHODS}, got {self.method!r}")

    def tuning(self, base: Tuning) -> Tuning:
        """The GEMM's launch choices: ``base`` with this candidate's tile, local size and reads."""
        texel = base.texel and (self.texel is None or self.texel)
        return dataclasses.replace(base, local_size=self.gemm_local_size or base.local_size, texel=texel,
                                   fp16=base.fp16 and texel, mb=self.mb, pb=self.pb)

    def label(self) -> str:
        """Short text for tables and logs, e.g. ``deform fused 8x16 gemm-ls64 sample-ls64 texel``."""
        parts = ["deform"] + ([self.method] if self.method else [])
        if self.mb or self.pb:
            parts.append(f"{self.mb}x{self.pb}")
        if self.gemm_local_size:
            parts.append(f"gemm-ls{self.gemm_local_size}")
        if self.sample_local_size:
            parts.append(f"sample-ls{self.sample_local_size}")
        if self.texel is not None:
            parts.append("texel" if self.texel else "ssbo")
        return " ".join(parts)

    def to_json(self) -> dict:
        record: dict = {"op": "DeformConv", "method": self.method}
        record |= {k: v for k, v in (("mb", self.mb), ("pb", self.pb), ("gemm_local_size", self.gemm_local_size),
                                     ("sample_local_size", self.sample_local_size)) if v}
        if self.texel is not None:
            record["texel"] = self.texel
        return record

    @classmethod
    def from_json(cls, record: object) -> DeformCandidate:
        """The candidate :meth:`to_json` wrote; ValueError for anything else."""
        if not isinstance(record, dict) or record.get("op") != "DeformConv":
            raise ValueError(f"not a DeformConv candidate: {record!r}")
        texel = record.get("texel")
        # (entries written before the fused method existed are the columns method's)
        return cls(mb=int(record.get("mb", 0)), pb=int(record.get("pb", 0)),
                   gemm_local_size=int(record.get("gemm_local_size", 0)),
                   sample_local_size=int(record.get("sample_local_size", 0)),
                   texel=None if texel is None else bool(texel), method=str(record.get("method", "columns")))


class DeformConv(WeightedOp):
    """A 2-D deformable convolution whose weights stay on the device (see the module docstring).

    Call it as ``op(x, offset, mask=None)``.  The first call at a new (input shape, mask or not)
    records a command buffer; later calls at that shape reuse it (one submit each).

    How a shape runs (the column GEMM's register tile and local size, the sampling stage's local
    size, texel or storage reads: a :class:`DeformCandidate`) is, as for :class:`vkconv.Conv`:
    forced by ``candidate`` (fields left 0 / None are chosen by the heuristics); else from the
    tuning cache (``VKCONV_TUNE=cache``, the default, or ``1``); else measured now when ``tune`` is
    True (or ``VKCONV_TUNE=1``) and stored in the cache; else the heuristics.
    :meth:`choice_for` says which candidate runs a shape and where the choice came from.
    """

    #: Upper bound, in bytes, on the column buffer of one chunk; None means the device's
    #: maxStorageBufferRange.  Lowering it only makes more, smaller chunks (tests use that).
    column_budget: int | None = None

    def __init__(self, w: np.ndarray, b: np.ndarray | None = None, *, strides=1, pads=0,
                 dilations=1, group: int = 1, offset_group: int = 1, activation=None,
                 ctx: Context | None = None, tune: bool | str | None = None,
                 candidate: DeformCandidate | None = None):
        super().__init__(w, ranks=4, strides=strides, pads=pads, dilations=dilations, group=group,
                         activation=activation, ctx=ctx)
        self.offset_group = shapes.positive_int("offset_group", offset_group)
        self.tune_mode = tune_mode(tune)
        self.tuning = tuning(self.ctx)
        self.forced = candidate
        # Host copies of the GEMM's weights and bias (None once closed); one RowsKernel (packed
        # weights) per GEMM launch choice that has run.
        self._rows: tuple[np.ndarray, np.ndarray | None] | None = None
        self._gemms: dict[Tuning, RowsKernel] = {}
        self._fused: dict[int, Buffer] = {}  # the fused kernel's packed weights, by vec4s per row
        self._choices: dict[tuple[tuple[int, ...], bool], Choice[DeformCandidate]] = {}
        self._last_mask: dict[tuple[int, ...], bool] = {}  # input shape -> mask or not, as last run
        self.set_weights(w, b)

    # -- weights -------------------------------------------------------------------------------
    def _prepare_weights(self, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        cout, cin_g, kh, kw = w.shape
        if cout < 1 or cin_g < 1:
            raise ValueError(f"w: every dimension must be >= 1, got shape {w.shape}")
        cin = cin_g * self.group
        if cin % self.offset_group:
            raise ValueError(f"offset_group: {cin} input channels (w {w.shape} x group={self.group}) "
                             f"are not divisible by offset_group={self.offset_group}")
        # The GEMM's input channels are the column rows, tap-major: row = tap * C_in/g + channel.
        rows = np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(cout, kh * kw * cin_g, 1, 1, 1)
        return rows, None if b is None else b.copy()

    def _adopt_weights(self, state: tuple[np.ndarray, np.ndarray | None]) -> None:
        self._rows = state

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
            return self._plan(tuple(x.shape), mask is not None).run(arrays)[0]

    def plan(self, x_shape: Sequence[int], has_mask: bool | None = None) -> Plan:
        """The recorded plan for inputs x of ``x_shape``, offset and (with ``has_mask``; None: as
        this op last ran that shape, else with a mask) mask of the shapes :meth:`offset_shape` /
        :meth:`mask_shape` give; its inputs are in that order, and its ``body`` records the
        dispatches alone (device graphs replay it; ``cv_plugin.profile`` times it after a call,
        knowing the input shape only)."""
        x_shape = tuple(int(s) for s in x_shape)
        self.output_shape(x_shape)
        with self._lock:
            return self._plan(x_shape, self._mask(x_shape, has_mask))

    def _plan(self, x_shape: tuple[int, ...], has_mask: bool) -> Plan:
        self._open()
        self._last_mask[x_shape] = has_mask

        def build() -> Plan:
            choice = self._choice(x_shape, has_mask)
            return self._build_plan(x_shape, self.output_shape(x_shape), has_mask, choice.candidate)
        return self._plans.get((x_shape, has_mask), build)

    # -- kernel choice -------------------------------------------------------------------------
    def choice_for(self, x_shape: Sequence[int], has_mask: bool | None = None) -> Choice[DeformCandidate]:
        """The candidate a call with input x of ``x_shape`` (and a mask or not; None: as this op
        last ran that shape, else with a mask) runs and where it came from: ``forced``, ``cache``,
        ``tuner`` or ``heuristic`` (with ``tune`` on, a shape the cache lacks is tuned here).
        ValueError if a forced candidate cannot run it."""
        x_shape = tuple(int(s) for s in x_shape)
        self.output_shape(x_shape)
        with self._lock:
            self._open()
            return self._choice(x_shape, self._mask(x_shape, has_mask))

    def choices(self) -> dict[tuple[int, ...], Choice[DeformCandidate]]:
        """Input shape -> choice, for every shape this op has chosen for (the mask variant it last
        ran; ``vkconv tune`` and ``vkconv run --debug`` list these)."""
        with self._lock:
            return {x: c for (x, m), c in self._choices.items() if self._last_mask.get(x, True) == m}

    def signature(self, x_shape: Sequence[int], has_mask: bool | None = None) -> str:
        """The tuning cache's key for input x of ``x_shape`` with a mask or not (None: as in
        :meth:`choice_for`): everything the candidates' speed depends on."""
        x_shape = tuple(int(s) for s in x_shape)
        self.output_shape(x_shape)
        return self._signature(x_shape, self._mask(x_shape, has_mask))

    def _mask(self, x_shape: tuple[int, ...], has_mask: bool | None) -> bool:
        return self._last_mask.get(x_shape, True) if has_mask is None else bool(has_mask)

    def _signature(self, x_shape: tuple[int, ...], has_mask: bool) -> str:
        def t(v) -> str:
            return ",".join(map(str, v))
        n, cin, h, w = x_shape
        return (f"DeformConv n={n} g={self.group} og={self.offset_group} ci={cin} co={self.weight_shape[0]} "
                f"size={h},{w} k={t(self.weight_shape[2:])} s={t(self.strides)} d={t(self.dilations)} "
                f"pad={t(self.pads)} mask={int(has_mask)} texel={int(self.tuning.texel)} "
                f"fp16={int(self.tuning.fp16)}")

    def _choice(self, x_shape: tuple[int, ...], has_mask: bool) -> Choice[DeformCandidate]:
        choice = self._choices.get((x_shape, has_mask))
        if choice is None:
            choice = self._choices[(x_shape, has_mask)] = self._choose(x_shape, has_mask)
            log.debug("deform_conv %s x%s mask=%d: %s", self.weight_shape, x_shape, has_mask, choice)
        return choice

    def _choose(self, x_shape: tuple[int, ...], has_mask: bool) -> Choice[DeformCandidate]:
        out_hw = math.prod(self.output_shape(x_shape)[2:])
        if self.forced is not None:
            cand = self._resolve(self.forced, out_hw)
            reason = self._unusable(cand)
            if reason is not None:
                raise ValueError(f"candidate: {cand.label()!r} cannot run x of shape {x_shape}: {reason}")
            return Choice(cand, "forced")
        return measured_choice(self.tune_mode, lambda: self._cached(x_shape, has_mask, out_hw),
                               lambda: self._autotune(x_shape, has_mask, budget_ms()).best,
                               lambda: self._resolve(DeformCandidate(), out_hw))

    def _resolve(self, cand: DeformCandidate, out_hw: int) -> DeformCandidate:
        """``cand`` with every choice it leaves to the heuristics filled in as they make it for
        ``out_hw`` output pixels per image: what runs (and what the tuner and the cache compare)."""
        base = self.tuning
        tune = cand.tuning(base)
        texel = tune.texel if texel_choices("gemm1x1", base) else None
        sample_ls = cand.sample_local_size or base.local_size
        method = cand.method or self._heuristic_method(sample_ls)
        if method == "fused":
            mb, pb = cand.mb or self._fused_mb(), cand.pb or 2 * self.ctx.info.subgroup_size
            return DeformCandidate(mb, pb, tune.local_size, sample_ls, texel, method)
        mb = choose_mb(self.weight_shape[0] // self.group, tune)
        pb = choose_pb(mb, out_hw, tune)
        return DeformCandidate(mb, pb, tune.local_size, sample_ls, texel, method)

    def _heuristic_method(self, local_size: int) -> str:
        """The fused kernel where it can run on a CPU device (lavapipe, 64-256 channels: 0.6-0.8x
        the columns method's time, docs/PERFORMANCE.md), else the columns (GPUs: not measured on
        one yet)."""
        fused = DeformCandidate(self._fused_mb(), 2 * self.ctx.info.subgroup_size, self.tuning.local_size,
                                local_size, method="fused")
        return "fused" if self.ctx.info.type == "cpu" and self._unusable(fused) is None else "columns"

    def _fused_mb(self) -> int:
        """The fused kernel's output channels per lane: 4 vec4s where the subgroup's lanes still
        all hold channels (from 128 channels on 8 lanes), else 2 (64), else 1; a subgroup whose
        chunk overhangs C_out computes zeros there (16 at 64 channels: 1.7x the time of 8)."""
        cout4 = -(-self.weight_shape[0] // 4)
        sg = self.ctx.info.subgroup_size
        return 4 * next((cb for cb in (4, 2) if cout4 >= cb * sg), 1)

    def _tiles(self) -> list[tuple[int, int]]:
        """The column GEMM's register tiles on this device, fastest first by the rows kernel's
        speed table.  (Wider tiles, 32x16, 32x32 and 64x16, took 2-3 % less CPU time on Mesa 22.3
        and 0-3 % more on Mesa 25.0 at 64 channels, below the tuner's margin, and 1.3-4.8 s /
        6.6-20 s to compile cold on those drivers: not candidates; docs/PERFORMANCE.md.)"""
        return register_tiles("gemm1x1", self.tuning)

    def method_tiles(self, method: str) -> list[tuple[int, int]]:
        """The register tiles (``mb``, ``pb``) the tuner tries for ``method``: the column GEMM's 6
        fastest, or the fused kernel's 4, 8 or 16 output channels x 1 or 2 pixels per lane."""
        if method == "fused":
            sg = self.ctx.info.subgroup_size
            return [(mb, pb) for mb in (4, 8, 16) for pb in (sg, 2 * sg)]
        return self._tiles()[:6]

    def _unusable(self, cand: DeformCandidate) -> str | None:
        """Why resolved candidate ``cand`` cannot run on this device (None if it can)."""
        sizes = local_sizes(self.ctx, "gemm1x1")
        for name, size in (("GEMM", cand.gemm_local_size), ("sampling", cand.sample_local_size)):
            if size not in sizes:
                return f"{name} local size {size} is not one of {sizes} here"
        if cand.method == "fused":
            return self._fused_unusable(cand)
        if (cand.mb, cand.pb) not in self._tiles():
            return f"register tile {cand.mb}x{cand.pb} is not one of {self._tiles()} here"
        return None

    def _fused_unusable(self, cand: DeformCandidate) -> str | None:
        """Why the fused kernel cannot run resolved candidate ``cand`` here (None if it can)."""
        info = self.ctx.info
        sg = info.subgroup_size
        if not info.subgroup_shuffle:
            return "the device has no subgroup shuffles"
        if self.group != 1:
            return f"the fused method runs conv groups of 1, not group={self.group}"
        if cand.pb % sg or cand.pb // sg not in (1, 2):
            return f"{cand.pb} pixels per subgroup of {sg} lanes: 1 or 2 per lane"
        if cand.pb * cand.mb // 4 > _MAX_FUSED_VEC4:
            return f"{cand.pb} x {cand.mb // 4} vec4 accumulators exceed {_MAX_FUSED_VEC4}"
        if cand.gemm_local_size % sg:
            return f"local size {cand.gemm_local_size} is not a multiple of the {sg}-lane subgroup"
        return None

    def _cached(self, x_shape: tuple[int, ...], has_mask: bool, out_hw: int) -> DeformCandidate | None:
        """The cache's candidate for this shape, if it can run here (a corrupt entry, or one
        written under other limits, is ignored with a log line)."""
        return cached_candidate(self.ctx, self._signature(x_shape, has_mask),
                                lambda record: self._resolve(DeformCandidate.from_json(record), out_hw),
                                self._unusable)

    def autotune(self, x_shape: Sequence[int], budget: float | None = None,
                 has_mask: bool | None = None) -> TuneResult[DeformCandidate]:
        """Measure the candidates for input x of ``x_shape`` (with a mask or not; None: as in
        :meth:`choice_for`) now, whatever the cache holds and ``tune`` says; store the fastest in
        the tuning cache and use it from the next call on.  ``budget``: ms of wall time (default
        ``VKCONV_TUNE_BUDGET_MS``, else 2000)."""
        x_shape = tuple(int(s) for s in x_shape)
        self.output_shape(x_shape)
        limit = budget_ms(budget)
        with self._lock:
            self._open()
            mask = self._mask(x_shape, has_mask)
            result = self._autotune(x_shape, mask, limit)
            self._choices[(x_shape, mask)] = Choice(result.best, "tuner")
            self._plans.drop((x_shape, mask))
        return result

    def _autotune(self, x_shape: tuple[int, ...], has_mask: bool, limit: float) -> TuneResult[DeformCandidate]:
        """:func:`vkconv.ops.tune.search` over this shape's candidates on seeded random inputs
        (offsets of a few pixels, masks in [0, 1]); each candidate's output must match the
        heuristic choice's (a wrong one is never chosen).  Stages: the method, its register tile,
        the GEMM's (or fused kernel's) local size, the pack and sampling stages' local size, texel or
        storage reads."""
        y_shape = self.output_shape(x_shape)
        out_hw = y_shape[2] * y_shape[3]
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(x_shape, dtype=np.float32),
                  rng.uniform(-3, 3, self.offset_shape(x_shape)).astype(np.float32)]
        if has_mask:
            arrays.append(rng.uniform(0, 1, self.mask_shape(x_shape)).astype(np.float32))
        before = set(self._gemms)
        tol = 1e-2 if self.tuning.fp16 else 1e-3
        baseline = self._resolve(DeformCandidate(), out_hw)
        agreement = Agreement(baseline.label(), tol)

        def measure(cand: DeformCandidate) -> TimedPlan | None:
            if self._unusable(cand) is not None:
                return None
            return agreement.timed(self.ctx, self._build_plan(x_shape, y_shape, has_mask, cand), arrays,
                                   cand.label())

        def methods(best: DeformCandidate) -> list[DeformCandidate]:
            return [self._resolve(DeformCandidate(method=m), out_hw) for m in METHODS]

        def tiles(best: DeformCandidate) -> list[DeformCandidate]:
            return [dataclasses.replace(best, mb=mb, pb=pb) for mb, pb in self.method_tiles(best.method)]

        def gemm_sizes(best: DeformCandidate) -> list[DeformCandidate]:
            return [dataclasses.replace(best, gemm_local_size=n) for n in local_sizes(self.ctx, "gemm1x1")]

        def sample_sizes(best: DeformCandidate) -> list[DeformCandidate]:
            return [dataclasses.replace(best, sample_local_size=n) for n in local_sizes(self.ctx, "gemm1x1")]

        def texels(best: DeformCandidate) -> list[DeformCandidate]:
            return [dataclasses.replace(best, texel=t) for t in texel_choices("gemm1x1", self.tuning)]

        result = search(baseline, [methods, tiles, gemm_sizes, sample_sizes, texels], measure, limit)
        keep = result.best.tuning(self.tuning)
        for tune in set(self._gemms) - before - {keep}:  # the losers' packed weights
            self._gemms.pop(tune).close()
        store_result(self.ctx, self._signature(x_shape, has_mask), result, DeformCandidate.to_json, limit)
        return result

    # -- chunks and plans ----------------------------------------------------------------------
    def chunks(self, n: int, out_hw: int, candidate: DeformCandidate | None = None) -> list[Chunk]:
        """How ``n`` images of ``out_hw`` output pixels are split so that one chunk's columns
        (and, when chunked, its scratch output) fit the column budget: whole images while one
        image fits, else runs of whole GEMM tiles of one image.  ``candidate``: the GEMM's
        register tile (default: the heuristic one)."""
        gemm = self._gemm(self._resolve(candidate or DeformCandidate(), out_hw))
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

    def _build_plan(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...], has_mask: bool,
                    cand: DeformCandidate) -> Plan:
        """The plan that runs resolved candidate ``cand``."""
        if cand.method == "fused":
            return self._build_fused_plan(x_shape, y_shape, has_mask, cand)
        ctx, gemm = self.ctx, self._gemm(cand)
        texel = self._texel(cand)
        n, cin, in_h, in_w = x_shape
        _, cout, out_h, out_w = y_shape
        kh, kw = self.weight_shape[2:]
        taps, og = kh * kw, self.offset_group
        cin_og, out_hw = cin // og, out_h * out_w
        og_blocks = self._og_blocks(cin)
        chunks = self.chunks(n, out_hw, cand)
        first_geo, _, first = gemm.tiled_operand(chunks[0].images, chunks[0].pixels)
        # The GEMM writes [images][C_out][tiles * PB]: the output itself when that is all of it.
        whole = len(chunks) == 1 and first_geo.y_shape[2] * first_geo.y_shape[3] == out_hw

        plan = Plan(ctx, [], [("deform_conv output", y_shape)])
        with closed_on_error(plan):
            x_buf, offset_buf, mask_buf, packed, pack = self._pack_stage(plan, x_shape, has_mask, cand)
            columns = Buffer(ctx, first.nbytes, texel=True, name="deform_conv columns")
            plan.keep.append(columns)
            scratch: Buffer | None = None
            if not whole:
                scratch = Buffer(ctx, 4 * math.prod(first_geo.y_shape),
                                 name="deform_conv chunk output")
                plan.keep.append(scratch)

            ls = cand.sample_local_size
            # Output sizes that are multiples of 4 read 4 pixels' offsets and mask as one vec4.
            quad = out_hw % 4 == 0
            per_pixel = TEXEL4 if quad else TEXEL1
            texel_s = (texel and texel_fits(ctx, packed.size, TEXEL4)
                       and all(texel_fits(ctx, b.size, per_pixel) for b in (offset_buf, mask_buf)))
            kinds = (TEXEL4, per_pixel, per_pixel) if texel_s else (STORAGE,) * 3
            unroll = og_blocks <= _UNROLL_BLOCKS
            sample = get_pipeline(ctx, "deform_conv_sample" if texel_s else "deform_conv_sample_ssbo",
                                  (*kinds, STORAGE), _SAMPLE_PUSH.size,
                                  (ls, 1, 1, 0, og_blocks if unroll else 0, cin_og if unroll else 0, int(quad)))
            texel_g = texel and texel_fits(ctx, columns.size) and texel_fits(ctx, gemm.weights.size)
            sample_set = DescriptorSet(sample, [packed, offset_buf, mask_buf, columns])
            plan.keep.append(sample_set)

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
            pack(cmd)
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

    def _texel(self, cand: DeformCandidate) -> bool:
        """Whether ``cand``'s stages read their operands through texel buffers (where they fit)."""
        return cand.texel is not False and self.tuning.texel

    def _og_blocks(self, cin: int) -> int:
        """Packed 4-channel blocks per offset group for ``cin`` input channels (deform_conv_pack.comp)."""
        return -(-(cin // self.offset_group) // 4)

    def _pack_stage(self, plan: Plan, x_shape: tuple[int, ...], has_mask: bool, cand: DeformCandidate
                    ) -> tuple[Buffer, Buffer, Buffer, Buffer, Callable[[CommandBuffer], None]]:
        """Both methods' start: ``plan``'s input buffers (x, offset and, with ``has_mask``, mask),
        the packed input (deform_conv_pack.comp) and the recorder of the pack stage and its
        barrier.  Returns ``(x, offset, mask, packed, record)``; ``mask`` is the offset buffer
        where there is no mask (bound, never read)."""
        ctx = self.ctx
        n, cin, in_h, in_w = x_shape
        og = self.offset_group
        og_blocks = self._og_blocks(cin)
        limit = ctx.info.max_workgroup_count
        if og > limit[1] or n > limit[2]:
            raise VkconvError(f"x: {n} images and {og} offset groups exceed the device's "
                              f"maxComputeWorkGroupCount {limit}")
        inputs = [("deform_conv input x", x_shape), ("deform_conv offset", self.offset_shape(x_shape))]
        if has_mask:
            inputs.append(("deform_conv mask", self.mask_shape(x_shape)))
        # Inputs that the shaders may read through texel-buffer views.
        for name, shape in inputs:
            plan.inputs.append(Buffer(ctx, 4 * math.prod(shape), staged=True, texel=True, name=name))
            plan.input_shapes.append(tuple(shape))
        x_buf, offset_buf = plan.inputs[:2]
        mask_buf = plan.inputs[2] if has_mask else offset_buf  # never read when has_mask == 0
        packed = Buffer(ctx, 16 * n * og * og_blocks * (in_h + 2) * (in_w + 2), texel=True,
                        name="deform_conv packed input")
        plan.keep.append(packed)
        ls = cand.sample_local_size
        texel_x = self._texel(cand) and texel_fits(ctx, x_buf.size, TEXEL1)
        pack = get_pipeline(ctx, "deform_conv_pack" if texel_x else "deform_conv_pack_ssbo",
                            (TEXEL1 if texel_x else STORAGE, STORAGE), _PACK_PUSH.size, (ls, 1, 1))
        pack_set = DescriptorSet(pack, [x_buf, packed])
        plan.keep.append(pack_set)
        push = _PACK_PUSH.pack(cin, in_h, in_w, og, cin // og, og_blocks)
        groups = (min(-(-((in_h + 2) * (in_w + 2)) // ls), limit[0]), og, n)

        def record(cmd: CommandBuffer) -> None:
            cmd.dispatch(pack, pack_set, push, groups)
            cmd.barrier()
            self._stage(cmd, "pack")
        return x_buf, offset_buf, mask_buf, packed, record

    def _build_fused_plan(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...], has_mask: bool,
                          cand: DeformCandidate) -> Plan:
        """The plan of the fused method (shaders/deform/deform_conv_fused.comp): pack, then one
        dispatch that samples, multiplies and stores the output."""
        ctx = self.ctx
        n, cin, in_h, in_w = x_shape
        _, cout, out_h, out_w = y_shape
        kh, kw = self.weight_shape[2:]
        og, out_hw = self.offset_group, out_h * out_w
        og_blocks = self._og_blocks(cin)
        sg = ctx.info.subgroup_size
        cb = cand.mb // 4
        chunk = sg * cb  # vec4s of output channels per subgroup
        cout4 = -(-cout // 4)
        coutp = -(-cout4 // chunk) * chunk
        tiles = -(-out_hw // cand.pb)
        weights = self._fused_weights(coutp)
        texel = self._texel(cand)

        plan = Plan(ctx, [], [("deform_conv output", y_shape)])
        with closed_on_error(plan):
            x_buf, offset_buf, mask_buf, packed, pack = self._pack_stage(plan, x_shape, has_mask, cand)
            texel_f = (texel and texel_fits(ctx, packed.size, TEXEL4) and texel_fits(ctx, weights.size, TEXEL4)
                       and all(texel_fits(ctx, b.size, TEXEL1) for b in (offset_buf, mask_buf)))
            kinds = (TEXEL4, TEXEL1, TEXEL1, TEXEL4, STORAGE) if texel_f else (STORAGE,) * 5
            ls = cand.gemm_local_size
            pipe = get_pipeline(ctx, "deform_conv_fused" if texel_f else "deform_conv_fused_ssbo", kinds,
                                _FUSED_PUSH.size,
                                (ls, 1, 1, self.activation, sg, cand.pb // sg, cb,
                                 og_blocks if og_blocks <= _UNROLL_BLOCKS else 0))
            dset = DescriptorSet(pipe, [packed, offset_buf, mask_buf, weights, plan.outputs[0]])
            plan.keep.append(dset)
            subgroups = n * tiles * (coutp // chunk)
            groups = grid(ctx, -(-subgroups // (ls // sg)) * ls, ls, 1, "x (deform_conv fused)")
            push = _FUSED_PUSH.pack(in_h, in_w, out_w, out_hw, kw, kh * kw, *self.strides, *self.pads[:2],
                                    *self.dilations, og, og_blocks, cout, coutp, coutp // chunk, tiles, n,
                                    int(has_mask), self.activation.a, self.activation.b)

        def body(cmd: CommandBuffer) -> None:
            self._stage(cmd, "begin")
            pack(cmd)
            cmd.dispatch(pipe, dset, push, groups)
            cmd.barrier()
            self._stage(cmd, "fused")

        with closed_on_error(plan):
            plan.record(body)
        return plan

    def _fused_weights(self, coutp: int) -> Buffer:
        """The fused kernel's weights with rows of ``coutp`` vec4s (built on first use):
        ``[tap][offset group][4-channel block][4][coutp]`` vec4, zero where a block or a row has
        no channel, then the bias row."""
        buf = self._fused.get(coutp)
        if buf is None:
            rows, b = self._open()
            cout, cin, kh, kw = self.weight_shape  # conv groups of 1: C_in / group is C_in
            taps, og = kh * kw, self.offset_group
            cin_og = cin // og
            blocks = self._og_blocks(cin)
            packed = np.zeros((taps * og * blocks * 4 + 1, 4 * coutp), np.float32)
            per_tap = rows.reshape(cout, taps, og, cin_og).transpose(1, 2, 3, 0)  # [tap][og][channel][C_out]
            packed[:-1].reshape(taps, og, blocks * 4, 4 * coutp)[:, :, :cin_og, :cout] = per_tap
            if b is not None:
                packed[-1, :cout] = b
            self.ctx.check()
            buf = self._fused[coutp] = upload_constant(self.ctx, packed, "deform_conv fused weights", texel=True)
        return buf

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

    def _open(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._rows is None:
            raise VkconvError("this DeformConv was closed")
        return self._rows

    def _gemm(self, cand: DeformCandidate) -> RowsKernel:
        """The column GEMM with ``cand``'s register tile, local size and reads (built on first use)."""
        tune = cand.tuning(self.tuning)
        gemm = self._gemms.get(tune)
        if gemm is None:
            rows, b = self._open()
            self.ctx.check()
            gemm = self._gemms[tune] = RowsKernel(self.ctx, rows, b, self.group, self.activation, tune, flat=True)
        return gemm

    def _stage(self, cmd, name: str) -> None:
        """Recording hook, called at "begin" and after each stage's barrier ("pack", then "sample"
        and "gemm" per chunk, or "fused"); cv_plugin.bench.deform.TimedDeformConv overrides it to
        write GPU timestamps."""

    # -- lifetime ------------------------------------------------------------------------------
    def _release(self) -> None:
        self._plans.clear()
        for gemm in self._gemms.values():
            gemm.close()
        self._gemms.clear()
        for buf in self._fused.values():
            buf.close()
        self._fused.clear()
        self._rows = None


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
