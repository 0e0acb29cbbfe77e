"""Constant folding into convolution weights: inference BatchNormalization and per-channel affine
maps (``x * s + t``) after a Conv or ConvTranspose."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vkconv.onnx.model import Node, is_float


def fold_affine(w: np.ndarray, b: np.ndarray | None, scale, shift, *, group: int = 1,
                transpose: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of a Conv (``w`` ``[C_out, C_in/group, *k]``) or, with ``transpose``, a
    ConvTranspose (``w`` ``[C_in, C_out/group, *k]``) whose output is then multiplied by ``scale``
    and shifted by ``shift`` per output channel (float64 arithmetic, float32 results)."""
    w = np.asarray(w, np.float64)
    cout = w.shape[1] * group if transpose else w.shape[0]
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (cout,))
    t = np.broadcast_to(np.asarray(shift, np.float64).reshape(-1), (cout,))
    b = np.zeros(cout) if b is None else np.asarray(b, np.float64)
    if transpose:
        per_group = s.reshape(group, 1, cout // group, *([1] * (w.ndim - 2)))
        w2 = (w.reshape(group, -1, *w.shape[1:]) * per_group).reshape(w.shape)
    else:
        w2 = w * s.reshape(-1, *([1] * (w.ndim - 1)))
    return w2.astype(np.float32), (b * s + t).astype(np.float32)


def batchnorm_affine(scale, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as ``x * s + t`` per channel (float64)."""
    s = np.asarray(scale, np.float64).reshape(-1) / np.sqrt(np.asarray(var, np.float64).reshape(-1) + eps)
    return s, np.asarray(beta, np.float64).reshape(-1) - np.asarray(mean, np.float64).reshape(-1) * s


def node_batchnorm(node: Node, constants: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`batchnorm_affine` of a BatchNormalization node with constant parameters."""
    scale, beta, mean, var = (constants[t] for t in node.inputs[1:5])
    return batchnorm_affine(scale, beta, mean, var, float(node.attrs.get("epsilon", 1e-5)))


def fold_batchnorm(w: np.ndarray, b: np.ndarray | None, scale, beta, mean, var, eps: float, *,
                   group: int = 1, transpose: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fold_affine` of an inference BatchNormalization."""
    return fold_affine(w, b, *batchnorm_affine(scale, beta, mean, var, eps), group=group, transpose=transpose)


def channel_constant(c: np.ndarray | None, rank: int, channels: int) -> np.ndarray | None:
    """``c`` as ``[channels]`` values when it broadcasts against a ``[N, channels, ...]`` tensor of
    ``rank`` along axis 1 only (a scalar or a per-channel constant), else None."""
    if not is_float(c) or c.ndim > rank:
        return None
    full = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for k, d in enumerate(full) if k != 1) or full[1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (channels,))
