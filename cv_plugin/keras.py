"""Keras -> ONNX for models ``cv2.dnn`` cannot read: ConvLSTM2D becomes the ``vkconv.ConvLSTM2D`` op.

    import cv_plugin
    from cv_plugin.keras import to_onnx
    net = cv_plugin.read_net(to_onnx(keras_model))
    net.setInput(frames)            # Keras' own layout, e.g. [N, T, H, W, C]
    prediction = net.forward()      # Keras' own layout

Supported layers: ``InputLayer``, ``ConvLSTM2D``, ``BatchNormalization`` (inference form, ONNX
``BatchNormalization``), ``Conv1D``/``Conv2D``/``Conv3D`` (ONNX ``Conv``: ``read_net`` routes it to
vkconv where vkconv has a kernel for its rank, OpenCV runs the rest), ``Activation``, ``ReLU``,
``LeakyReLU``, and the ``activation`` argument of these layers.  Anything else raises ValueError
naming the layer.

Layouts: Keras is channels-last; ONNX ``Conv``/``BatchNormalization`` want channels at axis 1 and
``vkconv.ConvLSTM2D`` wants ``[N, T, C, H, W]``.  The converter tracks, for every tensor, how its
ONNX layout is permuted from the Keras one and inserts a ``Transpose`` only where a consumer needs
another layout, so the ONNX model takes and returns tensors in Keras' layouts.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cv_plugin.conv_lstm_layer import OP_TYPE
from cv_plugin.rewrite import DOMAIN
from vkconv.ops.conv_lstm import KERAS_ACTIVATIONS

OPSET = 17

# Keras activation name -> (ONNX op, attributes), for those with a one-node ONNX form.
_ACTIVATION_OPS: dict[str, tuple[str, dict[str, Any]]] = {
    "relu": ("Relu", {}),
    "sigmoid": ("Sigmoid", {}),
    "tanh": ("Tanh", {}),
    "hard_sigmoid": ("HardSigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5}),  # Keras 3: relu6(x+3)/6
    "hard_silu": ("HardSwish", {}),
    "hard_swish": ("HardSwish", {}),
    "leaky_relu": ("LeakyRelu", {"alpha": 0.2}),
    "elu": ("Elu", {"alpha": 1.0}),
    "selu": ("Selu", {}),
    "softplus": ("Softplus", {}),
    "softsign": ("Softsign", {}),
    "exponential": ("Exp", {}),
}


class _Tensor:
    """An ONNX tensor standing for a Keras tensor: ``onnx = transpose(keras, perm)``."""

    def __init__(self, name: str, perm: tuple[int, ...], shape: tuple):
        self.name, self.perm, self.shape = name, tuple(perm), tuple(shape)  # shape: Keras layout


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._layouts: dict[tuple[str, tuple[int, ...]], str] = {}

    def name(self, base: str) -> str:
        name = base
        i = 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def constant(self, base: str, value: np.ndarray | np.generic) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, *, domain: str = "", **attrs) -> str:
        out = self.name(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def layout(self, t: _Tensor, perm: tuple[int, ...]) -> str:
        """``t`` as ``transpose(keras, perm)``: a Transpose when its layout differs (made once)."""
        perm = tuple(perm)
        if perm == t.perm:
            return t.name
        key = (t.name, perm)
        if key not in self._layouts:
            # transpose(transpose(K, p), r) = transpose(K, q) needs p[r[i]] == q[i]
            r = [t.perm.index(axis) for axis in perm]
            self._layouts[key] = self.node("Transpose", [t.name], f"{t.name}/transpose", perm=r)
        return self._layouts[key]


def _channels_first(rank: int, channel_axis: int) -> tuple[int, ...]:
    """The permutation bringing Keras axis ``channel_axis`` to axis 1."""
    channel_axis %= rank
    return (0, channel_axis, *[a for a in range(1, rank) if a != channel_axis])


def _numpy(variable) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable), np.float32)


def _activation_name(layer, value) -> str:
    """A Keras activation as its registered name (config strings, or the function itself)."""
    if value is None:
        return "linear"
    name = value if isinstance(value, str) else getattr(value, "__name__", None)
    if not isinstance(name, str):
        raise ValueError(f"model: layer {layer.name!r} has an activation {value!r} that is not a "
                         "Keras activation name")
    return name


def _emit_activation(b: _Builder, t: _Tensor, name: str, where: str) -> _Tensor:
    if name == "linear":
        return t
    if name == "relu6":
        lo, hi = b.constant(f"{where}/min", np.float32(0.0)), b.constant(f"{where}/max", np.float32(6.0))
        return _Tensor(b.node("Clip", [t.name, lo, hi], f"{where}/relu6"), t.perm, t.shape)
    if name in ("silu", "swish"):
        sig = b.node("Sigmoid", [t.name], f"{where}/sigmoid")
        return _Tensor(b.node("Mul", [t.name, sig], f"{where}/silu"), t.perm, t.shape)
    if name not in _ACTIVATION_OPS:
        raise ValueError(f"model: activation {name!r} of {where!r} is not supported; supported: "
                         f"linear, relu6, silu, {', '.join(_ACTIVATION_OPS)}")
    op, attrs = _ACTIVATION_OPS[name]
    return _Tensor(b.node(op, [t.name], f"{where}/{name}", **attrs), t.perm, t.shape)


def _same_pads(in_sizes, kernel, strides, dilations) -> list[int] | None:
    """Keras "same" as explicit ONNX pads (odd pixel at the end); None when a size is unknown and
    the stride makes the padding depend on it."""
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        span = d * (k - 1) + 1
        if s == 1:
            total = span - 1
        elif size is None:
            return None
        else:
            total = max(0, (-(-size // s) - 1) * s + span - size)
        begins.append(total // 2)
        ends.append(total - total // 2)
    return begins + ends


# -- layers ------------------------------------------------------------------------------------
def _conv_lstm(b: _Builder, layer, x: _Tensor) -> tuple[str, tuple[int, ...]]:
    cfg = layer.get_config()
    for key, bad in (("go_backwards", True), ("return_state", True), ("stateful", True)):
        if cfg.get(key) == bad:
            raise ValueError(f"model: ConvLSTM2D {layer.name!r} with {key}=True is not supported")
    channels_last = cfg.get("data_format", "channels_last") == "channels_last"
    seq = (0, 1, 4, 2, 3) if channels_last else (0, 1, 2, 3, 4)
    acts = {}
    for key in ("activation", "recurrent_activation"):
        name = _activation_name(layer, cfg[key])
        if name not in KERAS_ACTIVATIONS:
            raise ValueError(f"model: ConvLSTM2D {layer.name!r} {key} {name!r} is not supported; "
                             f"supported: {', '.join(KERAS_ACTIVATIONS)}")
        acts[key] = name
    cell = layer.cell
    kernel, recurrent = _numpy(cell.kernel), _numpy(cell.recurrent_kernel)
    bias = _numpy(cell.bias) if cell.use_bias else np.zeros(kernel.shape[-1], np.float32)
    inputs = [b.layout(x, seq), b.constant(f"{layer.name}/kernel", kernel),
              b.constant(f"{layer.name}/recurrent_kernel", recurrent), b.constant(f"{layer.name}/bias", bias)]
    out = b.node(OP_TYPE, inputs, layer.name, domain=DOMAIN,
                 vk_padding=cfg["padding"], vk_strides=list(cfg["strides"]),
                 vk_dilations=list(cfg["dilation_rate"]),
                 vk_return_sequences=int(bool(cfg["return_sequences"])),
                 vk_activation=acts["activation"], vk_recurrent_activation=acts["recurrent_activation"])
    if cfg["return_sequences"]:
        return out, seq
    return out, (0, 3, 1, 2) if channels_last else (0, 1, 2, 3)


def _conv(b: _Builder, layer, x: _Tensor) -> tuple[str, tuple[int, ...]]:
    cfg = layer.get_config()
    rank = len(cfg["kernel_size"])
    if cfg["padding"] not in ("same", "valid"):
        raise ValueError(f"model: {type(layer).__name__} {layer.name!r} padding {cfg['padding']!r} "
                         "is not supported (same, valid)")
    channels_last = cfg.get("data_format", "channels_last") == "channels_last"
    perm = _channels_first(rank + 2, -1 if channels_last else 1)
    kernel = _numpy(layer.kernel)  # [*k, C / groups, F] -> ONNX [F, C / groups, *k]
    w = kernel.transpose(rank + 1, rank, *range(rank))
    inputs = [b.layout(x, perm), b.constant(f"{layer.name}/kernel", w)]
    if cfg["use_bias"]:
        inputs.append(b.constant(f"{layer.name}/bias", _numpy(layer.bias)))
    strides, dilations = list(cfg["strides"]), list(cfg["dilation_rate"])
    attrs: dict[str, Any] = dict(kernel_shape=list(cfg["kernel_size"]), strides=strides,
                                 dilations=dilations, group=int(cfg.get("groups", 1)))
    if cfg["padding"] == "same":
        spatial = x.shape[1:-1] if channels_last else x.shape[2:]
        pads = _same_pads(spatial, cfg["kernel_size"], strides, dilations)
        attrs.update(pads=pads) if pads is not None else attrs.update(auto_pad="SAME_UPPER")
    return b.node("Conv", inputs, layer.name, **attrs), perm


def _batchnorm(b: _Builder, layer, x: _Tensor) -> tuple[str, tuple[int, ...]]:
    cfg = layer.get_config()
    axis = cfg["axis"]
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(f"model: BatchNormalization {layer.name!r} over axes {axis} is not supported")
        axis = axis[0]
    rank = len(x.shape)
    perm = _channels_first(rank, axis)
    mean, var = _numpy(layer.moving_mean), _numpy(layer.moving_variance)
    gamma = _numpy(layer.gamma) if cfg["scale"] else np.ones_like(mean)
    beta = _numpy(layer.beta) if cfg["center"] else np.zeros_like(mean)
    inputs = [b.layout(x, perm)] + [b.constant(f"{layer.name}/{n}", v) for n, v in
                                    (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var))]
    return b.node("BatchNormalization", inputs, layer.name, epsilon=float(cfg["epsilon"])), perm


def _relu_layer(layer) -> str:
    cfg = layer.get_config()
    slope, threshold, top = cfg.get("negative_slope", 0.0), cfg.get("threshold", 0.0), cfg.get("max_value")
    if threshold == 0.0 and slope == 0.0 and top is None:
        return "relu"
    if threshold == 0.0 and slope == 0.0 and top == 6.0:
        return "relu6"
    raise ValueError(f"model: ReLU {layer.name!r} with threshold/negative_slope/max_value {threshold}/"
                     f"{slope}/{top} is not supported")


def _convert_layer(b: _Builder, layer, x: _Tensor, out_shape: tuple) -> _Tensor:
    kind = type(layer).__name__
    if kind == "ConvLSTM2D":
        name, perm = _conv_lstm(b, layer, x)
    elif kind in ("Conv1D", "Conv2D", "Conv3D"):
        name, perm = _conv(b, layer, x)
    elif kind == "BatchNormalization":
        name, perm = _batchnorm(b, layer, x)
    elif kind == "Activation":
        return _emit_activation(b, x, _activation_name(layer, layer.get_config()["activation"]), layer.name)
    elif kind == "ReLU":
        return _emit_activation(b, x, _relu_layer(layer), layer.name)
    elif kind == "LeakyReLU":
        alpha = float(layer.get_config()["negative_slope"])
        return _Tensor(b.node("LeakyRelu", [x.name], layer.name, alpha=alpha), x.perm, x.shape)
    else:
        raise ValueError(f"model: layer {layer.name!r} of type {kind} is not supported by "
                         "cv_plugin.keras (ConvLSTM2D, BatchNormalization, Conv1D/2D/3D, activations)")
    out = _Tensor(name, perm, out_shape)
    if kind == "ConvLSTM2D":  # ONNX shape inference cannot type a custom op's output: say its shape
        b.value_info.append(_value_info(name, tuple(out_shape[a] for a in perm), f"{name}_dim"))
    elif "activation" in layer.get_config():
        out = _emit_activation(b, out, _activation_name(layer, layer.get_config()["activation"]), layer.name)
    return out


def _value_info(name: str, shape: tuple, prefix: str) -> onnx.ValueInfoProto:
    dims = [d if d is not None else f"{prefix}_{i}" for i, d in enumerate(shape)]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def to_onnx(model, *, name: str | None = None) -> onnx.ModelProto:
    """An ONNX model (opset 17 + domain ``vkconv``) computing ``model``'s inference output.

    ``model``: a built Keras 3 model (Sequential with an ``Input``, or Functional). Inputs and
    outputs keep the Keras shapes and layouts; unknown (None) dimensions become symbolic ones.
    Load the result with :func:`cv_plugin.read_net`. ValueError names what cannot be converted.
    """
    functional = getattr(model, "_functional", None) or model
    if not hasattr(functional, "_nodes_by_depth") or not getattr(functional, "inputs", None):
        raise ValueError("model: expected a built Keras model with known inputs (a Functional "
                         "model, or a Sequential one starting with keras.Input)")
    b = _Builder()
    tensors: dict[int, _Tensor] = {}
    graph_inputs = []
    for i, kt in enumerate(functional.inputs):
        t = _Tensor(b.name(kt.name if getattr(kt, "name", None) else f"input_{i}"),
                    tuple(range(len(kt.shape))), tuple(kt.shape))
        tensors[id(kt)] = t
        graph_inputs.append(_value_info(t.name, t.shape, f"{t.name}_dim"))
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            layer = node.operation
            if type(layer).__name__ == "InputLayer":
                continue
            if len(node.input_tensors) != 1 or len(node.outputs) != 1:
                raise ValueError(f"model: layer {layer.name!r} has {len(node.input_tensors)} inputs and "
                                 f"{len(node.outputs)} outputs; only single-input layers are supported")
            src = tensors.get(id(node.input_tensors[0]))
            if src is None:
                raise ValueError(f"model: layer {layer.name!r} reads a tensor this converter did not make")
            tensors[id(node.outputs[0])] = _convert_layer(b, layer, src, tuple(node.outputs[0].shape))
    graph_outputs: list[onnx.ValueInfoProto] = []
    for i, kt in enumerate(functional.outputs):
        t = tensors[id(kt)]
        out = b.layout(t, tuple(range(len(t.shape))))
        if out in {o.name for o in graph_outputs} or out in {gi.name for gi in graph_inputs}:
            out = b.node("Identity", [out], f"output_{i}")
        graph_outputs.append(_value_info(out, t.shape, f"output_{i}_dim"))
    graph = helper.make_graph(b.nodes, name or model.name, graph_inputs, graph_outputs, b.initializers,
                              value_info=b.value_info)
    return helper.make_model(graph, producer_name="cv_plugin.keras",
                             opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])


def next_frame_model(size: int = 40, filters: int = 64, seed: int | None = None):
    """Keras' next-frame-prediction architecture (keras.io examples/vision/conv_lstm): three
    ConvLSTM2D (5x5, 3x3, 1x1, relu, return_sequences) each followed by BatchNormalization, then
    Conv3D(1, 3x3x3, sigmoid); input ``[N, T, size, size, 1]``.  With ``seed``, every weight and
    BatchNormalization statistic is random (fan-in scaled), so nothing is an identity."""
    import keras

    layers = keras.layers
    inp = layers.Input(shape=(None, size, size, 1))
    x = inp
    for kernel in (5, 3, 1):
        x = layers.ConvLSTM2D(filters, kernel, padding="same", return_sequences=True, activation="relu")(x)
        x = layers.BatchNormalization()(x)
    x = layers.Conv3D(1, 3, activation="sigmoid", padding="same")(x)
    model = keras.Model(inp, x)
    if seed is not None:
        randomize_weights(model, seed)
    return model


def randomize_weights(model, seed: int) -> None:
    """Random weights everywhere, BatchNormalization statistics included (they start as identity)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if type(layer).__name__ == "BatchNormalization":
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32)
                               if v.path.endswith(("gamma", "moving_variance"))
                               else (0.3 * rng.standard_normal(w.shape)).astype(np.float32)
                               for w, v in zip(weights, layer.weights)])
        elif weights:
            fan_in = [np.prod(w.shape[:-1]) if w.ndim > 1 else 1 for w in weights]
            layer.set_weights([(rng.standard_normal(w.shape) / np.sqrt(fi)).astype(np.float32)
                               for w, fi in zip(weights, fan_in)])
