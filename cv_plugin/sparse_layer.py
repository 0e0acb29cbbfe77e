"""cv2.dnn layers for sparse 3-D convolution: ``vkconv.SparseEncoder`` and ``vkconv.SubMConv3d``.

OpenCV 4.x layers must declare their output shapes from their input shapes, and a strided sparse
convolution's output size depends on the data, so the op set is (docs/SPARSE.md has the details
and an ``onnx.helper`` example):

* ``vkconv.SparseEncoder(features [N, C] float, coords [N, 4], W0, B0, W1, B1, ...)`` -> the dense
  BEV map ``[batch, C_last * D', H', W']``: a SECOND-style middle encoder whose intermediate sparse
  tensors stay on the device (vkconv.ops.sparse.encoder.SparseEncoder);
* ``vkconv.SubMConv3d(features [N, C_in], coords [N, 4], W, B)`` -> ``[N, C_out]``: one SubM layer,
  whose output sites are its input sites, so its shape is known.

``coords`` rows are ``(batch, z, y, x)``.  A runtime int input reaches a Python layer as float32
(exact below 2^24); the layer checks every value is a whole number in range.  Weights are spconv
2.x's ``[C_out, kD, kH, kW, C_in]`` (constants, taken out of the graph by the rewrite).
"""
from __future__ import annotations

import numpy as np

import vkconv
from cv_plugin import layers
from vkconv.kernels.activation import NAMES
from vkconv.ops.sparse.encoder import EncoderLayer, SparseEncoder, plan_layers


def _ints(params: dict, key: str, default=None) -> tuple[int, ...]:
    """An int-list attribute of any length (OpenCV hands a 1-element list over as a scalar)."""
    value = params.get(key, default)
    if value is None:
        raise ValueError(f"attribute {key} is required")
    return tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))


