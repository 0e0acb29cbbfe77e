"""In-memory ONNX rewrite that routes convolutions to vkconv's layers.

Standard nodes listed in :data:`ROUTES` (``Conv``, ``ConvTranspose``...) become nodes of the
custom domain ``vkconv`` (layer type ``vkconv.<Op>``), which OpenCV's importer hands to our registered
Python layer, so no built-in layer is ever overridden.  A directly following ``BatchNormalization``
is folded into constant weights and a directly following activation is fused into the shader's
epilogue, each only when nothing else reads the intermediate tensor and it is not a graph output.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vkconv.graph.executor import fold_batchnorm

DOMAIN = "vkconv"

# ONNX activation -> (vkconv activation name, attribute defaults (a, b))
_ACTIVATIONS = {
    "Relu": ("Relu", {}),
    "LeakyRelu": ("LeakyRelu", {"alpha": 0.01}),
    "HardSigmoid": ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}),
    "HardSwish": ("HardSwish", {}),
    "Sigmoid": ("Sigmoid", {}),
    "Tanh": ("Tanh", {}),
    "Clip": ("Clip", {}),
}


@dataclass
class RewriteReport:
    """What the rewrite did, for tests and for ``read_net`` users."""

    routed: list[str]
    folded_batchnorm: int = 0
    fused_activations: int = 0
    left_to_opencv: list[str] = field(default_factory=list)
    # node key -> its constant inputs (in ONNX order; None for an omitted one), removed from the graph
    constants: dict[str, list[np.ndarray | None]] = field(default_factory=dict, repr=False)


class _Graph:
    """Lookups over one ONNX graph that the rewrite keeps up to date."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(a.t)
        self.graph_outputs = {o.name for o in graph.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.shapes: dict[str, list] = {}
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            dims = vi.type.tensor_type.shape.dim
            if vi.type.tensor_type.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]

    def sole_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and tensor not in self.graph_outputs:
            return users[0]
        return None

    def add_initializer(self, name: str, value: np.ndarray) -> str:
        value = value.astype(np.float32)
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        self.constants[name] = value
        return name


def _attrs(node: onnx.NodeProto) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _fold_batchnorm(g: _Graph, conv: onnx.NodeProto, bn: onnx.NodeProto, key: str) -> bool:
    """Fold ``bn`` into ``conv``'s constant W and B (in place). False when it cannot be folded."""
    attrs = _attrs(bn)
    if attrs.get("training_mode", 0) or len(bn.output) > 1 and any(bn.output[1:]):
        return False
    w_name = conv.input[1]
    b_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
    needed = [w_name, *bn.input[1:5]] + ([b_name] if b_name else [])
    if any(n not in g.constants for n in needed):
        return False
    scale, beta, mean, var = (g.constants[n].reshape(-1) for n in bn.input[1:5])
    w_folded, b_folded = fold_batchnorm(g.constants[w_name], g.constants[b_name] if b_name else None,
                                        scale, beta, mean, var, float(attrs.get("epsilon", 1e-5)))
    x_name = conv.input[0]
    del conv.input[:]
    conv.input.extend([x_name, g.add_initializer(f"{key}__vk_w", w_folded),
                       g.add_initializer(f"{key}__vk_b", b_folded)])
    conv.output[0] = bn.output[0]
    return True


