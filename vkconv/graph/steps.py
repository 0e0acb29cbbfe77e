"""What a :class:`~vkconv.graph.Graph` runs per node: the step protocol, the adapter that runs an
op with resident weights (Conv, ConvTranspose, DeformConv, ConvLSTM2D) through its own recorded
plan, and the mapping from a (fused) ONNX node to its step."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.activation import Activation
from vkconv.onnx.model import Node
from vkconv.onnx.support import POOLS, conv_lstm_params, resize_params, slice_params
from vkconv.ops.conv.op import Conv
from vkconv.ops.conv_lstm import ConvLSTM2D
from vkconv.ops.conv_transpose import ConvTranspose
from vkconv.ops.copies import Concat, Slice
from vkconv.ops.deform_conv import DeformConv
from vkconv.ops.elementwise import Elementwise, Shape, element_count
from vkconv.ops.pool import Pool
from vkconv.ops.resize import Resize
from vkconv.ops.transpose import Transpose
from vkconv.ops.tune import choice_label
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, get_context
from vkconv.runtime.plan import Plan


class GraphStep(Protocol):
    """What a graph step runs (Elementwise, Pool, Concat, PlanStep...): device-free shape inference and
    recording into a command buffer; a ``close()`` method, where present, frees device memory."""

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]: ...

    def record(self, cmd: CommandBuffer, inputs: Sequence[Buffer], outputs: Sequence[Buffer],
               in_shapes: Sequence[Shape]) -> list: ...


def run_step(kernel: GraphStep, arrays: Sequence[np.ndarray], ctx: Context | None = None) -> list[np.ndarray]:
    """Run one kernel (``output_shapes`` + ``record``) on float32 ``arrays`` with a one-off plan:
    for tests and one-off use; a :class:`Graph` is the way to run many."""
    ctx = ctx or get_context()
    arrays = [shapes.as_float32(f"input {i}", a) for i, a in enumerate(arrays)]
    in_shapes = [a.shape for a in arrays]
    out_shapes = kernel.output_shapes(in_shapes)
    for i, s in enumerate([*in_shapes, *out_shapes]):
        element_count(f"tensor {i}", s)
    plan = Plan(ctx, [(f"input {i}", s) for i, s in enumerate(in_shapes)],
                [(f"output {i}", s) for i, s in enumerate(out_shapes)])
    try:
        plan.record(lambda cmd: plan.keep.extend(kernel.record(cmd, plan.inputs, plan.outputs, in_shapes)))
        return plan.run(arrays)
    finally:
        plan.close()


class PlanStep:
    """A Conv, ConvTranspose, DeformConv or ConvLSTM2D node run through its vkconv op's recorded
    plan, on the plan's own input / output buffers when the graph gave it those, else with copies
    in / out.  Inputs: X (and, for DeformConv, offset and optional mask; for ConvLSTM2D, optional
    h0 and c0)."""

    def __init__(self, op: Conv | ConvTranspose | DeformConv | ConvLSTM2D):
        self.op = op

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]:
        x = tuple(int(d) for d in in_shapes[0])
        op = self.op
        if isinstance(op, ConvLSTM2D):
            op.check_state(x, in_shapes[1:], unknown_ok=True)
            return [op.output_shape(x)]
        if isinstance(op, Conv):
            return [shapes.conv_output_shape(x, op.weight_shape, op.strides, op.pads, op.dilations,
                                             op.group, op.auto_pad)[0]]
        if len(x) == op.nd + 2 and any(d <= 0 for d in x[2:]):  # unknown while importing
            cout = op.weight_shape[0] if isinstance(op, DeformConv) else op.weight_shape[1] * op.group
            return [(x[0], cout, *(-1,) * op.nd)]
        return [op.output_shape(x)]

    def plan(self, in_shapes: Sequence[Shape]) -> Plan:
        """The op's plan for these input shapes; calling it also marks the plan most recently used
        in the op's cache, which keeps it alive as long as a graph plan that replays it."""
        x = tuple(int(d) for d in in_shapes[0])
        if isinstance(self.op, DeformConv):
            return self.op.plan(x, len(in_shapes) > 2)
        if isinstance(self.op, ConvLSTM2D):
            return self.op.plan(x, len(in_shapes) > 1)
        return self.op.plan(x)

    def record(self, cmd, inputs, outputs, in_shapes):
        plan = self.plan(in_shapes)
        copied = False
        for buf, own, shape in zip(inputs, plan.inputs, in_shapes):
            if buf is not own:  # the tensors' own sizes: a plan's buffers may be padded beyond them
                cmd.copy(buf.buffer, own.buffer, 4 * math.prod(shape))
                copied = True
        if copied:
            cmd.barrier()
        plan.body(cmd)
        if outputs[0] is not plan.outputs[0]:
            cmd.barrier()
            cmd.copy(plan.outputs[0].buffer, outputs[0].buffer, 4 * math.prod(self.output_shapes(in_shapes)[0]))
        return []

    def close(self) -> None:
        self.op.close()


