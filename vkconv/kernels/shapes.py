"""Argument checking and the ONNX shape arithmetic shared by every convolution-like op."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def as_float32(name: str, value, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    """``value`` as a C-contiguous float32 array (non-contiguous input is copied).

    Any other dtype is refused rather than converted, so that a float64 or int array passed by
    mistake is reported instead of silently losing precision.
    """
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name}: expected a numpy.ndarray, got {type(value).__name__}")
    if value.dtype != np.float32:
        raise ValueError(f"{name}: dtype must be float32, got {value.dtype} (use .astype(np.float32))")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.ndim not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise ValueError(f"{name}: expected rank {want}, got shape {value.shape}")
    return np.ascontiguousarray(value)


def input_and_weights(x, w) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``w`` of a 1-D to 3-D convolution as float32, ValueError naming both when their
    ranks disagree (either could be the wrong one)."""
    x, w = as_float32("x", x, (3, 4, 5)), as_float32("w", w, (3, 4, 5))
    if w.ndim != x.ndim:
        raise ValueError(f"w: rank {w.ndim} ({w.ndim - 2}-D weights) does not match x: rank {x.ndim} "
                         f"({x.ndim - 2}-D input)")
    return x, w


def positive_int(name: str, value) -> int:
    """``value`` as an int >= 1; bools and non-integers are refused (``group=True`` is a mistake)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def spatial(name: str, value, n: int, *, minimum: int) -> tuple[int, ...]:
    """A scalar or length-``n`` sequence of ints, each at least ``minimum``."""
    if isinstance(value, (int, np.integer)):
        out = (int(value),) * n
    elif isinstance(value, Sequence) and len(value) == n and all(
            isinstance(v, (int, np.integer)) for v in value):
        out = tuple(int(v) for v in value)
    else:
        raise ValueError(f"{name}: expected an int or {n} ints, got {value!r}")
    if any(v < minimum for v in out):
        raise ValueError(f"{name}: every value must be >= {minimum}, got {out}")
    return out


def pads(value, n: int) -> tuple[int, ...]:
    """ONNX pads ``(begin_0..begin_n-1, end_0..end_n-1)`` from a scalar, ``n`` (symmetric) or ``2n``
    non-negative ints."""
    if isinstance(value, Sequence) and len(value) == n and n != 0:
        value = tuple(value) * 2
    return spatial("pads", value, 2 * n, minimum=0)


def conv_out_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
                  dilation: int) -> int:
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def resolve_auto_pad(auto_pad: str, in_spatial: Sequence[int], kernel: Sequence[int],
                     strides: Sequence[int], dilations: Sequence[int]) -> tuple[int, ...] | None:
    """Explicit ONNX pads for ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID; None for NOTSET.

    SAME_* pads so that ``out = ceil(in / stride)``; the odd pixel goes at the end for SAME_UPPER and
    at the beginning for SAME_LOWER, as the ONNX Conv specification says.
    """
    mode = auto_pad.upper() if isinstance(auto_pad, str) else auto_pad
    n = len(in_spatial)
    if mode in ("NOTSET", ""):
        return None
    if mode == "VALID":
        return (0,) * (2 * n)
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"auto_pad: expected NOTSET, SAME_UPPER, SAME_LOWER or VALID, got {auto_pad!r}")
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return tuple(begins + ends)


def conv_output_shape(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
                      pads_: Sequence[int], dilations: Sequence[int], group: int,
                      auto_pad: str = "NOTSET") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(output shape, resolved pads)`` of ONNX Conv, without touching a device.

    ``x_shape`` is ``[N, C, *spatial]``, ``w_shape`` ``[C_out, C / group, *kernel]``. ValueError names
    the argument when the input cannot be convolved with these weights.  Unknown dimensions (<= 0,
    as OpenCV reports dynamic ones while importing) stay unknown in the output.
    """
    x_shape, w_shape = tuple(int(s) for s in x_shape), tuple(int(s) for s in w_shape)
    nd = len(w_shape) - 2
    if len(x_shape) != nd + 2:
        raise ValueError(f"x: expected rank {nd + 2} for weights of shape {w_shape}, got shape {x_shape}")
    if x_shape[1] != w_shape[1] * group and x_shape[1] > 0:  # <= 0: unknown while importing
        raise ValueError(f"x: {x_shape[1]} channels, but w {w_shape} with group={group} expects "
                         f"{w_shape[1] * group}")
    kernel = w_shape[2:]
    auto = resolve_auto_pad(auto_pad, x_shape[2:], kernel, strides, dilations)
    resolved = tuple(pads_) if auto is None else auto
    known = [s > 0 for s in x_shape[2:]]
    out = [conv_out_size(s, k, st, resolved[i], resolved[i + nd], d) if ok else s
           for i, (s, k, st, d, ok) in enumerate(zip(x_shape[2:], kernel, strides, dilations, known))]
    if any(o < 1 for o, ok in zip(out, known) if ok):
        raise ValueError(f"x: spatial size {x_shape[2:]} with pads {resolved} is smaller than the dilated "
                         f"kernel {kernel} (dilations {tuple(dilations)}); output would be {out}")
    return (x_shape[0], w_shape[0], *out), resolved


