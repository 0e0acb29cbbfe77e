"""vkconv: ONNX-exact convolutions as GLSL compute shaders on any Vulkan device.

Arrays in, arrays out (numpy float32, NCHW).  The SPIR-V is embedded (``vkconv/_spirv.py``), so no
shader compiler is needed at run time.  See ``python -m vkconv info`` for the devices.
"""
from __future__ import annotations

from .activation import Activation
from .context import Context, DeviceInfo, close_context, get_context, list_devices, validation_messages
from .conv import Conv, conv
from .conv_lstm import ConvLSTM2D, conv_lstm2d
from .conv_transpose import ConvTranspose, conv_transpose
from .deform_conv import DeformConv, deform_conv
from .errors import NoDeviceError, ValidationError, VkconvError
from .graph import Graph
from .log import configure_logging
from .shapes import resolve_auto_pad
from .sparse import SparseTensor, gather_rows, scatter_add_rows, sparse_conv3d, sparse_inverse_conv3d, subm_conv3d

__version__ = "0.1.0"

__all__ = [
    "Activation", "Context", "Conv", "ConvLSTM2D", "ConvTranspose", "DeformConv", "DeviceInfo", "Graph",
    "NoDeviceError", "SparseTensor", "ValidationError", "VkconvError", "__version__", "close_context",
    "configure_logging", "conv", "conv_lstm2d", "conv_transpose", "deform_conv", "gather_rows", "get_context",
    "list_devices", "resolve_auto_pad", "scatter_add_rows", "sparse_conv3d", "sparse_inverse_conv3d",
    "subm_conv3d", "validation_messages",
]
