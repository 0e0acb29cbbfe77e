"""Device-resident graphs: a list of ONNX nodes run on the device with one command buffer per
input-shape set: one upload of the graph inputs, every node's dispatches in topological order,
one readback of the graph outputs.

Supported nodes (:data:`OP_TYPES`): Conv, ConvTranspose (constant W/B; a following
BatchNormalization or scalar / per-channel constant Mul, Add, Sub is folded into the weights and a
following activation fused, when nothing else reads the intermediate tensor), BatchNormalization
(inference; a per-channel scale + shift otherwise), Relu, Clip, LeakyRelu, HardSwish, HardSigmoid, Sigmoid, Tanh,
Add/Sub/Mul/Div (broadcasting, rank <= 5), MaxPool, AveragePool, GlobalAveragePool,
GlobalMaxPool (2-D), Concat, Resize (nearest / linear, opset >= 11) and Upsample (2-D NCHW).
:func:`unsupported_reason` says why a node cannot run here.

Intermediate tensors live in device buffers reused by liveness: a tensor's buffer returns to a
free list keyed by size after its last reader, so a plan's memory stays near the peak live set.
Conv and ConvTranspose run through their own classes' recorded plans (``Plan.body``) on the plan's
input and output buffers, outside the liveness pool: the tensor a conv writes lives in its plan's
output buffer, and the tensor it reads in its plan's input buffer unless another conv claimed it
first or it is a graph input (then one device-side copy brings it in).

Chains of elementwise nodes (binary ops, activations, BatchNormalization not folded into a conv)
run as one :class:`~vkconv.ops.elementwise.Elementwise` dispatch each, and scalar or per-channel Mul / Add /
Sub after a conv are folded into its weights, as BatchNormalization is.
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeGuard

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vkconv.kernels import shapes
from vkconv.kernels.activation import (
    IMMEDIATE,
    MAX_INSTRUCTIONS,
    OP_CODES,
    Activation,
    Instruction,
    activation_instruction,
)
from vkconv.ops.conv.op import Conv
from vkconv.ops.conv_transpose import ConvTranspose
from vkconv.ops.elementwise import MAX_INPUTS, MAX_RANK, Elementwise, Shape, element_count
from vkconv.ops.pool import Pool
from vkconv.ops.resize import COORDINATE_MODES, NEAREST_MODES, Resize
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, get_context, vk
from vkconv.runtime.plan import Plan, PlanCache, closed_on_error
from vkconv.runtime.timestamps import Timestamps
from vkconv.runtime.transfer import upload_constant

ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh")
BINARY = ("Add", "Sub", "Mul", "Div")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
OP_TYPES = ("Conv", "ConvTranspose", "BatchNormalization", *ACTIVATIONS, *BINARY, *POOLS, "Concat",
            "Resize", "Upsample")


class GraphKernel(Protocol):
    """What a graph step runs (Elementwise, Pool, Concat, ConvNode...): device-free shape inference and
    recording into a command buffer; a ``close()`` method, where present, frees device memory."""

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]: ...

    def record(self, cmd: CommandBuffer, inputs: Sequence[Buffer], outputs: Sequence[Buffer],
               in_shapes: Sequence[Shape]) -> list: ...


def run_kernel(kernel: GraphKernel, arrays: Sequence[np.ndarray], ctx: Context | None = None) -> list[np.ndarray]:
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


class ConvNode:
    """A Conv or ConvTranspose node run through its vkconv object's recorded plan, on the plan's
    own input / output buffers when the graph gave it those, else with a copy in / out."""

    def __init__(self, op: Conv | ConvTranspose):
        self.op = op

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]:
        x = tuple(int(d) for d in in_shapes[0])
        op = self.op
        if isinstance(op, Conv):
            return [shapes.conv_output_shape(x, op.weight_shape, op.strides, op.pads, op.dilations,
                                             op.group, op.auto_pad)[0]]
        if len(x) == op.nd + 2 and any(d <= 0 for d in x[2:]):  # unknown while importing
            return [(x[0], op.weight_shape[1] * op.group, *(-1,) * op.nd)]
        return [op.output_shape(x)]

    def plan(self, x_shape: Shape) -> Plan:
        """The op's plan for ``x_shape``; calling it also marks the plan most recently used in the
        op's cache, which keeps it alive as long as a graph plan that replays it."""
        return self.op.plan(tuple(x_shape))

    def record(self, cmd, inputs, outputs, in_shapes):
        plan = self.plan(in_shapes[0])
        # the tensors' own sizes: a kernel's plan buffers may be padded beyond them
        if inputs[0] is not plan.inputs[0]:
            cmd.copy(inputs[0].buffer, plan.inputs[0].buffer, 4 * math.prod(in_shapes[0]))
            cmd.barrier()
        plan.body(cmd)
        if outputs[0] is not plan.outputs[0]:
            cmd.barrier()
            cmd.copy(plan.outputs[0].buffer, outputs[0].buffer, 4 * math.prod(self.output_shapes(in_shapes)[0]))
        return []

    def close(self) -> None:
        self.op.close()


