"""Saved converted models: the rewrite written to a file that plain ``cv2.dnn.readNet`` runs.

``convert(model, path)`` rewrites the model as :func:`cv_plugin.read_net` does (Conv, ConvTranspose
and DeformConv nodes become ``vkconv.*`` nodes, BatchNorm folded, activations fused; in subgraph
mode, groups of ops become ``vkconv.Subgraph`` nodes) and writes it self-contained: every routed
node gets its constants back as initializers (OpenCV hands them to the layer as blobs), with the
rewrite's ``vk_const`` / ``vk_ninputs`` attributes saying which input slot each fills, and no net
id.  A ``vkconv.Subgraph`` node carries its group (nodes and weights, as a serialized ONNX graph)
in one extra int32 initializer, its last input.

Any later process runs it with::

    import cv2, cv_plugin
    cv_plugin.register()
    net = cv2.dnn.readNet("model.vkconv.onnx")

The layers of such a net live in the plugin-level cache (:data:`cv_plugin.layers.STANDALONE`),
freed by :func:`cv_plugin.release`; their errors are logged and kept for
:func:`cv_plugin.take_errors` (plain ``cv2.dnn`` cannot raise them: the forward fails with a
``cv2.error``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cv_plugin import layers, subgraph
from cv_plugin.net import prepare_model
from cv_plugin.rewrite import DOMAIN, RewriteReport, rewrite
from cv_plugin.subgraph import SubgraphSpec
from vkconv.onnx.model import Node


def encode_spec(spec: SubgraphSpec) -> np.ndarray:
    """``spec`` as int32 words (an initializer OpenCV passes on unchanged): the byte count, then
    the serialized ONNX graph holding the group's nodes, constants, inputs and outputs."""
    graph = helper.make_graph(
        [helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name, **n.attrs) for n in spec.nodes],
        "vkconv_subgraph",
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in spec.inputs],
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in spec.outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in spec.constants.items()])
    data = graph.SerializeToString()
    padded = data + b"\0" * (-len(data) % 4)
    return np.concatenate([np.array([len(data)], np.int32), np.frombuffer(padded, np.int32)])


def decode_spec(words: np.ndarray) -> SubgraphSpec:
    """The inverse of :func:`encode_spec` (from the blob OpenCV hands over: int32, ``(N, 1)``)."""
    words = np.ascontiguousarray(words, np.int32).reshape(-1)
    if words.size < 1 or not 0 <= int(words[0]) <= 4 * (words.size - 1):
        raise ValueError("vkconv.Subgraph: its last input is not a subgraph written by cv_plugin.convert")
    graph = onnx.GraphProto.FromString(words[1:].tobytes()[:int(words[0])])
    return SubgraphSpec([Node.from_proto(n) for n in graph.node],
                        {t.name: numpy_helper.to_array(t) for t in graph.initializer},
                        [vi.name for vi in graph.input], [vi.name for vi in graph.output])


class SubgraphLayer(subgraph.SubgraphLayer):
    """``vkconv.Subgraph``, also from a saved model: there its spec is the last blob."""

    @classmethod
    def standalone_params(cls, params: dict, constants: list) -> tuple[dict, list]:
        if len(constants) != 1 or constants[0] is None:
            raise ValueError("vkconv.Subgraph: expected its group as the one constant input (a model "
                             "written by cv_plugin.convert(..., mode='subgraph'))")
        return params, [decode_spec(constants[0])]


layers.LAYER_TYPES["vkconv.Subgraph"] = SubgraphLayer


def convert(model, path: str | os.PathLike, *, mode: str = "layer", fuse: bool = True, min_ops: int = 2,
            input_shapes: Mapping[str, Sequence[int]] | None = None) -> RewriteReport:
    """Write ``model`` (a path, bytes or ``onnx.ModelProto``) rewritten for vkconv's layers to
    ``path``, self-contained (weights inside), for plain ``cv2.dnn.readNet`` after
    :func:`cv_plugin.register`; returns what the rewrite routed.  ``mode``, ``fuse``,
    ``min_ops`` and ``input_shapes`` are :func:`cv_plugin.read_net`'s."""
    proto = prepare_model(model, mode, input_shapes)
    specs: dict[str, SubgraphSpec] = {}
    if mode == "subgraph":
        proto, specs = subgraph.partition(proto, min_ops=min_ops)
    routed, report = rewrite(proto, 0, fuse=fuse)
    names = {t.name for t in routed.graph.initializer} | {n for node in routed.graph.node for n in node.output}
    for node in routed.graph.node:
        if node.domain != DOMAIN or node.name not in report.constants:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        runtime, constants = iter(list(node.input)), iter(report.constants[node.name])
        inputs = []
        for i in range(int(attrs["vk_ninputs"])):
            if not int(attrs["vk_const"]) >> i & 1:
                inputs.append(next(runtime))
                continue
            value = next(constants)
            inputs.append("" if value is None else _initializer(routed.graph, names, f"{node.name}__vk_in{i}",
                                                                 np.asarray(value)))
        if node.name in specs:
            inputs.append(_initializer(routed.graph, names, f"{node.name}__vk_spec", encode_spec(specs[node.name])))
        del node.input[:]
        node.input.extend(inputs)
        kept = [a for a in node.attribute if a.name != "vk_net"]
        del node.attribute[:]
        node.attribute.extend(kept)
    onnx.save(routed, os.fspath(path))
    return report


def _initializer(graph: onnx.GraphProto, names: set[str], name: str, value: np.ndarray) -> str:
    while name in names:
        name += "_"
    names.add(name)
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name
