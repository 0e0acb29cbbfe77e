"""Dense convolution (ONNX ``Conv``) for 1-D, 2-D and 3-D inputs.

Layouts: input ``x`` is NCW, NCHW or NCDHW, weights ``w`` are ``[C_out, C_in / group, *kernel]``
with one kernel extent per spatial dim, bias ``b`` is ``[C_out]``, the output is NC[D][H]W; all
float32.  The kernel that runs is chosen by shape and device type (see :mod:`vkconv.ops.conv.kernels`):
``depthwise``, ``gemm1x1``, ``winograd``, ``implicit_gemm`` (CPU devices) or ``tiled`` (GPUs), with
``direct`` as the fallback when a kernel's scratch buffers would not fit the device.  ``kernel=`` or
``VKCONV_CONV_KERNEL`` forces one.
"""
from __future__ import annotations

import os

import numpy as np

from vkconv.kernels import shapes
from vkconv.ops.base import WeightedOp
from vkconv.ops.conv.kernels import KERNELS, Geometry, Kernel, eligible, make_kernel, select, tuning
from vkconv.runtime.context import Context
from vkconv.runtime.plan import Plan

_NAMES = {1: "N, C, W", 2: "N, C, H, W", 3: "N, C, D, H, W"}


def _kernel_request(kernel: str | None) -> str:
    name = kernel if kernel is not None else os.environ.get("VKCONV_CONV_KERNEL", "") or "auto"
    if name != "auto" and name not in KERNELS:
        raise ValueError(f"kernel: unknown {name!r}; expected 'auto' or one of {', '.join(KERNELS)}")
    return name