# -- ONNX nodes -> kernels -------------------------------------------------------------------------
@dataclass
class Node:
    """One ONNX node: op type, input / output tensor names ('' = absent) and attributes."""

    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    name: str = ""

    @classmethod
    def from_proto(cls, node: onnx.NodeProto) -> Node:
        attrs = {}
        for a in node.attribute:
            v = helper.get_attribute_value(a)
            attrs[a.name] = v.decode() if isinstance(v, bytes) else v
        return cls(node.op_type, list(node.input), list(node.output), attrs, node.name)


def _const(constants: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    return np.asarray(constants[name]) if name and name in constants else None


def _is_float(array: np.ndarray | None) -> TypeGuard[np.ndarray]:
    return array is not None and np.issubdtype(array.dtype, np.floating)


def activation_spec(node: Node, constants: Mapping[str, np.ndarray]):
    """``(name, a, b)`` for an activation node (see :class:`vkconv.Activation`), None when its
    parameters are not constants."""
    a = node.attrs
    if node.op_type == "Clip":
        lo, hi = float(a.get("min", -np.inf)), float(a.get("max", np.inf))  # opset < 11 attributes
        for i, tensor in enumerate(node.inputs[1:3]):
            if not tensor:
                continue
            value = _const(constants, tensor)
            if value is None or value.size != 1:
                return None
            lo, hi = (float(value.reshape(-1)[0]), hi) if i == 0 else (lo, float(value.reshape(-1)[0]))
        return ("Clip", lo, hi)
    if node.op_type == "LeakyRelu":
        return ("LeakyRelu", float(a.get("alpha", 0.01)))
    if node.op_type == "HardSigmoid":
        return ("HardSigmoid", float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)))
    return (node.op_type,)


def _resize_params(node: Node, constants: Mapping[str, np.ndarray]) -> dict | str:
    """Keyword arguments of :class:`~vkconv.ops.resize.Resize` for a Resize / Upsample node, or the
    reason it cannot run here."""
    a = node.attrs
    mode = a.get("mode", "nearest")
    if node.op_type == "Upsample":
        scales = a.get("scales") if len(node.inputs) < 2 else _const(constants, node.inputs[1])
        if scales is None:
            return "Upsample scales are not a constant"
        return dict(mode=mode, coordinate_transformation_mode="asymmetric", nearest_mode="floor",
                    scales=np.asarray(scales, np.float32))
    if len(node.inputs) < 3:
        return "Resize of opset 10 (no roi input) is not supported"
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    if coord not in COORDINATE_MODES:
        return f"coordinate_transformation_mode {coord!r} is not supported"
    if nearest not in NEAREST_MODES:
        return f"nearest_mode {nearest!r} is not supported"
    if int(a.get("antialias", 0)) or int(a.get("exclude_outside", 0)) or "axes" in a \
            or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "antialias, exclude_outside, axes and keep_aspect_ratio_policy are not supported"
    scales = _const(constants, node.inputs[2])
    sizes = _const(constants, node.inputs[3]) if len(node.inputs) > 3 else None
    if scales is not None and scales.size == 0:
        scales = None
    if (scales is None) == (sizes is None or sizes.size == 0):
        return "Resize needs exactly one of scales and sizes, as a constant"
    return dict(mode=mode, coordinate_transformation_mode=coord, nearest_mode=nearest, scales=scales,
                sizes=sizes if scales is None else None)


