"""Deformable convolution in ``cv2.dnn``: the ``vkconv.DeformConv`` layer and the exports it serves.

OpenCV cannot import any deformable convolution itself.  Every form below is rewritten into one
``vkconv.DeformConv`` node with inputs in ONNX order (X, W, offset[, B[, mask]]); W and B become
resident device weights, offset and mask stay runtime inputs:

=====================================  ==============================================  ==========================
export                                  inputs (source order)                           attributes
=====================================  ==============================================  ==========================
ONNX ``DeformConv`` (opset 19/22)       X, W, offset, B, mask                            strides, pads, dilations,
                                                                                         group, offset_group
mmcv/mmdeploy                           input, offset, mask, weight, bias                stride, padding, dilation,
``mmcv::MMCVModulatedDeformConv2d``                                                      groups, deform_groups
``custom::DeformConv2d`` (TensorRT      input, offset, mask, weight, bias                stride, padding, dilation,
DCNv2 plugin style)                                                                      deformable_groups
torchvision ``deform_conv2d`` exported  input, weight, offset, mask, bias, stride_h,     (all as constant inputs)
with ``ONNX_FALLTHROUGH``               stride_w, pad_h, pad_w, dil_h, dil_w, groups,
(``torchvision::deform_conv2d``)        offset_groups, use_mask
=====================================  ==============================================  ==========================

All use the torchvision offset layout ``[N, offset_group * 2 * kH * kW, oH, oW]`` (dy, dx per tap).
"""
from __future__ import annotations

import numpy as np

import vkconv
from cv_plugin import layers
from cv_plugin.rewrite import ROUTES, Route, conv_attributes
from vkconv.kernels import shapes


class DeformConvOp(layers.ConvFamilyOp):
    """Inputs X, W, offset[, B[, mask]]; an omitted or empty mask (torchvision's "no mask") means DCNv1."""

    input_names = ("X", "W", "offset", "B", "mask")
    required = 3

    def __init__(self, params: dict, constants: list[np.ndarray]):
        super().__init__(params, constants)
        self.offset_group = int(params.get("vk_offset_group", 1))
        self.use_mask = bool(params.get("vk_use_mask", 1))

    def output_shapes(self, in_shapes):
        out, _ = shapes.conv_output_shape(in_shapes[0], in_shapes[1], self.strides, self.pads,
                                          self.dilations, self.group)
        return [out]

    def build(self, w, b):
        return vkconv.DeformConv(w, b, strides=self.strides, pads=self.pads, dilations=self.dilations,
                                 group=self.group, offset_group=self.offset_group,
                                 activation=self.activation, tune=self.tune)

    def forward(self, arrays):
        x, w, offset, *rest = arrays
        b = rest[0] if rest else None
        mask = rest[1] if self.use_mask and len(rest) > 1 and rest[1] is not None and rest[1].size else None
        op = self.weights(w, b.reshape(-1) if b is not None else None)
        return [op(x, offset, mask)]


class DeformConvLayer(layers.Layer):
    op_class = DeformConvOp
    slot_priority = ((1, 3, 4, 2, 0), (0, 2, 4, 3, 1))


def _onnx(attrs: dict, nd: int) -> dict:
    return {**conv_attributes(attrs, nd), "vk_offset_group": int(attrs.get("offset_group", 1))}


def _mmcv_style(groups_key: str | None, offset_groups_key: str):
    def attributes(attrs: dict, nd: int) -> dict:
        if attrs.get("activation_type", -1) != -1:
            raise ValueError(f"DeformConv2d: fused activation_type={attrs['activation_type']} is not "
                             "supported; export without it")
        pad = list(attrs.get("padding", [0, 0]))
        return {"vk_group": int(attrs.get(groups_key, 1)) if groups_key else 1,
                "vk_strides": list(attrs.get("stride", [1, 1])),
                "vk_dilations": list(attrs.get("dilation", [1, 1])),
                "vk_pads": pad + pad, "vk_auto_pad": "NOTSET",
                "vk_offset_group": int(attrs.get(offset_groups_key, 1))}
    return attributes


def _torchvision(attrs: dict, nd: int) -> dict:
    return {"vk_group": int(attrs["groups"]), "vk_strides": [int(attrs["stride_h"]), int(attrs["stride_w"])],
            "vk_dilations": [int(attrs["dil_h"]), int(attrs["dil_w"])],
            "vk_pads": [int(attrs["pad_h"]), int(attrs["pad_w"])] * 2, "vk_auto_pad": "NOTSET",
            "vk_offset_group": int(attrs["offset_groups"]), "vk_use_mask": int(attrs["use_mask"])}


_MMCV_ORDER = (0, 3, 1, 4, 2)  # input, offset, mask, weight, bias -> X, W, offset, B, mask
ROUTES.update({
    ("", "DeformConv"): Route("DeformConv", (2,), _onnx),
    ("mmcv", "MMCVModulatedDeformConv2d"): Route(
        "DeformConv", (2,), _mmcv_style("groups", "deform_groups"), inputs=_MMCV_ORDER),
    ("custom", "DeformConv2d"): Route(
        "DeformConv", (2,), _mmcv_style(None, "deformable_groups"), inputs=_MMCV_ORDER),
    ("torchvision", "deform_conv2d"): Route(
        "DeformConv", (2,), _torchvision, inputs=(0, 1, 2, 4, 3),
        scalar_inputs=dict(enumerate(("stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
                                      "groups", "offset_groups", "use_mask"), start=5))),
})
layers.LAYER_TYPES["vkconv.DeformConv"] = DeformConvLayer
