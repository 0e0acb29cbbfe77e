"""Launch shapes chosen from the device's type and limits (or fixed by a tuned candidate): local
sizes, register tiles, shared-memory tiles.  The tables were measured on lavapipe (Mesa 22.3);
on other devices the tuner (:mod:`vkconv.ops.tune`) measures instead of trusting them."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from vkconv.runtime.context import Context
from vkconv.runtime.errors import VkconvError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tuning:
    """Launch shapes chosen from the device: local size and register-tile sizes."""

    local_size: int
    max_tile: int  # MB * PB bound: register-tile floats per invocation
    texel: bool    # read operands through texel buffers
    fp16: bool = False  # keep weights as fp16 (RGBA16F texel views); arithmetic stays fp32
    # A candidate's fixed choices (0 / None: chosen by the tables below): the rows kernels' output
    # channels per invocation, the rows and depthwise kernels' pixels per invocation, the tiled
    # kernel's tile shape.
    mb: int = 0
    pb: int = 0
    tile: TileShape | None = None
    # The rows kernels' subgroup-shared input rows (conv_rows_shared: the lanes of a subgroup share
    # one pixel tile and hold neighbouring output-channel blocks); chosen per shape by
    # vkconv.ops.conv.selection, never by the device alone.
    shared: bool = False
    # The rows kernels' input rows per step of their row loop (0: chosen by rows_unroll)
    unroll: int = 0


def tuning(ctx: Context, fp16: bool | None = None) -> Tuning:
    """Tile sizes by device type, and the weight storage precision.

    On a CPU device (lavapipe) an invocation is one SIMD lane of a loop the JIT unrolls; loads are
    expensive and registers spill cheaply to L1, so big register tiles (16x16) win. A GPU has a
    register file per thread and needs occupancy: at most 32 accumulators per invocation.
    ``fp16``: None follows ``VKCONV_FP16=1`` (ignored, with a log line, where the device cannot read
    RGBA16F texel buffers); True on such a device is an error.
    """
    big = ctx.info.type == "cpu"
    texel = os.environ.get("VKCONV_CONV_TEXEL", "1") not in ("0", "")
    if fp16 is None:
        fp16 = os.environ.get("VKCONV_FP16", "") == "1"
        if fp16 and not ctx.info.fp16_texel:
            log.info("VKCONV_FP16=1 ignored: %s cannot read RGBA16F texel buffers", ctx.info.name)
            fp16 = False
    elif fp16 and not ctx.info.fp16_texel:
        raise VkconvError(f"fp16: {ctx.info.name} cannot read RGBA16F texel buffers")
    return Tuning(local_size=ctx.local_size(), max_tile=CPU_MAX_TILE if big else 32, texel=texel,
                  fp16=bool(fp16) and texel)


# Relative throughput of the rows kernel for (MB, PB) register tiles, measured on lavapipe over
# 1x1 GEMMs and 3x3 convolutions (stride 1 and 2); larger tiles (12x20, 20x12, 24x8, 16x32) were
# no faster or spilled. A GPU only sees the tiles its max_tile allows.
# PB 28 divides the 28-, 56-, 112- and 224-wide rows (and Winograd's 56-tile planes) that PB 16
# pads by 1/8: there 16x28 took 0.82-0.87x the time of 16x16 on Mesa 22.3 and 0.86-0.99x on
# Mesa 25.0 (VGG-16's 28x28 layers, 3x3 s2 128->256 at 56; docs/PERFORMANCE.md), and about 1.0x
# where 16 divides the width too; so it sits just below 16x16 and wins where 16 would pad.
# (12x28 measured about as fast as 16x28 but is left out: choose_mb would give it every layer of
# 12k output channels, whose only PB would then be 28 whatever the width.)
ROWS_SPEED = {(16, 16): 1.0, (16, 28): 0.95, (16, 8): 0.85, (8, 16): 0.8, (8, 32): 0.8, (8, 28): 0.8,
              (16, 4): 0.6, (4, 32): 0.6, (8, 8): 0.6, (4, 16): 0.5, (8, 4): 0.35, (4, 8): 0.35, (4, 4): 0.25}
CPU_MAX_TILE = 448  # accumulators per invocation on a CPU device: up to 16x28, which did not spill
DEPTHWISE_SPEED = {16: 1.0, 8: 0.8, 4: 0.5}
DEPTHWISE_TILES = {(0, pb): speed for pb, speed in DEPTHWISE_SPEED.items()}  # choose_pb's form


def choose_mb(cout_g: int, tune: Tuning) -> int:
    """Output channels per invocation: ``tune.mb`` when a candidate fixes it, else the block whose
    fastest allowed tile is fastest net of the zero-padded part of the last block."""
    if tune.mb:
        return tune.mb
    best = None
    for mb in sorted({m for m, _ in ROWS_SPEED}, reverse=True):
        speeds = [s for (m, pb), s in ROWS_SPEED.items() if m == mb and m * pb <= tune.max_tile]
        if not speeds:
            continue
        score = max(speeds) * max(cout_g, 1) / max(-(-cout_g // mb) * mb, 1)
        if best is None or score > best[0]:
            best = (score, mb)
    assert best is not None  # ROWS_SPEED has a 4 x 4 tile, within every max_tile (>= 32)
    return best[1]


def choose_pb(mb: int, out_w: int, tune: Tuning, speeds=ROWS_SPEED) -> int:
    """Pixels per invocation for ``mb`` channels: ``tune.pb`` when a candidate fixes it, else the
    fastest tile net of the partial last tile."""
    if tune.pb:
        return tune.pb
    best = None
    for (m, pb), speed in speeds.items():
        if m != mb or m * pb > tune.max_tile:
            continue
        padded = -(-out_w // pb) * pb
        score = speed * out_w / padded
        if best is None or score > best[0]:
            best = (score, pb)
    return best[1] if best else 4


UNROLLS = (1, 2, 4, 8)


def rows_unroll(rows: int, kw: int, tune: Tuning) -> int:
    """Input rows per step of conv_rows' row loop for ``rows`` rows (input channels x kernel depth x
    kernel height) of a kernel ``kw`` wide: ``tune.unroll`` when a candidate fixes it, else about 4
    updates of each accumulator per step (4 // kw rows, at least 1), fewer where rounding ``rows`` up
    to whole steps would add more than 1/8 (the rows past the last add zeros).  Measured on
    lavapipe, both drivers (docs/PERFORMANCE.md): 4 rows a step took 0.65-0.85x the time of 1 on
    VGG-16's Winograd GEMMs and a 1x1 GEMM; 3x3 implicit GEMMs, whose 3 kernel columns already
    update each accumulator 3 times a row, gained nothing (0.95-1.12x)."""
    if tune.unroll:
        return tune.unroll
    return next(u for u in (4, 2, 1) if u <= max(1, 4 // kw) and -rows % u <= rows / 8)


def parallel_tuning(tune: Tuning, outputs: int, workgroups: int = 4) -> Tuning:
    """``tune`` with ``max_tile`` lowered (to 16 at least: the 4 x 4 tile) so that a dispatch of
    ``outputs`` values still spreads over about ``workgroups`` workgroups.  For a small dispatch
    that the next one waits for (a ConvLSTM time step): lavapipe runs one workgroup per thread, and
    the biggest tile left the other core idle.  Measured on lavapipe (Mesa 22.3, 2 cores), ConvLSTM
    steps of 72-162 pixels x 12-20 gate channels: 4 x 4 / 4 x 8 tiles took 0.4-0.55x the time of
    the tables' 16 x 8."""
    limit = outputs // (workgroups * tune.local_size)
    if tune.mb or tune.pb or limit >= tune.max_tile:
        return tune
    # a power of two, so that nearby sizes share one bound (ops keep a kernel per bound)
    return dataclasses.replace(tune, max_tile=max(16, 1 << max(limit, 1).bit_length() - 1))


@dataclass(frozen=True)
class TileShape:
    """conv_tiled.comp's tiles: TM x TN per workgroup, K strips of TK, RM x RN per invocation."""

    tm: int
    tn: int
    tk: int
    rm: int
    rn: int

    @property
    def invocations(self) -> int:
        return (self.tm // self.rm) * (self.tn // self.rn)

    @property
    def shared_bytes(self) -> int:
        """Both operand tiles plus the per-pixel origins (an ivec4 each)."""
        return 4 * (self.tm * self.tk + self.tk * self.tn) + 16 * self.tn


# Largest first: 64 x 64 reuses each loaded operand 64 times with 64 accumulators per invocation
# (a GPU's register budget at good occupancy); smaller tiles for devices with fewer invocations or
# less shared memory.
TILE_SHAPES = (TileShape(64, 64, 16, 8, 8), TileShape(32, 64, 16, 4, 8), TileShape(32, 32, 16, 4, 4),
                TileShape(16, 16, 8, 4, 4))


def choose_tiles(ctx: Context) -> TileShape:
    """The largest tile within min(128, device) invocations per workgroup and min(16 KiB, device)
    shared memory."""
    info = ctx.info
    invocations = min(128, info.max_workgroup_invocations, info.max_workgroup_size[0])
    shared = min(16384, info.max_shared_memory)
    for tile in TILE_SHAPES:
        if tile.invocations <= invocations and tile.shared_bytes <= shared:
            return tile
    raise VkconvError(f"tiled: {info.name} allows {invocations} invocations and {shared} bytes of shared "
                      f"memory per workgroup, below the smallest tile's {TILE_SHAPES[-1]}")




T = TypeVar("T")


def fitting_tile(tiles: Sequence[T], need: int, capacity) -> T:
    """The first of ``tiles`` (ordered small to large) whose ``capacity(tile)`` holds ``need``
    channels, else the largest: narrow layers waste no padded channels, wide ones get the biggest
    register tile the list allows (the ops pick the list per device type)."""
    return next((tile for tile in tiles if capacity(tile) >= need), tiles[-1])
