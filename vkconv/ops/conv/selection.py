"""How a convolution is run: which kernel family a shape calls for (the heuristic), and the
candidates the tuner may measure instead (family x register tile x local size x texel reads x
rows per step x subgroup-shared input rows x tile shape)."""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from vkconv.kernels.tiling import (
    DEPTHWISE_SPEED,
    DEPTHWISE_TILES,
    ROWS_SPEED,
    TILE_SHAPES,
    UNROLLS,
    TileShape,
    Tuning,
    choose_mb,
    choose_pb,
    choose_tiles,
    rows_unroll,
)
from vkconv.ops.conv.kernels import KERNELS, Geometry, winograd_tiles
from vkconv.runtime.context import Context


def eligible(name: str, geo: Geometry) -> str | None:
    """Why kernel ``name`` cannot run ``geo`` (None if it can)."""
    if name == "gemm1x1" and not geo.pointwise:
        return "needs a 1x1 kernel, stride 1 and no padding"
    if name == "depthwise" and not (geo.cin_g == 1 and geo.group > 1):
        return "needs group == input channels (> 1)"
    if name in ("winograd", "winograd63") and not (geo.winograd_shape and geo.group == 1):
        return "needs a 3x3 2-D kernel, stride 1, dilation 1, group 1"
    return None


GPU_TYPES = ("discrete", "integrated", "virtual")
# The kernels whose work runs in conv_rows.comp (Winograd's batched GEMM too): register tiles, rows
# per step and subgroup-shared input rows apply to them.
ROWS_KERNELS = ("implicit_gemm", "gemm1x1", "winograd", "winograd63")


def select(geo: Geometry, device_type: str = "cpu") -> str:
    """The kernel the shape calls for on a device of ``device_type`` (``DeviceInfo.type``), before
    checking that its scratch buffers fit.  Implicit-GEMM shapes get ``tiled`` on GPUs (discrete,
    integrated, virtual) and ``implicit_gemm`` on CPU devices, where shared memory and barriers are
    slow (docs/PERFORMANCE.md)."""
    if eligible("depthwise", geo) is None:
        return "depthwise"
    if eligible("gemm1x1", geo) is None:
        return "gemm1x1"
    if eligible("winograd", geo) is None and winograd_pays(geo):
        return "winograd63" if winograd63_pays(geo) else "winograd"
    return "tiled" if device_type in GPU_TYPES else "implicit_gemm"


def winograd_pays(geo: Geometry) -> bool:
    """Winograd wins when the channel counts are large enough for its GEMMs to dominate the
    transforms and the 36 GEMMs over the tile grid (rows padded to an even tile count) do at
    most half the multiplications of a direct convolution.  Measured on lavapipe: 0.3-0.6x the
    implicit GEMM's time from 64 input channels on; ties or loses at 16-32 channels or 7x7 images."""
    tiles = winograd_tiles(geo)[3]
    return (geo.cin_g >= 64 and geo.cout_g >= 32
            and 36 * tiles <= 0.5 * 9 * geo.n * geo.out[1] * geo.out[2])


def winograd63_pays(geo: Geometry) -> bool:
    """F(6x6, 3x3) instead of F(4x4, 3x3) (where Winograd pays) on images of at least 112 x 112 whose
    tile grids give it at most 0.9 x F(4,3)'s multiplications.  Measured on both lavapipe drivers
    (docs/PERFORMANCE.md): 0.84-0.92 x F(4,3)'s time on VGG-16 at 224 and 112 (product ratio 0.86),
    1.02-1.05 x at 56 (0.91: its transforms cost more per tile), 1.06-1.11 x at 28 (1.02) and 1.8 x
    at 14 (1.33), where rows of 3 tiles are padded to 4."""
    return (min(geo.out[1], geo.out[2]) >= 112
            and 64 * winograd_tiles(geo, 6)[3] <= 0.9 * 36 * winograd_tiles(geo)[3])


