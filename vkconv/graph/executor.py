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
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from vkconv.kernels import shapes
from vkconv.kernels.activation import (
    Activation,
)
from vkconv.onnx.fusion import fuse
from vkconv.onnx.model import Node, graph_constants, is_constant_node, node_constants, sort_nodes
from vkconv.onnx.support import POOLS, resize_params, unsupported_reason
from vkconv.ops.conv.op import Conv
from vkconv.ops.conv_transpose import ConvTranspose
from vkconv.ops.elementwise import Elementwise, Shape, element_count
from vkconv.ops.pool import Pool
from vkconv.ops.resize import Resize
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, get_context, vk
from vkconv.runtime.plan import Plan, PlanCache, closed_on_error
from vkconv.runtime.timestamps import Timestamps
from vkconv.runtime.transfer import upload_constant


class GraphStep(Protocol):
    """What a graph step runs (Elementwise, Pool, Concat, ConvNode...): device-free shape inference and
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


def _build(node: Node, constants: Mapping[str, np.ndarray], ctx: Context) -> tuple[GraphStep, list[str]]:
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
    params = resize_params(node, constants)
    assert not isinstance(params, str)  # unsupported_reason turned the node down otherwise
    return Resize(**params, ctx=ctx), ins[:1]


def _step_label(kernel: GraphStep, x_shape: Shape) -> str:
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
        raw = list(graph.node) if isinstance(graph, onnx.GraphProto) else list(graph)
        protos = [n for n in raw if isinstance(n, onnx.NodeProto)]
        consts = graph_constants(graph) if isinstance(graph, onnx.GraphProto) else node_constants(protos)
        if isinstance(graph, onnx.GraphProto):
            inputs = inputs if inputs is not None else [i.name for i in graph.input if i.name not in consts]
            outputs = outputs if outputs is not None else [o.name for o in graph.output]
        nodes = [Node(n.op_type, list(n.inputs), list(n.outputs), dict(n.attrs), n.name, n.members)
                 if isinstance(n, Node) else Node.from_proto(n) for n in raw
                 if not (isinstance(n, onnx.NodeProto) and is_constant_node(n))]
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
        nodes = fuse(sort_nodes(nodes, set(self.inputs) | set(consts)), consts, set(self.outputs))
        self.steps: list[tuple[Node, GraphStep, list[str]]] = []
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
        times = [StepTime(node.name or node.op_type, node.op_type, _step_label(kernel, known[reads[0]]),
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