def unsupported_reason(node: Node | onnx.NodeProto, constants: Mapping[str, np.ndarray],
                       ranks: Mapping[str, int] | None = None) -> str | None:
    """Why ``node`` cannot run in a :class:`Graph` (None when it can).  ``ranks``: the known ranks
    of tensors (shape inference); the ops that need a rank refuse tensors not in it.  Without
    ``ranks`` ranks are not checked here (a :class:`Graph` checks shapes when it meets them)."""
    if isinstance(node, onnx.NodeProto):
        if node.domain not in ("", "ai.onnx"):
            return f"domain {node.domain!r}"
        node = Node.from_proto(node)
    op, ins = node.op_type, list(node.inputs)

    def rank(t: str, wanted: int) -> int | None:
        return wanted if ranks is None else ranks.get(t)

    if op not in OP_TYPES:
        return f"{op} is not a graph op"
    if len([o for o in node.outputs if o]) != 1:
        return f"{op} with {len(node.outputs)} outputs"
    runtime = [t for t in ins if t and t not in constants]
    if not runtime:
        return "no runtime input (constant folding is OpenCV's job)"
    if op in ("Conv", "ConvTranspose"):
        w = _const(constants, ins[1]) if len(ins) > 1 else None
        if not _is_float(w) or w.ndim not in (3, 4, 5):
            return "W is not a float constant of rank 3..5"
        if len(ins) > 2 and ins[2] and not _is_float(_const(constants, ins[2])):
            return "B is not a float constant"
        return None
    if op == "BatchNormalization":
        if int(node.attrs.get("training_mode", 0)) or len(ins) != 5 \
                or not all(_is_float(_const(constants, t)) for t in ins[1:]):
            return "BatchNormalization needs inference mode and constant parameters"
        return None if (rank(ins[0], 4) or 0) >= 2 else "input rank unknown"
    if op in ACTIVATIONS:
        return None if activation_spec(node, constants) is not None else "Clip bounds are not constants"
    if op in BINARY:
        for t in ins:
            c, r = _const(constants, t), rank(t, 4)
            if c is not None and not _is_float(c):
                return "non-float constant operand"
            if c is None and not 0 <= (r if r is not None else -1) <= MAX_RANK:
                return f"operand rank unknown or above {MAX_RANK}"
        return None
    if op in POOLS:
        if rank(ins[0], 4) != 4:
            return "pooling runs on 4-D NCHW input only"
        if op == "MaxPool" and int(node.attrs.get("storage_order", 0)):
            return "storage_order 1"
        return None
    if op == "Concat":
        for t in ins:
            c = _const(constants, t)
            if (c is not None and not _is_float(c)) or (c is None and rank(t, 4) is None):
                return "Concat operand of unknown rank or non-float constant"
        return None
    params = _resize_params(node, constants)  # Resize, Upsample
    if isinstance(params, str):
        return params
    return None if rank(ins[0], 4) == 4 else "Resize runs on 4-D NCHW input only"


def fold_affine(w: np.ndarray, b: np.ndarray | None, scale, shift, *, group: int = 1,
                transpose: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of a Conv (``w`` ``[C_out, C_in/group, *k]``) or, with ``transpose``, a
    ConvTranspose (``w`` ``[C_in, C_out/group, *k]``) whose output is then multiplied by ``scale``
    and shifted by ``shift`` per output channel (float64 arithmetic, float32 results)."""
    w = np.asarray(w, np.float64)
    cout = w.shape[1] * group if transpose else w.shape[0]
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (cout,))
    t = np.broadcast_to(np.asarray(shift, np.float64).reshape(-1), (cout,))
    b = np.zeros(cout) if b is None else np.asarray(b, np.float64)
    if transpose:
        per_group = s.reshape(group, 1, cout // group, *([1] * (w.ndim - 2)))
        w2 = (w.reshape(group, -1, *w.shape[1:]) * per_group).reshape(w.shape)
    else:
        w2 = w * s.reshape(-1, *([1] * (w.ndim - 1)))
    return w2.astype(np.float32), (b * s + t).astype(np.float32)


def batchnorm_affine(scale, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as ``x * s + t`` per channel (float64)."""
    s = np.asarray(scale, np.float64).reshape(-1) / np.sqrt(np.asarray(var, np.float64).reshape(-1) + eps)
    return s, np.asarray(beta, np.float64).reshape(-1) - np.asarray(mean, np.float64).reshape(-1) * s


def _node_batchnorm(node: Node, constants: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`batchnorm_affine` of a BatchNormalization node with constant parameters."""
    scale, beta, mean, var = (constants[t] for t in node.inputs[1:5])
    return batchnorm_affine(scale, beta, mean, var, float(node.attrs.get("epsilon", 1e-5)))


def fold_batchnorm(w: np.ndarray, b: np.ndarray | None, scale, beta, mean, var, eps: float, *,
                   group: int = 1, transpose: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fold_affine` of an inference BatchNormalization."""
    return fold_affine(w, b, *batchnorm_affine(scale, beta, mean, var, eps), group=group, transpose=transpose)


def _channel_constant(c: np.ndarray | None, rank: int, channels: int) -> np.ndarray | None:
    """``c`` as ``[channels]`` values when it broadcasts against a ``[N, channels, ...]`` tensor of
    ``rank`` along axis 1 only (a scalar or a per-channel constant), else None."""
    if not _is_float(c) or c.ndim > rank:
        return None
    full = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for k, d in enumerate(full) if k != 1) or full[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,))


