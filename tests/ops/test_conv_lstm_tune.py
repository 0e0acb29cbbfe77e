"""Measured kernel choice for ConvLSTM2D: every candidate the tuner can pick, the cache, the budget.

Oracle: Keras' own ConvLSTM2D layer (torch backend; where Keras is missing, the float64 numpy
ConvLSTM written from Keras 3's equations, tests/conv_lstm_reference.py); tolerance max abs diff
<= 1e-4 x max |expected| (tests/oracles.assert_close), as in tests/ops/test_conv_lstm.py.  No test
depends on a timing: the tuning tests use a budget of 0, which admits the baseline (the
heuristic choice) alone, or plant cache entries.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
import pytest
from conv_lstm_reference import conv_lstm2d as reference
from oracles import assert_close

import vkconv
from vkconv.ops.conv.selection import Candidate, local_sizes, register_tiles
from vkconv.ops.conv_lstm import ConvLSTM2D, ConvLSTMCandidate
from vkconv.ops.tune import Choice
from vkconv.runtime.tunecache import TuneCache, cache_for, device_identity

REL = 1e-4
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@dataclasses.dataclass(frozen=True)
class Case:
    """A layer whose input convolution may take Winograd (3x3, stride 1): frames of odd size
    (H*W not a multiple of 4), 9 filters (36 gate channels: no tile of 16 is full), batch 2."""

    n: int = 2
    t: int = 3
    c: int = 4
    hw: tuple[int, int] = (7, 9)
    f: int = 9
    with_state: bool = True

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (self.n, self.t, self.c, *self.hw)

    def arrays(self):
        rng = np.random.default_rng(11)
        x = rng.standard_normal(self.x_shape).astype(np.float32)
        k = (0.3 * rng.standard_normal((3, 3, self.c, 4 * self.f))).astype(np.float32)
        u = (0.3 * rng.standard_normal((3, 3, self.f, 4 * self.f))).astype(np.float32)
        b = (0.3 * rng.standard_normal(4 * self.f)).astype(np.float32)
        state = tuple(rng.standard_normal((self.n, self.f, *self.hw)).astype(np.float32) for _ in range(2)) \
            if self.with_state else None
        return x, k, u, b, state

    def op(self, **kw) -> ConvLSTM2D:
        _, k, u, b, _ = self.arrays()
        return ConvLSTM2D(k, u, b, **kw)

    def run(self, op: ConvLSTM2D) -> np.ndarray:
        x, _, _, _, state = self.arrays()
        return op(x, state)

    def expected(self) -> np.ndarray:
        x, k, u, b, state = self.arrays()
        keras = _keras()
        if keras is None:
            return reference(x, k, u, b, initial_state=state)
        layer = keras.layers.ConvLSTM2D(self.f, 3, padding="same", return_sequences=True)
        xk = np.ascontiguousarray(x.transpose(0, 1, 3, 4, 2))  # Keras: N, T, H, W, C
        layer.build(xk.shape)
        layer.set_weights([k, u, b])
        keras_state = None if state is None else [np.ascontiguousarray(s.transpose(0, 2, 3, 1)) for s in state]
        y = np.asarray(keras.ops.convert_to_numpy(layer(xk, initial_state=keras_state)))
        return np.ascontiguousarray(np.moveaxis(y, -1, -3))


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError:
        return None
    return keras


CASE = Case()


def _every_candidate(op: ConvLSTM2D, x_shape) -> list[ConvLSTMCandidate]:
    """Every step tile and local size, and every input family and tile, each at least once (cycled
    together: one forward per step tile instead of the whole product)."""
    ctx, base = op.ctx, op.tuning
    step_tiles = register_tiles("implicit_gemm", base)
    sizes = local_sizes(ctx, "implicit_gemm")
    inputs = [(name, tile) for name in ("implicit_gemm", "winograd") for tile in register_tiles(name, base)]
    count = max(len(step_tiles), len(inputs))
    return [ConvLSTMCandidate(Candidate("implicit_gemm", *step_tiles[i % len(step_tiles)], sizes[i % len(sizes)]),
                              Candidate(inputs[i % len(inputs)][0], *inputs[i % len(inputs)][1]))
            for i in range(count)]


def test_every_candidate_matches_keras():
    expected = CASE.expected()
    with CASE.op(tune=False) as op:
        cands = _every_candidate(op, CASE.x_shape)
    for cand in cands:
        with CASE.op(candidate=cand) as op:
            choice = op.choice_for(CASE.x_shape, True)
            assert choice.source == "forced", choice
            for got, want in ((choice.candidate.step, cand.step), (choice.candidate.input, cand.input)):
                assert (got.kernel, got.mb, got.pb) == (want.kernel, want.mb, want.pb), choice
            assert choice.candidate.step.local_size == cand.step.local_size, choice
            assert_close(CASE.run(op), expected, REL, what=cand.label())


def test_forced_candidate_fills_in_the_heuristics_and_refuses_what_cannot_run():
    with CASE.op(tune=False) as op:
        heuristic = op.choice_for(CASE.x_shape, True).candidate
    with CASE.op(candidate=ConvLSTMCandidate(Candidate("implicit_gemm", local_size=heuristic.step.local_size))) as op:
        assert op.choice_for(CASE.x_shape, True) == Choice(heuristic, "forced")
    # the step's tile follows its local size (the parallel bound: about 4 workgroups per step)
    with CASE.op(candidate=ConvLSTMCandidate(Candidate("implicit_gemm", local_size=32))) as op:
        forced = op.choice_for(CASE.x_shape, True).candidate
        assert forced.step.local_size == 32 and forced.input == heuristic.input
    with CASE.op(candidate=ConvLSTMCandidate(Candidate("implicit_gemm", local_size=48))) as op, \
            pytest.raises(ValueError, match="step: local size 48"):
        CASE.run(op)
    with CASE.op(candidate=ConvLSTMCandidate(input=Candidate("implicit_gemm", 12, 12))) as op, \
            pytest.raises(ValueError, match="input convolution: register tile 12x12"):
        op.choice_for(CASE.x_shape)
    strided = ConvLSTM2D(*CASE.arrays()[1:4], strides=2, candidate=ConvLSTMCandidate(input=Candidate("winograd")))
    with strided, pytest.raises(ValueError, match="winograd needs"):
        strided.choice_for(CASE.x_shape)
    for bad in (dict(step=Candidate("winograd")), dict(input=Candidate("tiled"))):
        with pytest.raises(ValueError, match="runs on"):
            ConvLSTMCandidate(**bad)


def test_candidates_round_trip_through_json():
    for cand in (ConvLSTMCandidate(), ConvLSTMCandidate(Candidate("implicit_gemm", 4, 8, 32, True)),
                 ConvLSTMCandidate(input=Candidate("winograd", 16, 28, 64))):
        assert ConvLSTMCandidate.from_json(json.loads(json.dumps(cand.to_json()))) == cand
    for bad in ({"kernel": "implicit_gemm"}, None, {"op": "ConvLSTM2D", "step": {"kernel": "winograd"}},
                {"op": "ConvLSTM2D", "input": {"kernel": "implicit_gemm", "mb": 6}}):
        with pytest.raises(ValueError):
            ConvLSTMCandidate.from_json(bad)


def test_tune_stores_the_choice_and_another_op_reads_it(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VKCONV_TUNE_BUDGET_MS", "0")
    with CASE.op(tune=True) as op:
        assert_close(CASE.run(op), CASE.expected(), REL)
        choice = op.choice_for(CASE.x_shape)
        assert choice.source == "tuner"
        key = op.signature(CASE.x_shape)
        assert "state=1" in key and op.signature(CASE.x_shape, False) != key
    # the file, read afresh, has the entry; an op in cache mode (the default) uses it
    entry = TuneCache(device_identity(vkconv.get_context()), tmp_path).get(key)
    assert entry is not None and ConvLSTMCandidate.from_json(entry["candidate"]) == choice.candidate
    with CASE.op() as op:
        assert_close(CASE.run(op), CASE.expected(), REL)
        assert op.choices() == {CASE.x_shape: Choice(choice.candidate, "cache")}
    # without an initial state the shape has no entry
    with CASE.op() as op:
        assert op.choice_for(CASE.x_shape, False).source == "heuristic"


def test_cached_candidate_is_used_and_tune_false_ignores_it(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    with CASE.op() as op:
        heuristic = op.choice_for(CASE.x_shape, True)
        assert heuristic.source == "heuristic"
        planted = ConvLSTMCandidate(Candidate("implicit_gemm", 8, 16, 128, True, shared=False, unroll=2),
                                    Candidate("winograd", 4, 8, 64, True, shared=False, unroll=2))
        cache_for(op.ctx).put(op.signature(CASE.x_shape, True), {"candidate": planted.to_json()})
    with CASE.op() as op:
        assert op.choice_for(CASE.x_shape, True) == Choice(planted, "cache")
        assert_close(CASE.run(op), CASE.expected(), REL, what=planted.label())
    monkeypatch.setenv("VKCONV_TUNE", "0")
    with CASE.op() as op:
        assert op.choice_for(CASE.x_shape, True) == heuristic
    with CASE.op(tune=False) as op:
        assert op.choice_for(CASE.x_shape, True) == heuristic


@pytest.mark.parametrize("record", [{"op": "ConvLSTM2D", "step": {"kernel": "implicit_gemm", "mb": 6}},
                                    {"op": "ConvLSTM2D", "step": {"kernel": "implicit_gemm", "local_size": 48}},
                                    {"op": "DeformConv"}, {"kernel": "winograd"}, "garbage"])
def test_corrupt_cache_entry_falls_back_to_the_heuristics(monkeypatch, tmp_path, caplog, record):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    with CASE.op() as op:
        cache_for(op.ctx).put(op.signature(CASE.x_shape, True), {"candidate": record})
    with caplog.at_level(logging.WARNING, "vkconv.ops.conv_lstm"), CASE.op() as op:
        assert op.choice_for(CASE.x_shape, True).source == "heuristic"
        assert_close(CASE.run(op), CASE.expected(), REL)
    assert "tuning cache entry" in caplog.text


def test_budget_zero_times_the_baseline_only(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    with CASE.op(tune=False) as op:
        heuristic = op.choice_for(CASE.x_shape, True).candidate
        result = op.autotune(CASE.x_shape, budget=0, with_state=True)
        assert result.best == result.baseline == heuristic
        assert result.trials[0].note == "baseline"
        assert len(result.trials) > 1 and all(t.note == "over budget" for t in result.trials[1:])
        # the stages cover the step's tiles (the parallel caps' and the tables'), its local sizes,
        # and the input convolution's families and tiles
        proposed = {t.candidate for t in result.trials}
        assert {c.step.local_size for c in proposed} >= set(local_sizes(op.ctx, "implicit_gemm"))
        assert {(c.step.mb, c.step.pb) for c in proposed} >= {(4, 4), (heuristic.step.mb, heuristic.step.pb)}
        assert {c.input.kernel for c in proposed} == {"winograd", "implicit_gemm"}
        assert len({(c.input.mb, c.input.pb) for c in proposed}) > 1
        assert op.choice_for(CASE.x_shape, True).source == "tuner"
        assert_close(CASE.run(op), CASE.expected(), REL)


def test_a_tuned_choice_is_correct_and_losers_are_released(monkeypatch, tmp_path):
    """A real search (a budget admitting a few candidates): whatever it picks matches Keras, and
    the losers' kernels are released."""
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    with CASE.op(tune=False) as op:
        CASE.run(op)
        result = op.autotune(CASE.x_shape, budget=3000)
        assert sum(t.ms is not None for t in result.trials) > 1
        assert op.choice_for(CASE.x_shape).candidate == result.best
        assert_close(CASE.run(op), CASE.expected(), REL, what=result.best.label())
        kept = {("recurrent", result.best.step), ("input", result.best.input)}
        heuristic = op._resolve(ConvLSTMCandidate(), op._convs(op._geometry(CASE.x_shape)))
        assert set(op._kernels) <= kept | {("recurrent", heuristic.step), ("input", heuristic.input)}
