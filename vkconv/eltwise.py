"""Elementwise kernels for device-resident graphs: ONNX Add/Sub/Mul/Div with broadcasting and the
unary activations (Relu, Clip, LeakyRelu, HardSwish, HardSigmoid, Sigmoid, Tanh).

These kernels own no buffers and no plan: ``record(cmd, inputs, outputs, in_shapes)`` records
their dispatches into a command buffer the caller owns (see :class:`vkconv.graph.Graph`), reading
and writing the caller's :class:`~vkconv.buffer.Buffer` objects, and returns the objects (descriptor
sets) that must live as long as that command buffer.  ``output_shapes(in_shapes)`` needs no device.
Tensors are dense row-major float32; shape entries <= 0 mean "not known yet" (OpenCV asks for
shapes while importing a model with dynamic sizes) and stay unknown in the output shapes.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

from .activation import Activation
from .buffer import Buffer
from .command import CommandBuffer
from .context import Context, get_context
from .pipeline import DescriptorSet

MAX_RANK = 5
_INT32_MAX = 2**31 - 1
_BINARY_OPS = {"Add": 0, "Sub": 1, "Mul": 2, "Div": 3}
_BINARY_PUSH = struct.Struct("<16i2f")
_UNARY_PUSH = struct.Struct("<i2f")

Shape = tuple[int, ...]


# Invocations per workgroup of the one-element-per-invocation kernels.
ELEMENTWISE_LOCAL = 128


def linear_groups(ctx: Context, count: int, local: int) -> tuple[int, int, int]:
    """Workgroups for a grid-stride loop over ``count`` items: capped at the device limit, the
    shaders loop over the rest."""
    return (max(1, min(-(-count // local), ctx.info.max_workgroup_count[0])), 1, 1)


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


class Binary:
    """ONNX ``Add``/``Sub``/``Mul``/``Div`` of float32 tensors of rank <= 5 with broadcasting, and an
    optional fused activation (see :meth:`vkconv.activation.Activation.parse`).

    Inputs A, B; output ``broadcast_shape(A, B)``.  Division by zero gives IEEE inf/NaN, as in ONNX.
    """

    def __init__(self, op: str, activation=None, ctx: Context | None = None):
        if op not in _BINARY_OPS:
            raise ValueError(f"op: expected one of {', '.join(_BINARY_OPS)}, got {op!r}")
        self.op = op
        self.activation = Activation.parse(activation)
        self.ctx = ctx or get_context()

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]:
        if len(in_shapes) != 2:
            raise ValueError(f"{self.op}: expected 2 inputs, got {len(in_shapes)}")
        a, b = (tuple(int(d) for d in s) for s in in_shapes)
        if len(a) > MAX_RANK or len(b) > MAX_RANK:
            raise ValueError(f"{self.op}: rank above {MAX_RANK} is not supported (A {a}, B {b})")
        return [broadcast_shape(a, b)]

    def record(self, cmd: CommandBuffer, inputs: Sequence[Buffer], outputs: Sequence[Buffer],
               in_shapes: Sequence[Shape]) -> list:
        out = self.output_shapes(in_shapes)[0]
        total = element_count(f"{self.op} output", out)
        lift = (MAX_RANK - len(out))
        dims = [1] * lift + list(out)
        sa = [0] * lift + broadcast_strides(in_shapes[0], out)
        sb = [0] * lift + broadcast_strides(in_shapes[1], out)
        local = self.ctx.local_size(ELEMENTWISE_LOCAL)
        act = self.activation
        pipe = self.ctx.pipeline("eltwise_binary", 3, _BINARY_PUSH.size,
                                 (local, 1, 1, act.kind, _BINARY_OPS[self.op]))
        dset = DescriptorSet(pipe, [inputs[0], inputs[1], outputs[0]])
        cmd.dispatch(pipe, dset, _BINARY_PUSH.pack(*dims, *sa, *sb, total, act.a, act.b),
                     linear_groups(self.ctx, total, local))
        return [dset]


class Unary:
    """An activation applied elementwise (``Relu``, ``("Clip", lo, hi)``, ``("LeakyRelu", alpha)``,
    ``HardSwish``, ``("HardSigmoid", alpha, beta)``, ``Sigmoid``, ``Tanh``); output shape = input
    shape."""

    def __init__(self, activation, ctx: Context | None = None):
        self.activation = Activation.parse(activation)
        if self.activation.kind == 0:
            raise ValueError(f"activation: expected an activation, got {activation!r}")
        self.ctx = ctx or get_context()

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]:
        if len(in_shapes) != 1:
            raise ValueError(f"activation: expected 1 input, got {len(in_shapes)}")
        return [tuple(int(d) for d in in_shapes[0])]

    def record(self, cmd: CommandBuffer, inputs: Sequence[Buffer], outputs: Sequence[Buffer],
               in_shapes: Sequence[Shape]) -> list:
        total = element_count("activation input", in_shapes[0])
        local = self.ctx.local_size(ELEMENTWISE_LOCAL)
        act = self.activation
        pipe = self.ctx.pipeline("eltwise_unary", 2, _UNARY_PUSH.size, (local, 1, 1, act.kind))
        dset = DescriptorSet(pipe, [inputs[0], outputs[0]])
        cmd.dispatch(pipe, dset, _UNARY_PUSH.pack(total, act.a, act.b), linear_groups(self.ctx, total, local))
        return [dset]