def _build(node: Node, constants: Mapping[str, np.ndarray], ctx: Context) -> tuple[GraphKernel, list[str]]:
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
            return ConvNode(Conv(w, b, **common)), ins[:1]
        shape = a.get("output_shape")
        return ConvNode(ConvTranspose(w, b, output_padding=tuple(a.get("output_padding", [0] * nd)),
                                      output_shape=tuple(shape)[-nd:] if shape else None, **common)), ins[:1]
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
    params = _resize_params(node, constants)
    assert not isinstance(params, str)  # unsupported_reason turned the node down otherwise
    return Resize(**params, ctx=ctx), ins[:1]


def _toposort(nodes: list[Node], available: set[str]) -> list[Node]:
    ready, order, pending = set(available), [], list(nodes)
    while pending:
        progress = [n for n in pending if all(not t or t in ready for t in n.inputs)]
        if not progress:
            names = [n.name or n.op_type for n in pending]
            raise ValueError(f"graph: nodes {names} read tensors nothing produces (or form a cycle)")
        for n in progress:
            order.append(n)
            ready.update(n.outputs)
        pending = [n for n in pending if all(n is not p for p in progress)]
    return order


def _fuse(nodes: list[Node], constants: dict[str, np.ndarray], keep: set[str]) -> list[Node]:
    """Fold into a preceding Conv / ConvTranspose's weights the BatchNormalization and the Mul /
    Add / Sub by scalar or per-channel constants that follow it, then fuse an activation into its
    epilogue, as long as each intermediate has that one reader and is not in ``keep`` (graph
    outputs)."""
    readers: dict[str, list[Node]] = defaultdict(list)
    for n in nodes:
        for t in n.inputs:
            readers[t].append(n)
    removed: set[int] = set()

    def sole_reader(t: str) -> Node | None:
        users = readers.get(t, [])
        return users[0] if len(users) == 1 and t not in keep and id(users[0]) not in removed else None

    def affine(node: Node, y: str, rank: int, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale, shift) per channel of ``node`` applied to ``y``, None when it is not one."""
        ins = node.inputs
        if node.op_type == "BatchNormalization":
            return _node_batchnorm(node, constants) if ins[0] == y else None
        if node.op_type not in ("Mul", "Add", "Sub") or len(ins) != 2 or ins.count(y) != 1:
            return None
        other = ins[1] if ins[0] == y else ins[0]
        c = _channel_constant(_const(constants, other), rank, channels)
        if c is None or (node.op_type == "Sub" and ins[1] == y):
            return None
        ones, zeros = np.ones(channels), np.zeros(channels)
        return (c, zeros) if node.op_type == "Mul" else (ones, c if node.op_type == "Add" else -c)

    for n in nodes:
        if id(n) in removed or n.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = constants[n.inputs[1]]
        transpose, group = n.op_type == "ConvTranspose", int(n.attrs.get("group", 1))
        channels = w.shape[1] * group if transpose else w.shape[0]
        nxt = sole_reader(n.outputs[0])
        while nxt is not None and (st := affine(nxt, n.outputs[0], w.ndim, channels)) is not None:
            b = constants[n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] else None
            w, b2 = fold_affine(w, b, *st, group=group, transpose=transpose)
            constants[f"{nxt.outputs[0]}__vk_w"], constants[f"{nxt.outputs[0]}__vk_b"] = w, b2
            n.inputs = [n.inputs[0], f"{nxt.outputs[0]}__vk_w", f"{nxt.outputs[0]}__vk_b"]
            n.outputs = list(nxt.outputs)
            removed.add(id(nxt))
            nxt = sole_reader(n.outputs[0])
        if nxt is not None and nxt.op_type in ACTIVATIONS:
            spec = activation_spec(nxt, constants)
            if spec is not None:
                n.attrs = {**n.attrs, "_activation": spec}
                n.outputs = list(nxt.outputs)
                removed.add(id(nxt))
    return [n for n in nodes if id(n) not in removed]


_ELEMENTWISE = (*ACTIVATIONS, *BINARY, "BatchNormalization")


def _program(members: list[Node],
             constants: Mapping[str, np.ndarray]) -> tuple[Node, dict[str, np.ndarray]] | None:
    """One ``Elementwise`` node computing ``members`` (elementwise nodes in topological order; the
    last one's output is the result) and the constants it adds, or None past the kernel's limits.
    Size-1 constants of rank <= 1 become immediates; BatchNormalization's folded scale and shift
    become per-channel inputs (new constants named after its output)."""
    added: dict[str, np.ndarray] = {}
    leaves: list[str] = []
    channel: list[int] = []
    registers: dict[str, int] = {}
    program: list[Instruction] = []

    def operand(t: str, per_channel: bool = False) -> int | float:
        if t in registers:
            return registers[t]
        c = _const(constants, t)
        if c is not None and c.size == 1 and c.ndim <= 1 and not per_channel:
            return float(c.reshape(-1)[0])
        if t not in leaves:
            leaves.append(t)
            if per_channel:
                channel.append(len(leaves) - 1)
        return leaves.index(t)

    def emit(op: int, a: int | float, b: int | float, fb: float = 0.0) -> None:
        if isinstance(a, float):
            program.append(Instruction(op, IMMEDIATE, int(b), a, fb))
        elif isinstance(b, float):
            program.append(Instruction(op, a, IMMEDIATE, b, fb))
        else:
            program.append(Instruction(op, a, b, 0.0, fb))

    for node in members:
        ins = node.inputs
        if node.op_type in BINARY:
            emit(OP_CODES[node.op_type], operand(ins[0]), operand(ins[1]))
        elif node.op_type == "BatchNormalization":
            scale, shift = _node_batchnorm(node, constants)
            out = node.outputs[0]
            added[f"{out}__vk_scale"], added[f"{out}__vk_shift"] = scale.astype(np.float32), shift.astype(np.float32)
            emit(OP_CODES["Mul"], operand(ins[0]), operand(f"{out}__vk_scale", True))
            emit(OP_CODES["Add"], 3 + len(program), operand(f"{out}__vk_shift", True))
        else:
            act = activation_instruction(activation_spec(node, constants), 0)
            emit(act.op, operand(ins[0]), act.fa, act.fb)
        registers[node.outputs[0]] = 3 + len(program)
    if len(leaves) > MAX_INPUTS or len(program) > MAX_INSTRUCTIONS or not leaves:
        return None
    names = [m.name or m.op_type for m in members]
    return Node("Elementwise", leaves, list(members[-1].outputs),
                {"_program": program, "_channel_inputs": channel},
                names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"), added


def _fuse_epilogues(nodes: list[Node], keep: set[str]) -> list[Node]:
    """Move an ``Elementwise`` node that only transforms a conv's output by constants into that
    conv's epilogue (:attr:`vkconv.Activation.post`), when nothing else reads the conv's output."""
    readers: dict[str, int] = defaultdict(int)
    for n in nodes:
        for t in n.inputs:
            readers[t] += 1
    producer = {t: n for n in nodes for t in n.outputs}
    removed: set[int] = set()
    for n in nodes:
        if n.op_type != "Elementwise" or len(n.inputs) != 1 or n.attrs["_channel_inputs"]:
            continue
        conv = producer.get(n.inputs[0])
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or n.inputs[0] in keep \
                or readers[n.inputs[0]] != 1 or "_post" in conv.attrs:
            continue
        conv.attrs = {**conv.attrs, "_post": n.attrs["_program"]}
        conv.outputs = list(n.outputs)
        removed.add(id(n))
    return [n for n in nodes if id(n) not in removed]


def _fuse_elementwise(nodes: list[Node], constants: dict[str, np.ndarray], keep: set[str]) -> list[Node]:
    """Replace the elementwise nodes (binary ops, activations, unfolded BatchNormalization) by
    ``Elementwise`` nodes, each a group run by one dispatch.  Groups grow backwards from their
    last node: a producer joins when every reader of its output is in the group already and its
    output is not in ``keep``, so no intermediate leaves the group; :func:`_program` bounds them."""
    readers: dict[str, set[int]] = defaultdict(set)
    producer: dict[str, Node] = {}
    for n in nodes:
        for t in n.inputs:
            readers[t].add(id(n))
        for t in n.outputs:
            producer[t] = n
    position = {id(n): i for i, n in enumerate(nodes)}
    grouped: dict[int, Node | None] = {}  # id -> the fused node at the group's last member
    for root in reversed(nodes):
        if root.op_type not in _ELEMENTWISE or id(root) in grouped:
            continue
        members = {id(root): root}
        grown = True
        while grown:
            grown = False
            for m in list(members.values()):
                for t in m.inputs:
                    p = producer.get(t)
                    if p is None or id(p) in members or id(p) in grouped or p.op_type not in _ELEMENTWISE \
                            or t in keep or not readers[t] <= members.keys():
                        continue
                    trial = sorted([*members.values(), p], key=lambda x: position[id(x)])
                    if _program(trial, constants) is not None:
                        members[id(p)] = p
                        grown = True
        ordered = sorted(members.values(), key=lambda x: position[id(x)])
        built = _program(ordered, constants)
        assert built is not None  # one node alone is within every limit
        fused, added = built
        constants.update(added)
        for m in ordered:
            grouped[id(m)] = None
        grouped[id(root)] = fused
    return [step for n in nodes if (step := grouped.get(id(n), n)) is not None]


def _kernel_label(kernel: GraphKernel, x_shape: Shape) -> str:
    if isinstance(kernel, ConvNode):
        return f"conv {kernel.op.choice_for(x_shape)}" if isinstance(kernel.op, Conv) else "convtranspose"
    return type(kernel).__name__.lower()


@dataclass
class StepTime:
    """One graph step's device time: node name, op type (after fusion: a Conv may carry a folded
    BatchNormalization and an activation), the kernel that ran, first input and output shapes."""

    name: str
    op_type: str
    kernel: str
    input_shape: Shape
    output_shape: Shape
    ms: float


class Graph:
    """ONNX nodes run on the device, one submit per call.

    ``graph``: an ``onnx.GraphProto`` (its initializers and Constant nodes are constants, its inputs
    that are not constants the graph inputs, its outputs the graph outputs) or a list of
    ``NodeProto`` / :class:`Node` in any order; ``constants``: more constant tensors by name;
    ``inputs`` / ``outputs``: tensor names, by default the graph's (for a node list: the tensors
    read but not produced or constant, and those produced but not read).  Every node must pass
    :func:`unsupported_reason`.  Tensors are float32, dense row-major (NCHW for the spatial ops).

    The first call at a new set of input shapes builds a plan (intermediate buffers, one recorded
    command buffer); later calls replay it.  ``transfers`` counts host<->device tensor copies.
    """

    def __init__(self, graph: onnx.GraphProto | Sequence, constants: Mapping[str, np.ndarray] | None = None,
                 ctx: Context | None = None, *, inputs: Sequence[str] | None = None,
                 outputs: Sequence[str] | None = None):
        self.ctx = ctx or get_context()
        consts: dict[str, np.ndarray] = {}
        if isinstance(graph, onnx.GraphProto):
            consts.update({t.name: numpy_helper.to_array(t) for t in graph.initializer})
            raw = list(graph.node)
            inputs = inputs if inputs is not None else [i.name for i in graph.input if i.name not in consts]
            outputs = outputs if outputs is not None else [o.name for o in graph.output]
        else:
            raw = list(graph)
        nodes = []
        for n in raw:
            node = Node(n.op_type, list(n.inputs), list(n.outputs), dict(n.attrs), n.name) \
                if isinstance(n, Node) else Node.from_proto(n)
            if node.op_type == "Constant" and "value" in node.attrs:
                consts[node.outputs[0]] = numpy_helper.to_array(node.attrs["value"])
                continue
            nodes.append(node)
        consts.update(constants or {})
        produced = {t for n in nodes for t in n.outputs if t}
        read = [t for n in nodes for t in n.inputs if t]
        if inputs is None:
            inputs = list(dict.fromkeys(t for t in read if t not in produced and t not in consts))
        if outputs is None:
            outputs = [t for n in nodes for t in n.outputs if t and t not in set(read)]
        self.inputs, self.outputs = list(inputs), list(outputs)
        if not self.outputs:
            raise ValueError("outputs: the graph has no outputs")
        missing = [o for o in self.outputs if o not in produced and o not in self.inputs]
        if missing:
            raise ValueError(f"outputs: {missing} are neither produced by a node nor graph inputs")
        for n in nodes:
            reason = unsupported_reason(n, consts)  # ranks are checked when shapes are known
            if reason is not None:
                raise ValueError(f"graph: node {n.name or n.op_type!r} ({n.op_type}): {reason}")
        nodes = _toposort(nodes, set(self.inputs) | set(consts))
        keep = set(self.outputs)
        nodes = _fuse_epilogues(_fuse_elementwise(_fuse(nodes, consts, keep), consts, keep), keep)
        self.steps: list[tuple[Node, GraphKernel, list[str]]] = []
        self._const_buffers: dict[str, Buffer] = {}
        self._shape_cache: dict[tuple, dict[str, Shape]] = {}
        with closed_on_error(self):
            for n in nodes:
                kernel, reads = _build(n, consts, self.ctx)
                self.steps.append((n, kernel, list(reads)))
                for t in reads:
                    if t in consts and t not in self._const_buffers:
                        self._const_buffers[t] = upload_constant(
                            self.ctx, np.ascontiguousarray(consts[t], np.float32), f"graph constant {t}")
        self._const_shapes = {t: tuple(consts[t].shape) for t in self._const_buffers}
        self._plans = PlanCache()
        self._conv_shapes: dict[tuple, list[tuple[ConvNode, Shape]]] = {}
        self._lock = threading.Lock()
        self.transfers = {"uploads": 0, "downloads": 0}

    # -- shapes ------------------------------------------------------------------------------------
    def tensor_shapes(self, input_shapes: Sequence[Shape]) -> dict[str, Shape]:
        """Every tensor's shape for graph inputs of ``input_shapes`` (in :attr:`inputs` order),
        without a device; entries <= 0 are unknown dimensions and stay unknown."""
        if len(input_shapes) != len(self.inputs):
            raise ValueError(f"inputs: expected {len(self.inputs)} shapes ({self.inputs}), got {len(input_shapes)}")
        known: dict[str, Shape] = dict(self._const_shapes)
        known.update({n: tuple(int(d) for d in s) for n, s in zip(self.inputs, input_shapes)})
        for node, kernel, reads in self.steps:
            try:
                outs = kernel.output_shapes([known[t] for t in reads])
            except ValueError as exc:
                exc.add_note(f"in graph node {node.name or node.op_type!r} ({node.op_type})")
                raise
            known.update(zip(node.outputs, outs))
        return known

    def output_shapes(self, input_shapes: Sequence[Shape]) -> list[Shape]:
        known = self.tensor_shapes(input_shapes)
        return [known[o] for o in self.outputs]

    # -- plans -------------------------------------------------------------------------------------
    def _build_plan(self, in_shapes: tuple[Shape, ...], timestamps: Timestamps | None = None) -> Plan:
        """The plan for ``in_shapes``; with ``timestamps``, one mark before the first step and one
        after each step (labelled with the step's index)."""
        known = self.tensor_shapes(in_shapes)
        for name, s in known.items():
            element_count(f"tensor {name!r}", s)
        plan = Plan(self.ctx, [(n, known[n]) for n in self.inputs], [(n, known[n]) for n in self.outputs])
        bufs: dict[str, Buffer] = dict(self._const_buffers)
        bufs.update(zip(self.inputs, plan.inputs))
        for name, buf in zip(self.outputs, plan.outputs):
            bufs.setdefault(name, buf)  # an output that is also an input is copied at the end
        last: dict[str, int] = {}
        for i, (_, _, reads) in enumerate(self.steps):
            for t in reads:
                last[t] = i
        # A conv's own plan buffers hold the tensor it writes and, where no other conv claimed it
        # first, the one it reads: the conv then runs on them with no copy in or out.
        homes: dict[str, Buffer] = {}
        for node, kernel, reads in self.steps:
            if isinstance(kernel, ConvNode):
                conv_plan = kernel.plan(known[reads[0]])
                homes.setdefault(reads[0], conv_plan.inputs[0])
                homes.setdefault(node.outputs[0], conv_plan.outputs[0])
        pooled: set[str] = set()
        free: dict[int, list[Buffer]] = defaultdict(list)
        assignment = []  # per step: (input buffers, output buffers, input shapes)
        for i, (node, _, reads) in enumerate(self.steps):
            for t in node.outputs:
                if t not in bufs and t in homes:
                    bufs[t] = homes[t]
                elif t not in bufs:
                    nbytes = 4 * math.prod(known[t])
                    size = -(-nbytes // 16) * 16
                    if free[size]:
                        buf = free[size].pop()
                    else:
                        buf = Buffer(self.ctx, nbytes, name=f"graph tensor {t}")
                        plan.keep.append(buf)
                    bufs[t] = buf
                    pooled.add(t)
            assignment.append(([bufs[t] for t in reads], [bufs[t] for t in node.outputs],
                               [known[t] for t in reads]))
            for t in {*reads, *node.outputs}:
                if t in pooled and last.get(t, -1) <= i:
                    free[bufs[t].size].append(bufs[t])
                    pooled.discard(t)
        self._conv_shapes[in_shapes] = [(k, s[0]) for (_, k, _), (_, _, s) in zip(self.steps, assignment)
                                        if isinstance(k, ConvNode)]
        copies = [(bufs[n], out) for n, out in zip(self.outputs, plan.outputs) if bufs[n] is not out]

        def body(cmd: CommandBuffer) -> None:
            if timestamps is not None:
                timestamps.reset(cmd)
                timestamps.mark(cmd)
            for i, ((_, kernel, _), (ins, outs, in_shapes_)) in enumerate(zip(self.steps, assignment)):
                plan.keep.extend(kernel.record(cmd, ins, outs, in_shapes_))
                cmd.barrier()
                if timestamps is not None:
                    timestamps.mark(cmd, str(i))
            for src, dst in copies:
                cmd.copy(src.buffer, dst.buffer, dst.nbytes)

        plan.record(body)
        return plan

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs (in :attr:`outputs` order) for float32 ``arrays`` in :attr:`inputs` order."""
        if len(arrays) != len(self.inputs):
            raise ValueError(f"inputs: expected {len(self.inputs)} arrays ({self.inputs}), got {len(arrays)}")
        arrays = [shapes.as_float32(n, a) for n, a in zip(self.inputs, arrays)]
        key = tuple(a.shape for a in arrays)
        with self._lock:
            plan = self._plans.get(key, lambda: self._build_plan(key))
            for conv, x_shape in self._conv_shapes.get(key, []):
                conv.plan(x_shape)  # keep the conv plans this graph plan replays most recent
            self.transfers["uploads"] += len(arrays)
            self.transfers["downloads"] += len(self.outputs)
            return plan.run(arrays)

    def profile(self, arrays: Sequence[np.ndarray], repeat: int = 3) -> tuple[list[np.ndarray], list[StepTime]]:
        """Outputs as :meth:`run` gives them, and each step's device time (the minimum over
        ``repeat`` submits, after one warm-up) from timestamp queries.  Builds a separate plan with
        the timestamps recorded in, used for this call only; transfers are not counted."""
        if len(arrays) != len(self.inputs):
            raise ValueError(f"inputs: expected {len(self.inputs)} arrays ({self.inputs}), got {len(arrays)}")
        arrays = [shapes.as_float32(n, a) for n, a in zip(self.inputs, arrays)]
        key = tuple(a.shape for a in arrays)
        known = self.tensor_shapes(key)
        stamps = Timestamps(self.ctx, len(self.steps) + 1)
        try:
            with self._lock:
                plan = self._build_plan(key, stamps)
                try:
                    runs = []
                    for _ in range(max(1, repeat) + 1):
                        outputs = plan.run(arrays)
                        runs.append([t for _, t in stamps.intervals()])
                    best = [min(step) for step in zip(*runs[1:])]
                finally:
                    plan.close()
        finally:
            stamps.close()
        times = [StepTime(node.name or node.op_type, node.op_type, _kernel_label(kernel, known[reads[0]]),
                          known[reads[0]], known[node.outputs[0]], t)
                 for (node, kernel, reads), t in zip(self.steps, best)]
        return outputs, times

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{input name: array}`` -> ``{output name: array}``."""
        unknown = set(inputs) - set(self.inputs)
        missing = [n for n in self.inputs if n not in inputs]
        if unknown or missing:
            raise ValueError(f"inputs: missing {missing}, unexpected {sorted(unknown)}; expected {self.inputs}")
        return dict(zip(self.outputs, self.run([inputs[n] for n in self.inputs])))

    def close(self) -> None:
        """Free the plans, the device constants and the convs' weights."""
        if hasattr(self, "_plans"):
            self._plans.clear()
        for _, kernel, _ in self.steps:
            if hasattr(kernel, "close"):
                kernel.close()
        for buf in self._const_buffers.values():
            buf.close()
        self._const_buffers.clear()

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