class Conv(WeightedOp):
    """A convolution whose weights stay on the device; call it with inputs of any batch/size.

    ``auto_pad`` (``NOTSET``, ``SAME_UPPER``, ``SAME_LOWER``, ``VALID``) overrides ``pads`` per input
    shape, as in ONNX.  The first call at a new input shape records a command buffer; later calls
    at that shape reuse it (one submit each, no Vulkan object created).  ``kernel`` forces a kernel
    (``"direct"``, ``"implicit_gemm"``, ``"gemm1x1"``, ``"depthwise"``, ``"winograd"``, ``"tiled"``; default
    ``VKCONV_CONV_KERNEL`` or ``"auto"``); a forced kernel that cannot run a shape raises ValueError.
    ``fp16=True`` (default: ``VKCONV_FP16=1``) keeps the weights of the texel-buffer kernels
    (implicit_gemm, gemm1x1, depthwise; not winograd, whose transform would magnify the rounding) as
    float16 — half the weight memory and bandwidth;
    inputs, outputs and arithmetic stay float32, so results differ from fp32 weights by the weights'
    rounding (about 5e-4 relative each).
    """

    def __init__(self, w: np.ndarray, b: np.ndarray | None = None, *, strides=1, pads=0,
                 dilations=1, group: int = 1, activation=None, auto_pad: str = "NOTSET",
                 ctx: Context | None = None, kernel: str | None = None, fp16: bool | None = None):
        super().__init__(w, ranks=(3, 4, 5), strides=strides, pads=pads, dilations=dilations, group=group,
                         activation=activation, ctx=ctx)
        shapes.resolve_auto_pad(auto_pad, (1,) * self.nd, (1,) * self.nd, (1,) * self.nd,
                                (1,) * self.nd)  # validates the name
        self.auto_pad = auto_pad
        self.kernel = _kernel_request(kernel)
        self.tuning = tuning(self.ctx, fp16)
        self._kernels: dict[str, Kernel] = {}
        self._w: np.ndarray | None = None
        self._b: np.ndarray | None = None
        self.set_weights(w, b)

    # -- weights -------------------------------------------------------------------------------
    def set_weights(self, w: np.ndarray, b: np.ndarray | None = None) -> None:
        """Replace the weights (and bias) by arrays of the same layout; plans are rebuilt."""
        w, b = self.check_weights(w, b)
        with self._lock:
            self._release()
            self.weight_shape = w.shape
            # Host copies, lifted to 3-D: kernels pack their own layouts from them on first use.
            self._w = w.reshape(w.shape[:2] + (1,) * (3 - self.nd) + w.shape[2:]).copy()
            self._b = None if b is None else b.copy()

    # -- shapes --------------------------------------------------------------------------------
    def resolved_pads(self, x_shape) -> tuple[int, ...]:
        """Explicit ONNX pads ``(begin..., end...)`` for an input of ``x_shape``."""
        auto = shapes.resolve_auto_pad(self.auto_pad, x_shape[2:], self.weight_shape[2:],
                                       self.strides, self.dilations)
        return self.pads if auto is None else auto

    def output_shape(self, x_shape) -> tuple[int, ...]:
        """Output shape for an input of ``x_shape``; ValueError if the input does not fit."""
        x_shape = tuple(int(s) for s in x_shape)
        cout, cin_g, *kernel = self.weight_shape
        if len(x_shape) != self.nd + 2:
            raise ValueError(f"x: expected rank {self.nd + 2} ({_NAMES[self.nd]}) for these weights, "
                             f"got shape {x_shape}")
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

    def _geometry(self, x_shape) -> Geometry:
        x_shape = tuple(int(s) for s in x_shape)
        return Geometry.lift(x_shape, self.weight_shape, self.group, self.strides, self.dilations,
                             self.resolved_pads(x_shape), self.output_shape(x_shape))

    def kernel_for(self, x_shape) -> str:
        """The kernel a call with input shape ``x_shape`` runs (ValueError if a forced kernel
        cannot run it)."""
        geo = self._geometry(x_shape)
        with self._lock:
            return self._select(geo)

    def _select(self, geo: Geometry) -> str:
        if self.kernel != "auto":
            reason = eligible(self.kernel, geo)
            if reason is not None:
                raise ValueError(f"kernel: {self.kernel!r} cannot run x of shape {geo.x_shape}: {reason}")
            return self.kernel
        name = select(geo, self.ctx.info.type)
        return name if self._kernel(name).fits(geo) else "direct"

    # -- execution -----------------------------------------------------------------------------
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``[N, C_in, *spatial]`` float32 -> ``[N, C_out, *out]`` float32."""
        x = shapes.as_float32("x", x, self.nd + 2)
        y_shape = self.output_shape(x.shape)
        if 0 in y_shape:
            return np.zeros(y_shape, np.float32)
        with self._lock:
            return self._plan(x.shape).run([x])[0]

    def plan(self, x_shape) -> Plan:
        """The recorded plan for inputs of ``x_shape`` (built on first use, then cached): its
        ``body`` records the dispatches alone (bench/conv.py times them with GPU timestamps)."""
        x_shape = tuple(int(s) for s in x_shape)
        self.output_shape(x_shape)
        with self._lock:
            return self._plan(x_shape)

    def _plan(self, x_shape) -> Plan:
        def build() -> Plan:
            geo = self._geometry(x_shape)
            return self._kernel(self._select(geo)).plan(geo)
        return self._plans.get(tuple(x_shape), build)

    def _kernel(self, name: str) -> Kernel:
        kernel = self._kernels.get(name)
        if kernel is None:
            assert self._w is not None  # set_weights ran in __init__ and _release keeps it
            self.ctx.check()
            kernel = self._kernels[name] = make_kernel(name, self.ctx, self._w, self._b, self.group,
                                                       self.activation, self.tuning)
        return kernel

    # -- lifetime ------------------------------------------------------------------------------
    def _release(self) -> None:
        self._plans.clear()
        for kernel in self._kernels.values():
            kernel.close()
        self._kernels.clear()


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, strides=1, pads=0,
         dilations=1, group: int = 1, activation=None) -> np.ndarray:
    """ONNX ``Conv`` on the Vulkan device, for NCW (1-D), NCHW (2-D) or NCDHW (3-D) float32 input.

    ``strides``/``dilations``: an int or one per spatial dim. ``pads``: an int, one per spatial dim
    (symmetric), or ONNX order ``(begin..., end...)``. ``group``: 1, C (depthwise) or any divisor.
    ``activation``: see :meth:`vkconv.kernels.activation.Activation.parse`. ``auto_pad`` is resolved by the
    caller: :func:`vkconv.kernels.shapes.resolve_auto_pad` gives the explicit pads.
    Returns ``[N, C_out, *out]`` float32. Raises ValueError naming the bad argument.
    """
    x, w = shapes.input_and_weights(x, w)
    with Conv(w, b, strides=strides, pads=pads, dilations=dilations, group=group,
              activation=activation) as op:
        return op(x)