def _activation(g: _Graph, node: onnx.NodeProto) -> tuple[str, float, float] | None:
    """``(name, a, b)`` for a fusable activation node, None otherwise."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _ACTIVATIONS:
        return None
    name, defaults = _ACTIVATIONS[node.op_type]
    attrs = {**defaults, **_attrs(node)}
    if node.op_type == "Clip":
        lo, hi = attrs.get("min", -np.inf), attrs.get("max", np.inf)  # opset < 11 attributes
        bounds = list(node.input[1:3])
        for i, tensor in enumerate(bounds):
            if not tensor:
                continue
            if tensor not in g.constants:
                return None  # runtime bounds cannot be baked into the pipeline
            value = float(np.asarray(g.constants[tensor]).reshape(-1)[0])
            lo, hi = (value, hi) if i == 0 else (lo, value)
        return name, float(lo), float(hi)
    if node.op_type == "LeakyRelu":
        return name, float(attrs["alpha"]), 0.0
    if node.op_type == "HardSigmoid":
        return name, float(attrs["alpha"]), float(attrs["beta"])
    return name, 0.0, 0.0


@dataclass(frozen=True)
class Route:
    """How one standard ONNX op becomes a node of the ``vkconv`` domain.

    ``inputs``: positions, in the source node, of the inputs in vkconv's order (X, W, ...), so that
    exporters with another order (mmcv's x, offset, mask, weight, bias) share one layer.
    ``scalar_inputs``: source input position -> attribute name, for exporters that pass attributes
    as constant inputs (torchvision's ``deform_conv2d``); they join the attributes.
    ``attributes(attrs, nd)`` maps the source attributes onto vkconv's ``vk_*`` attributes.
    """

    layer: str
    ranks: tuple[int, ...]
    attributes: Callable[[dict, int], dict]
    inputs: tuple[int, ...] | None = None
    scalar_inputs: dict[int, str] = field(default_factory=dict)
    fold_batchnorm: bool = False
    fuse_activation: bool = True


def conv_attributes(attrs: dict, nd: int) -> dict:
    return dict(vk_group=int(attrs.get("group", 1)),
                vk_strides=list(attrs.get("strides", [1] * nd)),
                vk_dilations=list(attrs.get("dilations", [1] * nd)),
                vk_pads=list(attrs.get("pads", [0] * (2 * nd))),
                vk_auto_pad=attrs.get("auto_pad", "NOTSET"))


def _conv_transpose_attributes(attrs: dict, nd: int) -> dict:
    extra = {"vk_output_padding": list(attrs.get("output_padding", [0] * nd))}
    if "output_shape" in attrs:
        extra["vk_output_shape"] = list(attrs["output_shape"])[-nd:]
    return {**conv_attributes(attrs, nd), **extra}


# (domain, op_type) -> Route; extended by the op modules that serve more ops
ROUTES: dict[tuple[str, str], Route] = {
    ("", "Conv"): Route("Conv", (1, 2, 3), conv_attributes, fold_batchnorm=True),
    ("", "ConvTranspose"): Route("ConvTranspose", (1, 2, 3), _conv_transpose_attributes),
}


def _kernel(g: _Graph, node: onnx.NodeProto, w_name: str) -> list[int] | None:
    """The kernel shape from the kernel_shape attribute or from W's known shape."""
    kernel = _attrs(node).get("kernel_shape")
    if kernel is None:
        w_shape = list(g.constants[w_name].shape) if w_name in g.constants else g.shapes.get(w_name)
        if w_shape and len(w_shape) > 2 and all(d for d in w_shape[2:]):
            kernel = w_shape[2:]
    return [int(k) for k in kernel] if kernel else None


_INT32_MAX = 2**31 - 1
# attribute -> (minimum, length as a multiple of the spatial rank)
_LIMITS = {"kernel_shape": (1, 1), "vk_strides": (1, 1), "vk_dilations": (1, 1), "vk_pads": (0, 2),
           "vk_output_padding": (0, 1), "vk_output_shape": (1, 1)}


def _check_attributes(label: str, op_type: str, attrs: dict, nd: int, w_shape) -> None:
    """Refuse out-of-range attributes before OpenCV sees them (it breaks on ints >= 2^31, and a
    layer must never be asked to dispatch nonsense)."""
    where = f"model: node {label!r} ({op_type})"
    for name, (minimum, per) in _LIMITS.items():
        if name not in attrs:
            continue
        values = [int(v) for v in attrs[name]]
        if len(values) != per * nd:
            raise ValueError(f"{where}: {name.removeprefix('vk_')} has {len(values)} values, expected "
                             f"{per * nd} for a {nd}-D op")
        if any(v < minimum or v > _INT32_MAX for v in values):
            raise ValueError(f"{where}: {name.removeprefix('vk_')} {values} out of range "
                             f"[{minimum}, 2^31 - 1]")
    for name in ("vk_group", "vk_offset_group"):
        if name in attrs and not 1 <= int(attrs[name]) <= _INT32_MAX:
            raise ValueError(f"{where}: {name.removeprefix('vk_')}={attrs[name]} must be >= 1")
    if w_shape is not None and list(w_shape[2:]) != list(attrs["kernel_shape"]):
        raise ValueError(f"{where}: kernel_shape {list(attrs['kernel_shape'])} does not match the "
                         f"weights' shape {list(w_shape)}")


def _unique(label: str, keys: set[str]) -> str:
    key = label
    while key in keys:
        key += "'"
    keys.add(key)
    return key


def _fuse_followers(g: _Graph, node: onnx.NodeProto, route: Route, key: str, removed: set[int],
                    report: RewriteReport) -> tuple[str, float, float] | None:
    """Fold a following BatchNormalization and absorb a following activation into ``node``."""
    nxt = g.sole_consumer(node.output[0])
    if route.fold_batchnorm and nxt is not None and nxt.op_type == "BatchNormalization" \
            and nxt.domain in ("", "ai.onnx") and _fold_batchnorm(g, node, nxt, key):
        removed.add(id(nxt))
        report.folded_batchnorm += 1
        nxt = g.sole_consumer(node.output[0])
    if not route.fuse_activation or nxt is None or id(nxt) in removed:
        return None
    act = _activation(g, nxt)
    if act is not None:
        node.output[0] = nxt.output[0]
        removed.add(id(nxt))
        report.fused_activations += 1
    return act


def _take_constants(g: _Graph, node: onnx.NodeProto, net_id: int, key: str,
                    report: RewriteReport) -> dict:
    """Move ``node``'s constant inputs into ``report.constants``; return the bookkeeping attributes
    every vkconv layer reads (which inputs were constant, how many there were, who it is)."""
    inputs = list(node.input)
    while inputs and not inputs[-1]:
        inputs.pop()
    # Initializers and Constant-node outputs alike (exporters such as Paddle2ONNX store weights in
    # Constant nodes, which OpenCV also turns into blobs).  An optional input left out with an empty
    # name is not a runtime input either: its value is None (OpenCV hands it over as a None blob).
    const = [i for i, name in enumerate(inputs) if not name or name in g.constants]
    report.constants[key] = [g.constants[inputs[i]] if inputs[i] else None for i in const]
    del node.input[:]
    node.input.extend(name for i, name in enumerate(inputs) if i not in const)
    return dict(vk_net=net_id, vk_key=key, vk_const=sum(1 << i for i in const), vk_ninputs=len(inputs))


def rewrite(model: onnx.ModelProto, net_id: int, *, fuse: bool = True) -> tuple[onnx.ModelProto, RewriteReport]:
    """A copy of ``model`` whose routable nodes are ``vkconv``-domain nodes tagged with ``net_id``.

    Nodes the model already has in the ``vkconv`` domain (sparse encoders, ConvLSTM from the Keras
    converter...) keep their attributes and get the bookkeeping ones.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = _Graph(model.graph)
    report = RewriteReport(routed=[])
    removed: set[int] = set()
    keys: set[str] = set()
    nodes = list(model.graph.node)
    for index, node in enumerate(nodes):
        label = node.name or f"{node.op_type}#{index}"
        if node.domain == DOMAIN:
            key = _unique(label, keys)
            for name, value in _take_constants(g, node, net_id, key, report).items():
                node.attribute.append(helper.make_attribute(name, value))
            node.name = key
            report.routed.append(key)
            continue
        route = ROUTES.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))
        if route is None:
            continue
        order = route.inputs or tuple(range(len(node.input)))
        inputs = [node.input[i] if i < len(node.input) else "" for i in order]
        attrs = _attrs(node)
        scalars = {name: node.input[i] for i, name in route.scalar_inputs.items() if i < len(node.input)}
        if any(t not in g.constants for t in scalars.values()):
            report.left_to_opencv.append(label)  # attributes computed at run time: not ours
            continue
        attrs.update({name: np.asarray(g.constants[t]).reshape(-1)[0].item() for name, t in scalars.items()})
        kernel = _kernel(g, node, inputs[1]) if len(inputs) > 1 else None
        if kernel is None or len(kernel) not in route.ranks:
            report.left_to_opencv.append(label)
            continue
        key = _unique(label, keys)
        if route.inputs:
            del node.input[:]
            node.input.extend(inputs)
        act = _fuse_followers(g, node, route, key, removed, report) if fuse else None
        w_shape = g.constants[inputs[1]].shape if inputs[1] in g.constants else None
        new_attrs = dict(kernel_shape=kernel, vk_nd=len(kernel), **route.attributes(attrs, len(kernel)))
        _check_attributes(label, node.op_type, new_attrs, len(kernel), w_shape)
        new_attrs.update(_take_constants(g, node, net_id, key, report))
        if act is not None:
            new_attrs.update(vk_act=act[0], vk_act_a=act[1], vk_act_b=act[2])
        node.CopyFrom(helper.make_node(route.layer, list(node.input), [node.output[0]], name=key,
                                       domain=DOMAIN, **new_attrs))
        report.routed.append(key)
    kept = [n for n in nodes if id(n) not in removed]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_dangling(model.graph)
    if report.routed and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model, report


def _drop_dangling(graph: onnx.GraphProto) -> None:
    """Remove initializers, Constant nodes and value_info that nothing uses any more (constants the
    layers now hold, folded BatchNorm parameters)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep_nodes = [n for n in graph.node
                  if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    produced = {name for node in graph.node for name in node.output} | {i.name for i in graph.input}
    keep_init = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep_init)
    keep_vi = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(keep_vi)
