"""Convolutional LSTM (Keras ``ConvLSTM2D``) on the device, on the dense convolution kernels.

Layouts: input ``x`` is ``[N, T, C, H, W]`` (time-major frames, each NCHW), weights are in Keras'
own layouts (``kernel [kh, kw, C, 4F]``, ``recurrent_kernel [rkh, rkw, F, 4F]``, ``bias [4F]``, the
4F axis holding the gates in Keras' order i, f, c, o), initial states ``h0``/``c0`` and the output
frames are ``[N, F, H', W']``; all float32.  The output is ``[N, T, F, H', W']`` with
``return_sequences`` and the last hidden state ``[N, F, H', W']`` without.

Semantics are Keras 3's ``ConvLSTMCell``::

    g = conv(x_t, kernel, strides, padding, dilation) + bias + conv_same(h_{t-1}, recurrent_kernel)
    i, f, o = rec_act(g_i), rec_act(g_f), rec_act(g_o)
    c_t = f * c_{t-1} + i * act(g_c);   h_t = o * act(c_t)

The recurrent convolution is always "same"-padded with stride 1 and no dilation, as in Keras.

The whole sequence is one recorded command buffer and one queue submit, on the dense convolution
kernels (vkconv/ops/conv/kernels.py): the input convolution of all N*T frames as one ordinary
convolution (batch N*T, bias added, no activation) into the input gates ``[N, T, 4F, H', W']``, on
Winograd where a ``vkconv.Conv`` of its shape would take it, else on the implicit GEMM
(:class:`~vkconv.ops.conv.kernels.RowsKernel`, conv_rows.comp); then one implicit-GEMM dispatch per
time step, the recurrent convolution of h_{t-1} with the gates fused into its store
(conv_rows_lstm: it reads the input gates and c_{t-1}, writes c_t and h_t; docs/PERFORMANCE.md has
the figures).  Both kernels' weights are reordered so that output channel ``4 * filter + gate`` holds
gate i, f, c or o of a filter: a register tile of MB (a multiple of 4) channels then holds whole
filters.  h_t is written twice, into the output and into one of two zero-padded, row-aligned
state buffers (the layout the kernel reads without a pack pass) taking turns as the next step's
input; the cell state stays in a device buffer.

The step's register tile and local size and the input convolution's family and tile are one
:class:`ConvLSTMCandidate` per (input shape, initial state or not): forced, from the tuning cache,
measured by the tuner (:func:`vkconv.ops.tune.search`, each candidate timed as one whole forward)
or from the heuristics (the tables' tile, lowered for a small step by
:func:`~vkconv.kernels.tiling.parallel_tuning`), as :class:`vkconv.Conv` chooses its kernel.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.activation import Activation
from vkconv.kernels.tiling import parallel_tuning, tuning
from vkconv.ops.base import DeviceOp
from vkconv.ops.conv.kernels import Geometry, RowsKernel, WinogradKernel
from vkconv.ops.conv.selection import Candidate, eligible, local_sizes, register_tiles, resolve, select
from vkconv.ops.tune import (
    Agreement,
    Choice,
    TimedPlan,
    TuneResult,
    budget_ms,
    cached_candidate,
    measured_choice,
    search,
    store_result,
    tune_mode,
)
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.context import Context
from vkconv.runtime.plan import Plan, closed_on_error
from vkconv.runtime.transfer import upload_constant

log = logging.getLogger(__name__)

_SIGMOID, _HARD_SIGMOID = Activation.parse("Sigmoid").kind, Activation.parse("HardSigmoid").kind

# Keras activation names -> vkconv activation specs.  Keras 3's hard_sigmoid is relu6(x + 3) / 6,
# not ONNX's default slope 0.2 (Keras 2's); pass ("HardSigmoid", 0.2, 0.5) for that one.
KERAS_ACTIVATIONS = {
    "linear": None,
    "tanh": "Tanh",
    "sigmoid": "Sigmoid",
    "relu": "Relu",
    "relu6": ("Clip", 0.0, 6.0),
    "hard_sigmoid": ("HardSigmoid", 1.0 / 6.0, 0.5),
    "hard_silu": "HardSwish",
    "hard_swish": "HardSwish",
    "leaky_relu": ("LeakyRelu", 0.2),
}


def keras_activation(name: str, spec) -> Activation:
    """A Keras activation name (see :data:`KERAS_ACTIVATIONS`), or any
    :meth:`vkconv.Activation.parse` spec such as ``("HardSigmoid", 0.2, 0.5)``."""
    if isinstance(spec, str) and spec.lower() in KERAS_ACTIVATIONS:
        return Activation.parse(KERAS_ACTIVATIONS[spec.lower()])
    try:
        return Activation.parse(spec)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}; Keras names: {', '.join(KERAS_ACTIVATIONS)}") from None


def gate_major(kernel: np.ndarray) -> np.ndarray:
    """Keras ``[kh, kw, C, 4F]`` (gate-major: channel ``gate * F + filter``) -> ONNX
    ``[4F, C, kh, kw]`` with channel ``4 * filter + gate``, gates i, f, c, o."""
    kh, kw, cin, four_f = kernel.shape
    gates = kernel.reshape(kh, kw, cin, 4, four_f // 4).transpose(4, 3, 2, 0, 1)  # [F, 4, C, kh, kw]
    return np.ascontiguousarray(gates.reshape(four_f, cin, kh, kw))


def output_shape(x_shape: Sequence[int], kernel_shape: Sequence[int], *, padding: str = "same",
                 strides=1, dilation=1, return_sequences: bool = True) -> tuple[int, ...]:
    """Output shape for ``x_shape`` ``[N, T, C, H, W]`` and a Keras kernel shape, without a device.

    Unknown dimensions (<= 0, as OpenCV reports dynamic ones while importing a model) stay unknown.
    ValueError names the argument when the shapes do not fit together.
    """
    geo = _Geometry(x_shape, kernel_shape, padding, strides, dilation, unknown_ok=True)
    return geo.output(return_sequences)


class _Geometry:
    """Input-convolution sizes and pads of one input shape (Keras' "same" = ONNX SAME_UPPER).

    With ``unknown_ok``, dimensions <= 0 are unknown: unchecked, and unknown in the output.
    """

    def __init__(self, x_shape, kernel_shape, padding, strides, dilation, *, unknown_ok: bool = False):
        x_shape, kernel_shape = tuple(int(s) for s in x_shape), tuple(int(s) for s in kernel_shape)
        if len(x_shape) != 5:
            raise ValueError(f"x: expected rank 5 (N, T, C, H, W), got shape {x_shape}")
        kh, kw, cin, four_f = kernel_shape
        known = [s > 0 or not unknown_ok for s in x_shape]
        if known[2] and x_shape[2] != cin:
            raise ValueError(f"x: {x_shape[2]} channels, but kernel {kernel_shape} expects {cin}")
        if known[1] and x_shape[1] < 1:
            raise ValueError(f"x: needs at least one time step, got shape {x_shape}")
        mode = {"same": "SAME_UPPER", "valid": "VALID"}.get(str(padding).lower())
        if mode is None:
            raise ValueError(f"padding: expected 'same' or 'valid', got {padding!r}")
        self.strides = shapes.spatial("strides", strides, 2, minimum=1)
        self.dilation = shapes.spatial("dilation", dilation, 2, minimum=1)
        self.n, self.steps, self.cin = x_shape[:3]
        self.in_hw = x_shape[3:]
        self.filters = four_f // 4
        pads = shapes.resolve_auto_pad(mode, self.in_hw, (kh, kw), self.strides, self.dilation)
        assert pads is not None  # None only for NOTSET
        self.pads = pads
        self.out_hw = tuple(shapes.conv_out_size(s, k, st, self.pads[i], self.pads[i + 2], d) if ok else s
                            for i, (s, k, st, d, ok) in enumerate(zip(self.in_hw, (kh, kw), self.strides,
                                                                      self.dilation, known[3:])))
        if any(o < 1 for o, ok in zip(self.out_hw, known[3:]) if ok):
            raise ValueError(f"x: frames of {self.in_hw} are smaller than the dilated kernel {(kh, kw)} "
                             f"(dilation {self.dilation}, padding {padding!r}); output would be "
                             f"{self.out_hw}")

    def output(self, return_sequences: bool) -> tuple[int, ...]:
        state = (self.filters, *self.out_hw)
        return (self.n, self.steps, *state) if return_sequences else (self.n, *state)


INPUT_FAMILIES = ("winograd", "implicit_gemm")  # the input convolution's kernel families


@dataclass(frozen=True)
class ConvLSTMCandidate:
    """One way to run a ConvLSTM2D shape (None, or a field of 0 / None: chosen by the heuristics,
    as without tuning), as :class:`~vkconv.ops.conv.selection.Candidate` s of the two convolutions.

    ``step``: the recurrent step's kernel (``implicit_gemm``: its MB x PB register tile, MB a
    multiple of 4 so that a tile holds whole filters, and its local size); ``input``: the input
    convolution's family (``winograd`` or ``implicit_gemm``), register tile and local size.
    """

    step: Candidate | None = None
    input: Candidate | None = None

    def __post_init__(self):
        if self.step is not None and self.step.kernel != "implicit_gemm":
            raise ValueError(f"candidate: the recurrent step runs on implicit_gemm, got {self.step.label()!r}")
        if self.input is not None and self.input.kernel not in INPUT_FAMILIES:
            raise ValueError(f"candidate: the input convolution runs on {' or '.join(INPUT_FAMILIES)}, "
                             f"got {self.input.label()!r}")

    def label(self) -> str:
        """Short text for tables and logs: the step's tile and local size, then the input
        convolution's family and tile, e.g. ``lstm 4x8 ls64 + winograd 16x16``."""
        step = "" if self.step is None else dataclasses.replace(self.step, texel=None).label()
        parts = ["lstm", step.removeprefix("implicit_gemm").strip()]
        if self.input is not None:
            family = "igemm" if self.input.kernel == "implicit_gemm" else self.input.kernel
            tile = f" {self.input.mb}x{self.input.pb}" if self.input.mb or self.input.pb else ""
            parts.append(f"+ {family}{tile}")
        return " ".join(p for p in parts if p)

    def to_json(self) -> dict:
        record: dict = {"op": "ConvLSTM2D"}
        record |= {k: c.to_json() for k, c in (("step", self.step), ("input", self.input)) if c is not None}
        return record

    @classmethod
    def from_json(cls, record: object) -> ConvLSTMCandidate:
        """The candidate :meth:`to_json` wrote; ValueError for anything else."""
        if not isinstance(record, dict) or record.get("op") != "ConvLSTM2D":
            raise ValueError(f"not a ConvLSTM2D candidate: {record!r}")
        step, inp = (None if record.get(k) is None else Candidate.from_json(record[k]) for k in ("step", "input"))
        return cls(step, inp)


