"""Measured kernel choice for DeformConv: every candidate the tuner can pick, the cache, the budget.

Every candidate is checked against onnxruntime's CPU DeformConv (opset 19; max abs difference
<= 1e-4 x max |y|, the suite's tolerance).  No test depends on a timing: the tuning tests use a
budget of 0, which admits the baseline (the heuristic choice) alone, or plant cache entries.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import warnings

import numpy as np
import pytest
from oracles import assert_close, onnxruntime_reference

import vkconv
from vkconv.ops.conv.selection import local_sizes
from vkconv.ops.deform_conv import METHODS, DeformCandidate, DeformConv
from vkconv.ops.tune import Choice
from vkconv.runtime.tunecache import TuneCache, cache_for, device_identity

REL = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    cin: int
    cout: int
    hw: tuple[int, int]
    group: int = 1
    offset_group: int = 1
    mask: bool = True

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (self.n, self.cin, *self.hw)

    def op(self, **kw) -> DeformConv:
        return DeformConv(self.arrays()["W"], self.arrays()["B"], pads=1, group=self.group,
                          offset_group=self.offset_group, **kw)

    def arrays(self) -> dict[str, np.ndarray]:
        """ONNX-ordered inputs: 3x3 kernel, pad 1, offsets of up to 2.5 pixels (points off
        every edge), masks in [0, 1)."""
        rng = np.random.default_rng(self.n + self.cin + self.cout + sum(self.hw))
        taps = 9
        oh, ow = self.hw
        return {"X": rng.standard_normal(self.x_shape).astype(np.float32),
                "W": rng.standard_normal((self.cout, self.cin // self.group, 3, 3)).astype(np.float32),
                "offset": rng.uniform(-2.5, 2.5, (self.n, self.offset_group * 2 * taps, oh, ow)).astype(np.float32),
                "B": rng.standard_normal(self.cout).astype(np.float32),
                "mask": rng.random((self.n, self.offset_group * taps, oh, ow)).astype(np.float32)}

    def inputs(self) -> list[np.ndarray]:
        a = self.arrays()
        return [a["X"], a["offset"], a["mask"]] if self.mask else [a["X"], a["offset"]]

    def expected(self) -> np.ndarray:
        a = self.arrays()
        if not self.mask:
            a.pop("mask")
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "group": self.group,
                 "offset_group": self.offset_group}
        return onnxruntime_reference("DeformConv", a, attrs, opset=19)


CASES = {
    # 99 output pixels (not a multiple of 4: per-pixel offset reads), two offset groups, batch 2
    "odd-og2-batch2": Case(2, 8, 12, (9, 11), offset_group=2),
    # 48 pixels (vec4 offset reads), two conv groups, DCNv1
    "groups-dcnv1": Case(1, 16, 40, (6, 8), group=2, mask=False),
}


def sampled(op: DeformConv, x_shape) -> list[DeformCandidate]:
    """For each method that can run the shape here: every register tile the tuner tries (at the
    heuristic local sizes and reads), every local size of either stage and both read paths (at
    the heuristic tile): the tile, each local size and the read path are independent
    specialization constants / bindings, so this covers each value of each without the whole
    product."""
    out_hw = x_shape[2] * x_shape[3]
    sizes = local_sizes(op.ctx, "gemm1x1")
    found = []
    for method in METHODS:
        base = op._resolve(DeformCandidate(method=method), out_hw)
        if op._unusable(base) is not None:
            continue
        found += [dataclasses.replace(base, mb=mb, pb=pb) for mb, pb in op.method_tiles(method)]
        found += [dataclasses.replace(base, gemm_local_size=n) for n in sizes]
        found += [dataclasses.replace(base, sample_local_size=n) for n in sizes]
        found += [dataclasses.replace(base, texel=t) for t in (True, False)]
    return [c for c in dict.fromkeys(found) if op._unusable(c) is None]


@pytest.mark.parametrize("name", list(CASES))
def test_every_candidate_matches_onnxruntime(name):
    case = CASES[name]
    expected = case.expected()
    with case.op(tune=False) as op:
        op(*case.inputs())  # runs with the mask or not: choice_for's default follows it
        cands = sampled(op, case.x_shape)
    for cand in cands:
        with case.op(candidate=cand) as op:
            assert op.choice_for(case.x_shape, case.mask) == Choice(cand, "forced")
            assert_close(op(*case.inputs()), expected, REL, what=cand.label())


def test_forced_candidate_fills_in_the_heuristics_and_refuses_what_cannot_run():
    case = CASES["groups-dcnv1"]
    with case.op(tune=False) as op:
        heuristic = op.choice_for(case.x_shape, False).candidate
    with case.op(candidate=DeformCandidate(sample_local_size=32)) as op:
        assert op.choice_for(case.x_shape, False).candidate == dataclasses.replace(heuristic, sample_local_size=32)
    with case.op(candidate=DeformCandidate(gemm_local_size=48)) as op, \
            pytest.raises(ValueError, match="GEMM local size 48"):
        op(*case.inputs())
    with case.op(candidate=DeformCandidate(mb=12, pb=12)) as op, pytest.raises(ValueError, match="register tile 12x12"):
        op.choice_for(case.x_shape)
    with case.op(candidate=DeformCandidate(method="fused")) as op, \
            pytest.raises(ValueError, match="conv groups of 1|no subgroup shuffles"):
        op.choice_for(case.x_shape)
    with pytest.raises(ValueError, match="multiples of 4"):
        DeformCandidate(mb=6)


def test_candidates_round_trip_through_json():
    for cand in (DeformCandidate(), DeformCandidate(32, 16, 128, 32, False), DeformCandidate(texel=True),
                 DeformCandidate(8, 16, 64, 64, True, "fused")):
        assert DeformCandidate.from_json(json.loads(json.dumps(cand.to_json()))) == cand
    # entries written before the fused method existed are the columns method's
    assert DeformCandidate.from_json({"op": "DeformConv", "mb": 16}) == DeformCandidate(16, method="columns")
    for bad in ({"kernel": "implicit_gemm"}, None, [1], {"op": "DeformConv", "mb": 6},
                {"op": "DeformConv", "method": "im2col"}):
        with pytest.raises(ValueError):
            DeformCandidate.from_json(bad)


def test_tune_stores_the_choice_and_another_op_reads_it(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    case = CASES["odd-og2-batch2"]
    with case.op(tune=True) as op:
        monkeypatch.setenv("VKCONV_TUNE_BUDGET_MS", "0")
        assert_close(op(*case.inputs()), case.expected(), REL)
        choice = op.choice_for(case.x_shape)
        assert choice.source == "tuner"
        key = op.signature(case.x_shape)
        assert "mask=1" in key and "og=2" in key and op.signature(case.x_shape, False) != key
    # the file, read afresh, has the entry; an op in cache mode (the default) uses it
    entry = TuneCache(device_identity(vkconv.get_context()), tmp_path).get(key)
    assert entry is not None and DeformCandidate.from_json(entry["candidate"]) == choice.candidate
    with case.op() as op:
        assert op.choice_for(case.x_shape, True) == Choice(choice.candidate, "cache")
        assert op.choices() == {case.x_shape: Choice(choice.candidate, "cache")}
    # the DCNv1 variant of the shape has no entry
    with case.op() as op:
        assert op.choice_for(case.x_shape, False).source == "heuristic"


def test_cached_candidate_is_used_and_tune_false_ignores_it(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    case = CASES["groups-dcnv1"]
    with case.op() as op:
        heuristic = op.choice_for(case.x_shape, False)
        planted = dataclasses.replace(heuristic.candidate, pb=8, sample_local_size=32, texel=False)
        cache_for(op.ctx).put(op.signature(case.x_shape, False), {"candidate": planted.to_json()})
    with case.op() as op:
        assert op.choice_for(case.x_shape, False) == Choice(planted, "cache")
        assert_close(op(*case.inputs()), case.expected(), REL, what=planted.label())
    monkeypatch.setenv("VKCONV_TUNE", "0")
    with case.op() as op:
        assert op.choice_for(case.x_shape, False) == heuristic
    with case.op(tune=False) as op:
        assert op.choice_for(case.x_shape, False) == heuristic


@pytest.mark.parametrize("record", [{"op": "DeformConv", "mb": 6}, {"op": "DeformConv", "gemm_local_size": 48},
                                    {"kernel": "winograd"}, "garbage"])
def test_corrupt_cache_entry_falls_back_to_the_heuristics(monkeypatch, tmp_path, caplog, record):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    case = CASES["groups-dcnv1"]
    with case.op() as op:
        cache_for(op.ctx).put(op.signature(case.x_shape, False), {"candidate": record})
    with caplog.at_level(logging.WARNING, "vkconv.ops.deform_conv"), case.op() as op:
        assert op.choice_for(case.x_shape, False).source == "heuristic"
        assert_close(op(*case.inputs()), case.expected(), REL)
    assert "tuning cache entry" in caplog.text


def test_corrupt_cache_file_is_ignored_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    case = CASES["groups-dcnv1"]
    path = TuneCache(device_identity(vkconv.get_context()), tmp_path).path
    path.write_text('{"format": 1, "entries": {"a"')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with case.op() as op:
                assert op.choice_for(case.x_shape, False).source == "heuristic"
    assert len([w for w in caught if "tuning cache" in str(w.message)]) == 1


def test_budget_zero_times_the_baseline_only(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    case = CASES["odd-og2-batch2"]
    with case.op(tune=False) as op:
        heuristic = op.choice_for(case.x_shape, True).candidate
        result = op.autotune(case.x_shape, budget=0, has_mask=True)
        assert result.best == result.baseline == heuristic
        assert result.trials[0].note == "baseline"
        assert len(result.trials) > 1 and all(t.note == "over budget" for t in result.trials[1:])
        # the stages cover the register tiles, both local sizes and the read paths
        proposed = {t.candidate for t in result.trials}
        assert {c.gemm_local_size for c in proposed} >= set(local_sizes(op.ctx, "gemm1x1"))
        assert {c.sample_local_size for c in proposed} >= set(local_sizes(op.ctx, "gemm1x1"))
        assert {(c.mb, c.pb) for c in proposed} > {(heuristic.mb, heuristic.pb)}
        assert op.choice_for(case.x_shape, True).source == "tuner"
        assert_close(op(*case.inputs()), case.expected(), REL)


def test_a_tuned_choice_is_correct(monkeypatch, tmp_path):
    """A real search (a budget admitting a few candidates): whatever it picks matches onnxruntime,
    and the losers' GEMM weights are released."""
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    case = CASES["groups-dcnv1"]
    with case.op(tune=False) as op:
        result = op.autotune(case.x_shape, budget=1500, has_mask=False)
        assert sum(t.ms is not None for t in result.trials) >= 2
        assert_close(op(*case.inputs()), case.expected(), REL, what=result.best.label())
        assert len(op._gemms) == 1


def test_tune_setting_is_checked(monkeypatch):
    case = CASES["groups-dcnv1"]
    with pytest.raises(ValueError, match="tune"):
        case.op(tune="sometimes")
    monkeypatch.setenv("VKCONV_TUNE", "yes")
    with pytest.raises(ValueError, match="VKCONV_TUNE"):
        case.op()
