"""ONNX ``Transpose`` on the device, for device-resident graphs: host side of
``shaders/graph/transpose.comp`` (the Keras converter's layout changes around ConvLSTM2D and
BatchNormalization, channels-last models' NHWC <-> NCHW)."""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from vkconv.kernels.divide import magic
from vkconv.ops.elementwise import MAX_RANK, Shape, element_count
from vkconv.ops.launch import LoopLaunch
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, get_context
from vkconv.runtime.pipeline import DescriptorSet, get_pipeline

_PUSH = struct.Struct("<8I5i5ii")


class Transpose(LoopLaunch):
    """ONNX ``Transpose`` of a float32 tensor of rank <= 5: output axis ``i`` is input axis
    ``perm[i]``; ``perm`` None reverses the axes (the ONNX default).  A permutation that only
    moves size-1 axes, or keeps the memory order, is one buffer copy (no shader)."""

    def __init__(self, perm: Sequence[int] | None = None, ctx: Context | None = None):
        self.perm = None if perm is None else tuple(int(a) for a in perm)
        self.ctx = ctx or get_context()

    def _perm(self, rank: int) -> tuple[int, ...]:
        if rank > MAX_RANK:
            raise ValueError(f"x: rank {rank} is above {MAX_RANK}")
        if self.perm is None:
            return tuple(range(rank - 1, -1, -1))
        if sorted(self.perm) != list(range(rank)):
            raise ValueError(f"perm: {list(self.perm)} is not a permutation of the {rank} axes of x")
        return self.perm

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(int(d) for d in in_shapes[0])
        return [tuple(shape[a] for a in self._perm(len(shape)))]

    def collapse(self, shape: Shape) -> list[tuple[int, int]]:
        """(output extent, input element stride) per axis the shader walks, outermost first:
        size-1 axes dropped, neighbours that are neighbours in the input too merged.  At most one
        axis left means the output is the input's memory, unchanged."""
        shape = tuple(int(d) for d in shape)
        strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
        axes: list[tuple[int, int]] = []
        for a in self._perm(len(shape)):
            if shape[a] == 1:
                continue
            if axes and axes[-1][1] == strides[a] * shape[a]:
                axes[-1] = (axes[-1][0] * shape[a], strides[a])
            else:
                axes.append((shape[a], strides[a]))
        return axes

    def record(self, cmd: CommandBuffer, inputs: Sequence[Buffer], outputs: Sequence[Buffer],
               in_shapes: Sequence[Shape]) -> list:
        shape = tuple(int(d) for d in in_shapes[0])
        total = element_count("Transpose output", self.output_shapes(in_shapes)[0])
        axes = self.collapse(shape)
        if len(axes) <= 1:
            cmd.copy(inputs[0].buffer, outputs[0].buffer, 4 * total)
            return []
        padded = [(1, 0)] * (5 - len(axes)) + axes
        extents, strides = [e for e, _ in padded], [s for _, s in padded]
        launch = self.loop_launch("transpose", total, in_shapes)
        local = launch.local
        pipe = get_pipeline(self.ctx, "transpose", 2, _PUSH.size, (local, 1, 1, 0, len(axes)))
        dset = DescriptorSet(pipe, [inputs[0], outputs[0]])
        push = _PUSH.pack(*[v for e in extents[1:] for v in magic(e)], *extents, *strides, total)
        cmd.dispatch(pipe, dset, push, launch.groups(self.ctx, total))
        return [dset]
