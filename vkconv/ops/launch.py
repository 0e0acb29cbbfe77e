"""Measured launch shapes for the grid-stride loop kernels (elementwise, pool, resize, transpose).

Each of these kernels covers ``count`` items with a loop, so any workgroup size and count runs it;
which is fastest depends on the device (on lavapipe 16-32 k invocations in all beat both fewer and
more; a GPU was never measured: docs/PERFORMANCE.md, "Elementwise and pool launch shapes").  A
:class:`LaunchCandidate` is one launch shape: ``local`` invocations per workgroup, at most ``cap``
workgroups.  The ops inherit :class:`LoopLaunch` and ask :meth:`LoopLaunch.loop_launch` for the
shape of each dispatch they record: the forced one (``op.launch``), else the tuning cache's entry
for (kernel, count bucket) on this device, else the heuristic (``LOOP_LOCAL`` invocations, at most
``CPU_LOOP_GROUPS`` / ``CPU_TRANSPOSE_GROUPS`` workgroups on CPU devices, the device's x limit
elsewhere).  :func:`tune_launch` (or ``VKCONV_TUNE=1`` / ``op.tune = True`` at record time) times
the candidates with :func:`vkconv.ops.tune.search` on a run of the op at the real shape and
stores the winner.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from vkconv.ops.tune import (
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
from vkconv.runtime.dispatch import CPU_LOOP_GROUPS, CPU_TRANSPOSE_GROUPS, LOOP_LOCAL, looped_grid
from vkconv.runtime.plan import Plan

log = logging.getLogger(__name__)

LOCALS = (64, 128, 256)
CAPS = (64, 256, 1024, 4096, 0)  # 0: no cap but the device's x limit

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LaunchCandidate:
    """A loop kernel's launch shape: ``local`` invocations per workgroup, at most ``cap``
    workgroups (0: the device's ``maxComputeWorkGroupCount[0]``)."""

    local: int
    cap: int = 0

    def __post_init__(self):
        if self.local < 1 or self.cap < 0:
            raise ValueError(f"launch: local must be >= 1 and cap >= 0, got {self}")

    def label(self) -> str:
        """Short text for tables and logs, e.g. ``128 x <=256``."""
        return f"{self.local} x <={self.cap}" if self.cap else f"{self.local} x any"

    def groups(self, ctx: Context, count: int) -> tuple[int, int, int]:
        """Workgroups covering ``count`` items (the kernel loops over the rest), at least one."""
        return looped_grid(ctx, count, self.local, self.cap)

    def to_json(self) -> dict:
        return {"local": self.local, "cap": self.cap}

    @classmethod
    def from_json(cls, record: object) -> LaunchCandidate:
        """The candidate :meth:`to_json` wrote; ValueError for anything else."""
        if not isinstance(record, dict) or not all(isinstance(record.get(k), int) for k in ("local", "cap")):
            raise ValueError(f"not a launch shape: {record!r}")
        return cls(record["local"], record["cap"])


def launch_candidates(ctx: Context) -> list[LaunchCandidate]:
    """Every launch shape the tuner may time on this device (local sizes it accepts)."""
    locals_ = sorted({ctx.local_size(v) for v in LOCALS})
    return [LaunchCandidate(local, cap) for cap in CAPS for local in locals_]


def heuristic_launch(ctx: Context, kernel: str) -> LaunchCandidate:
    """Today's rule: ``LOOP_LOCAL`` invocations; on CPU devices at most ``CPU_LOOP_GROUPS``
    workgroups (``CPU_TRANSPOSE_GROUPS`` for the transpose kernel), elsewhere no cap."""
    cpu_cap = CPU_TRANSPOSE_GROUPS if kernel == "transpose" else CPU_LOOP_GROUPS
    return LaunchCandidate(ctx.local_size(LOOP_LOCAL), cpu_cap if ctx.info.type == "cpu" else 0)


def launch_signature(kernel: str, count: int) -> str:
    """The tuning cache's key: the kernel (shader) name and the count's power-of-two bucket
    (``count`` in [2^(b-1), 2^b)); a shape tuned at one count serves its bucket."""
    return f"launch {kernel} n<2^{max(1, int(count)).bit_length()}"


class Launch(NamedTuple):
    """A recorded loop dispatch: the kernel (shader) name, the items its loop covers, the op's
    input shapes and the launch shape's :class:`~vkconv.ops.tune.Choice`."""

    kernel: str
    items: int
    in_shapes: tuple[Shape, ...]
    choice: Choice[LaunchCandidate]


class LoopLaunch:
    """What a loop-kernel op inherits: ``launch`` forces a launch shape (None: cache, else the
    heuristic), ``tune`` is the op's tuning request (True / False / None = ``VKCONV_TUNE``, as in
    :func:`vkconv.ops.tune.tune_mode`), and :meth:`loop_launch` resolves the shape of a dispatch.
    The op's ``record(cmd, inputs, outputs, in_shapes)`` must record one loop dispatch through it."""

    ctx: Context
    launch: LaunchCandidate | None = None
    tune: bool | str | None = None
    last_launch: Launch | None = None  # the last dispatch recorded, for tune_launch and `vkconv tune`

    def loop_launch(self, kernel: str, count: int, in_shapes: Sequence[Shape]) -> LaunchCandidate:
        """The launch shape of this op's ``kernel`` dispatch over ``count`` items, inputs of
        ``in_shapes``; with tuning on, a bucket the cache lacks is tuned here (on separate plans)."""
        choice = self._launch_choice(kernel, count, in_shapes)
        self.last_launch = Launch(kernel, int(count), tuple(tuple(int(d) for d in s) for s in in_shapes), choice)
        return choice.candidate

    def _launch_choice(self, kernel: str, count: int, in_shapes: Sequence[Shape]) -> Choice[LaunchCandidate]:
        if self.launch is not None:
            return Choice(self.launch, "forced")
        return measured_choice(tune_mode(self.tune), lambda: cached_launch(self.ctx, kernel, count),
                               lambda: tune_launch(self, in_shapes).best, lambda: heuristic_launch(self.ctx, kernel))


def cached_launch(ctx: Context, kernel: str, count: int) -> LaunchCandidate | None:
    """The cache's launch shape for ``kernel`` at ``count`` items, if it is valid on this device."""
    return cached_candidate(ctx, launch_signature(kernel, count), LaunchCandidate.from_json,
                            lambda cand: None if cand.local == ctx.local_size(cand.local)
                            else f"{cand.local} invocations per workgroup do not fit")


def _run_plan(op: LoopLaunch, in_shapes: Sequence[Shape], arrays: Sequence[np.ndarray]) -> tuple[Plan, np.ndarray]:
    """``op`` recorded into its own plan at ``in_shapes`` and run once on ``arrays``: the plan and
    its output."""
    out_shapes = op.output_shapes(in_shapes)  # type: ignore[attr-defined]
    plan = Plan(op.ctx, [(f"input {i}", s) for i, s in enumerate(in_shapes)],
                [(f"output {i}", s) for i, s in enumerate(out_shapes)])
    try:
        plan.record(lambda cmd: plan.keep.extend(op.record(cmd, plan.inputs, plan.outputs,  # type: ignore[attr-defined]
                                                           in_shapes)))
        return plan, plan.run(arrays)[0]
    except BaseException:
        plan.close()
        raise


def tune_launch(op: LoopLaunch, in_shapes: Sequence[Shape], budget: float | None = None) -> TuneResult[LaunchCandidate]:
    """Time ``op``'s launch shapes at inputs of ``in_shapes`` (seeded random float32 data) with
    :func:`vkconv.ops.tune.search`: the heuristic first, then the workgroup caps, the local sizes
    of the best, the caps again; every candidate's output must equal the heuristic's bit for bit.  The
    winner goes to the tuning cache under (kernel, count bucket).  ``budget``: ms of wall time
    (default ``VKCONV_TUNE_BUDGET_MS``, else 2000).  ValueError when ``op`` records no loop
    kernel at these shapes (a global pool, a transpose that is a plain copy)."""
    in_shapes = [tuple(int(d) for d in s) for s in in_shapes]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s, dtype=np.float32) for s in in_shapes]
    limit = budget_ms(budget)
    saved = op.launch, op.tune, op.last_launch
    try:
        op.launch, op.tune, op.last_launch = None, "0", None  # the probe runs the heuristic, tunes nothing
        plan, expected = _run_plan(op, in_shapes, arrays)
        plan.close()
        if op.last_launch is None:
            raise ValueError(f"{type(op).__name__} records no loop kernel at {in_shapes}")
        kernel, count = op.last_launch.kernel, op.last_launch.items
        baseline = heuristic_launch(op.ctx, kernel)

        def measure(cand: LaunchCandidate) -> TimedPlan:
            op.launch = cand
            plan, got = _run_plan(op, in_shapes, arrays)
            try:
                if not np.array_equal(got, expected, equal_nan=True):
                    raise ValueError(f"launch {cand.label()} gave a different result from {baseline.label()}")
                return TimedPlan(op.ctx, plan)  # re-records the body with op.launch still set
            except BaseException:
                plan.close()
                raise

        candidates = launch_candidates(op.ctx)

        def caps(best: LaunchCandidate) -> list[LaunchCandidate]:
            return [c for c in candidates if c.local == best.local and c.cap != best.cap]

        def locals_(best: LaunchCandidate) -> list[LaunchCandidate]:
            return [c for c in candidates if c.cap == best.cap and c.local != best.local]

        result = search(baseline, [caps, locals_, caps], measure, limit)
    finally:
        op.launch, op.tune, op.last_launch = saved
    store_result(op.ctx, launch_signature(kernel, count), result, LaunchCandidate.to_json, limit)
    log.debug("launch %s at %d items: %s %.3f ms (heuristic %.3f ms)", kernel, count, result.best.label(),
              result.best_ms, result.baseline_ms)
    return result
