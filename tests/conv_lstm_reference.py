"""A float64 numpy ConvLSTM2D written from Keras 3's equations, independent of vkconv.

Layouts as vkconv.conv_lstm2d: x ``[N, T, C, H, W]``; Keras weights ``kernel [kh, kw, C, 4F]``,
``recurrent_kernel [kh, kw, F, 4F]``, ``bias [4F]`` with gates i, f, c, o along the last axis.
"""
from __future__ import annotations

import numpy as np

ACTIVATIONS = {
    "linear": lambda v: v,
    "tanh": np.tanh,
    "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
    "relu": lambda v: np.maximum(v, 0.0),
    "relu6": lambda v: np.clip(v, 0.0, 6.0),
    # Keras 3: relu6(x + 3) / 6
    "hard_sigmoid": lambda v: np.clip(v + 3.0, 0.0, 6.0) / 6.0,
    "hard_silu": lambda v: v * np.clip(v + 3.0, 0.0, 6.0) / 6.0,
    "hard_swish": lambda v: v * np.clip(v + 3.0, 0.0, 6.0) / 6.0,
    "leaky_relu": lambda v: np.where(v >= 0, v, 0.2 * v),
    # Keras 2's hard_sigmoid (ONNX HardSigmoid's defaults)
    "keras2_hard_sigmoid": lambda v: np.clip(0.2 * v + 0.5, 0.0, 1.0),
}


def conv2d(x: np.ndarray, kernel: np.ndarray, strides=(1, 1), dilation=(1, 1),
           padding: str = "valid") -> np.ndarray:
    """``x [N, C, H, W]`` convolved with a Keras kernel ``[kh, kw, C, O]`` -> ``[N, O, H', W']``.

    "same" pads as TensorFlow/Keras do: output ``ceil(in / stride)``, total padding split with the
    odd pixel at the end.
    """
    n, c, h, w = x.shape
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    dh, dw = dilation
    pads = []
    for size, k, s, d in ((h, kh, sh, dh), (w, kw, sw, dw)):
        if padding == "same":
            out = -(-size // s)
            total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((0, 0))
    xp = np.pad(x, ((0, 0), (0, 0), *pads))
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, kernel.shape[3], out_h, out_w))
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, :, ky * dh: ky * dh + (out_h - 1) * sh + 1: sh,
                       kx * dw: kx * dw + (out_w - 1) * sw + 1: sw]
            y += np.einsum("nchw,co->nohw", patch, kernel[ky, kx])
    return y


def conv_lstm2d(x, kernel, recurrent_kernel, bias=None, *, padding="same", strides=(1, 1),
                dilation=(1, 1), return_sequences=True, activation="tanh",
                recurrent_activation="sigmoid", initial_state=None) -> np.ndarray:
    x = x.astype(np.float64)
    kernel, recurrent_kernel = kernel.astype(np.float64), recurrent_kernel.astype(np.float64)
    f = kernel.shape[3] // 4
    act, rec = ACTIVATIONS[activation], ACTIVATIONS[recurrent_activation]
    n, steps = x.shape[:2]
    h = c = None
    if initial_state is not None:
        h, c = (s.astype(np.float64) for s in initial_state)
    outputs = []
    for t in range(steps):
        g = conv2d(x[:, t], kernel, strides, dilation, padding)
        if bias is not None:
            g += bias.astype(np.float64).reshape(1, -1, 1, 1)
        if h is None:
            h = c = np.zeros((n, f, *g.shape[2:]))
        g += conv2d(h, recurrent_kernel, padding="same")
        gi, gf, gc, go = (g[:, k * f:(k + 1) * f] for k in range(4))
        c = rec(gf) * c + rec(gi) * act(gc)
        h = rec(go) * act(c)
        outputs.append(h)
    return np.stack(outputs, axis=1) if return_sequences else outputs[-1]
