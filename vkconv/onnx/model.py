"""The node model and the lookups every ONNX consumer in vkconv shares: one attribute decoder, one
view of a graph's constants and readers, shape inference, one topological sort."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard, TypeVar

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

STANDARD_DOMAINS = ("", "ai.onnx")
VKCONV_DOMAIN = "vkconv"  # vkconv's own ops (the layer types of cv_plugin, ConvLSTM2D from cv_plugin.keras)


def attributes(node: onnx.NodeProto) -> dict:
    """``node``'s attributes as Python values (strings decoded, tensors left as TensorProto)."""
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def label(node: onnx.NodeProto, index: int) -> str:
    """How messages name a node: its name, or ``OpType#index`` for the many exporters that leave
    names empty."""
    return node.name or f"{node.op_type}#{index}"


def unique_labels(nodes: Sequence[onnx.NodeProto]) -> list[str]:
    """:func:`label` of each node, made unique with primes; both modes key nodes by these."""
    seen: set[str] = set()
    out = []
    for i, node in enumerate(nodes):
        key = label(node, i)
        while key in seen:
            key += "'"
        seen.add(key)
        out.append(key)
    return out


@dataclass
class Node:
    """One ONNX node: op type, input / output tensor names ('' = an omitted optional input, as
    ONNX writes it) and attributes.  ``members``: the labels of the source nodes this node stands
    for after fusion (itself alone before)."""

    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    name: str = ""
    members: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.members:
            self.members = (self.name or self.op_type,)

    @classmethod
    def from_proto(cls, node: onnx.NodeProto, name: str | None = None) -> Node:
        """``name``: the label to use (default: the proto's own name)."""
        return cls(node.op_type, list(node.input), list(node.output), attributes(node),
                   node.name if name is None else name)

    def input(self, i: int) -> str:
        """Input ``i``'s tensor name, '' when it is absent or omitted."""
        return self.inputs[i] if i < len(self.inputs) else ""


def const(constants: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    """The constant named ``name`` ('' = an omitted input: None)."""
    return np.asarray(constants[name]) if name and name in constants else None


def is_float(array: np.ndarray | None) -> TypeGuard[np.ndarray]:
    return array is not None and np.issubdtype(array.dtype, np.floating)


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and the outputs of ``Constant`` nodes with a tensor ``value`` (exporters such as
    Paddle2ONNX store weights in Constant nodes; OpenCV treats both as constants)."""
    return {**{t.name: numpy_helper.to_array(t) for t in graph.initializer}, **node_constants(graph.node)}


def node_constants(nodes: Iterable[onnx.NodeProto]) -> dict[str, np.ndarray]:
    """The values of the ``Constant`` nodes among ``nodes``, by output name."""
    return {n.output[0]: numpy_helper.to_array(attributes(n)["value"]) for n in nodes if is_constant_node(n)}


def is_constant_node(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in STANDARD_DOMAINS \
        and any(a.name == "value" for a in node.attribute)


def value_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    """``vi``'s dims, None for each symbolic or unknown one; None when it declares no shape."""
    tensor = vi.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]


class ModelView:
    """Lookups over one ONNX graph: its constants, graph outputs and declared shapes."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.constants = graph_constants(graph)
        self.graph_outputs = {o.name for o in graph.output}
        # tensor -> declared dims (None where symbolic or unknown)
        self.shapes: dict[str, list] = {vi.name: dims for vi in [*graph.input, *graph.value_info, *graph.output]
                       if (dims := value_dims(vi)) is not None}


def tensor_info(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """(rank, elem_type) of every tensor that ONNX shape inference can type; a model that shape
    inference rejects gets only what its own value_info says.  Outputs of custom-domain nodes
    (vkconv's ConvLSTM2D, mmcv's DeformConv...), which inference cannot type, are taken as float32
    so that the types of what follows them are inferred."""
    known = {vi.name for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    custom = [t for n in model.graph.node if n.domain not in STANDARD_DOMAINS for t in n.output
              if t and t not in known]
    if custom:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.value_info.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                      for t in custom)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference raises many types on exotic models
        inferred = model
    g = inferred.graph
    ranks, types = {}, {}
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            ranks[vi.name] = len(tt.shape.dim)
    return ranks, types


T = TypeVar("T")


def toposort(nodes: Sequence[T], available: Iterable[str], reads: Callable[[T], Iterable[str]],
             writes: Callable[[T], Iterable[str]]) -> list[T]:
    """``nodes`` in a topological order, stable (a node moves only after what it reads).
    ``available``: tensors that exist before any node runs.  ValueError naming the nodes left when
    some read tensors nothing produces, or form a cycle."""
    ready, order, pending = set(available), [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(not t or t in ready for t in reads(n)):
                order.append(n)
                ready.update(writes(n))
            else:
                rest.append(n)
        if len(rest) == len(pending):
            names = [getattr(n, "name", "") or getattr(n, "op_type", "?") for n in rest]
            raise ValueError(f"graph: nodes {names} read tensors nothing produces (or form a cycle)")
        pending = rest
    return order


def sort_nodes(nodes: Sequence[Node], available: Iterable[str]) -> list[Node]:
    return toposort(nodes, available, lambda n: n.inputs, lambda n: n.outputs)


def sort_protos(nodes: Sequence[onnx.NodeProto], available: Iterable[str]) -> list[onnx.NodeProto]:
    return toposort(nodes, available, lambda n: n.input, lambda n: n.output)


# nodes that only reshape or retype: OpenCV's importer evaluates them when their inputs are constants
_SHAPE_ONLY = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Cast", "Identity"}


def fold_shape_constants(graph: onnx.GraphProto, constants: dict[str, np.ndarray]) -> set[str]:
    """Evaluate shape-only nodes (Reshape, Unsqueeze...) whose inputs are all constants, as OpenCV's
    importer does, adding their outputs to ``constants``: exporters reshape per-channel parameters
    this way, and the fusion passes must see them as the constants they are.  Returns the names
    of the tensors it folded (names, not node ids: protobuf may hand out a new Python object for a
    node each time the graph is read)."""
    folded: set[str] = set()
    for node in graph.node:
        if node.op_type not in _SHAPE_ONLY or node.domain not in STANDARD_DOMAINS \
                or not all(t in constants for t in node.input if t):
            continue
        try:
            outs = ReferenceEvaluator(node).run(None, {t: constants[t] for t in node.input if t})
        except Exception:  # noqa: BLE001 - left to OpenCV, unfolded
            continue
        constants.update(zip(node.output, (np.asarray(o) for o in outs)))
        folded.update(node.output)
    return folded
