"""Layer mode: the in-memory ONNX rewrite that routes convolutions to vkconv's layers.

Standard nodes listed in :data:`ROUTES` (``Conv``, ``ConvTranspose``...) become nodes of the
custom domain ``vkconv`` (layer type ``vkconv.<Op>``), which OpenCV's importer hands to our registered
Python layer, so no built-in layer is ever overridden.  What is fused into a routed node is decided
by :mod:`vkconv.onnx.fusion`, the same passes subgraph mode runs: following BatchNormalization and
per-channel affine ops folded into constant weights, an activation and a chain of elementwise ops
by constants taken into the shader's epilogue, each only when nothing else reads the intermediate
tensor and it is not a graph output.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from vkconv.onnx.fusion import ANCHORS, CONV_TYPES, fuse
from vkconv.onnx.model import (
    VKCONV_DOMAIN,
    ModelView,
    Node,
    attributes,
    fold_shape_constants,
    is_constant_node,
    tensor_info,
    unique_labels,
)
from vkconv.onnx.support import runs_on_device

DOMAIN = VKCONV_DOMAIN


@dataclass
class RewriteReport:
    """What the rewrite did, for tests and for ``read_net`` users."""

    routed: list[str]
    folded_batchnorm: int = 0
    fused_activations: int = 0
    left_to_opencv: list[str] = field(default_factory=list)
    # routed node key -> the labels of the source nodes it replaced (itself first)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # node key -> its constant inputs (in ONNX order; None for an omitted one), removed from the graph
    constants: dict[str, list[np.ndarray | None]] = field(default_factory=dict, repr=False)


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


def _kernel(g: ModelView, node: onnx.NodeProto, w_name: str) -> list[int] | None:
    """The kernel shape from the kernel_shape attribute or from W's known shape."""
    kernel = attributes(node).get("kernel_shape")
    if kernel is None:
        w_shape = list(g.constants[w_name].shape) if w_name in g.constants else g.shapes.get(w_name)
        if w_shape and len(w_shape) > 2 and all(d for d in w_shape[2:]):
            kernel = w_shape[2:]
    return [int(k) for k in kernel] if kernel else None


_INT32_MAX = 2**31 - 1
# attribute -> (minimum, length as a multiple of the spatial rank)
_LIMITS = {"kernel_shape": (1, 1), "vk_strides": (1, 1), "vk_dilations": (1, 1), "vk_pads": (0, 2),
           "vk_output_padding": (0, 1), "vk_output_shape": (1, 1)}


def check_attributes(label: str, op_type: str, attrs: dict, nd: int, w_shape) -> None:
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


def _take_constants(g: ModelView, node: onnx.NodeProto, net_id: int, key: str,
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


def _fusion_plan(model: onnx.ModelProto, g: ModelView, labels: list[str]) -> dict[str, Node]:
    """Label of each routed node that absorbs others -> the fused node :func:`vkconv.onnx.fuse`
    makes of it (its ``members``, folded W/B in ``g.constants``, ``_activation``, ``_post``)."""
    ranks, types = tensor_info(model)
    anchors = tuple({*ANCHORS, *(op for (_, op), route in ROUTES.items() if route.fuse_activation)})
    nodes, outside = [], set()
    for proto, name in zip(model.graph.node, labels):
        routed = _route(proto) is not None
        if is_constant_node(proto):
            continue
        if routed or runs_on_device(proto, g.constants, ranks, types):
            nodes.append(Node.from_proto(proto, name))
        else:
            outside.update(proto.input)
    keep = outside | g.graph_outputs
    fused = fuse(nodes, g.constants, keep, anchors)
    return {n.members[0]: n for n in fused if n.op_type in anchors and len(n.members) > 1}


def _route(node: onnx.NodeProto) -> Route | None:
    return ROUTES.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))


def _fused_attributes(fused: Node) -> dict:
    """The vk_act* / vk_post attributes of a fused node's epilogue (OpenCV takes float lists)."""
    out: dict[str, object] = {}
    act = fused.attrs.get("_activation")
    if act is not None:
        name, a, b = (*act, 0.0, 0.0)[:3]
        out.update(vk_act=name, vk_act_a=float(a), vk_act_b=float(b))
    if "_post" in fused.attrs:
        out["vk_post"] = [float(v) for ins in fused.attrs["_post"] for v in ins.constants()]
    return out


def rewrite(model: onnx.ModelProto, net_id: int, *, fuse: bool = True) -> tuple[onnx.ModelProto, RewriteReport]:
    """A copy of ``model`` whose routable nodes are ``vkconv``-domain nodes tagged with ``net_id``.

    Nodes the model already has in the ``vkconv`` domain (sparse encoders, ConvLSTM from the Keras
    converter...) keep their attributes and get the bookkeeping ones.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = ModelView(model.graph)
    folded = fold_shape_constants(model.graph, g.constants)
    report = RewriteReport(routed=[])
    nodes = list(model.graph.node)
    labels = unique_labels(nodes)
    plan = _fusion_plan(model, g, labels) if fuse else {}
    absorbed = {m for f in plan.values() for m in f.members[1:]}
    op_of = {name: n.op_type for name, n in zip(labels, nodes)}
    for node, label in zip(nodes, labels):
        if node.domain == DOMAIN:
            for name, value in _take_constants(g, node, net_id, label, report).items():
                node.attribute.append(helper.make_attribute(name, value))
            node.name = label
            report.routed.append(label)
            continue
        route = _route(node)
        if route is None or label in absorbed:
            continue
        order = route.inputs or tuple(range(len(node.input)))
        inputs = [node.input[i] if i < len(node.input) else "" for i in order]
        attrs = attributes(node)
        scalars = {name: node.input[i] for i, name in route.scalar_inputs.items() if i < len(node.input)}
        if any(t not in g.constants for t in scalars.values()):
            report.left_to_opencv.append(label)  # attributes computed at run time: not ours
            continue
        attrs.update({name: np.asarray(g.constants[t]).reshape(-1)[0].item() for name, t in scalars.items()})
        kernel = _kernel(g, node, inputs[1]) if len(inputs) > 1 else None
        if kernel is None or len(kernel) not in route.ranks:
            report.left_to_opencv.append(label)
            continue
        fused = plan.get(label)
        if fused is not None:
            if fused.op_type in CONV_TYPES:  # W and B may have been folded: new constants
                inputs = list(fused.inputs)
            node.output[0] = fused.outputs[0]
            report.fused[label] = fused.members
            report.folded_batchnorm += sum(op_of[m] == "BatchNormalization" for m in fused.members)
            report.fused_activations += "_activation" in fused.attrs
        del node.input[:]
        node.input.extend(inputs)
        w_shape = g.constants[inputs[1]].shape if inputs[1] in g.constants else None
        new_attrs = dict(kernel_shape=kernel, vk_nd=len(kernel), **route.attributes(attrs, len(kernel)))
        check_attributes(label, node.op_type, new_attrs, len(kernel), w_shape)
        new_attrs.update(_take_constants(g, node, net_id, label, report))
        if fused is not None:
            new_attrs.update(_fused_attributes(fused))
        node.CopyFrom(helper.make_node(route.layer, list(node.input), [node.output[0]], name=label,
                                       domain=DOMAIN, **new_attrs))
        report.routed.append(label)
    kept = [n for n, name in zip(nodes, labels) if name not in absorbed]
    read = {t for n in kept for t in n.input} | g.graph_outputs
    kept = [n for n in kept if not set(n.output) <= folded or any(t in read for t in n.output)]
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
