"""Dense convolution (ONNX ``Conv``) for 1-D and 2-D inputs: host side of ``shaders/conv2d.comp``.

Layouts: input ``x`` is NCW or NCHW, weights ``w`` are ``[C_out, C_in / group, kW]`` or
``[C_out, C_in / group, kH, kW]``, bias ``b`` is ``[C_out]``, the output is NC(H)W; all float32.
A 1-D convolution runs as a 2-D one with H = 1.
"""
from __future__ import annotations

import struct
import threading

import numpy as np

from . import shapes
from .activation import Activation
from .buffer import upload_constant
from .context import Context, get_context
from .pipeline import DescriptorSet
from .plan import Plan, PlanCache

_OC_BLOCK = 4   # output channels per invocation (vec4 weights)
_PIX_BLOCK = 4  # output pixels per invocation
_PUSH = struct.Struct("<16i2f")


def _local_size(ctx: Context, want: int = 64) -> int:
    info = ctx.info
    return max(1, min(want, info.max_workgroup_invocations, info.max_workgroup_size[0]))


def pack_weights(w: np.ndarray, group: int) -> np.ndarray:
    """``[C_out, C_in/g, *k]`` -> ``[g, ceil(C_out/g / 4), C_in/g * prod(k), 4]``, zero-padded."""
    cout = w.shape[0]
    cout_g = cout // group
    blocks = -(-cout_g // _OC_BLOCK)
    k = int(np.prod(w.shape[1:]))
    packed = np.zeros((group, blocks * _OC_BLOCK, k), np.float32)
    packed[:, :cout_g] = w.reshape(group, cout_g, k)
    return np.ascontiguousarray(packed.reshape(group, blocks, _OC_BLOCK, k).transpose(0, 1, 3, 2))


def pack_bias(b: np.ndarray | None, cout: int, group: int) -> np.ndarray:
    cout_g = cout // group
    blocks = -(-cout_g // _OC_BLOCK)
    packed = np.zeros((group, blocks * _OC_BLOCK), np.float32)
    if b is not None:
        packed[:, :cout_g] = b.reshape(group, cout_g)
    return packed


class Conv:
    """A convolution whose weights stay on the device; call it with inputs of any batch/size.

    ``auto_pad`` (``NOTSET``, ``SAME_UPPER``, ``SAME_LOWER``, ``VALID``) overrides ``pads`` per input
    shape, as in ONNX.  The first call at a new input shape records a command buffer; later calls
    at that shape reuse it (one submit each).
    """

    def __init__(self, w: np.ndarray, b: np.ndarray | None = None, *, strides=1, pads=0,
                 dilations=1, group: int = 1, activation=None, auto_pad: str = "NOTSET",
                 ctx: Context | None = None):
        w = shapes.as_float32("w", w, (3, 4))
        self.nd = w.ndim - 2
        if not isinstance(group, (int, np.integer)) or group < 1:
            raise ValueError(f"group: expected a positive int, got {group!r}")
        self.group = int(group)
        if w.shape[0] % self.group:
            raise ValueError(f"w: {w.shape[0]} output channels are not divisible by group={group}")
        if any(k < 1 for k in w.shape[2:]):
            raise ValueError(f"w: kernel dimensions must be >= 1, got {w.shape[2:]}")
        self.strides = shapes.spatial("strides", strides, self.nd, minimum=1)
        self.dilations = shapes.spatial("dilations", dilations, self.nd, minimum=1)
        self.pads = shapes.pads(pads, self.nd)
        shapes.resolve_auto_pad(auto_pad, (1,) * self.nd, (1,) * self.nd, (1,) * self.nd,
                                (1,) * self.nd)  # validates the name
        self.auto_pad = auto_pad
        self.activation = Activation.parse(activation)
        self.ctx = ctx or get_context()
        self.local_size = _local_size(self.ctx)
        self.pipeline = self.ctx.pipeline("conv2d", 4, _PUSH.size,
                                          (self.local_size, 1, 1, self.activation.kind))
        self._plans = PlanCache()
        self._lock = threading.Lock()
        self._weights = self._bias = None
        self.set_weights(w, b)

    # -- weights -------------------------------------------------------------------------------
    def set_weights(self, w: np.ndarray, b: np.ndarray | None = None) -> None:
        """Replace the weights (and bias) by arrays of the same layout; plans are rebuilt."""
        w = shapes.as_float32("w", w, self.nd + 2)
        if self._weights is not None and w.shape != self.weight_shape:
            raise ValueError(f"w: shape {w.shape} differs from this Conv's {self.weight_shape}")
        if w.shape[0] % self.group:
            raise ValueError(f"w: {w.shape[0]} output channels are not divisible by group={self.group}")
        if b is not None:
            b = shapes.as_float32("b", b, 1)
            if b.shape[0] != w.shape[0]:
                raise ValueError(f"b: expected {w.shape[0]} values (one per output channel), got {b.shape[0]}")
        with self._lock:
            self._release()
            self.weight_shape = w.shape
            self._weights = upload_constant(self.ctx, pack_weights(w, self.group), "conv weights")
            self._bias = upload_constant(self.ctx, pack_bias(b, w.shape[0], self.group), "conv bias")

    # -- shapes --------------------------------------------------------------------------------
    def resolved_pads(self, x_shape) -> tuple[int, ...]:
        auto = shapes.resolve_auto_pad(self.auto_pad, x_shape[2:], self.weight_shape[2:],
                                       self.strides, self.dilations)
        return self.pads if auto is None else auto

    def output_shape(self, x_shape) -> tuple[int, ...]:
        """Output shape for an input of ``x_shape``; ValueError if the input does not fit."""
        x_shape = tuple(int(s) for s in x_shape)
        cout, cin_g, *kernel = self.weight_shape
        if len(x_shape) != self.nd + 2:
            raise ValueError(f"x: expected rank {self.nd + 2} (N, C, {'H, ' if self.nd == 2 else ''}W) "
                             f"for these weights, got shape {x_shape}")
        if x_shape[1] != cin_g * self.group:
            raise ValueError(f"x: {x_shape[1]} channels, but w {self.weight_shape} with group={self.group} "
                             f"expects {cin_g * self.group}")
        pads = self.resolved_pads(x_shape)
        out = [shapes.conv_out_size(s, k, st, pads[i], pads[i + self.nd], d)
               for i, (s, k, st, d) in enumerate(zip(x_shape[2:], kernel, self.strides, self.dilations))]
        if any(o < 1 for o in out):
            raise ValueError(f"x: spatial size {x_shape[2:]} with pads {pads} is smaller than the dilated "
                             f"kernel {tuple(kernel)} (dilations {self.dilations}); output would be {out}")
        return (x_shape[0], cout, *out)

    # -- execution -----------------------------------------------------------------------------
    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = shapes.as_float32("x", x, self.nd + 2)
        y_shape = self.output_shape(x.shape)
        if x.size == 0 or 0 in y_shape:
            return np.zeros(y_shape, np.float32)
        with self._lock:
            plan = self._plans.get(x.shape, lambda: self._build_plan(x.shape, y_shape))
            return plan.run([x])[0]

    def _build_plan(self, x_shape, y_shape) -> Plan:
        ctx = self.ctx
        plan = Plan(ctx, [("conv input x", x_shape)], [("conv output", y_shape)])
        dset = DescriptorSet(self.pipeline, [plan.inputs[0], self._weights, self._bias, plan.outputs[0]])
        plan.keep.append(dset)
        cout, cin_g, *kernel = self.weight_shape
        pads = self.resolved_pads(x_shape)
        # 1-D runs as 2-D with a unit height and no vertical padding.
        def lift(t, unit=1):
            return (unit, *t) if self.nd == 1 else tuple(t)

        in_h, in_w = lift(x_shape[2:])
        out_h, out_w = lift(y_shape[2:])
        k_h, k_w = lift(kernel)
        s_h, s_w = lift(self.strides)
        d_h, d_w = lift(self.dilations)
        p_h, p_w = lift(pads[:self.nd], 0)
        cout_g = cout // self.group
        blocks = -(-cout_g // _OC_BLOCK)
        act = self.activation
        push = _PUSH.pack(cin_g, in_h, in_w, cout_g, out_h, out_w, k_h, k_w, s_h, s_w, p_h, p_w,
                          d_h, d_w, self.group, blocks, act.a, act.b)
        pixel_groups = -(-(out_h * out_w) // (_PIX_BLOCK * self.local_size))
        groups = (pixel_groups, self.group * blocks, x_shape[0])
        plan.record(lambda cmd: cmd.dispatch(self.pipeline, dset, push, groups))
        return plan

    # -- lifetime ------------------------------------------------------------------------------
    def _release(self) -> None:
        self._plans.clear()
        for buf in (self._weights, self._bias):
            if buf is not None:
                buf.close()
        self._weights = self._bias = None

    def close(self) -> None:
        """Free the device buffers and recorded plans (the shared pipeline stays cached)."""
        with self._lock:
            self._release()

    def __enter__(self) -> "Conv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, strides=1, pads=0,
         dilations=1, group: int = 1, activation=None) -> np.ndarray:
    """ONNX ``Conv`` on the Vulkan device, for NCW (1-D) or NCHW (2-D) float32 input.

    ``strides``/``dilations``: an int or one per spatial dim. ``pads``: an int, one per spatial dim
    (symmetric), or ONNX order ``(begin..., end...)``. ``group``: 1, C (depthwise) or any divisor.
    ``activation``: see :meth:`vkconv.activation.Activation.parse`. ``auto_pad`` is resolved by the
    caller: :func:`vkconv.shapes.resolve_auto_pad` gives the explicit pads.
    Returns ``[N, C_out, *out]`` float32. Raises ValueError naming the bad argument.
    """
    x = shapes.as_float32("x", x, (3, 4))
    w = shapes.as_float32("w", w, (3, 4))
    if w.ndim != x.ndim:
        raise ValueError(f"w: rank {w.ndim} does not match x's rank {x.ndim}")
    with Conv(w, b, strides=strides, pads=pads, dilations=dilations, group=group,
              activation=activation) as op:
        return op(x)
