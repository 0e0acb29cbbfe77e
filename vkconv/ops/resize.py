"""2-D Resize / Upsample (nearest and bilinear) over NCHW float32 for device-resident graphs.

Like :mod:`vkconv.ops.elementwise`, :class:`Resize` records into a command buffer and buffers the caller
owns.  The sampling positions are computed here in float64, following the ONNX specification's
formulas as its reference implementation does, into small per-row / per-column index and weight
tables (clamped to the input, so the shader never reads out of bounds); ``shaders/graph/resize.comp``
only gathers and blends.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.divide import magic
from vkconv.ops.elementwise import Shape, checked_sizes
from vkconv.ops.launch import LoopLaunch
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, get_context
from vkconv.runtime.pipeline import DescriptorSet, get_pipeline
from vkconv.runtime.transfer import upload_constant

_PUSH = struct.Struct("<4I5i")
COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def source_coordinate(mode: str, o: int, scale: float, in_size: int, out_size: int) -> float:
    """Where output index ``o`` samples the input axis (ONNX coordinate_transformation_mode)."""
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out_size > 1 else 0.0
    if mode == "align_corners":
        return 0.0 if out_size == 1 else o * (in_size - 1) / (out_size - 1)
    return o / scale  # asymmetric


def nearest_index(mode: str, x: float) -> int:
    if mode == "floor":
        return math.floor(x)
    if mode == "ceil":
        return math.ceil(x)
    if x == math.floor(x) + 0.5:  # exact halves: the mode decides
        return math.floor(x) if mode == "round_prefer_floor" else math.ceil(x)
    return math.floor(x + 0.5)


def axis_table(linear: bool, coord_mode: str, nearest_mode: str, scale: float, in_size: int,
               out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices [out, 2] int32, weights [out] float32)`` for one axis: output o is
    ``x[i0] * (1 - w) + x[i1] * w``; indices clamped to ``[0, in_size)`` (edge replication)."""
    idx = np.zeros((out_size, 2), np.int32)
    wts = np.zeros(out_size, np.float32)
    for o in range(out_size):
        x = source_coordinate(coord_mode, o, scale, in_size, out_size)
        if linear:
            base = math.floor(x)
            idx[o] = (min(max(base, 0), in_size - 1), min(max(base + 1, 0), in_size - 1))
            wts[o] = x - base
        else:
            idx[o] = min(max(nearest_index(nearest_mode, x), 0), in_size - 1)
    return idx, wts


