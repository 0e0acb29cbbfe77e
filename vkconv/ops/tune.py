"""Measured kernel choice: time an op's candidates on the device, keep the fastest.

An op that can run a shape more than one way (:class:`vkconv.Conv`: kernel family x register tile x
local size x texel or storage reads x tile shape) hands :func:`search` its heuristic choice (the
baseline), a list of *stages* and a way to time one candidate.  Each stage proposes variations of
the best candidate so far (families first, then register tiles, local sizes, texel reads: a greedy
walk, not the whole product, so a shape costs a few dozen timings at most).  Each candidate runs
once with real-shaped data (its output checked against the baseline's by the op), then once more
between GPU timestamps; one clearly slower than the best so far (``PRUNE``) stops there, the others
get two more timed runs and count by their fastest.  A candidate replaces the best only when it is
``MARGIN`` faster, and a final winner other than the heuristic choice must stay ``MARGIN`` faster in
a side-by-side rematch (both timed alternately ``REMATCH`` times, compared by their medians: a burst
of load hits both alike, where a fastest-of-three let one lucky run decide), so that noise alone
rarely moves the choice away from the heuristic.

Budget (``VKCONV_TUNE_BUDGET_MS``, default 2000 ms of wall time per shape, pipeline builds
included): a candidate starts only while the time spent plus its expected cost stays within it:
its ``prior`` times the best time so far, for two runs, or, where more, the median wall time of the
trials so far, builds and output checks included (on Mesa 25 a cold pipeline build of a large
layer took 0.3-0.8 s, and the runs alone let VGG-16's 224² and 112² shapes take 5.8 s each); the
baseline always runs.

``VKCONV_TUNE``: ``cache`` (default) uses a tuned choice when the cache has the shape and the
heuristics otherwise, never timing anything; ``1`` tunes shapes the cache lacks (and stores them);
``0`` ignores the cache.  An op's ``tune=True`` / ``False`` stands for ``1`` / ``0``.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

from vkconv.runtime.context import Context
from vkconv.runtime.errors import VkconvError
from vkconv.runtime.plan import Plan
from vkconv.runtime.timestamps import Stopwatch
from vkconv.runtime.tunecache import cache_for

log = logging.getLogger(__name__)

MODES = ("1", "0", "cache")
DEFAULT_BUDGET_MS = 2000.0
PRUNE = 1.3    # a first timing this far above the best so far stops the candidate
MARGIN = 0.03  # a candidate must be this much faster than the best so far to replace it
REMATCH = 5    # alternating runs of the baseline and the winner in the final rematch

C = TypeVar("C", bound=Hashable)
SOURCES = ("forced", "cache", "tuner", "heuristic")


def tune_mode(request: bool | str | None = None) -> str:
    """``"1"``, ``"0"`` or ``"cache"``: ``request`` (True/False/one of those), or ``VKCONV_TUNE``
    when it is None; ValueError names a bad value."""
    if request is None:
        value = os.environ.get("VKCONV_TUNE", "") or "cache"
        if value not in MODES:
            raise ValueError(f"VKCONV_TUNE={value!r}: expected 1, 0 or cache")
        return value
    if isinstance(request, bool):
        return "1" if request else "0"
    if request not in MODES:
        raise ValueError(f"tune: expected True, False, None or one of {', '.join(MODES)}, got {request!r}")
    return request


def budget_ms(value: float | None = None) -> float:
    """The per-shape tuning budget in ms: ``value``, else ``VKCONV_TUNE_BUDGET_MS``, else 2000."""
    if value is None:
        text = os.environ.get("VKCONV_TUNE_BUDGET_MS", "")
        try:
            value = float(text) if text else DEFAULT_BUDGET_MS
        except ValueError:
            raise ValueError(f"VKCONV_TUNE_BUDGET_MS={text!r}: expected a number of milliseconds") from None
    if not value >= 0:
        raise ValueError(f"tuning budget: expected >= 0 ms, got {value!r}")
    return float(value)


class Timed(Protocol):
    """One candidate, built and run once (warm): :meth:`once` times one more run on the device."""

    def once(self) -> float: ...

    def close(self) -> None: ...


class Labelled(Protocol):
    """A candidate that names itself for tables and logs."""

    def label(self) -> str: ...


L = TypeVar("L", bound=Labelled)


@dataclass(frozen=True)
class Choice(Generic[L]):
    """The candidate that runs a shape (every choice resolved) and where the choice came from, one
    of :data:`SOURCES`: ``forced``, ``cache``, ``tuner`` or ``heuristic``."""

    candidate: L
    source: str

    def __str__(self) -> str:
        return f"{self.candidate.label()} ({self.source})"


class Agreement:
    """What every candidate must compute before it may be timed: the first output checked (the
    baseline's, which :func:`search` measures first) is the reference, and a later one that differs
    from it by more than ``tol`` times its largest magnitude raises ValueError naming both, so a
    candidate that computes something else never wins."""

    def __init__(self, baseline: str, tol: float):
        self.baseline, self.tol = baseline, tol
        self.reference: np.ndarray | None = None

    def check(self, y: np.ndarray, label: str) -> None:
        if self.reference is None:
            self.reference = y
        elif not np.allclose(y, self.reference, rtol=0,
                             atol=self.tol * max(float(np.abs(self.reference).max()), 1e-6)):
            raise ValueError(f"{label} gave a different result from {self.baseline}")

    def timed(self, ctx: Context, plan: Plan, inputs: Sequence[np.ndarray], label: str) -> TimedPlan:
        """``plan`` run once on ``inputs`` and checked, then ready to time; closed if it fails."""
        try:
            self.check(plan.run(list(inputs))[0], label)
            return TimedPlan(ctx, plan)
        except BaseException:
            plan.close()
            raise


def measured_choice(mode: str, cached: Callable[[], L | None], tuned: Callable[[], L],
                    heuristic: Callable[[], L]) -> Choice[L]:
    """The rule every tunable op follows once no candidate is forced: under tuning ``mode``
    (:func:`tune_mode`) ``"cache"`` or ``"1"`` the cache's candidate when ``cached()`` has one;
    under ``"1"`` a shape the cache lacks is tuned (``tuned()``, which stores its result); else
    ``heuristic()``.  Each is called only when the rule gets to it."""
    if mode != "0":
        hit = cached()
        if hit is not None:
            return Choice(hit, "cache")
        if mode == "1":
            return Choice(tuned(), "tuner")
    return Choice(heuristic(), "heuristic")


class TimedPlan:
    """A built, warmed plan whose dispatches :meth:`once` times on the device (an op's ``measure``
    for :func:`search` returns one)."""

    def __init__(self, ctx: Context, plan: Plan):
        assert plan.body is not None  # a built plan has recorded its body
        self.plan, self.watch = plan, Stopwatch(ctx, plan.body)

    def once(self) -> float:
        return self.watch.time()

    def close(self) -> None:
        self.watch.close()
        self.plan.close()


@dataclass
class Trial(Generic[C]):
    """One candidate's outcome: its best device time in ms (a pruned one's single timing; None when
    it never ran) and a note (``baseline``, ``pruned``, ``over budget``, ``does not fit``,
    ``failed: ...``)."""

    candidate: C
    ms: float | None
    note: str = ""


@dataclass
class TuneResult(Generic[C]):
    """The search's outcome: the best candidate and the baseline (heuristic) with their device
    times, every trial in order, and the wall seconds it took."""

    best: C
    best_ms: float
    baseline: C
    baseline_ms: float
    trials: list[Trial[C]] = field(default_factory=list)
    seconds: float = 0.0


def search(baseline: C, stages: Sequence[Callable[[C], Sequence[C]]], measure: Callable[[C], Timed | None],
           budget: float, prior: Callable[[C], float] = lambda c: 1.0) -> TuneResult[C]:
    """Time ``baseline``, then each stage's proposals (given the best so far), within ``budget``
    ms; see the module docstring.  ``measure(c)`` builds and warms candidate ``c`` (None: it cannot
    run this shape; VkconvError/ValueError: it failed, e.g. its output was wrong); ``prior(c)`` is
    its expected time relative to the best (for the budget)."""
    start = time.perf_counter()
    timed = measure(baseline)
    if timed is None:
        raise VkconvError("tuning: the heuristic choice cannot run this shape")
    try:
        base_ms = min(timed.once() for _ in range(3))
    finally:
        timed.close()
    result = TuneResult(baseline, base_ms, baseline, base_ms, [Trial(baseline, base_ms, "baseline")])
    walls = [1e3 * (time.perf_counter() - start)]  # wall ms of each trial, its build included
    seen = {baseline}
    for stage in stages:
        for cand in stage(result.best):
            if cand in seen:
                continue
            seen.add(cand)
            began = time.perf_counter()
            expected = max(2 * prior(cand) * result.best_ms, float(np.median(walls)))
            if 1e3 * (began - start) + expected > budget:
                result.trials.append(Trial(cand, None, "over budget"))
                continue
            result.trials.append(_trial(cand, measure, result.best_ms))
            walls.append(1e3 * (time.perf_counter() - began))
            ms = result.trials[-1].ms
            if ms is not None and ms < result.best_ms * (1 - MARGIN):
                result.best, result.best_ms = cand, ms
    if result.best != baseline:
        _confirm(result, measure)
    result.seconds = time.perf_counter() - start
    log.debug("tuned in %.2f s: %s %.3f ms (baseline %s %.3f ms), %d trials", result.seconds, result.best,
              result.best_ms, baseline, base_ms, len(result.trials))
    return result


def cached_candidate(ctx: Context, key: str, parse: Callable[[object], C],
                     unusable: Callable[[C], str | None]) -> C | None:
    """The tuning cache's candidate under ``key`` (its record parsed by ``parse``, e.g. a candidate
    class's ``from_json``), or None: when the cache has none, and when the record is corrupt or
    cannot run here (written under other limits or by another vkconv, ``unusable`` says why),
    which is logged once and ignored."""
    entry = cache_for(ctx).get(key)
    if entry is None:
        return None
    try:
        cand = parse(entry.get("candidate"))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("tuning cache entry for %s ignored: %s", key, exc)
        return None
    reason = unusable(cand)
    if reason is not None:
        log.warning("tuning cache entry for %s ignored: %s cannot run here: %s", key, cand, reason)
        return None
    return cand


def store_result(ctx: Context, key: str, result: TuneResult[C], to_json: Callable[[C], object],
                 limit: float) -> None:
    """Put ``result`` in the tuning cache under ``key`` (candidates as ``to_json`` writes them, which
    :func:`cached_candidate`'s ``parse`` reads back): the winner and the heuristic choice with their
    device ms, and what the search cost."""
    cache_for(ctx).put(key, {
        "candidate": to_json(result.best), "ms": round(result.best_ms, 4),
        "heuristic": to_json(result.baseline), "heuristic_ms": round(result.baseline_ms, 4),
        "trials": len(result.trials), "seconds": round(result.seconds, 3),
        "budget_ms": limit, "when": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _confirm(result: TuneResult[C], measure: Callable[[C], Timed | None]) -> None:
    """Time the baseline and the winner again, alternately (``REMATCH`` runs each), and go back to
    the baseline unless the winner's median is still ``MARGIN`` faster: a winner picked in a burst
    of load from other processes does not survive a side-by-side rematch.  (Fastest-of-three let a
    16x8 tile through on Mesa 25 that then lost by 4.8 % in 11 rounds in turns.)"""
    pair = [measure(result.baseline), measure(result.best)]
    try:
        base, best = pair
        if base is None or best is None:
            return
        base_times, best_times = [], []
        for _ in range(REMATCH):
            base_times.append(base.once())
            best_times.append(best.once())
        base_ms, best_ms = float(np.median(base_times)), float(np.median(best_times))
        result.trials.append(Trial(result.best, best_ms, f"rematch: baseline {base_ms:.3f} ms"))
        if best_ms < base_ms * (1 - MARGIN):
            result.best_ms, result.baseline_ms = best_ms, base_ms
        else:
            result.best, result.best_ms, result.baseline_ms = result.baseline, base_ms, base_ms
    finally:
        for timed in pair:
            if timed is not None:
                timed.close()


def _trial(cand: C, measure: Callable[[C], Timed | None], best_ms: float) -> Trial[C]:
    try:
        timed = measure(cand)
    except (VkconvError, ValueError) as exc:
        log.info("tuning: candidate %s failed: %s", cand, exc)
        return Trial(cand, None, f"failed: {exc}")
    if timed is None:
        return Trial(cand, None, "does not fit")
    try:
        first = timed.once()
        if first > PRUNE * best_ms:
            return Trial(cand, first, "pruned")
        return Trial(cand, min(first, timed.once(), timed.once()))
    finally:
        timed.close()


def choice_label(op: object, x_shape) -> str:
    """What ``op`` runs at input shape ``x_shape``, for profiles and step lists: its class name in
    lower case, then, for an op with a measured choice (a ``choice_for`` method: ``Conv``,
    ``ConvTranspose``), the candidate and its source, e.g. ``conv winograd 16x16 ls64 texel (cache)``."""
    name = type(op).__name__.lower()
    choice_for = getattr(op, "choice_for", None)
    return f"{name} {choice_for(x_shape)}" if choice_for is not None else name
