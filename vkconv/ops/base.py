"""The op skeleton, written once.

:class:`DeviceOp` is what every op with device-resident state shares (Conv, ConvTranspose,
DeformConv, ConvLSTM2D): its context, its plan cache (one recorded command buffer per input shape)
and the lock around both; ``close()`` (or leaving a ``with`` block) frees its buffers and plans
while the pipelines stay cached on the context for other ops.

:class:`WeightedOp` adds what the ONNX Conv family shares: W (``[C_out or C_in, C / group, *k]``)
and B (``[C_out]``) checked one way, group / strides / dilations / pads parsed one way, and the
fused epilogue.
"""
from __future__ import annotations

import threading
from typing import Self

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.activation import Activation
from vkconv.runtime.context import Context, get_context
from vkconv.runtime.plan import PlanCache


class DeviceOp:
    """Subclasses implement :meth:`_release` (called with the lock held)."""

    def __init__(self, ctx: Context | None):
        self.ctx = ctx or get_context()
        self.ctx.check()
        self._plans = PlanCache()
        self._lock = threading.Lock()

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free the device buffers and recorded plans (the shared pipelines stay cached)."""
        with self._lock:
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WeightedOp(DeviceOp):
    """An op of the Conv family: input X ``[N, C_in, *spatial]``, weights W, optional bias B.

    ``ranks``: the ranks W may have (its spatial rank ``nd`` = rank - 2 follows from it);
    group divides W's first axis: output channels for Conv-style ``[C_out, C_in/g, *k]``, input
    channels for ConvTranspose's ``[C_in, C_out/g, *k]`` (which overrides :meth:`output_channels`).
    """

    first_axis = "output"  # what W's first axis counts, for messages

    def __init__(self, w: np.ndarray, *, ranks: int | tuple[int, ...], strides, pads, dilations, group,
                 activation, ctx: Context | None):
        w = shapes.as_float32("w", w, ranks)
        self.nd = w.ndim - 2
        self.group = shapes.positive_int("group", group)
        self.strides = shapes.spatial("strides", strides, self.nd, minimum=1)
        self.dilations = shapes.spatial("dilations", dilations, self.nd, minimum=1)
        self.pads = shapes.pads(pads, self.nd)
        self.activation = Activation.parse(activation)
        self.weight_shape: tuple[int, ...] = ()  # set by set_weights
        super().__init__(ctx)

    def output_channels(self, w_shape: tuple[int, ...]) -> int:
        return w_shape[0]

    def set_weights(self, w: np.ndarray, b: np.ndarray | None = None) -> None:
        """Replace the weights (and bias) by arrays of the same layout; plans are rebuilt."""
        w, b = self.check_weights(w, b)
        state = self._prepare_weights(w, b)
        with self._lock:
            self._release()
            self.weight_shape = w.shape
            self._adopt_weights(state)

    def _prepare_weights(self, w: np.ndarray, b: np.ndarray | None):
        """What :meth:`_adopt_weights` installs, made outside the lock (checks beyond
        :meth:`check_weights`, packing, uploads); by default ``(w, b)``."""
        return w, b

    def _adopt_weights(self, state) -> None:
        """Install :meth:`_prepare_weights`' result (called with the lock held, plans released)."""
        raise NotImplementedError

    def check_weights(self, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """``w`` and ``b`` as float32 arrays, ValueError naming the problem when they do not fit
        this op (rank, a changed shape, empty kernel, group, bias length)."""
        w = shapes.as_float32("w", w, self.nd + 2)
        what = type(self).__name__
        if self.weight_shape and w.shape != self.weight_shape:
            raise ValueError(f"w: shape {w.shape} differs from this {what}'s {self.weight_shape}")
        if min(w.shape[2:]) < 1:
            raise ValueError(f"w: kernel dimensions must be >= 1, got shape {w.shape}")
        if w.shape[0] % self.group:
            raise ValueError(f"w: {w.shape[0]} {self.first_axis} channels are not divisible by group={self.group}")
        if b is not None:
            b = shapes.as_float32("b", b, 1)
            cout = self.output_channels(w.shape)
            if b.shape[0] != cout:
                raise ValueError(f"b: expected {cout} values (one per output channel), got {b.shape[0]}")
        return w, b