class Resize(LoopLaunch):
    """ONNX ``Resize`` (or ``Upsample``) of the two spatial axes of NCHW input.

    Exactly one of ``scales`` (4 floats, N and C ones equal to 1) and ``sizes`` (4 ints, N and C
    equal to the input's) gives the output size, as in ONNX: ``floor(in * scale)`` or ``sizes``
    (then ``scale = out / in``).  ``mode`` ``"nearest"`` or ``"linear"``;
    ``coordinate_transformation_mode`` one of :data:`COORDINATE_MODES`; ``nearest_mode`` one of
    :data:`NEAREST_MODES`.  Upsample is ``Resize(mode, "asymmetric", "floor", scales=...)``.
    """

    def __init__(self, mode: str = "nearest", coordinate_transformation_mode: str = "half_pixel",
                 nearest_mode: str = "round_prefer_floor", *, scales=None, sizes=None,
                 ctx: Context | None = None):
        if mode not in ("nearest", "linear"):
            raise ValueError(f"mode: expected 'nearest' or 'linear', got {mode!r}")
        if coordinate_transformation_mode not in COORDINATE_MODES:
            raise ValueError(f"coordinate_transformation_mode: expected one of {', '.join(COORDINATE_MODES)}, "
                             f"got {coordinate_transformation_mode!r}")
        if nearest_mode not in NEAREST_MODES:
            raise ValueError(f"nearest_mode: expected one of {', '.join(NEAREST_MODES)}, got {nearest_mode!r}")
        if (scales is None) == (sizes is None):
            raise ValueError("scales: give exactly one of scales and sizes")
        if scales is not None:
            scales = np.asarray(scales, np.float32).reshape(-1)
            if scales.size != 4 or not np.all(np.isfinite(scales)) or np.any(scales <= 0) \
                    or scales[0] != 1 or scales[1] != 1:
                raise ValueError(f"scales: expected 4 positive values with N and C scales 1, got {scales.tolist()}")
        if sizes is not None:
            sizes = np.asarray(sizes).reshape(-1)
            if sizes.size != 4 or np.any(sizes < 1):
                raise ValueError(f"sizes: expected 4 positive ints, got {sizes.tolist()}")
            sizes = tuple(int(s) for s in sizes)
        self.mode, self.coord_mode, self.nearest_mode = mode, coordinate_transformation_mode, nearest_mode
        self.scales, self.sizes = scales, sizes
        self.ctx = ctx or get_context()

    def _axes(self, x_shape: Shape) -> list[tuple[int, float]]:
        """(output size, scale) of H and W."""
        axes = []
        for axis in (2, 3):
            size = x_shape[axis]
            if self.sizes is not None:
                out = self.sizes[axis]
                axes.append((out, out / size if size > 0 else 1.0))
            else:
                scale = float(self.scales[axis])  # float32 widened, as the reference does
                axes.append((math.floor(size * scale) if size > 0 else -1, scale))
        return axes

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]:
        x_shape = shapes.single_nchw("Resize", in_shapes)
        if self.sizes is not None and any(0 < a != b for a, b in zip(x_shape[:2], self.sizes[:2])):
            raise ValueError(f"sizes: {self.sizes} resize N or C of x {x_shape}; only H and W may change")
        out = tuple(o for o, _ in self._axes(x_shape))
        if any(o == 0 for o in out):
            raise ValueError(f"scales: {self.scales.tolist()} shrink x {x_shape} to an empty output")
        return [(*x_shape[:2], *out)]

    def record(self, cmd: CommandBuffer, inputs: Sequence[Buffer], outputs: Sequence[Buffer],
               in_shapes: Sequence[Shape]) -> list:
        out = self.output_shapes(in_shapes)[0]
        x_shape, total = checked_sizes("Resize", in_shapes[0], out)
        linear = self.mode == "linear"
        tables = [axis_table(linear, self.coord_mode, self.nearest_mode, scale, x_shape[axis], size)
                  for axis, (size, scale) in zip((2, 3), self._axes(x_shape))]
        # nearest upsampling by whole factors: the shader computes o / f instead of reading tables
        factors = [o // i if not linear and o % i == 0 and np.array_equal(t[0][:, 0], np.arange(o) // (o // i))
                   else 0 for (t, i, o) in zip(tables, x_shape[2:], out[2:])]
        fh, fw = factors if all(factors) else (0, 0)
        vec4 = fw > 0 and out[3] % 4 == 0
        lanes = 4 if vec4 else 1
        # uploaded once, in front of the next submit (this command buffer's first)
        index = upload_constant(self.ctx, np.concatenate([t[0].reshape(-1) for t in tables]), "resize indices")
        weight = upload_constant(self.ctx, np.concatenate([t[1] for t in tables]), "resize weights")
        launch = self.loop_launch("resize", total // lanes, in_shapes)
        local = launch.local
        pipe = get_pipeline(self.ctx, "resize", 4, _PUSH.size, (local, 1, 1, 0, int(linear), fh, fw, int(vec4)))
        dset = DescriptorSet(pipe, [inputs[0], index, weight, outputs[0]])
        cmd.dispatch(pipe, dset, _PUSH.pack(*magic(out[3] // lanes), *magic(out[2]), *x_shape[2:], *out[2:],
                                            total // lanes), launch.groups(self.ctx, total // lanes))
        return [dset, index, weight]
