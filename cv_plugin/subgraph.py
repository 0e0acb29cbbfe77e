"""Subgraph mode: maximal connected groups of ops vkconv can run become one ``vkconv.Subgraph``
layer each, run by :class:`vkconv.graph.Graph` with one upload of the group's inputs, one
readback of its outputs and every intermediate tensor kept in device memory.

Partitioning runs on the ONNX model *before* the layer-mode rewrite (:func:`cv_plugin.rewrite.rewrite`),
which then routes the convolutions left outside every group one at a time, as in layer mode.
Inside a group the graph does its own Conv + BatchNormalization folding and activation fusion.

A node joins a group when :func:`vkconv.graph.unsupported_reason` accepts it with the ranks
that ONNX shape inference gives and all its runtime tensors are float32.  Groups grow in
topological order; a node joins (and may merge) the groups of its producers only when that cannot
make a cycle through OpenCV's layers (no path leaves a group and comes back into it).  Groups
with fewer than ``min_ops`` nodes are left to layer mode.

The group's nodes and constants are not stored in the ONNX node (OpenCV's importer cannot take
graph attributes): :func:`attach` puts a :class:`SubgraphSpec` in the net's state under the node
key, where the layer finds it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

import vkconv
from cv_plugin import layers
from cv_plugin.rewrite import DOMAIN
from vkconv.graph import Graph
from vkconv.onnx.model import (
    ModelView,
    Node,
    fold_shape_constants,
    is_constant_node,
    sort_protos,
    tensor_info,
    unique_labels,
)
from vkconv.onnx.support import runs_on_device

MODES = ("layer", "subgraph")


@dataclass
class SubgraphSpec:
    """One group: its nodes (topological order), constants, external inputs and outputs."""

    nodes: list[Node]
    constants: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    shape: tuple = field(default=(), repr=False)  # Layer reads constants' .shape; a spec has none


def _groups(nodes: list[onnx.NodeProto], ok: list[bool]) -> list[list[int]]:
    """Node indices per group, each group convex (see the module docstring)."""
    parent: dict[int, int] = {}

    def find(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    producer = {t: i for i, n in enumerate(nodes) for t in n.output if t}
    group: list[int | None] = [None] * len(nodes)
    taint: list[set[int]] = [set() for _ in nodes]  # groups this node depends on through an exit
    gtaint: dict[int, set[int]] = {}

    def exits(p: int) -> set[int]:
        out = {find(g) for g in taint[p]}
        if (gp := group[p]) is not None:
            out.add(find(gp))
        return out

    def taint_as_member(i: int, members: set[int]) -> set[int]:
        out: set[int] = set()
        for p in prods[i]:
            if (gp := group[p]) is not None and find(gp) in members:
                out |= {find(g) for g in taint[p]}
            else:
                out |= exits(p)
        return out

    prods = [sorted({producer[t] for t in n.input if t in producer}) for n in nodes]
    for i in range(len(nodes)):
        if not ok[i]:
            taint[i] = set().union(*(exits(p) for p in prods[i])) if prods[i] else set()
            continue
        members: set[int] = set()
        for g in dict.fromkeys(find(gp) for p in prods[i] if (gp := group[p]) is not None):
            trial = members | {g}
            if trial & taint_as_member(i, trial):
                continue
            if any(m in {find(x) for x in gtaint[g]} or g in {find(x) for x in gtaint[m]} for m in members):
                continue
            members = trial
        if not members:
            parent[i] = i
            gtaint[i] = set()
            members = {i}
        root = min(members)
        for m in members:
            parent[m] = root
        taint[i] = taint_as_member(i, {root})
        gtaint[root] = set().union(taint[i], *(gtaint[m] for m in members))
        group[i] = root
    by_group: dict[int, list[int]] = defaultdict(list)
    for i, gi in enumerate(group):
        if gi is not None:
            by_group[find(gi)].append(i)
    return list(by_group.values())


def partition(model: onnx.ModelProto, *, min_ops: int = 2) -> tuple[onnx.ModelProto, dict[str, SubgraphSpec]]:
    """A copy of ``model`` whose groups of supported nodes are ``vkconv.Subgraph`` nodes, and the
    spec of each by node name."""
    if not isinstance(min_ops, int) or min_ops < 1:
        raise ValueError(f"min_ops: expected a positive int, got {min_ops!r}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = ModelView(model.graph)
    folded = fold_shape_constants(model.graph, g.constants)
    ranks, types = tensor_info(model)
    protos = list(model.graph.node)  # one Python object per node, so that id() names it below
    label_of = dict(zip(map(id, protos), unique_labels(protos)))
    nodes = [n for n in protos if not is_constant_node(n)]
    groups = [grp for grp in _groups(nodes, [runs_on_device(n, g.constants, ranks, types) for n in nodes])
              if len(grp) >= min_ops]
    specs: dict[str, SubgraphSpec] = {}
    replaced: dict[int, onnx.NodeProto | None] = {}
    names = {n.name for n in model.graph.node}
    for k, grp in enumerate(groups):
        members = [nodes[i] for i in grp]
        produced = {t for n in members for t in n.output}
        outside_reads = {t for i, n in enumerate(nodes) if i not in set(grp) for t in n.input}
        inputs = list(dict.fromkeys(t for n in members for t in n.input
                                    if t and t not in produced and t not in g.constants))
        outputs = [t for n in members for t in n.output if t in outside_reads or t in g.graph_outputs]
        consts = {t: g.constants[t] for n in members for t in n.input if t in g.constants}
        key = f"vkconv_subgraph_{k}"
        while key in names:
            key += "_"
        names.add(key)
        specs[key] = SubgraphSpec([Node.from_proto(n, label_of[id(n)]) for n in members], consts, inputs, outputs)
        node = helper.make_node("Subgraph", inputs, outputs, name=key, domain=DOMAIN)
        for j, i in enumerate(grp):
            replaced[id(nodes[i])] = node if j == len(grp) - 1 else None
    if specs:
        kept = [n for n in (replaced.get(id(n), n) for n in protos) if n is not None]
        read = {t for n in kept for t in n.input} | g.graph_outputs
        # constant-foldable nodes whose results only the groups read: the groups hold the values
        kept = [n for n in kept if not set(n.output) <= folded or any(t in read for t in n.output)]
        available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
        del model.graph.node[:]
        model.graph.node.extend(sort_protos(kept, available))  # OpenCV imports nodes in file order
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model, specs


def attach(state: layers.NetState, specs: dict[str, SubgraphSpec]) -> None:
    """Give each Subgraph layer its spec (the rewrite left it no constants)."""
    for key, spec in specs.items():
        state.constants[key] = [spec]


class SubgraphOp(layers.Op):
    """A group of ONNX nodes run as one :class:`vkconv.graph.Graph`; ``graph.transfers`` counts
    its host<->device tensor copies."""

    def __init__(self, params: dict, constants: list):
        super().__init__(params, [])
        if len(constants) != 1 or not isinstance(constants[0], SubgraphSpec):
            raise vkconv.VkconvError(f"vkconv.Subgraph {self.name}: no subgraph spec (load the model "
                                     "with cv_plugin.read_net(..., mode='subgraph'))")
        spec = constants[0]
        self.spec = spec
        self.graph = Graph(spec.nodes, spec.constants, inputs=spec.inputs, outputs=spec.outputs)

    def output_shapes(self, in_shapes):
        return self.graph.output_shapes(in_shapes)

    def forward(self, arrays):
        if self.graph.ctx.lost:
            raise vkconv.VkconvError(f"vkconv.Subgraph {self.name}: its device was lost; reload the net")
        return self.graph.run([np.ascontiguousarray(a, np.float32) for a in arrays])

    def profile(self, arrays):
        return self.graph.profile([np.ascontiguousarray(a, np.float32) for a in arrays])

    def close(self):
        self.graph.close()


class SubgraphLayer(layers.Layer):
    op_class = SubgraphOp


layers.LAYER_TYPES["vkconv.Subgraph"] = SubgraphLayer
