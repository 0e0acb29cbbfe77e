"""Device-resident graphs: a list of ONNX nodes run on the device with one command buffer per
input-shape set: one upload of the graph inputs, every node's dispatches in topological order,
one readback of the graph outputs.

What can run here is :mod:`vkconv.onnx.support`'s matrix (:data:`vkconv.onnx.OP_TYPES`,
:func:`vkconv.onnx.unsupported_reason`); the nodes are fused by :mod:`vkconv.onnx.fusion`, the same
passes layer mode uses, and each becomes a step of :mod:`vkconv.graph.steps`.

Intermediate tensors live in device buffers reused by liveness: a tensor's buffer returns to a
free list keyed by size after its last reader, so a plan's memory stays near the peak live set.
Conv, ConvTranspose, DeformConv and ConvLSTM2D run through their own classes' recorded plans
(``Plan.body``) on the plan's input and output buffers, outside the liveness pool: the tensor such
an op writes lives in its plan's output buffer, and the tensors it reads in its plan's input
buffers unless another op claimed them first or it is a graph input (then one device-side copy brings it in).
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from vkconv.graph.steps import GraphStep, PlanStep, build_step, step_label
from vkconv.kernels import shapes
from vkconv.onnx.fusion import fuse
from vkconv.onnx.model import Node, graph_constants, is_constant_node, node_constants, sort_nodes
from vkconv.onnx.support import unsupported_reason
from vkconv.ops.elementwise import Shape, element_count
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, get_context
from vkconv.runtime.plan import Plan, PlanCache, closed_on_error
from vkconv.runtime.timestamps import Timestamps
from vkconv.runtime.transfer import upload_constant


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
                kernel, reads = build_step(n, consts, self.ctx)
                self.steps.append((n, kernel, list(reads)))
                for t in reads:
                    if t in consts and t not in self._const_buffers:
                        self._const_buffers[t] = upload_constant(
                            self.ctx, np.ascontiguousarray(consts[t], np.float32), f"graph constant {t}")
        self._const_shapes = {t: tuple(consts[t].shape) for t in self._const_buffers}
        self._plans = PlanCache()
        self._step_shapes: dict[tuple, list[tuple[PlanStep, list[Shape]]]] = {}
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
            if isinstance(kernel, PlanStep):
                op_plan = kernel.plan([known[t] for t in reads])
                for t, buf in zip(reads, op_plan.inputs):
                    homes.setdefault(t, buf)
                homes.setdefault(node.outputs[0], op_plan.outputs[0])
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
        self._step_shapes[in_shapes] = [(k, s) for (_, k, _), (_, _, s) in zip(self.steps, assignment)
                                        if isinstance(k, PlanStep)]
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

    def _checked(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(arrays) != len(self.inputs):
            raise ValueError(f"inputs: expected {len(self.inputs)} arrays ({self.inputs}), got {len(arrays)}")
        return [shapes.as_float32(n, a) for n, a in zip(self.inputs, arrays)]

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs (in :attr:`outputs` order) for float32 ``arrays`` in :attr:`inputs` order."""
        arrays = self._checked(arrays)
        key = tuple(a.shape for a in arrays)
        with self._lock:
            plan = self._plans.get(key, lambda: self._build_plan(key))
            for step, step_shapes in self._step_shapes.get(key, []):
                step.plan(step_shapes)  # keep the op plans this graph plan replays most recent
            self.transfers["uploads"] += len(arrays)
            self.transfers["downloads"] += len(self.outputs)
            return plan.run(arrays)

    def profile(self, arrays: Sequence[np.ndarray], repeat: int = 3) -> tuple[list[np.ndarray], list[StepTime]]:
        """Outputs as :meth:`run` gives them, and each step's device time (the minimum over
        ``repeat`` submits, after one warm-up) from timestamp queries.  Builds a separate plan with
        the timestamps recorded in, used for this call only; transfers are not counted."""
        arrays = self._checked(arrays)
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
        times = [StepTime(node.name or node.op_type, node.op_type, step_label(kernel, known[reads[0]]),
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
