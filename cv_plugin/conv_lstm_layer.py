"""The ``vkconv.ConvLSTM2D`` custom ONNX op as a ``cv2.dnn`` layer (made by :mod:`cv_plugin.keras`).

Node: domain ``vkconv``, op ``ConvLSTM2D``, inputs ``X [N, T, C, H, W]``, ``kernel [kh, kw, C, 4F]``,
``recurrent_kernel [rkh, rkw, F, 4F]``, ``bias [4F]`` (Keras layouts, gates i, f, c, o) and
optionally ``h0``, ``c0`` ``[N, F, H', W']``; output ``[N, T, F, H', W']`` or ``[N, F, H', W']``.
Attributes (``vk_``-prefixed so that OpenCV does not rename them): ``vk_padding`` ("same" /
"valid"), ``vk_strides``, ``vk_dilations`` (2 ints), ``vk_return_sequences`` (0/1),
``vk_activation``, ``vk_recurrent_activation`` (Keras activation names).
"""
from __future__ import annotations

import numpy as np

import vkconv
from cv_plugin import layers
from cv_plugin.layers import _same
from vkconv.onnx.support import conv_lstm_params
from vkconv.ops import conv_lstm

OP_TYPE = "ConvLSTM2D"


class ConvLSTMOp(layers.Op):
    """Keras ConvLSTM2D; weights may be constants or runtime inputs."""

    input_names = ("X", "kernel", "recurrent_kernel", "bias", "h0", "c0")
    required = 4
    tune: bool | str | None = None  # read_net(tune=...), handed to the vkconv op it builds

    def __init__(self, params: dict, constants: list[np.ndarray]):
        super().__init__(params, constants)
        if self.ninputs not in (4, 6):
            raise ValueError(f"{OP_TYPE}: expected inputs (X, kernel, recurrent_kernel, bias[, h0, c0]), "
                             f"got {self.ninputs}")
        # decoded (and checked) now, so that a bad node fails at readNet rather than at forward
        self.options = conv_lstm_params(params)
        self.lstm: vkconv.ConvLSTM2D | None = None
        self._src: tuple | None = None  # the runtime weights the device copy was made from

    def output_shapes(self, in_shapes):
        o = self.options
        return [conv_lstm.output_shape(in_shapes[0], in_shapes[1], padding=o["padding"], strides=o["strides"],
                                       dilation=o["dilation"], return_sequences=o["return_sequences"])]

    def forward(self, arrays):
        x = arrays[0]
        # Constants keep their ONNX dtype and shape; runtime inputs arrive as float32 from OpenCV.
        kernel, recurrent, bias = (np.asarray(a, np.float32) for a in arrays[1:4])
        bias = bias.reshape(-1)
        state = tuple(a for a in arrays[4:6] if a is not None) or None  # h0, c0 omitted: zeros
        if self.lstm is None:
            self.lstm = vkconv.ConvLSTM2D(kernel, recurrent, bias, tune=self.tune, **self.options)
        elif self.runtime_weights and not all(_same(a, b) for a, b in zip((kernel, recurrent, bias),
                                                                            self._src)):
            self.lstm.set_weights(kernel, recurrent, bias)
        self._src = (kernel, recurrent, bias)
        return [self.lstm(x, state)]

    def close(self):
        if self.lstm is not None:
            self.lstm.close()
            self.lstm = None


class ConvLSTMLayer(layers.Layer):
    op_class = ConvLSTMOp
    slot_priority = ((1, 2, 3, 4, 5, 0), (0, 4, 5, 3, 2, 1))


layers.LAYER_TYPES[f"vkconv.{OP_TYPE}"] = ConvLSTMLayer
