"""Fusion passes shared by layer mode (cv_plugin's rewrite) and subgraph mode (vkconv.graph), so
both modes fuse the same nodes:

1. :func:`fuse_convs`: fold into a Conv / ConvTranspose the BatchNormalization and scalar or
   per-channel Mul / Add / Sub that follow it, then take a following activation into its epilogue;
2. :func:`fuse_elementwise`: chains of elementwise nodes become one ``Elementwise`` node each;
3. :func:`fuse_epilogues`: an ``Elementwise`` node that only transforms a conv's output by
   constants moves into that conv's epilogue (``_post``).

A fused node's ``members`` lists the source nodes it replaced.  A tensor in ``keep`` (graph
outputs, tensors read by nodes outside the list) is never fused away.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np

from vkconv.kernels.activation import IMMEDIATE, MAX_INSTRUCTIONS, OP_CODES, Instruction, activation_instruction
from vkconv.onnx.fold import channel_constant, fold_affine, node_batchnorm
from vkconv.onnx.model import Node, const, is_float
from vkconv.onnx.support import ACTIVATIONS, BINARY, activation_spec
from vkconv.ops.elementwise import MAX_INPUTS

# nodes that fold following affine maps into their W and B (and take epilogues)
CONV_TYPES = ("Conv", "ConvTranspose")
# nodes whose output can absorb an activation
ANCHORS = (*CONV_TYPES, "DeformConv")


def fuse(nodes: list[Node], constants: dict[str, np.ndarray], keep: set[str],
         anchors: tuple[str, ...] = ANCHORS) -> list[Node]:
    """All three passes, in order (``constants`` gains the folded weights); ``anchors``: see
    :func:`fuse_convs`."""
    return fuse_epilogues(fuse_elementwise(fuse_convs(nodes, constants, keep, anchors), constants, keep), keep)


def fuse_convs(nodes: list[Node], constants: dict[str, np.ndarray], keep: set[str],
               anchors: tuple[str, ...] = ANCHORS) -> list[Node]:
    """Pass 1 on the nodes of type ``anchors``.  Folding needs constant float W (and B); an
    anchor without them (runtime weights, DeformConv) still takes an activation."""
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
            return node_batchnorm(node, constants) if ins[0] == y else None
        if node.op_type not in ("Mul", "Add", "Sub") or len(ins) != 2 or ins.count(y) != 1:
            return None
        other = ins[1] if ins[0] == y else ins[0]
        c = channel_constant(const(constants, other), rank, channels)
        if c is None or (node.op_type == "Sub" and ins[1] == y):
            return None
        ones, zeros = np.ones(channels), np.zeros(channels)
        return (c, zeros) if node.op_type == "Mul" else (ones, c if node.op_type == "Add" else -c)

    def absorb(n: Node, nxt: Node) -> None:
        n.outputs = list(nxt.outputs)
        n.members = (*n.members, *nxt.members)
        removed.add(id(nxt))

    for n in nodes:
        if id(n) in removed or n.op_type not in anchors:
            continue
        w, b = const(constants, n.input(1)), const(constants, n.input(2))
        foldable = n.op_type in CONV_TYPES and is_float(w) and w.ndim >= 3 and (not n.input(2) or is_float(b))
        nxt = sole_reader(n.outputs[0])
        if foldable:
            assert w is not None
            transpose, group = n.op_type == "ConvTranspose", int(n.attrs.get("group", 1))
            channels = w.shape[1] * group if transpose else w.shape[0]
            while nxt is not None and (st := affine(nxt, n.outputs[0], w.ndim, channels)) is not None:
                w, b = fold_affine(w, b, *st, group=group, transpose=transpose)
                constants[f"{nxt.outputs[0]}__vk_w"], constants[f"{nxt.outputs[0]}__vk_b"] = w, b
                n.inputs = [n.inputs[0], f"{nxt.outputs[0]}__vk_w", f"{nxt.outputs[0]}__vk_b"]
                absorb(n, nxt)
                nxt = sole_reader(n.outputs[0])
        if nxt is not None and nxt.op_type in ACTIVATIONS:
            spec = activation_spec(nxt, constants)
            if spec is not None:
                n.attrs = {**n.attrs, "_activation": spec}
                absorb(n, nxt)
    return [n for n in nodes if id(n) not in removed]


_ELEMENTWISE = (*ACTIVATIONS, *BINARY, "BatchNormalization")


def elementwise_program(members: list[Node],
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
        c = const(constants, t)
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
            scale, shift = node_batchnorm(node, constants)
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
                names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}",
                tuple(label for m in members for label in m.members)), added


def fuse_epilogues(nodes: list[Node], keep: set[str]) -> list[Node]:
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
        if conv is None or conv.op_type not in CONV_TYPES or n.inputs[0] in keep \
                or readers[n.inputs[0]] != 1 or "_post" in conv.attrs:
            continue
        conv.attrs = {**conv.attrs, "_post": n.attrs["_program"]}
        conv.outputs = list(n.outputs)
        conv.members = (*conv.members, *n.members)
        removed.add(id(n))
    return [n for n in nodes if id(n) not in removed]


def fuse_elementwise(nodes: list[Node], constants: dict[str, np.ndarray], keep: set[str]) -> list[Node]:
    """Replace the elementwise nodes (binary ops, activations, unfolded BatchNormalization) by
    ``Elementwise`` nodes, each a group run by one dispatch.  Groups grow backwards from their
    last node: a producer joins when every reader of its output is in the group already and its
    output is not in ``keep``, so no intermediate leaves the group; :func:`elementwise_program` bounds them."""
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
                    if elementwise_program(trial, constants) is not None:
                        members[id(p)] = p
                        grown = True
        ordered = sorted(members.values(), key=lambda x: position[id(x)])
        built = elementwise_program(ordered, constants)
        assert built is not None  # one node alone is within every limit
        fused, added = built
        constants.update(added)
        for m in ordered:
            grouped[id(m)] = None
        grouped[id(root)] = fused
    return [step for n in nodes if (step := grouped.get(id(n), n)) is not None]