def build_step(node: Node, constants: Mapping[str, np.ndarray], ctx: Context) -> tuple[GraphStep, list[str]]:
    """(kernel, names of the tensors its ``record`` reads) for a supported node (one that
    :func:`unsupported_reason` accepts, so its weights and parameters are constants)."""
    op, a, ins = node.op_type, node.attrs, node.inputs
    if op in ("Conv", "ConvTranspose"):
        w = np.asarray(constants[ins[1]]).astype(np.float32)
        b = np.asarray(constants[ins[2]]).astype(np.float32) if len(ins) > 2 and ins[2] else None
        nd = w.ndim - 2
        common = dict(strides=tuple(a.get("strides", [1] * nd)), pads=tuple(a.get("pads", [0] * 2 * nd)),
                      dilations=tuple(a.get("dilations", [1] * nd)), group=int(a.get("group", 1)),
                      auto_pad=a.get("auto_pad", "NOTSET"), ctx=ctx,
                      activation=Activation.parse(a.get("_activation")).with_post(a["_post"]) if "_post" in a
                      else a.get("_activation"))
        if op == "Conv":
            return PlanStep(Conv(w, b, **common)), ins[:1]
        shape = a.get("output_shape")
        return PlanStep(ConvTranspose(w, b, output_padding=tuple(a.get("output_padding", [0] * nd)),
                                      output_shape=tuple(shape)[-nd:] if shape else None, **common)), ins[:1]
    if op == "DeformConv":
        w = np.asarray(constants[ins[1]]).astype(np.float32)
        b = np.asarray(constants[node.input(3)]).astype(np.float32) if node.input(3) else None
        deform = DeformConv(w, b, strides=tuple(a.get("strides", [1, 1])), pads=tuple(a.get("pads", [0] * 4)),
                            dilations=tuple(a.get("dilations", [1, 1])), group=int(a.get("group", 1)),
                            offset_group=int(a.get("offset_group", 1)), activation=a.get("_activation"), ctx=ctx)
        return PlanStep(deform), [ins[0], ins[2], *([node.input(4)] if node.input(4) else [])]
    if op == "Slice":
        bounds = slice_params(node, constants)
        assert not isinstance(bounds, str)  # unsupported_reason turned the node down otherwise
        return Slice(*bounds, ctx=ctx), ins[:1]
    if op == "Transpose":
        return Transpose(a.get("perm"), ctx), ins[:1]
    if op == "ConvLSTM2D":
        kernel, recurrent, bias = (np.asarray(constants[t], np.float32) for t in ins[1:4])
        lstm = ConvLSTM2D(kernel, recurrent, bias.reshape(-1), ctx=ctx, **conv_lstm_params(a))
        return PlanStep(lstm), [ins[0], *ins[4:6]]
    if op == "Elementwise":
        return Elementwise(a["_program"], len(ins), ctx, a["_channel_inputs"]), list(ins)
    if op in POOLS:
        if op.startswith("Global"):
            return Pool(op, ctx=ctx), ins[:1]
        k = tuple(a["kernel_shape"])
        return Pool(op, k, strides=tuple(a.get("strides", [1] * len(k))),
                    pads=tuple(a.get("pads", [0] * 2 * len(k))), dilations=tuple(a.get("dilations", [1] * len(k))),
                    ceil_mode=int(a.get("ceil_mode", 0)), count_include_pad=int(a.get("count_include_pad", 0)),
                    auto_pad=a.get("auto_pad", "NOTSET"), ctx=ctx), ins[:1]
    if op == "Concat":
        return Concat(int(a["axis"]), ctx), list(ins)
    params = resize_params(node, constants)
    assert not isinstance(params, str)  # unsupported_reason turned the node down otherwise
    return Resize(**params, ctx=ctx), ins[:1]


def step_label(kernel: GraphStep, x_shape: Shape) -> str:
    if isinstance(kernel, PlanStep):
        return choice_label(kernel.op, x_shape)
    return type(kernel).__name__.lower()


