"""vkconv's layers under the names of ops OpenCV lacks, for plain ``cv2.dnn.readNet``.

After :func:`cv_plugin.register`, ``cv2.dnn.readNet("dcn.onnx")`` (OpenCV's own custom-layer way)
imports these nodes without any rewrite, and they run on Vulkan:

==================================  ===================================  ========================
ONNX node                           layer type OpenCV looks up           runs as
==================================  ===================================  ========================
``DeformConv`` (opset 19, 22)       ``DeformConv``                       ``vkconv.DeformConv``
``mmcv::MMCVModulatedDeformConv2d`` ``mmcv.MMCVModulatedDeformConv2d``   ``vkconv.DeformConv``
``custom::DeformConv2d``            ``custom.DeformConv2d``              ``vkconv.DeformConv``
``torchvision::deform_conv2d``      ``torchvision.deform_conv2d``        ``vkconv.DeformConv``
==================================  ===================================  ========================

Nodes of the ``vkconv`` domain (``cv_plugin.keras.to_onnx``'s ConvLSTM2D, sparse encoders, and
models saved by :func:`cv_plugin.convert`) load the same way under their own ``vkconv.*`` types.

What such a layer is told differs from the rewrite's path: OpenCV hands it the node's attributes
renamed (``strides``→``stride``, ``pads``→``pad``, ``dilations``→``dilation``,
``kernel_shape``→``kernel_size``) and its constant inputs as blobs in input order (None for an
omitted input, 1-D as ``(N, 1)``, int64 as int32), and only its runtime inputs at forward.  Which
input slot a blob or a runtime tensor fills is not said; the layer assumes what exporters write:
weights, bias and torchvision's scalar attributes are constants, X / offset / mask runtime tensors
(``SLOTS``).  Models that break that (runtime weights, a constant mask) load with
:func:`cv_plugin.read_net`, which sees the whole graph.

``Conv`` and ``ConvTranspose`` cannot be routed this way: OpenCV has built-in layers for them, and
registering over a built-in crashes the process (see shared/notes/opencv-python-layers.md); only
:func:`cv_plugin.read_net` and :func:`cv_plugin.convert` (the rewrite) move them to Vulkan.
"""
from __future__ import annotations

import numpy as np

from cv_plugin import layers
from cv_plugin.deform_layer import DeformConvLayer
from cv_plugin.rewrite import ROUTES, Route, check_attributes

# OpenCV's renames of standard ONNX attributes, undone for the route's attribute mapping
_RENAMED = {"kernel_size": "kernel_shape", "pad": "pads", "stride": "strides", "dilation": "dilations"}

# (domain, op) -> (source input slots that constants fill first, slots runtime inputs fill first)
SLOTS: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, ...]]] = {
    ("", "DeformConv"): ((1, 3, 4, 2, 0), (0, 2, 4, 3, 1)),  # X, W, offset, B, mask
    ("mmcv", "MMCVModulatedDeformConv2d"): ((3, 4, 2, 1, 0), (0, 1, 2, 4, 3)),  # x, offset, mask, W, B
    ("custom", "DeformConv2d"): ((3, 4, 2, 1, 0), (0, 1, 2, 4, 3)),
    # input, weight, offset, mask, bias, then 9 scalar attributes
    ("torchvision", "deform_conv2d"): ((1, *range(5, 14), 4, 3, 2, 0), (0, 2, 3, 4, 1)),
}


def routed_params(domain: str, op: str, route: Route, params: dict, constants: list) -> tuple[dict, list]:
    """The vkconv layer's params and constants (in its input order) for a ``domain::op`` node that
    OpenCV handed over with ``params`` and the constant blobs ``constants``."""
    const_first, runtime_first = SLOTS[(domain, op)]
    where = f"{domain + '::' if domain else ''}{op}"
    if len(constants) > len(const_first):
        raise ValueError(f"{where}: {len(constants)} constant inputs, the op takes at most {len(const_first)}")
    const_slots = sorted(const_first[:len(constants)])
    source: list = [None] * len(const_first)
    for i, value in zip(const_slots, constants):
        source[i] = value
    attrs = {(_RENAMED.get(k, k) if not domain else k): v for k, v in params.items()}
    for i, name in route.scalar_inputs.items():
        if i not in const_slots or source[i] is None:
            raise ValueError(f"{where}: input {i} ({name}) must be a constant")
        attrs[name] = int(np.asarray(source[i]).reshape(-1)[0])
    order = route.inputs or tuple(range(len(const_first)))  # vkconv input j <- source input order[j]
    w = source[order[1]]
    kernel = attrs.get("kernel_shape")
    if kernel is None and w is not None:
        kernel = w.shape[2:]
    kernel = [int(k) for k in (kernel if isinstance(kernel, (tuple, list)) else [kernel])] if kernel is not None \
        else None
    nd = len(kernel) if kernel else route.ranks[-1]
    vk = {**route.attributes(attrs, nd), "vk_nd": nd}
    if kernel:
        vk["kernel_shape"] = kernel
    check_attributes(where, op, vk, nd, w.shape if w is not None else None)
    vk_const = [j for j, s in enumerate(order) if s in const_slots]
    runtime = tuple(order.index(s) for s in runtime_first if s not in const_slots and s in order)
    vk.update(vk_ninputs=len(order), vk_const=sum(1 << j for j in vk_const), vk_runtime_order=runtime,
              vk_key=where)
    return vk, [source[order[j]] for j in vk_const]


def _layer_class(domain: str, op: str, route: Route, base: type[layers.Layer]) -> type[layers.Layer]:
    def standalone_params(cls, params: dict, constants: list) -> tuple[dict, list]:
        return routed_params(domain, op, route, params, constants)

    return type(f"{op}Layer", (base,), {"standalone_params": classmethod(standalone_params)})


# layer type -> class, for each op OpenCV lacks; register() registers them with vkconv's own types
for (_domain, _op) in SLOTS:
    layers.LAYER_TYPES[f"{_domain}.{_op}" if _domain else _op] = _layer_class(
        _domain, _op, ROUTES[(_domain, _op)], DeformConvLayer)