def conv_transpose_out_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
                            dilation: int, output_padding: int) -> int:
    """ONNX ConvTranspose output length along one axis for explicit pads."""
    return stride * (size - 1) + output_padding + dilation * (kernel - 1) + 1 - pad_begin - pad_end


def resolve_conv_transpose_pads(auto_pad: str, in_spatial: Sequence[int], kernel: Sequence[int],
                                strides: Sequence[int], dilations: Sequence[int],
                                output_padding: Sequence[int],
                                output_shape: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """Pads ``(begin..., end...)`` of ONNX ConvTranspose when ``output_shape`` or ``auto_pad`` decides
    them; None when the explicit ``pads`` attribute applies (NOTSET and no ``output_shape``).

    As the specification says: SAME_UPPER / SAME_LOWER target ``output_shape = in * stride``, a
    given ``output_shape`` wins over ``pads``, and the total padding
    ``stride * (in - 1) + output_padding + dilation * (kernel - 1) + 1 - output_shape`` is split with
    the smaller half at the beginning for SAME_UPPER and at the end otherwise.  The halves use
    floor division, as the ONNX reference and its conformance data do, so an ``output_shape`` larger
    than the natural size gives a negative pad (extra outputs, holding just the bias).
    """
    mode = auto_pad.upper() if isinstance(auto_pad, str) else auto_pad
    if mode not in ("NOTSET", "", "SAME_UPPER", "SAME_LOWER", "VALID"):
        raise ValueError(f"auto_pad: expected NOTSET, SAME_UPPER, SAME_LOWER or VALID, got {auto_pad!r}")
    n = len(in_spatial)
    if output_shape is None:
        if mode in ("NOTSET", ""):
            return None
        if mode == "VALID":
            return (0,) * (2 * n)
        output_shape = [size * s for size, s in zip(in_spatial, strides)]
    begins, ends = [], []
    for size, k, s, d, adj, out in zip(in_spatial, kernel, strides, dilations, output_padding,
                                       output_shape):
        total = conv_transpose_out_size(size, k, s, 0, 0, d, adj) - out
        half = total // 2
        begins.append(half if mode == "SAME_UPPER" else total - half)
        ends.append(total - half if mode == "SAME_UPPER" else half)
    return tuple(begins + ends)


def conv_transpose_output_shape(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int],
                                pads_: Sequence[int], dilations: Sequence[int], group: int,
                                output_padding: Sequence[int], output_shape: Sequence[int] | None = None,
                                auto_pad: str = "NOTSET") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(output shape, resolved pads)`` of ONNX ConvTranspose, without touching a device.

    ``x_shape`` is ``[N, C_in, *spatial]``, ``w_shape`` ``[C_in, C_out / group, *kernel]``; the pads
    may be negative when ``output_shape`` asks for more than the natural size. ValueError names the
    argument when the input does not fit these weights.
    """
    x_shape, w_shape = tuple(int(s) for s in x_shape), tuple(int(s) for s in w_shape)
    nd = len(w_shape) - 2
    if len(x_shape) != nd + 2:
        names = ("N, C, W", "N, C, H, W", "N, C, D, H, W")[min(nd, 3) - 1]
        raise ValueError(f"x: expected rank {nd + 2} ({names}) for these weights, got shape {x_shape}")
    if x_shape[1] != w_shape[0]:
        raise ValueError(f"x: {x_shape[1]} channels, but w {w_shape} expects {w_shape[0]} "
                         f"(ConvTranspose weights are [C_in, C_out / group, *kernel])")
    if any(s < 1 for s in x_shape[2:]):
        raise ValueError(f"x: spatial dimensions must be >= 1, got shape {x_shape}")
    kernel = w_shape[2:]
    auto = resolve_conv_transpose_pads(auto_pad, x_shape[2:], kernel, strides, dilations,
                                       output_padding, output_shape)
    resolved = tuple(pads_) if auto is None else auto
    out = [conv_transpose_out_size(s, k, st, resolved[i], resolved[i + nd], d, a)
           for i, (s, k, st, d, a) in enumerate(zip(x_shape[2:], kernel, strides, dilations, output_padding))]
    if any(o < 1 for o in out):
        raise ValueError(f"pads: {resolved} crop away the whole output of x {x_shape} (output would be {out})")
    return (x_shape[0], w_shape[1] * group, *out), resolved


def single_nchw(op: str, in_shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The one 4-D NCHW input shape of a one-input 2-D op (pools, Resize); ValueError otherwise."""
    if len(in_shapes) != 1:
        raise ValueError(f"{op}: expected 1 input, got {len(in_shapes)}")
    x_shape = tuple(int(d) for d in in_shapes[0])
    if len(x_shape) != 4:
        raise ValueError(f"x: {op} supports 4-D NCHW input, got shape {x_shape}")
    return x_shape