def shared_unusable(ctx: Context, local_size: int) -> str | None:
    """Why conv_rows_shared cannot run here at ``local_size`` invocations per workgroup (None if
    it can): it needs subgroup shuffles, and whole subgroups in a workgroup."""
    info = ctx.info
    if not info.subgroup_shuffle:
        return "the device has no subgroup shuffles"
    if local_size % info.subgroup_size:
        return f"local size {local_size} is not a multiple of the {info.subgroup_size}-lane subgroup"
    return None


def shared_pays(ctx: Context, name: str, geo: Geometry, mb: int, local_size: int) -> bool:
    """Subgroup-shared input rows for kernel ``name`` with ``mb`` output channels per block: on CPU
    devices, for Winograd's GEMMs of at least 128 input channels and two blocks for every lane.
    Measured on both lavapipe drivers with 4 rows a step (docs/PERFORMANCE.md): 0.84-0.99x the
    plain kernel's time on VGG-16's layers of 128-512 input and 256-512 output channels, 1.03-1.06x
    at 128 -> 128 (one block a lane), 1.02-1.04x at 64 input channels, and 0.93-1.04x for the
    implicit GEMM.  GPUs keep it off until measured there (the tuner may still pick it)."""
    return (ctx.info.type not in GPU_TYPES and name in ("winograd", "winograd63") and geo.cin_g >= 128
            and -(-geo.cout_g // mb) >= 2 * ctx.info.subgroup_size and shared_unusable(ctx, local_size) is None)


@dataclass(frozen=True)
class Candidate:
    """One way to run a convolution: a kernel family and the launch choices it leaves open
    (0 / None: chosen by the heuristics, as without tuning).

    ``mb`` x ``pb``: the rows kernels' register tile (``implicit_gemm``, ``gemm1x1``, and
    ``winograd``'s GEMM); ``pb`` alone for ``depthwise``.  ``local_size``: invocations per
    workgroup (not ``tiled``, whose tile fixes it).  ``texel``: operands through texel buffers
    (True) or storage buffers (False).  ``tile``: ``tiled``'s tile shape.  ``shared``: the rows
    kernels' subgroup-shared input rows (conv_rows_shared) or not; ``unroll``: their input rows
    per step of the row loop.
    """

    kernel: str
    mb: int = 0
    pb: int = 0
    local_size: int = 0
    texel: bool | None = None
    tile: TileShape | None = None
    shared: bool | None = None
    unroll: int = 0

    def __post_init__(self):
        if self.mb % 4 or self.pb % 4 or min(self.mb, self.pb, self.local_size) < 0:
            raise ValueError(f"candidate: mb and pb must be multiples of 4 and local_size >= 0, got {self}")
        if self.unroll and self.unroll not in UNROLLS:
            raise ValueError(f"candidate: unroll must be one of {UNROLLS}, got {self.unroll}")

    def tuning(self, base: Tuning) -> Tuning:
        """``base`` with this candidate's choices fixed.  Texel reads stay off where ``base`` has
        them off (``VKCONV_CONV_TEXEL=0``, or the kernel reads storage buffers only)."""
        texel = base.texel and (self.texel is None or self.texel)
        return dataclasses.replace(base, local_size=self.local_size or base.local_size, texel=texel,
                                   fp16=base.fp16 and texel, mb=self.mb, pb=self.pb, tile=self.tile,
                                   shared=bool(self.shared), unroll=self.unroll)

    def label(self) -> str:
        """Short text for tables and logs, e.g. ``implicit_gemm 16x8 ls64 ssbo`` or ``winograd 16x28
        u4 ls64 texel shared``."""
        parts = [self.kernel]
        if self.mb or self.pb:
            parts.append(f"{self.mb}x{self.pb}" if self.mb else f"pb{self.pb}")
        if self.unroll:
            parts.append(f"u{self.unroll}")
        if self.tile is not None:
            t = self.tile
            parts.append(f"{t.tm}x{t.tn}/{t.tk}:{t.rm}x{t.rn}")
        if self.local_size:
            parts.append(f"ls{self.local_size}")
        if self.texel is not None:
            parts.append("texel" if self.texel else "ssbo")
        if self.shared:
            parts.append("shared")
        return " ".join(parts)

    def to_json(self) -> dict:
        record: dict = {"kernel": self.kernel}
        record |= {k: v for k, v in (("mb", self.mb), ("pb", self.pb), ("local_size", self.local_size),
                                     ("unroll", self.unroll)) if v}
        if self.texel is not None:
            record["texel"] = self.texel
        if self.tile is not None:
            record["tile"] = dataclasses.astuple(self.tile)
        if self.shared is not None:
            record["shared"] = self.shared
        return record

    @classmethod
    def from_json(cls, record: object) -> Candidate:
        """The candidate :meth:`to_json` wrote; ValueError for anything else."""
        if not isinstance(record, dict) or record.get("kernel") not in KERNELS:
            raise ValueError(f"not a conv candidate: {record!r}")
        tile = record.get("tile")
        return cls(kernel=record["kernel"], mb=int(record.get("mb", 0)), pb=int(record.get("pb", 0)),
                   local_size=int(record.get("local_size", 0)),
                   texel=None if record.get("texel") is None else bool(record["texel"]),
                   tile=None if tile is None else TileShape(*(int(v) for v in tile)),
                   shared=None if record.get("shared") is None else bool(record["shared"]),
                   unroll=int(record.get("unroll", 0)))


_DEPTHWISE_PB = tuple(sorted(DEPTHWISE_SPEED, reverse=True))
_LOCAL_SIZES = (32, 64, 128, 256)


def register_tiles(name: str, base: Tuning) -> list[tuple[int, int]]:
    """The (MB, PB) register tiles kernel ``name`` can take within ``base.max_tile``, by measured
    lavapipe speed (fastest first); ``(0, PB)`` for ``depthwise``; none for the others."""
    if name == "depthwise":
        return [(0, pb) for pb in _DEPTHWISE_PB]
    if name in ROWS_KERNELS:
        tiles = sorted(ROWS_SPEED, key=lambda t: -ROWS_SPEED[t])
        return [(mb, pb) for mb, pb in tiles if mb * pb <= base.max_tile]
    return []


def local_sizes(ctx: Context, name: str) -> list[int]:
    """The workgroup sizes kernel ``name`` can be launched with on this device (``tiled``: none,
    its tile shape fixes them)."""
    if name == "tiled":
        return []
    return sorted({ctx.local_size(n) for n in _LOCAL_SIZES})


def tile_shapes(ctx: Context) -> list[TileShape]:
    """``tiled``'s tile shapes within this device's invocations and shared memory per workgroup."""
    info = ctx.info
    invocations = min(info.max_workgroup_invocations, info.max_workgroup_size[0])
    return [t for t in TILE_SHAPES if t.invocations <= invocations and t.shared_bytes <= info.max_shared_memory]


def texel_choices(name: str, base: Tuning) -> list[bool]:
    """Whether kernel ``name`` can read its operands through texel buffers, storage buffers, or
    both (``direct`` and ``tiled`` read storage buffers only; ``VKCONV_CONV_TEXEL=0`` rules texels out)."""
    if name in ("direct", "tiled") or not base.texel:
        return []
    return [True, False]


def shared_choices(ctx: Context, name: str, local_size: int) -> list[bool]:
    """Whether kernel ``name`` at ``local_size`` can run with subgroup-shared input rows, without,
    or both (none for the kernels that are not conv_rows)."""
    if name not in ROWS_KERNELS:
        return []
    return [False] if shared_unusable(ctx, local_size) else [False, True]


def candidates(ctx: Context, geo: Geometry, base: Tuning) -> list[Candidate]:
    """Every candidate for ``geo`` on this device: each eligible kernel family x register tile x
    local size x texel/storage reads x rows per step x shared input rows or not (x tile shape for
    ``tiled``).
    Whether a candidate's scratch buffers fit is known once its kernel is built (:meth:`Kernel.fits`)."""
    found = []
    for name in KERNELS:
        if eligible(name, geo) is not None:
            continue
        tiles = register_tiles(name, base) or [(0, 0)]
        shapes = tile_shapes(ctx) if name == "tiled" else [None]
        texels: list[bool | None] = [*texel_choices(name, base)] or [None]
        unrolls = UNROLLS if name in ROWS_KERNELS else (0,)
        for (mb, pb), tile, ls, texel, unroll in itertools.product(tiles, shapes, local_sizes(ctx, name) or [0],
                                                                   texels, unrolls):
            shareds: list[bool | None] = [*shared_choices(ctx, name, ls)] or [None]
            found += [Candidate(name, mb, pb, ls, texel, tile, shared, unroll) for shared in shareds]
    return found


def resolve(ctx: Context, cand: Candidate, geo: Geometry, base: Tuning) -> Candidate:
    """``cand`` with every choice it leaves to the heuristics filled in as the kernel will make it
    for ``geo``: what actually runs (and what the tuner and the cache compare)."""
    tune = cand.tuning(base)
    name, mb, pb, shared, unroll = cand.kernel, 0, 0, None, 0
    if name in ROWS_KERNELS:
        mb = choose_mb(geo.cout_g, tune)
        width = ({"implicit_gemm": geo.out[2], "gemm1x1": math.prod(geo.size)}.get(name)
                 or winograd_tiles(geo, 6 if name == "winograd63" else 4)[3])
        pb = choose_pb(mb, width, tune)
        shared = cand.shared if cand.shared is not None else shared_pays(ctx, name, geo, mb, tune.local_size)
        rows, kw = (geo.cin_g * geo.kernel[0] * geo.kernel[1], geo.kernel[2]) if name == "implicit_gemm" \
            else (geo.cin_g, 1)
        unroll = rows_unroll(rows, kw, tune)
    elif name == "depthwise":
        pb = choose_pb(0, geo.out[2], tune, DEPTHWISE_TILES)
    return Candidate(name, mb, pb, 0 if name == "tiled" else tune.local_size,
                     tune.texel if texel_choices(name, base) else None,
                     (tune.tile or choose_tiles(ctx)) if name == "tiled" else None, shared, unroll)


# Expected time relative to the best candidate, for the tuning budget: on CPU devices the GPU
# kernel (shared memory, barriers) and the bounds-checked fallback ran 10-50x slower than the
# others on lavapipe, so they are timed only where the budget could absorb that.
_CPU_PRIOR = {"tiled": 30.0, "direct": 30.0}


def search_plan(ctx: Context, geo: Geometry, base: Tuning):
    """The tuner's stages for ``geo`` (each proposes variations of the best candidate so far, all
    resolved) and the prior expected cost of a candidate (see :func:`vkconv.ops.tune.search`)."""

    def families(best: Candidate) -> list[Candidate]:
        names = [n for n in KERNELS if n != best.kernel and eligible(n, geo) is None]
        return [resolve(ctx, Candidate(n), geo, base) for n in sorted(names, key=lambda n: prior(Candidate(n)))]

    def tiles(best: Candidate) -> list[Candidate]:
        if best.kernel == "tiled":
            return [dataclasses.replace(best, tile=t) for t in tile_shapes(ctx)]
        return [dataclasses.replace(best, mb=mb, pb=pb) for mb, pb in register_tiles(best.kernel, base)[:6]]

    def sizes(best: Candidate) -> list[Candidate]:
        return [dataclasses.replace(best, local_size=n) for n in local_sizes(ctx, best.kernel)]

    def texels(best: Candidate) -> list[Candidate]:
        return [dataclasses.replace(best, texel=t) for t in texel_choices(best.kernel, base)]

    def unrolls(best: Candidate) -> list[Candidate]:
        # At most 8 accumulator updates a step: 4-8 rows of a 3x3 kernel measured 0.97-1.66x one
        # row's time and took 1.6-5x as long to build (9 s for a 16x28 tile on Mesa 25).
        if best.kernel not in ROWS_KERNELS:
            return []
        kw = geo.kernel[2] if best.kernel == "implicit_gemm" else 1
        return [dataclasses.replace(best, unroll=u) for u in UNROLLS if u * kw <= 8]

    def shares(best: Candidate) -> list[Candidate]:
        return [dataclasses.replace(best, shared=s) for s in shared_choices(ctx, best.kernel, best.local_size)]

    def prior(cand: Candidate) -> float:
        return _CPU_PRIOR.get(cand.kernel, 1.0) if ctx.info.type not in GPU_TYPES else 1.0

    return [families, tiles, sizes, texels, unrolls, shares], prior
