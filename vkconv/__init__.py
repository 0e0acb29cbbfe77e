"""vkconv: ONNX-exact convolutions as GLSL compute shaders on any Vulkan device.

Arrays in, arrays out (numpy float32, NCHW).  The SPIR-V is embedded (``vkconv/runtime/_spirv.py``), so no
shader compiler is needed at run time.  See ``python -m vkconv info`` for the devices.
"""
from __future__ import annotations

from vkconv.graph import Graph
from vkconv.kernels.activation import Activation
from vkconv.kernels.shapes import resolve_auto_pad
from vkconv.ops.conv.op import Conv, conv
from vkconv.ops.conv_lstm import ConvLSTM2D, conv_lstm2d
from vkconv.ops.conv_transpose import ConvTranspose, conv_transpose
from vkconv.ops.deform_conv import DeformConv, deform_conv
from vkconv.ops.sparse.tensor import (
    SparseTensor,
    gather_rows,
    scatter_add_rows,
    sparse_conv3d,
    sparse_inverse_conv3d,
    subm_conv3d,
)
from vkconv.runtime.context import Context, DeviceInfo, close_context, get_context, list_devices, validation_messages
from vkconv.runtime.errors import NoDeviceError, ValidationError, VkconvError
from vkconv.runtime.log import configure_logging
from vkconv.runtime.version import __version__

__all__ = [
    "Activation", "Context", "Conv", "ConvLSTM2D", "ConvTranspose", "DeformConv", "DeviceInfo", "Graph",
    "NoDeviceError", "SparseTensor", "ValidationError", "VkconvError", "__version__", "close_context",
    "configure_logging", "conv", "conv_lstm2d", "conv_transpose", "deform_conv", "gather_rows", "get_context",
    "list_devices", "resolve_auto_pad", "scatter_add_rows", "sparse_conv3d", "sparse_inverse_conv3d",
    "subm_conv3d", "validation_messages",
]