class ConvLSTM2D(DeviceOp):
    """A ConvLSTM2D layer whose weights stay on the device; call it with ``[N, T, C, H, W]``.

    ``padding``: ``"same"`` or ``"valid"`` (input convolution only). ``activation``: the cell
    activation, ``recurrent_activation``: ``"sigmoid"`` or ``"hard_sigmoid"`` (Keras 3's,
    ``relu6(x + 3) / 6``) or ``("HardSigmoid", alpha, beta)``; see :func:`keras_activation`.
    The first call at a new input shape records a command buffer; later calls reuse it.

    How a shape runs (the recurrent step's register tile and local size, the input convolution's
    family and register tile: a :class:`ConvLSTMCandidate`) is, as for :class:`vkconv.Conv`:
    forced by ``candidate`` (what it leaves None / 0 is chosen by the heuristics); else from the
    tuning cache (``VKCONV_TUNE=cache``, the default, or ``1``); else measured now when ``tune`` is
    True (or ``VKCONV_TUNE=1``) and stored in the cache; else the heuristics.
    :meth:`choice_for` says which candidate runs a shape and where the choice came from.
    """

    def __init__(self, kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray | None = None,
                 *, padding: str = "same", strides=1, dilation=1, return_sequences: bool = True,
                 activation="tanh", recurrent_activation="sigmoid", ctx: Context | None = None,
                 tune: bool | str | None = None, candidate: ConvLSTMCandidate | None = None):
        kernel = shapes.as_float32("kernel", kernel, 4)
        if str(padding).lower() not in ("same", "valid"):
            raise ValueError(f"padding: expected 'same' or 'valid', got {padding!r}")
        self.padding = str(padding).lower()
        self.strides = shapes.spatial("strides", strides, 2, minimum=1)
        self.dilation = shapes.spatial("dilation", dilation, 2, minimum=1)
        self.return_sequences = bool(return_sequences)
        self.activation = keras_activation("activation", activation)
        self.recurrent_activation = keras_activation("recurrent_activation", recurrent_activation)
        if self.recurrent_activation.kind not in (_SIGMOID, _HARD_SIGMOID):
            raise ValueError(f"recurrent_activation: expected sigmoid or hard_sigmoid, got "
                             f"{recurrent_activation!r}")
        self.tune_mode = tune_mode(tune)
        self.forced = candidate
        super().__init__(ctx)
        # fp32 weights even under VKCONV_FP16=1: the rounding would compound over the time steps.
        self.tuning = tuning(self.ctx, fp16=False)
        # The two convolutions' gate-major weights (ONNX layout lifted to 3-D), bias and activation,
        # and their kernels by role and resolved candidate (:meth:`_kernel`), uploaded on first use.
        self._weights: dict[str, tuple[np.ndarray, np.ndarray | None, Activation]] = {}
        self._kernels: dict[tuple[str, Candidate], RowsKernel | WinogradKernel] = {}
        self._choices: dict[tuple[tuple[int, ...], bool], Choice[ConvLSTMCandidate]] = {}
        self._last_state: dict[tuple[int, ...], bool] = {}  # input shape -> with_state, as last run
        self.kernel_shape: tuple[int, ...] | None = None
        self.recurrent_shape: tuple[int, ...] | None = None
        self.set_weights(kernel, recurrent_kernel, bias)

    # -- weights -------------------------------------------------------------------------------
    def set_weights(self, kernel: np.ndarray, recurrent_kernel: np.ndarray,
                    bias: np.ndarray | None = None) -> None:
        """Replace the weights by arrays of the same shapes (Keras layouts); plans are rebuilt."""
        kernel = shapes.as_float32("kernel", kernel, 4)
        recurrent_kernel = shapes.as_float32("recurrent_kernel", recurrent_kernel, 4)
        kh, kw, cin, four_f = kernel.shape
        if min(kernel.shape) < 1 or four_f % 4:
            raise ValueError(f"kernel: expected [kh, kw, C, 4 * filters] with every dimension >= 1, "
                             f"got {kernel.shape}")
        f = four_f // 4
        rkh, rkw, rin, rout = recurrent_kernel.shape
        if rin != f or rout != four_f or rkh < 1 or rkw < 1:
            raise ValueError(f"recurrent_kernel: expected [kh, kw, {f}, {four_f}] for {f} filters, "
                             f"got {recurrent_kernel.shape}")
        if bias is not None:
            bias = shapes.as_float32("bias", bias, 1)
            if bias.shape[0] != four_f:
                raise ValueError(f"bias: expected {four_f} values (4 gates x {f} filters), "
                                 f"got {bias.shape[0]}")
        if self.kernel_shape is not None and (kernel.shape, recurrent_kernel.shape) != (
                self.kernel_shape, self.recurrent_shape):
            raise ValueError(f"kernel: shapes {kernel.shape}, {recurrent_kernel.shape} differ from this "
                             f"layer's {self.kernel_shape}, {self.recurrent_shape}")
        gate_bias = None if bias is None else np.ascontiguousarray(bias.reshape(4, f).T.reshape(-1))
        with self._lock:
            self._release()
            self.kernel_shape, self.recurrent_shape = kernel.shape, recurrent_kernel.shape
            self.filters = f
            # The input convolution has no activation: its gates are activated in the step's store,
            # where the recurrent kernel's activation is the cell activation.
            self._weights = {"input": (gate_major(kernel)[:, :, None], gate_bias, Activation()),
                             "recurrent": (gate_major(recurrent_kernel)[:, :, None], None, self.activation)}

    # -- shapes --------------------------------------------------------------------------------
    def _geometry(self, x_shape) -> _Geometry:
        return _Geometry(x_shape, self.kernel_shape, self.padding, self.strides, self.dilation)

    def output_shape(self, x_shape) -> tuple[int, ...]:
        """Output shape for an input of ``x_shape``; ValueError if the input does not fit.
        Unknown dimensions (<= 0) stay unknown."""
        assert self.kernel_shape is not None  # set in __init__
        return output_shape(x_shape, self.kernel_shape, padding=self.padding, strides=self.strides,
                            dilation=self.dilation, return_sequences=self.return_sequences)

    def check_state(self, x_shape, state_shapes: Sequence[Sequence[int]], *, unknown_ok: bool = False) -> None:
        """ValueError unless ``state_shapes`` is empty (zero initial state) or the shapes of
        ``(h0, c0)``, each ``[N, F, H', W']`` for an input of ``x_shape``.  With ``unknown_ok``,
        unknown dimensions (<= 0) are not checked."""
        if len(state_shapes) not in (0, 2):
            raise ValueError("initial_state: expected (h0, c0) or None")
        out = self.output_shape(x_shape)
        state = (out[0], self.filters, *out[-2:])
        for name, s in zip(("initial_state[0] (h0)", "initial_state[1] (c0)"), state_shapes):
            s = tuple(int(d) for d in s)
            if len(s) != 4 or any(a != b and not (unknown_ok and min(a, b) <= 0) for a, b in zip(s, state)):
                raise ValueError(f"{name}: expected shape {state}, got {s}")

    # -- execution -----------------------------------------------------------------------------
    def __call__(self, x: np.ndarray, initial_state=None) -> np.ndarray:
        """Run the sequence ``x`` ``[N, T, C, H, W]``; ``initial_state`` is ``(h0, c0)``, each
        ``[N, F, H', W']``, or None for zeros."""
        x = shapes.as_float32("x", x, 5)
        geo = self._geometry(x.shape)
        states = []
        if initial_state is not None:
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                raise ValueError("initial_state: expected (h0, c0) or None")
            states = [shapes.as_float32(name, s, 4)
                      for name, s in zip(("initial_state[0] (h0)", "initial_state[1] (c0)"), initial_state)]
            self.check_state(x.shape, [s.shape for s in states])
        if geo.n == 0:
            return np.zeros(geo.output(self.return_sequences), np.float32)
        with self._lock:
            return self._plan(x.shape, geo, bool(states)).run([x, *states])[0]

    def plan(self, x_shape: Sequence[int], with_state: bool) -> Plan:
        """The recorded plan for ``x`` of ``x_shape`` ``[N, T, C, H, W]`` (N >= 1) and, with
        ``with_state``, ``h0`` and ``c0`` ``[N, F, H', W']``; its inputs are in that order and its
        ``body`` records the dispatches alone, leaving the inputs unchanged (device graphs replay it)."""
        x_shape = tuple(int(s) for s in x_shape)
        geo = self._geometry(x_shape)
        with self._lock:
            return self._plan(x_shape, geo, with_state)

    def _plan(self, x_shape: tuple[int, ...], geo: _Geometry, with_state: bool) -> Plan:
        self._last_state[x_shape] = with_state

        def build() -> Plan:
            return self._build_plan(geo, with_state, self._choice(x_shape, with_state).candidate)
        return self._plans.get((x_shape, with_state), build)

    # -- kernel choice -------------------------------------------------------------------------
    def choice_for(self, x_shape: Sequence[int], with_state: bool | None = None) -> Choice[ConvLSTMCandidate]:
        """The candidate a call with ``x`` of ``x_shape`` (and an initial state or not; None: as
        this op last ran that shape, else without) runs and where it came from: ``forced``,
        ``cache``, ``tuner`` or ``heuristic`` (with ``tune`` on, a shape the cache lacks is tuned
        here).  ValueError if a forced candidate cannot run it."""
        x_shape = tuple(int(s) for s in x_shape)
        self._geometry(x_shape)
        with self._lock:
            return self._choice(x_shape, self._state(x_shape, with_state))

    def choices(self) -> dict[tuple[int, ...], Choice[ConvLSTMCandidate]]:
        """Input shape -> choice, for every shape this op has chosen for (the state variant it
        last ran; ``vkconv tune`` and ``vkconv run --debug`` list these)."""
        with self._lock:
            return {x: c for (x, s), c in self._choices.items() if self._last_state.get(x, False) == s}

    def signature(self, x_shape: Sequence[int], with_state: bool | None = None) -> str:
        """The tuning cache's key for ``x`` of ``x_shape`` with an initial state or not (None: as
        in :meth:`choice_for`): everything the candidates' speed depends on."""
        x_shape = tuple(int(s) for s in x_shape)
        self._geometry(x_shape)
        return self._signature(x_shape, self._state(x_shape, with_state))

    def _state(self, x_shape: tuple[int, ...], with_state: bool | None) -> bool:
        return self._last_state.get(x_shape, False) if with_state is None else bool(with_state)

    def _signature(self, x_shape: tuple[int, ...], with_state: bool) -> str:
        def t(v) -> str:
            return ",".join(map(str, v))
        assert self.kernel_shape is not None and self.recurrent_shape is not None  # set in __init__
        return (f"ConvLSTM2D x={t(x_shape)} k={t(self.kernel_shape)} rk={t(self.recurrent_shape)} "
                f"pad={self.padding} s={t(self.strides)} d={t(self.dilation)} "
                f"seq={int(self.return_sequences)} state={int(with_state)} texel={int(self.tuning.texel)}")

    def _choice(self, x_shape: tuple[int, ...], with_state: bool) -> Choice[ConvLSTMCandidate]:
        choice = self._choices.get((x_shape, with_state))
        if choice is None:
            choice = self._choices[(x_shape, with_state)] = self._choose(x_shape, with_state)
            log.debug("conv_lstm %s x%s state=%d: %s", self.kernel_shape, x_shape, with_state, choice)
        return choice

    def _choose(self, x_shape: tuple[int, ...], with_state: bool) -> Choice[ConvLSTMCandidate]:
        convs = self._convs(self._geometry(x_shape))
        if self.forced is not None:
            cand = self._resolve(self.forced, convs)
            reason = self._unusable(cand, convs)
            if reason is not None:
                raise ValueError(f"candidate: {cand.label()!r} cannot run x of shape {x_shape}: {reason}")
            return Choice(cand, "forced")
        return measured_choice(self.tune_mode, lambda: self._cached(x_shape, with_state, convs),
                               lambda: self._autotune(x_shape, with_state, budget_ms()).best,
                               lambda: self._resolve(ConvLSTMCandidate(), convs))

    def _convs(self, geo: _Geometry) -> tuple[Geometry, Geometry]:
        """The input convolution (all N*T frames, into ``[N*T, 4F, H', W']``) and the recurrent
        one (h_{t-1} ``[N, F, H', W']`` "same"-padded, into ``[N, 4F, H', W']``)."""
        assert self.kernel_shape is not None and self.recurrent_shape is not None  # set in __init__
        frames, f = geo.n * geo.steps, self.filters
        input_geo = Geometry.lift((frames, geo.cin, *geo.in_hw), (4 * f, geo.cin, *self.kernel_shape[:2]), 1,
                                  self.strides, self.dilation, geo.pads, (frames, 4 * f, *geo.out_hw))
        rk = self.recurrent_shape[:2]
        rpads = shapes.resolve_auto_pad("SAME_UPPER", geo.out_hw, rk, (1, 1), (1, 1))
        assert rpads is not None  # None only for NOTSET
        rec_geo = Geometry.lift((geo.n, f, *geo.out_hw), (4 * f, f, *rk), 1, (1, 1), (1, 1), rpads,
                                (geo.n, 4 * f, *geo.out_hw))
        return input_geo, rec_geo

    def _resolve_conv(self, cand: Candidate, geo: Geometry, max_tile: int | None = None) -> Candidate:
        """``cand`` resolved for ``geo``; a tile it leaves open is the tables' within ``max_tile``,
        by default the device's bound lowered for a small dispatch (:func:`parallel_tuning`)."""
        base = dataclasses.replace(self.tuning, local_size=cand.local_size or self.tuning.local_size)
        if max_tile is None:
            base = parallel_tuning(base, math.prod(geo.y_shape))
        else:
            base = dataclasses.replace(base, max_tile=max_tile)
        return resolve(self.ctx, cand, geo, base)

    def _resolve(self, cand: ConvLSTMCandidate, convs: tuple[Geometry, Geometry]) -> ConvLSTMCandidate:
        """``cand`` with every choice it leaves to the heuristics filled in: the step on the tables'
        tile, lowered for a small step (a time step's dispatch spread over the device); the input
        convolution on Winograd where :func:`~vkconv.ops.conv.selection.select` says it pays (as a
        ``vkconv.Conv`` of its shape would) and its buffers fit, else on the implicit GEMM."""
        input_geo, rec_geo = convs
        step = self._resolve_conv(cand.step or Candidate("implicit_gemm"), rec_geo)
        inp = cand.input
        if inp is None:
            inp = Candidate("implicit_gemm")
            if select(input_geo, self.ctx.info.type) in ("winograd", "winograd63"):  # F(4,3) for both
                winograd = self._resolve_conv(Candidate("winograd"), input_geo)
                if self._kernel("input", winograd).fits(input_geo):
                    inp = winograd
        return ConvLSTMCandidate(step, self._resolve_conv(inp, input_geo))

    def _unusable(self, cand: ConvLSTMCandidate, convs: tuple[Geometry, Geometry]) -> str | None:
        """Why resolved candidate ``cand`` cannot run the shape of ``convs`` here (None if it can)."""
        sizes = local_sizes(self.ctx, "implicit_gemm")
        for role, name, c, geo in (("recurrent", "step", cand.step, convs[1]),
                                   ("input", "input convolution", cand.input, convs[0])):
            assert c is not None  # resolved
            if c.kernel == "winograd" and eligible("winograd", geo) is not None:
                return f"{name}: winograd {eligible('winograd', geo)}"
            if c.local_size not in sizes:
                return f"{name}: local size {c.local_size} is not one of {sizes} here"
            tiles = register_tiles(c.kernel, self.tuning)
            if (c.mb, c.pb) not in tiles:
                return f"{name}: register tile {c.mb}x{c.pb} is not one of {tiles} here"
            if not self._kernel(role, c).fits(geo):
                return f"{name}: {c.kernel}'s buffers exceed the device's maxStorageBufferRange"
        return None

    def _cached(self, x_shape: tuple[int, ...], with_state: bool,
                convs: tuple[Geometry, Geometry]) -> ConvLSTMCandidate | None:
        """The cache's candidate for this shape, if it can run here (a corrupt entry, or one
        written under other limits, is ignored with a log line)."""
        return cached_candidate(self.ctx, self._signature(x_shape, with_state),
                                lambda record: self._resolve(ConvLSTMCandidate.from_json(record), convs),
                                lambda cand: self._unusable(cand, convs))

    def autotune(self, x_shape: Sequence[int], budget: float | None = None,
                 with_state: bool | None = None) -> TuneResult[ConvLSTMCandidate]:
        """Measure the candidates for ``x`` of ``x_shape`` (with an initial state or not; None: as
        in :meth:`choice_for`) now, whatever the cache holds and ``tune`` says; store the fastest
        in the tuning cache and use it from the next call on.  ``budget``: ms of wall time
        (default ``VKCONV_TUNE_BUDGET_MS``, else 2000)."""
        x_shape = tuple(int(s) for s in x_shape)
        self._geometry(x_shape)
        limit = budget_ms(budget)
        with self._lock:
            state = self._state(x_shape, with_state)
            result = self._autotune(x_shape, state, limit)
            self._choices[(x_shape, state)] = Choice(result.best, "tuner")
            self._plans.drop((x_shape, state))
        return result

    def _autotune(self, x_shape: tuple[int, ...], with_state: bool, limit: float) -> TuneResult[ConvLSTMCandidate]:
        """:func:`vkconv.ops.tune.search` over this shape's candidates, each timed as one whole
        forward (input convolution and every time step) on seeded random inputs; each candidate's
        output must match the heuristic choice's (a wrong one is never chosen).  Stages: the step's
        tile as the parallel bound would pick it under each cap (small tiles spread a small step
        over the device), the input convolution's family, the step's local size, the input
        convolution's tile, then the step's other tiles by the tables' speed."""
        geo = self._geometry(x_shape)
        convs = self._convs(geo)
        input_geo, rec_geo = convs
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal(x_shape, dtype=np.float32)]
        if with_state:
            arrays += [rng.standard_normal((geo.n, self.filters, *geo.out_hw), dtype=np.float32) for _ in range(2)]
        before = set(self._kernels)
        baseline = self._resolve(ConvLSTMCandidate(), convs)
        agreement = Agreement(baseline.label(), 1e-3)

        def measure(cand: ConvLSTMCandidate) -> TimedPlan | None:
            if self._unusable(cand, convs) is not None:
                return None
            return agreement.timed(self.ctx, self._build_plan(geo, with_state, cand), arrays, cand.label())

        def step(best: ConvLSTMCandidate, c: Candidate) -> ConvLSTMCandidate:
            return dataclasses.replace(best, step=c)

        def step_caps(best: ConvLSTMCandidate) -> list[ConvLSTMCandidate]:
            assert best.step is not None  # resolved
            # nearest to the best tile's size first: the budget may stop the walk part way
            area = best.step.mb * best.step.pb
            caps = [16 << i for i in range(8) if 16 << i < self.tuning.max_tile] + [self.tuning.max_tile]
            caps.sort(key=lambda cap: abs(math.log2(cap / area)))
            ls = best.step.local_size
            return [step(best, self._resolve_conv(Candidate("implicit_gemm", local_size=ls), rec_geo, cap))
                    for cap in caps]

        def families(best: ConvLSTMCandidate) -> list[ConvLSTMCandidate]:
            return [dataclasses.replace(best, input=self._resolve_conv(Candidate(name), input_geo))
                    for name in INPUT_FAMILIES if eligible(name, input_geo) is None]

        def step_sizes(best: ConvLSTMCandidate) -> list[ConvLSTMCandidate]:
            assert best.step is not None  # resolved
            return [step(best, dataclasses.replace(best.step, local_size=n))
                    for n in local_sizes(self.ctx, "implicit_gemm")]

        def input_tiles(best: ConvLSTMCandidate) -> list[ConvLSTMCandidate]:
            assert best.input is not None  # resolved
            return [dataclasses.replace(best, input=dataclasses.replace(best.input, mb=mb, pb=pb))
                    for mb, pb in register_tiles(best.input.kernel, self.tuning)[:6]]

        def step_tiles(best: ConvLSTMCandidate) -> list[ConvLSTMCandidate]:
            assert best.step is not None  # resolved
            return [step(best, dataclasses.replace(best.step, mb=mb, pb=pb))
                    for mb, pb in register_tiles("implicit_gemm", self.tuning)[:6]]

        result = search(baseline, [step_caps, families, step_sizes, input_tiles, step_tiles], measure, limit)
        keep = {("recurrent", result.best.step), ("input", result.best.input)}
        for key in set(self._kernels) - before - keep:  # the losers' packed weights
            self._kernels.pop(key).close()
        store_result(self.ctx, self._signature(x_shape, with_state), result, ConvLSTMCandidate.to_json, limit)
        return result

    def _kernel(self, role: str, cand: Candidate) -> RowsKernel | WinogradKernel:
        """The ``"input"`` or ``"recurrent"`` convolution's kernel for resolved candidate ``cand``
        (built on first use)."""
        kernel = self._kernels.get((role, cand))
        if kernel is None:
            w, b, act = self._weights[role]
            cls = WinogradKernel if cand.kernel == "winograd" else RowsKernel
            kernel = self._kernels[role, cand] = cls(self.ctx, w, b, 1, act, cand.tuning(self.tuning))
        return kernel

    def _build_plan(self, geo: _Geometry, with_state: bool, cand: ConvLSTMCandidate) -> Plan:
        """The plan that runs resolved candidate ``cand``."""
        n, steps, f = geo.n, geo.steps, self.filters
        plan = Plan(self.ctx, [], [("conv_lstm output", geo.output(self.return_sequences))])
        with closed_on_error(plan):  # a buffer past the device's limits, or too many workgroups
            # Texel-capable inputs: the convolution kernels may read them through texel views.
            inputs = [("conv_lstm input x", (n, steps, geo.cin, *geo.in_hw))]
            if with_state:
                inputs += [("conv_lstm h0", (n, f, *geo.out_hw)), ("conv_lstm c0", (n, f, *geo.out_hw))]
            for name, shape in inputs:
                plan.inputs.append(Buffer(self.ctx, 4 * math.prod(shape), staged=True, texel=True, name=name))
                plan.input_shapes.append(shape)
            self._record(plan, geo, with_state, cand)
        return plan

    def _record(self, plan: Plan, geo: _Geometry, with_state: bool, cand: ConvLSTMCandidate) -> None:
        ctx, n, steps, f = self.ctx, geo.n, geo.steps, self.filters
        assert cand.input is not None and cand.step is not None  # resolved
        hw = geo.out_hw[0] * geo.out_hw[1]
        y = plan.outputs[0]
        gx = Buffer(ctx, 4 * n * steps * 4 * f * hw, name="conv_lstm input gates")
        cell = Buffer(ctx, 4 * n * f * hw, name="conv_lstm cell state")
        plan.keep += [gx, cell]
        input_geo, rec_geo = self._convs(geo)
        input_conv = self._kernel("input", cand.input).record(plan, input_geo, plan.inputs[0], gx)

        recurrent = self._kernel("recurrent", cand.step)
        assert isinstance(recurrent, RowsKernel)  # only the input convolution may take Winograd
        pb, lay = recurrent.padded_layout(rec_geo)
        # Two state buffers taking turns; their padding must read as zeros, and nothing but the
        # pack of h0 (zeros there too) ever writes it, so they start zeroed once.
        zeros = np.zeros(lay.nbytes // 4, np.float32)
        if with_state:  # h0 packed into the first state buffer on every call
            first, pack_h0 = recurrent.pack(plan, rec_geo, lay, plan.inputs[1])
        else:
            first, pack_h0 = upload_constant(ctx, zeros, "conv_lstm hidden state", texel=True), None
            plan.keep.append(first)
        second = upload_constant(ctx, zeros, "conv_lstm hidden state", texel=True)
        plan.keep.append(second)
        step = recurrent.gate_steps(plan, rec_geo, pb, lay, (first, second), gx, cell, y,
                                    self.recurrent_activation)
        y_n = (steps if self.return_sequences else 1) * f * hw

        def body(cmd):
            if with_state:  # the cell state starts as a copy of c0: a device graph may read c0 again
                cmd.copy(plan.inputs[2].buffer, cell.buffer, cell.nbytes)
                pack_h0(cmd)  # ends with a barrier
            input_conv(cmd)
            for t in range(steps):
                cmd.barrier()
                step(cmd, t % 2, steps * 4 * f * hw, t * 4 * f * hw, y_n,
                     t * f * hw if self.return_sequences else 0, t > 0 or with_state)

        plan.record(body)

    # -- lifetime ------------------------------------------------------------------------------
    def _release(self) -> None:
        self._plans.clear()
        for kernel in self._kernels.values():
            kernel.close()
        self._kernels = {}


def conv_lstm2d(x: np.ndarray, kernel: np.ndarray, recurrent_kernel: np.ndarray,
                bias: np.ndarray | None, *, padding: str = "same", strides=1, dilation=1,
                return_sequences: bool = True, activation="tanh", recurrent_activation="sigmoid",
                initial_state=None) -> np.ndarray:
    """Keras 3 ``ConvLSTM2D`` on the Vulkan device (see the module docstring for the equations).

    ``x``: ``[N, T, C, H, W]`` float32. ``kernel [kh, kw, C, 4F]``, ``recurrent_kernel
    [rkh, rkw, F, 4F]``, ``bias [4F]`` or None: Keras layouts, gates i, f, c, o. ``padding``:
    ``"same"`` or ``"valid"``; ``strides``/``dilation``: an int or two. ``initial_state``: ``(h0, c0)``
    each ``[N, F, H', W']``, or None for zeros. Returns ``[N, T, F, H', W']`` with
    ``return_sequences``, else the last hidden state ``[N, F, H', W']``. ValueError names a bad argument.
    """
    with ConvLSTM2D(kernel, recurrent_kernel, bias, padding=padding, strides=strides, dilation=dilation,
                    return_sequences=return_sequences, activation=activation,
                    recurrent_activation=recurrent_activation) as op:
        return op(x, initial_state)
