"""ONNX ``Concat`` and ``Slice`` on the device, for device-resident graphs: copy commands only
(one region per outer index), no shader."""
from __future__ import annotations

import math
from collections.abc import Sequence

from vkconv.ops.elementwise import Shape, element_count
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, get_context, vk


class Concat:
    """ONNX ``Concat`` along ``axis`` (negative counts from the end): transfer commands only, one
    copy region per (input, outer index), so no shader runs."""

    def __init__(self, axis: int, ctx: Context | None = None):
        self.axis = int(axis)
        self.ctx = ctx or get_context()

    def _axis(self, rank: int) -> int:
        if not -rank <= self.axis < rank:
            raise ValueError(f"axis: {self.axis} is out of range for rank {rank}")
        return self.axis % rank

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]:
        if not in_shapes:
            raise ValueError("Concat: expected at least 1 input")
        first = tuple(int(d) for d in in_shapes[0])
        axis = self._axis(len(first))
        out = list(first)
        for i, s in enumerate(in_shapes[1:], 1):
            s = tuple(int(d) for d in s)
            if len(s) != len(first) or any(a != b and a > 0 and b > 0 for k, (a, b) in enumerate(zip(s, first))
                                           if k != axis):
                raise ValueError(f"input {i}: shape {s} cannot be concatenated with {first} on axis {axis}")
            out[axis] = out[axis] + s[axis] if out[axis] > 0 and s[axis] > 0 else -1
        return [tuple(out)]

    def record(self, cmd: CommandBuffer, inputs: Sequence[Buffer], outputs: Sequence[Buffer],
               in_shapes: Sequence[Shape]) -> list:
        out = self.output_shapes(in_shapes)[0]
        element_count("Concat output", out)
        axis = self._axis(len(out))
        outer = math.prod(out[:axis])
        out_chunk = 4 * math.prod(out[axis:])
        offset = 0
        for buf, shape in zip(inputs, in_shapes):
            chunk = 4 * math.prod(shape[axis:])
            regions = [vk.VkBufferCopy(srcOffset=o * chunk, dstOffset=o * out_chunk + offset, size=chunk)
                       for o in range(outer)]
            vk.vkCmdCopyBuffer(cmd.handle, buf.buffer, outputs[0].buffer, len(regions), regions)
            offset += chunk
        return []


class Slice:
    """ONNX ``Slice`` of one ``axis`` (negative counts from the end) with step 1: ``starts`` and
    ``ends`` clamped as ONNX clamps them (DCN exporters split a conv's output into offsets and mask
    this way)."""

    def __init__(self, axis: int, start: int, end: int, ctx: Context | None = None):
        self.axis, self.start, self.end = int(axis), int(start), int(end)
        self.ctx = ctx or get_context()

    def _range(self, shape: Shape) -> tuple[int, int, int]:
        """(axis, first index, count) for an input of ``shape``."""
        rank = len(shape)
        if not -rank <= self.axis < rank:
            raise ValueError(f"axes: {self.axis} is out of range for rank {rank}")
        axis = self.axis % rank
        size = int(shape[axis])
        start, end = (s + size if s < 0 else s for s in (self.start, self.end))
        start, end = min(max(start, 0), size), min(max(end, 0), size)
        return axis, start, max(end - start, 0)

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]:
        shape = tuple(int(d) for d in in_shapes[0])
        axis = self.axis % len(shape) if -len(shape) <= self.axis < len(shape) else self.axis
        if 0 <= axis < len(shape) and shape[axis] <= 0:  # unknown while importing
            return [shape]
        axis, _, count = self._range(shape)
        return [(*shape[:axis], count, *shape[axis + 1:])]

    def record(self, cmd: CommandBuffer, inputs: Sequence[Buffer], outputs: Sequence[Buffer],
               in_shapes: Sequence[Shape]) -> list:
        shape = tuple(int(d) for d in in_shapes[0])
        element_count("Slice output", self.output_shapes(in_shapes)[0])
        axis, start, count = self._range(shape)
        inner = 4 * math.prod(shape[axis + 1:])
        regions = [vk.VkBufferCopy(srcOffset=(o * shape[axis] + start) * inner, dstOffset=o * count * inner,
                                   size=count * inner) for o in range(math.prod(shape[:axis]))]
        vk.vkCmdCopyBuffer(cmd.handle, inputs[0].buffer, outputs[0].buffer, len(regions), regions)
        return []