def _floats(params: dict, key: str, n: int) -> tuple[float, ...] | None:
    value = params.get(key)
    if value is None:
        return None
    values = tuple(float(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if len(values) != n:
        raise ValueError(f"attribute {key}: expected {n} values (one per layer), got {len(values)}")
    return values


def _per_layer(params: dict, key: str, n: int, default: int) -> list[tuple[int, int, int]]:
    """``n`` triples from an int list of 3 per layer (or 1 per layer: the same on every axis)."""
    values = _ints(params, key, [default] * n)
    if len(values) == n:
        return [(v, v, v) for v in values]
    if len(values) != 3 * n:
        raise ValueError(f"attribute {key}: expected {n} or {3 * n} ints for {n} layers, got {len(values)}")
    return [(values[3 * i], values[3 * i + 1], values[3 * i + 2]) for i in range(n)]


def _activations(params: dict, n: int) -> list:
    """vk_acts (0 = none, else activation.glsl's ACT numbers: 1 Relu, 2 Clip, 3 LeakyRelu, 4
    HardSwish, 5 HardSigmoid, 6 Sigmoid, 7 Tanh) with optional vk_act_alphas / vk_act_betas."""
    kinds = _ints(params, "vk_acts", [0] * n)
    if len(kinds) != n:
        raise ValueError(f"attribute vk_acts: expected {n} values (one per layer), got {len(kinds)}")
    alphas, betas = _floats(params, "vk_act_alphas", n), _floats(params, "vk_act_betas", n)
    acts: list[str | tuple[str, float, float] | None] = []
    for i, kind in enumerate(kinds):
        if not 0 <= kind <= len(NAMES):
            raise ValueError(f"attribute vk_acts[{i}] = {kind}: expected 0..{len(NAMES)}")
        if kind == 0:
            acts.append(None)
        elif alphas is None:
            acts.append(NAMES[kind - 1])
        else:
            acts.append((NAMES[kind - 1], alphas[i], betas[i] if betas else 0.0))
    return acts


def coords_from_input(coords: np.ndarray) -> np.ndarray:
    """``[N, 4]`` coordinates as int32: float32 (runtime input) or int32 (constant) whole numbers."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords: expected shape [N, 4] (batch, z, y, x), got {coords.shape}")
    if np.issubdtype(coords.dtype, np.floating):
        if not np.all(np.isfinite(coords)) or np.any(coords != np.round(coords)) \
                or np.any(np.abs(coords) >= 2**24):
            raise ValueError("coords: float coordinates must be whole numbers below 2^24 "
                             "(OpenCV passes runtime int inputs as float32)")
    return coords.astype(np.int32)


class SparseEncoderOp(layers.Op):
    """``vkconv.SparseEncoder``: attributes ``vk_spatial_shape`` (D, H, W), ``vk_batch_size``,
    ``vk_subm`` (1 = SubM, 0 = SparseConv, per layer), ``vk_strides`` / ``vk_pads`` /
    ``vk_dilations`` (1 or 3 ints per layer), ``vk_acts`` (+ ``vk_act_alphas``, ``vk_act_betas``)."""

    input_names = ("features", "coords")
    required = 2

    def __init__(self, params: dict, constants: list[np.ndarray]):
        super().__init__(params, constants)
        self.spatial_shape = _ints(params, "vk_spatial_shape")
        if len(self.spatial_shape) != 3:
            raise ValueError(f"attribute vk_spatial_shape: expected (D, H, W), got {self.spatial_shape}")
        self.batch_size = int(params.get("vk_batch_size", 1))
        self.subm = _ints(params, "vk_subm")
        n = len(self.subm)
        if self.ninputs != 2 + 2 * n:
            raise ValueError(f"{n} layers take 2 + 2 x {n} inputs (features, coords, then W and B per "
                             f"layer), the node has {self.ninputs}")
        if self.const_mask >> 2 != (1 << 2 * n) - 1:
            raise ValueError("every layer's W and B must be constants (initializers)")
        strides = _per_layer(params, "vk_strides", n, 1)
        pads = _per_layer(params, "vk_pads", n, 0)
        dilations = _per_layer(params, "vk_dilations", n, 1)
        acts = _activations(params, n)
        w_b = constants[-2 * n:]
        self.layers = [EncoderLayer(np.asarray(w_b[2 * i], np.float32),
                                    np.asarray(w_b[2 * i + 1], np.float32).reshape(-1), bool(self.subm[i]),
                                    strides[i], pads[i], dilations[i], acts[i])
                       for i in range(n)]
        self.encoder: SparseEncoder | None = None  # made at the first forward: no device before
        self._out = plan_layers(self.layers, self.spatial_shape, self.batch_size).output_shape

    def output_shapes(self, in_shapes):
        feats, coords = in_shapes[0], in_shapes[1]
        if len(feats) != 2 or len(coords) != 2 or coords[1] != 4 or feats[0] != coords[0]:
            raise ValueError(f"expected features [N, C] and coords [N, 4], got {feats} and {coords}")
        return [self._out]

    def forward(self, arrays):
        if self.encoder is None:
            self.encoder = SparseEncoder(self.layers, self.spatial_shape, self.batch_size)
        return [self.encoder(np.ascontiguousarray(arrays[0], np.float32), coords_from_input(arrays[1]))]

    def close(self):
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None


class SubMConv3dOp(layers.Op):
    """``vkconv.SubMConv3d``: attributes ``vk_spatial_shape``, ``vk_batch_size``, ``vk_dilations``
    (1 or 3 ints), ``vk_act`` (0 = none or an ACT number) + ``vk_act_alpha`` / ``vk_act_beta``."""

    input_names = ("features", "coords", "W", "B")
    required = 3

    def __init__(self, params: dict, constants: list[np.ndarray]):
        super().__init__(params, constants)
        self.spatial_shape = _ints(params, "vk_spatial_shape")
        self.batch_size = int(params.get("vk_batch_size", 1))
        self.dilation = _per_layer(params, "vk_dilations", 1, 1)[0]
        act = {"vk_acts": params.get("vk_act", 0)}
        if "vk_act_alpha" in params:
            act.update(vk_act_alphas=params["vk_act_alpha"], vk_act_betas=params.get("vk_act_beta", 0.0))
        self.activation = _activations(act, 1)[0]

    def output_shapes(self, in_shapes):
        feats, coords, w = in_shapes[0], in_shapes[1], in_shapes[2]
        if len(feats) != 2 or len(w) != 5 or feats[1] != w[4] or tuple(coords) != (feats[0], 4):
            raise ValueError(f"expected features [N, C_in], coords [N, 4], W [C_out, kD, kH, kW, C_in]; "
                             f"got {feats}, {coords}, {w}")
        return [(feats[0], w[0])]

    def forward(self, arrays):
        feats, coords, w, *rest = arrays
        st = vkconv.SparseTensor(np.ascontiguousarray(feats, np.float32), coords_from_input(coords),
                                 self.spatial_shape, self.batch_size)
        bias = np.asarray(rest[0], np.float32).reshape(-1) if rest and rest[0] is not None else None
        out = vkconv.subm_conv3d(st, np.asarray(w, np.float32), bias, dilation=self.dilation,
                                 activation=self.activation)
        return [out.features]


class SparseEncoderLayer(layers.Layer):
    op_class = SparseEncoderOp

    @classmethod
    def slot_priority_for(cls, params):
        n = 2 + 2 * len(_ints(params, "vk_subm"))  # features, coords, then W and B per layer
        return (*range(2, n), 1, 0), tuple(range(n))


class SubMConv3dLayer(layers.Layer):
    op_class = SubMConv3dOp
    slot_priority = ((2, 3, 1, 0), (0, 1, 2, 3))


layers.LAYER_TYPES["vkconv.SparseEncoder"] = SparseEncoderLayer
layers.LAYER_TYPES["vkconv.SubMConv3d"] = SubMConv3dLayer
