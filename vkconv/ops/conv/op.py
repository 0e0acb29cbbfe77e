"""Dense convolution (ONNX ``Conv``) for 1-D, 2-D and 3-D inputs.

Layouts: input ``x`` is NCW, NCHW or NCDHW, weights ``w`` are ``[C_out, C_in / group, *kernel]``
with one kernel extent per spatial dim, bias ``b`` is ``[C_out]``, the output is NC[D][H]W; all
float32.  The kernel that runs is, per input shape (see :mod:`vkconv.ops.conv.kernels`):

- forced: ``kernel=`` or ``VKCONV_CONV_KERNEL``;
- from the tuning cache (``VKCONV_TUNE=cache``, the default, or ``1``): the candidate measured
  fastest on this device, driver and vkconv version (:mod:`vkconv.runtime.tunecache`);
- from the tuner (``tune=True`` or ``VKCONV_TUNE=1``, for a shape the cache lacks): measured now
  (:mod:`vkconv.ops.tune`) and stored in the cache;
- else by the heuristics: ``depthwise``, ``gemm1x1``, ``winograd``, ``implicit_gemm`` (CPU devices)
  or ``tiled`` (GPUs), with ``direct`` as the fallback when a kernel's scratch buffers would not fit.

:meth:`Conv.choice_for` says which candidate runs a shape and where the choice came from.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.tiling import tuning
from vkconv.ops.base import WeightedOp
from vkconv.ops.conv.kernels import KERNELS, Geometry, Kernel, make_kernel
from vkconv.ops.conv.selection import (
    ROWS_KERNELS,
    Candidate,
    eligible,
    local_sizes,
    resolve,
    search_plan,
    select,
    shared_unusable,
    tile_shapes,
)
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
from vkconv.runtime.context import Context
from vkconv.runtime.plan import Plan

log = logging.getLogger(__name__)

_NAMES = {1: "N, C, W", 2: "N, C, H, W", 3: "N, C, D, H, W"}


def _kernel_request(kernel: str | Candidate | None) -> Candidate | None:
    """The forced candidate (None: chosen per shape)."""
    if isinstance(kernel, Candidate):
        if kernel.kernel not in KERNELS:
            raise ValueError(f"kernel: unknown {kernel.kernel!r}; expected one of {', '.join(KERNELS)}")
        return kernel
    name = kernel if kernel is not None else os.environ.get("VKCONV_CONV_KERNEL", "") or "auto"
    if name != "auto" and name not in KERNELS:
        raise ValueError(f"kernel: unknown {name!r}; expected 'auto' or one of {', '.join(KERNELS)}")
    return None if name == "auto" else Candidate(name)


class Conv(WeightedOp):
    """A convolution whose weights stay on the device; call it with inputs of any batch/size.

    ``auto_pad`` (``NOTSET``, ``SAME_UPPER``, ``SAME_LOWER``, ``VALID``) overrides ``pads`` per input
    shape, as in ONNX.  The first call at a new input shape records a command buffer; later calls
    at that shape reuse it (one submit each, no Vulkan object created).  ``kernel`` forces a kernel
    (``"direct"``, ``"implicit_gemm"``, ``"gemm1x1"``, ``"depthwise"``, ``"winograd"``,
    ``"winograd63"``, ``"tiled"``; default ``VKCONV_CONV_KERNEL`` or ``"auto"``), or a whole
    :class:`~vkconv.ops.conv.selection.Candidate` (register tile, local size, reads); a forced
    kernel that cannot run a shape raises ValueError.
    ``fp16=True`` (default: ``VKCONV_FP16=1``) keeps the weights of the texel-buffer kernels
    (implicit_gemm, gemm1x1, depthwise; not winograd or winograd63, whose transforms would magnify
    the rounding) as float16 — half the weight memory and bandwidth;
    inputs, outputs and arithmetic stay float32, so results differ from fp32 weights by the weights'
    rounding (about 5e-4 relative each).
    ``tune``: True measures the candidates of each new input shape the tuning cache lacks (within
    ``VKCONV_TUNE_BUDGET_MS``) and stores the fastest; False uses the heuristics only; None (the
    default) follows ``VKCONV_TUNE`` (``cache``: a cached choice where there is one, never timing).
    """

    def __init__(self, w: np.ndarray, b: np.ndarray | None = None, *, strides=1, pads=0,
                 dilations=1, group: int = 1, activation=None, auto_pad: str = "NOTSET",
                 ctx: Context | None = None, kernel: str | Candidate | None = None, fp16: bool | None = None,
                 tune: bool | str | None = None):
        super().__init__(w, ranks=(3, 4, 5), strides=strides, pads=pads, dilations=dilations, group=group,
                         activation=activation, ctx=ctx)
        shapes.resolve_auto_pad(auto_pad, (1,) * self.nd, (1,) * self.nd, (1,) * self.nd,
                                (1,) * self.nd)  # validates the name
        self.auto_pad = auto_pad
        self.forced = _kernel_request(kernel)
        self.tune_mode = tune_mode(tune)
        self.tuning = tuning(self.ctx, fp16)
        self._kernels: dict[Candidate, Kernel] = {}
        self._choices: dict[tuple[int, ...], Choice[Candidate]] = {}  # by input shape
        self._w: np.ndarray | None = None
        self._b: np.ndarray | None = None
        self.set_weights(w, b)

    # -- weights -------------------------------------------------------------------------------
    def _adopt_weights(self, state) -> None:
        w, b = state
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
        """The kernel family a call with input shape ``x_shape`` runs (ValueError if a forced kernel
        cannot run it); :meth:`choice_for` gives the whole candidate and its source."""
        return self.choice_for(x_shape).candidate.kernel

    def choice_for(self, x_shape) -> Choice[Candidate]:
        """The candidate a call with input shape ``x_shape`` runs and where it came from (with
        ``tune`` on, a shape the cache lacks is tuned here)."""
        geo = self._geometry(x_shape)
        with self._lock:
            return self._choice(geo)

    def choices(self) -> dict[tuple[int, ...], Choice[Candidate]]:
        """Input shape -> choice, for every shape this Conv has chosen a kernel for."""
        with self._lock:
            return dict(self._choices)

    def signature(self, x_shape) -> str:
        """The tuning cache's key for input shape ``x_shape``: everything a kernel's speed depends on."""
        return self._signature(self._geometry(x_shape))

    def _signature(self, geo: Geometry) -> str:
        def t(v) -> str:
            return ",".join(map(str, v))
        return (f"Conv n={geo.n} g={geo.group} ci={geo.cin_g} co={geo.cout_g} size={t(geo.size)} "
                f"k={t(geo.kernel)} s={t(geo.strides)} d={t(geo.dilations)} pad={t(geo.pad_begin)}/"
                f"{t(geo.pad_end)} texel={int(self.tuning.texel)} fp16={int(self.tuning.fp16)}")

    def _choice(self, geo: Geometry) -> Choice[Candidate]:
        choice = self._choices.get(geo.x_shape)
        if choice is None:
            choice = self._choices[geo.x_shape] = self._choose(geo)
            log.debug("conv %s x%s: %s", self.weight_shape, geo.x_shape, choice)
        return choice

    def _choose(self, geo: Geometry) -> Choice[Candidate]:
        if self.forced is not None:
            reason = self._unusable(self.forced, geo)
            if reason is not None:
                raise ValueError(f"kernel: {self.forced.label()!r} cannot run x of shape {geo.x_shape}: {reason}")
            return Choice(self._resolve(self.forced, geo), "forced")
        return measured_choice(self.tune_mode, lambda: self._cached(geo),
                               lambda: self._autotune(geo, budget_ms()).best, lambda: self._heuristic(geo))

    def _resolve(self, cand: Candidate, geo: Geometry) -> Candidate:
        return resolve(self.ctx, cand, geo, self.tuning)

    def _heuristic(self, geo: Geometry) -> Candidate:
        cand = self._resolve(Candidate(select(geo, self.ctx.info.type)), geo)
        return cand if self._kernel(cand).fits(geo) else self._resolve(Candidate("direct"), geo)

    def _cached(self, geo: Geometry) -> Candidate | None:
        """The cache's candidate for ``geo``, if it can run here (a cache written under other limits
        or by another vkconv may hold one that cannot: it is ignored)."""
        return cached_candidate(self.ctx, self._signature(geo), Candidate.from_json,
                                lambda cand: self._unusable(cand, geo))

    def _unusable(self, cand: Candidate, geo: Geometry) -> str | None:
        """Why ``cand`` cannot run ``geo`` on this device (None if it can)."""
        reason = eligible(cand.kernel, geo)
        if reason is not None:
            return reason
        if cand.local_size and cand.local_size not in local_sizes(self.ctx, cand.kernel):
            return f"local size {cand.local_size} is not one of {local_sizes(self.ctx, cand.kernel)} here"
        if cand.tile is not None and cand.tile not in tile_shapes(self.ctx):
            return f"tile {cand.tile} exceeds this device's workgroup limits"
        if cand.shared:
            if cand.kernel not in ROWS_KERNELS:
                return f"shared input rows are for the kernels {', '.join(ROWS_KERNELS)}, not {cand.kernel}"
            reason = shared_unusable(self.ctx, cand.local_size or self.tuning.local_size)
            if reason is not None:
                return f"shared input rows: {reason}"
        if not self._kernel(cand).fits(geo):
            return "its scratch buffers exceed the device's storage buffer range"
        return None

    def autotune(self, x_shape, budget: float | None = None) -> TuneResult[Candidate]:
        """Measure the candidates for inputs of ``x_shape`` now (whatever the cache holds and
        ``tune`` says), store the fastest in the tuning cache and use it from the next call on.
        ``budget``: ms of wall time (default ``VKCONV_TUNE_BUDGET_MS``, else 2000)."""
        geo = self._geometry(x_shape)
        limit = budget_ms(budget)
        with self._lock:
            result = self._autotune(geo, limit)
            self._choices[geo.x_shape] = Choice(result.best, "tuner")
            self._plans.drop(geo.x_shape)
        return result

    def _autotune(self, geo: Geometry, limit: float) -> TuneResult[Candidate]:
        """:func:`vkconv.ops.tune.search` over this shape's candidates on seeded random data; each
        candidate's output must match the heuristic choice's (a wrong one is never chosen)."""
        x = np.random.default_rng(0).standard_normal(geo.x_shape, dtype=np.float32)
        before = set(self._kernels)
        tol = 1e-2 if self.tuning.fp16 else 1e-3

        def measure(cand: Candidate) -> TimedPlan | None:
            kernel = self._kernel(cand)
            if not kernel.fits(geo):
                return None
            return agreement.timed(self.ctx, kernel.plan(geo), [x], cand.label())

        baseline = self._heuristic(geo)
        agreement = Agreement(baseline.label(), tol)
        stages, prior = search_plan(self.ctx, geo, self.tuning)
        result = search(baseline, stages, measure, limit, prior)
        for cand in set(self._kernels) - before - {result.best}:  # the losers' weights
            self._kernels.pop(cand).close()
        store_result(self.ctx, self._signature(geo), result, Candidate.to_json, limit)
        return result

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
            return self._kernel(self._choice(geo).candidate).plan(geo)
        return self._plans.get(tuple(x_shape), build)

    def _kernel(self, cand: Candidate) -> Kernel:
        kernel = self._kernels.get(cand)
        if kernel is None:
            assert self._w is not None  # set_weights ran in __init__ and _release keeps it
            self.ctx.check()
            kernel = self._kernels[cand] = make_kernel(cand.kernel, self.ctx, self._w, self._b, self.group,
                                                       self.activation, cand.tuning(self.tuning))
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
