"""What runs on the device in a device-resident graph (the support matrix) and how a node's ONNX
attributes and constant inputs become the parameters of a vkconv op."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from vkconv.onnx.model import STANDARD_DOMAINS, VKCONV_DOMAIN, Node, const, is_float
from vkconv.ops.conv_lstm import keras_activation
from vkconv.ops.elementwise import MAX_RANK
from vkconv.ops.resize import COORDINATE_MODES, NEAREST_MODES

ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh")
BINARY = ("Add", "Sub", "Mul", "Div")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
# ops of vkconv's own ONNX domain (cv_plugin.keras writes ConvLSTM2D); the rest are standard ONNX
VKCONV_OP_TYPES = ("ConvLSTM2D",)
OP_TYPES = ("Conv", "ConvTranspose", "DeformConv", "BatchNormalization", *ACTIVATIONS, *BINARY, *POOLS,
            "Concat", "Slice", "Transpose", "Resize", "Upsample", *VKCONV_OP_TYPES)




def activation_spec(node: Node, constants: Mapping[str, np.ndarray]):
    """``(name, a, b)`` for an activation node (see :class:`vkconv.Activation`), None when its
    parameters are not constants."""
    a = node.attrs
    if node.op_type == "Clip":
        lo, hi = float(a.get("min", -np.inf)), float(a.get("max", np.inf))  # opset < 11 attributes
        for i, tensor in enumerate(node.inputs[1:3]):
            if not tensor:
                continue
            value = const(constants, tensor)
            if value is None or value.size != 1:
                return None
            lo, hi = (float(value.reshape(-1)[0]), hi) if i == 0 else (lo, float(value.reshape(-1)[0]))
        return ("Clip", lo, hi)
    if node.op_type == "LeakyRelu":
        return ("LeakyRelu", float(a.get("alpha", 0.01)))
    if node.op_type == "HardSigmoid":
        return ("HardSigmoid", float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)))
    return (node.op_type,)


def resize_params(node: Node, constants: Mapping[str, np.ndarray]) -> dict | str:
    """Keyword arguments of :class:`~vkconv.ops.resize.Resize` for a Resize / Upsample node, or the
    reason it cannot run here."""
    a = node.attrs
    mode = a.get("mode", "nearest")
    if node.op_type == "Upsample":
        scales = a.get("scales") if len(node.inputs) < 2 else const(constants, node.inputs[1])
        if scales is None:
            return "Upsample scales are not a constant"
        return dict(mode=mode, coordinate_transformation_mode="asymmetric", nearest_mode="floor",
                    scales=np.asarray(scales, np.float32))
    if len(node.inputs) < 3:
        return "Resize of opset 10 (no roi input) is not supported"
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    if coord not in COORDINATE_MODES:
        return f"coordinate_transformation_mode {coord!r} is not supported"
    if nearest not in NEAREST_MODES:
        return f"nearest_mode {nearest!r} is not supported"
    if int(a.get("antialias", 0)) or int(a.get("exclude_outside", 0)) or "axes" in a \
            or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "antialias, exclude_outside, axes and keep_aspect_ratio_policy are not supported"
    scales = const(constants, node.inputs[2])
    sizes = const(constants, node.inputs[3]) if len(node.inputs) > 3 else None
    if scales is not None and scales.size == 0:
        scales = None
    if (scales is None) == (sizes is None or sizes.size == 0):
        return "Resize needs exactly one of scales and sizes, as a constant"
    return dict(mode=mode, coordinate_transformation_mode=coord, nearest_mode=nearest, scales=scales,
                sizes=sizes if scales is None else None)


def slice_params(node: Node, constants: Mapping[str, np.ndarray]) -> tuple[int, int, int] | str:
    """``(axis, start, end)`` of a Slice over one axis with step 1 (constant starts / ends / axes:
    inputs from opset 10, attributes before), or the reason it cannot run here."""
    if len(node.inputs) > 1:
        values = [const(constants, node.input(i)) for i in range(1, 5)]
        if any(node.input(i) and v is None for i, v in zip(range(1, 5), values)):
            return "Slice starts, ends, axes and steps must be constants"
        starts, ends, axes, steps = values
    else:
        starts, ends, axes, steps = (node.attrs.get(k) for k in ("starts", "ends", "axes", "steps"))
    starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
    axes = np.arange(len(starts)) if axes is None else np.asarray(axes).reshape(-1)
    if len(starts) != 1 or len(ends) != 1 or len(axes) != 1:
        return "Slice over more than one axis"
    if steps is not None and np.any(np.asarray(steps) != 1):
        return "Slice with steps other than 1"
    clamp = lambda v: int(np.clip(v, -2**31, 2**31 - 1))  # noqa: E731 - INT64_MAX means "to the end"
    return int(axes[0]), clamp(starts[0]), clamp(ends[0])


def conv_lstm_params(attrs: Mapping) -> dict:
    """Keyword arguments of :class:`~vkconv.ops.conv_lstm.ConvLSTM2D` for the ``vk_*`` attributes
    of a ``vkconv.ConvLSTM2D`` node (see ``cv_plugin/conv_lstm_layer.py``), decoded ONNX attributes
    or the params OpenCV hands a layer (a 1-element list arrives as a scalar there).  ValueError
    names a bad attribute."""
    def pair(key: str) -> tuple[int, ...]:
        value = attrs.get(key, 1)
        return tuple(int(v) for v in ((value,) * 2 if isinstance(value, (int, float)) else value))

    padding = str(attrs.get("vk_padding", "same"))
    if padding not in ("same", "valid"):
        raise ValueError(f"vk_padding: expected 'same' or 'valid', got {padding!r}")
    activation = str(attrs.get("vk_activation", "tanh"))
    recurrent = str(attrs.get("vk_recurrent_activation", "sigmoid"))
    keras_activation("vk_activation", activation)
    keras_activation("vk_recurrent_activation", recurrent)
    return dict(padding=padding, strides=pair("vk_strides"), dilation=pair("vk_dilations"),
                return_sequences=bool(int(attrs.get("vk_return_sequences", 1))), activation=activation,
                recurrent_activation=recurrent)


def unsupported_reason(node: Node | onnx.NodeProto, constants: Mapping[str, np.ndarray],
                       ranks: Mapping[str, int] | None = None) -> str | None:
    """Why ``node`` cannot run in a :class:`Graph` (None when it can).  ``ranks``: the known ranks
    of tensors (shape inference); the ops that need a rank refuse tensors not in it.  Without
    ``ranks`` ranks are not checked here (a :class:`Graph` checks shapes when it meets them)."""
    if isinstance(node, onnx.NodeProto):
        wanted = (VKCONV_DOMAIN,) if node.op_type in VKCONV_OP_TYPES else STANDARD_DOMAINS
        if node.domain not in wanted:
            return f"domain {node.domain!r}"
        node = Node.from_proto(node)
    op, ins = node.op_type, list(node.inputs)

    def rank(t: str, wanted: int) -> int | None:
        return wanted if ranks is None else ranks.get(t)

    if op not in OP_TYPES:
        return f"{op} is not a graph op"
    if len([o for o in node.outputs if o]) != 1:
        return f"{op} with {len(node.outputs)} outputs"
    runtime = [t for t in ins if t and t not in constants]
    if not runtime:
        return "no runtime input (constant folding is OpenCV's job)"
    if op in ("Conv", "ConvTranspose"):
        w = const(constants, ins[1]) if len(ins) > 1 else None
        if not is_float(w) or w.ndim not in (3, 4, 5):
            return "W is not a float constant of rank 3..5"
        if len(ins) > 2 and ins[2] and not is_float(const(constants, ins[2])):
            return "B is not a float constant"
        return None
    if op == "DeformConv":
        w, b = const(constants, node.input(1)), const(constants, node.input(3))
        if not is_float(w) or w.ndim != 4:
            return "W is not a float constant of rank 4"
        if node.input(3) and not is_float(b):
            return "B is not a float constant"
        if any(t in constants for t in (node.input(0), node.input(2), node.input(4))):
            return "X, offset and mask must be runtime tensors"
        return None
    if op == "Slice":
        bounds = slice_params(node, constants)
        return bounds if isinstance(bounds, str) else None
    if op == "Transpose":
        perm = node.attrs.get("perm")
        r = rank(ins[0], MAX_RANK) if perm is None else len(perm)
        if r is None or r > MAX_RANK:
            return f"Transpose of rank unknown or above {MAX_RANK}"
        if perm is not None and sorted(perm) != list(range(r)):
            return f"perm {list(perm)} is not a permutation"
        return None
    if op == "ConvLSTM2D":  # X, kernel, recurrent_kernel, bias[, h0, c0]
        kernel, recurrent, bias = (const(constants, node.input(i)) for i in (1, 2, 3))
        if not (is_float(kernel) and kernel.ndim == 4 and is_float(recurrent) and recurrent.ndim == 4
                and is_float(bias)):
            return "kernel and recurrent_kernel (rank 4) and bias must be float constants"
        if len(ins) not in (4, 6) or any(not t or t in constants for t in [ins[0], *ins[4:]]):
            return "X and, where given, both h0 and c0 must be runtime tensors"
        if rank(ins[0], 5) != 5:
            return "X rank unknown or not 5 (N, T, C, H, W)"
        try:
            conv_lstm_params(node.attrs)
        except ValueError as exc:
            return str(exc)
        return None
    if op == "BatchNormalization":
        if int(node.attrs.get("training_mode", 0)) or len(ins) != 5 \
                or not all(is_float(const(constants, t)) for t in ins[1:]):
            return "BatchNormalization needs inference mode and constant parameters"
        return None if (rank(ins[0], 4) or 0) >= 2 else "input rank unknown"
    if op in ACTIVATIONS:
        return None if activation_spec(node, constants) is not None else "Clip bounds are not constants"
    if op in BINARY:
        for t in ins:
            c, r = const(constants, t), rank(t, 4)
            if c is not None and not is_float(c):
                return "non-float constant operand"
            if c is None and not 0 <= (r if r is not None else -1) <= MAX_RANK:
                return f"operand rank unknown or above {MAX_RANK}"
        return None
    if op in POOLS:
        if rank(ins[0], 4) != 4:
            return "pooling runs on 4-D NCHW input only"
        if op == "MaxPool" and int(node.attrs.get("storage_order", 0)):
            return "storage_order 1"
        return None
    if op == "Concat":
        for t in ins:
            c = const(constants, t)
            if (c is not None and not is_float(c)) or (c is None and rank(t, 4) is None):
                return "Concat operand of unknown rank or non-float constant"
        return None
    params = resize_params(node, constants)  # Resize, Upsample
    if isinstance(params, str):
        return params
    return None if rank(ins[0], 4) == 4 else "Resize runs on 4-D NCHW input only"


def runs_on_device(node: onnx.NodeProto, constants: Mapping[str, np.ndarray], ranks: Mapping[str, int],
                   types: Mapping[str, int]) -> bool:
    """Whether a device graph can run ``node``: :func:`unsupported_reason` accepts it with the
    inferred ``ranks``, and every runtime tensor it touches is float32 (``types``: ONNX elem types)."""
    if unsupported_reason(node, constants, ranks) is not None:
        return False
    tensors = [t for t in [*node.input, *node.output] if t and t not in constants]
    return all(types.get(t) == onnx.TensorProto.FLOAT for t in tensors)
