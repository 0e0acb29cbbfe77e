"""Elementwise kernels for device-resident graphs: ONNX Add/Sub/Mul/Div with broadcasting and the
unary activations (Relu, Clip, LeakyRelu, HardSwish, HardSigmoid, Sigmoid, Tanh).

These kernels own no buffers and no plan: ``record(cmd, inputs, outputs, in_shapes)`` records
their dispatches into a command buffer the caller owns (see :class:`vkconv.graph.Graph`), reading
and writing the caller's :class:`~vkconv.runtime.buffer.Buffer` objects, and returns the objects (descriptor
sets) that must live as long as that command buffer.  ``output_shapes(in_shapes)`` needs no device.
Tensors are dense row-major float32; shape entries <= 0 mean "not known yet" (OpenCV asks for
shapes while importing a model with dynamic sizes) and stay unknown in the output shapes.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

from vkconv.kernels.activation import (
    MAX_INSTRUCTIONS,
    OP_CODES,
    Activation,
    Instruction,
    activation_instruction,
    check_program,
)
from vkconv.kernels.divide import magic
from vkconv.ops.launch import LoopLaunch
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, get_context
from vkconv.runtime.pipeline import DescriptorSet, get_pipeline

MAX_RANK = 5
_INT32_MAX = 2**31 - 1

Shape = tuple[int, ...]


def element_count(name: str, shape: Shape) -> int:
    """Number of elements of ``shape``; ValueError when it is empty or past 32-bit indexing."""
    count = 1
    for d in shape:
        count *= int(d)
    if count <= 0:
        raise ValueError(f"{name}: shape {tuple(shape)} has no elements")
    if count > _INT32_MAX // 4:
        raise ValueError(f"{name}: shape {tuple(shape)} has too many elements for 32-bit indexing")
    return count


def checked_sizes(name: str, x_shape: Shape, out: Shape) -> tuple[Shape, int]:
    """``x_shape`` as a tuple and ``out``'s element count, for one-input ops; ValueError naming
    ``name`` when either tensor is empty or past 32-bit indexing."""
    element_count(f"{name} input x", x_shape)
    return tuple(x_shape), element_count(f"{name} output", out)


def broadcast_shape(a: Shape, b: Shape) -> Shape:
    """ONNX multidirectional (numpy) broadcast of two shapes; ValueError names the mismatch."""
    rank = max(len(a), len(b))
    a_full = (1,) * (rank - len(a)) + tuple(a)
    b_full = (1,) * (rank - len(b)) + tuple(b)
    out = []
    for x, y in zip(a_full, b_full):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        elif x <= 0 or y <= 0:  # one side unknown: the known extent (!= 1) must be it
            out.append(max(x, y))
        else:
            raise ValueError(f"B: shape {tuple(b)} does not broadcast with A's {tuple(a)} (axis extents "
                             f"{x} and {y})")
    return tuple(out)


def broadcast_strides(shape: Shape, out: Shape) -> list[int]:
    """Element strides of a row-major tensor of ``shape`` along each axis of ``out`` (right-aligned,
    same rank as ``out``), 0 along the axes it broadcasts."""
    full = (1,) * (len(out) - len(shape)) + tuple(shape)
    strides, step = [0] * len(out), 1
    for axis in range(len(out) - 1, -1, -1):
        strides[axis] = step if full[axis] != 1 else 0
        step *= full[axis]
    return strides


MAX_INPUTS = 4
_PUSH = struct.Struct("<6I5i20ii")


def collapse(out: Shape, in_shapes: Sequence[Shape]) -> tuple[list[int], list[list[int]]]:
    """``out``'s axes merged where every input is either broadcast along both neighbours or
    contiguous across them, size-1 axes dropped: (extents, per-input element strides), outermost
    first, at least one axis."""
    strides = [broadcast_strides(s, out) for s in in_shapes]
    extents: list[int] = []
    merged: list[list[int]] = [[] for _ in in_shapes]
    for axis, extent in enumerate(out):
        if extent == 1:
            continue
        here = [st[axis] for st in strides]
        # contiguous across the two axes, or broadcast along both (then both strides are 0)
        if extents and all(prev[-1] == s * extent for prev, s in zip(merged, here)):
            extents[-1] *= extent
            for prev, s in zip(merged, here):
                prev[-1] = s
            continue
        extents.append(extent)
        for prev, s in zip(merged, here):
            prev.append(s)
    if not extents:
        return [1], [[0] for _ in in_shapes]
    return extents, merged


class Elementwise(LoopLaunch):
    """A fused chain of elementwise ops on float32 tensors of rank <= 5 with ONNX broadcasting: one
    dispatch (``shaders/elementwise.comp``) reads each input once and writes the output once.

    ``program``: at most 8 :class:`~vkconv.kernels.activation.Instruction` over ``n_inputs``
    (<= 4) inputs; the last one's
    result is the output, of shape ``broadcast_shape`` of every input.  ``channel_inputs``: inputs
    given as ``[C]`` vectors that apply along axis 1 (NCHW channels) of the output, as
    BatchNormalization's parameters do.  Division by zero gives IEEE inf/NaN, as in ONNX.
    """

    def __init__(self, program: Sequence[Instruction], n_inputs: int, ctx: Context | None = None,
                 channel_inputs: Sequence[int] = (), name: str = "elementwise"):
        if not 1 <= n_inputs <= MAX_INPUTS:
            raise ValueError(f"n_inputs: expected 1..{MAX_INPUTS}, got {n_inputs}")
        check_program(program, n_inputs)
        self.program = tuple(program)
        self.n_inputs = n_inputs
        self.channel_inputs = frozenset(channel_inputs)
        self.name = name  # how errors name the op
        self.ctx = ctx or get_context()

    def _shapes(self, in_shapes: Sequence[Shape]) -> tuple[list[Shape], Shape]:
        if len(in_shapes) != self.n_inputs:
            raise ValueError(f"{self.name}: expected {self.n_inputs} inputs, got {len(in_shapes)}")
        shapes = [tuple(int(d) for d in s) for s in in_shapes]
        for i, s in enumerate(shapes):
            if len(s) > MAX_RANK:
                raise ValueError(f"input {i}: rank above {MAX_RANK} is not supported (shape {s})")
        tensors = [s for i, s in enumerate(shapes) if i not in self.channel_inputs]
        out: Shape = ()
        for s in tensors:
            out = broadcast_shape(out, s)
        for i in self.channel_inputs:
            if len(out) < 2 or len(shapes[i]) != 1 or (out[1] > 0 and shapes[i][0] != out[1]):
                raise ValueError(f"x: {shapes[i][0]} per-channel values cannot apply to shape {out}")
            shapes[i] = (shapes[i][0],) + (1,) * (len(out) - 2)
        return shapes, out

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]:
        return [self._shapes(in_shapes)[1]]

    def record(self, cmd: CommandBuffer, inputs: Sequence[Buffer], outputs: Sequence[Buffer],
               in_shapes: Sequence[Shape]) -> list:
        shapes, out = self._shapes(in_shapes)
        element_count(f"{self.name} output", out)
        extents, strides = collapse(out, shapes)
        if len(extents) > 5:
            raise ValueError(f"{self.name}: the broadcast of {shapes} does not collapse to 5 axes")
        axes = len(extents)
        pad = 5 - axes
        extents = [1] * pad + extents
        strides = [[0] * pad + s for s in strides] + [[0] * 5] * (MAX_INPUTS - self.n_inputs)
        vec4 = extents[4] % 4 == 0 and all(s[4] in (0, 1) for s in strides)
        if vec4:
            extents[4] //= 4
        inner = extents[1] * extents[2] * extents[3] * extents[4]
        magics = [v for d in extents[2:] for v in magic(d)]
        name = "elementwise_vec4" if vec4 else "elementwise"
        launch = self.loop_launch(name, inner, in_shapes)
        local = launch.local
        spec: list[int | float] = [local, 1, 1, 0, self.n_inputs, len(self.program), axes, 0]
        for k in range(MAX_INSTRUCTIONS):
            ins = self.program[k] if k < len(self.program) else Instruction(0, 0, 0)
            spec += ins.constants()
        pipe = get_pipeline(self.ctx, name, MAX_INPUTS + 1, _PUSH.size, tuple(spec))
        bufs = list(inputs[:self.n_inputs]) + [inputs[0]] * (MAX_INPUTS - self.n_inputs) + [outputs[0]]
        dset = DescriptorSet(pipe, bufs)
        groups = launch.groups(self.ctx, inner)
        cmd.dispatch(pipe, dset, _PUSH.pack(*magics, *extents, *[v for s in strides for v in s], inner),
                     (groups[0], 1, min(extents[0], self.ctx.info.max_workgroup_count[2])))
        return [dset]


class Binary(Elementwise):
    """ONNX ``Add``/``Sub``/``Mul``/``Div`` of float32 tensors of rank <= 5 with broadcasting, and an
    optional fused activation (see :meth:`vkconv.kernels.activation.Activation.parse`).

    Inputs A, B; output ``broadcast_shape(A, B)``.  Division by zero gives IEEE inf/NaN, as in ONNX.
    """

    def __init__(self, op: str, activation=None, ctx: Context | None = None):
        if op not in OP_CODES:
            raise ValueError(f"op: expected one of {', '.join(OP_CODES)}, got {op!r}")
        program = [Instruction(OP_CODES[op], 0, 1)]
        if Activation.parse(activation).kind:
            program.append(activation_instruction(activation, 4))
        super().__init__(program, 2, ctx, name=op)
        self.op = op


class Unary(Elementwise):
    """An activation applied elementwise (``Relu``, ``("Clip", lo, hi)``, ``("LeakyRelu", alpha)``,
    ``HardSwish``, ``("HardSigmoid", alpha, beta)``, ``Sigmoid``, ``Tanh``); output shape = input
    shape."""

    def __init__(self, activation, ctx: Context | None = None):
        if Activation.parse(activation).kind == 0:
            raise ValueError(f"activation: expected an activation, got {activation!r}")
        super().__init__([activation_instruction(activation, 0)], 1, ctx, name="activation")
