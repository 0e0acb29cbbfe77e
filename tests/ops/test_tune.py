"""Measured kernel choice: the candidates the tuner can pick, the search's budget, the tuning cache.

Every candidate is checked against onnxruntime (max abs difference <= 1e-4 x max |y|, the suite's
tolerance; the F(4x4, 3x3) Winograd transform is within it at these channel counts).  No test
depends on a timing: the budget test uses a budget of 0, which admits the baseline alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cv_plugin
import vkconv
from cv_plugin import cli, compat
from cv_plugin import tuning as net_tuning
from cv_plugin.input_shapes import fix_input_shapes
from tests.conftest import needs_opencv_layers
from tests.oracles import assert_close, onnxruntime_reference
from vkconv.kernels.tiling import UNROLLS, rows_unroll, tuning
from vkconv.ops import tune
from vkconv.ops.conv.kernels import KERNELS, Geometry
from vkconv.ops.conv.selection import Candidate, candidates, shared_unusable
from vkconv.runtime.tunecache import TuneCache, cache_for, device_identity

REL = 1e-4


@dataclass(frozen=True)
class Shape:
    x: tuple[int, ...]
    cout: int
    k: tuple[int, int]
    strides: int = 1
    pads: int = 0
    group: int = 1

    def arrays(self):
        rng = np.random.default_rng(sum(self.x) + self.cout)
        x = rng.standard_normal(self.x).astype(np.float32)
        w = rng.standard_normal((self.cout, self.x[1] // self.group, *self.k)).astype(np.float32)
        b = rng.standard_normal(self.cout).astype(np.float32)
        return x, w, b

    def attrs(self) -> dict:
        return {"strides": [self.strides] * 2, "pads": [self.pads] * 4, "group": self.group,
                "kernel_shape": list(self.k)}

    def conv(self, **kw) -> vkconv.Conv:
        _, w, b = self.arrays()
        return vkconv.Conv(w, b, strides=self.strides, pads=self.pads, group=self.group, **kw)

    def expected(self) -> np.ndarray:
        x, w, b = self.arrays()
        return onnxruntime_reference("Conv", {"x": x, "w": w, "b": b}, self.attrs())


SHAPES = {
    "3x3-odd": Shape((1, 8, 9, 11), 12, (3, 3), pads=1),                     # winograd-eligible
    "groups-batch2-s2": Shape((2, 12, 7, 10), 18, (3, 3), strides=2, pads=1, group=3),
    "depthwise-x2": Shape((1, 8, 13, 13), 16, (3, 3), pads=1, group=8),
    "1x1-batch2": Shape((2, 16, 5, 7), 20, (1, 1)),
}


# Launch choices sampled one at a time below; shared input rows and rows per step are not among
# them: test_shared_rows_and_rows_per_step_match_onnxruntime runs every value of both on every rows
# kernel, with small register tiles (each big-tile pipeline costs 1.5-6 s to build on Mesa 25).
_LAUNCH = ("local_size", "texel")


def sampled(cands: list[Candidate]) -> list[Candidate]:
    """Per kernel family: every register tile and tile shape (at the family's first launch
    choices), and every value of each launch choice in ``_LAUNCH`` with the others as the first's
    (at the family's first tile).  They are independent specialization constants / bindings, so
    this covers each value of each without the whole product (thousands of pipelines)."""
    chosen: list[Candidate] = []
    for name in KERNELS:
        family = [c for c in cands if c.kernel == name]
        if not family:
            continue
        first = family[0]
        family = [c for c in family if (c.shared, c.unroll) == (first.shared, first.unroll)]

        def launch(c: Candidate) -> tuple:
            return tuple(getattr(c, a) for a in _LAUNCH)

        chosen += [c for c in family if launch(c) == launch(first)]
        for attr in _LAUNCH:
            chosen += [c for c in family if (c.mb, c.pb, c.tile) == (first.mb, first.pb, first.tile)
                       and getattr(c, attr) != getattr(first, attr)
                       and all(getattr(c, a) == getattr(first, a) for a in _LAUNCH if a != attr)]
    return chosen


def _candidates(shape: Shape) -> list[Candidate]:
    ctx = vkconv.get_context()
    x, w, _ = shape.arrays()
    with shape.conv() as op:
        geo = Geometry.lift(x.shape, w.shape, shape.group, op.strides, op.dilations, op.resolved_pads(x.shape),
                            op.output_shape(x.shape))
    return candidates(ctx, geo, tuning(ctx, False))


@pytest.mark.parametrize("name", SHAPES)
def test_every_candidate_matches_onnxruntime(name):
    shape = SHAPES[name]
    x, _, _ = shape.arrays()
    expected = shape.expected()
    cands = _candidates(shape)
    families = {c.kernel for c in cands}
    assert {"implicit_gemm", "direct", "tiled"} <= families
    for cand in sampled(cands):
        with shape.conv(kernel=cand) as op:
            choice = op.choice_for(x.shape)
            assert choice.source == "forced"
            assert choice.candidate == cand, "a fully specified candidate resolves to itself"
            assert_close(op(x), expected, REL, what=f"{name} {cand.label()}")


# Shapes for the subgroup-shared rows kernel: 44 output channels per group in blocks of 4 are 11
# blocks, more than a subgroup of 8 lanes holds and not a multiple of it (the second subgroup's
# lanes past block 11 store nothing); the stride-2 row segments of 16 pixels are 9 vec4s, more
# than one per lane; input widths a multiple of 4 are read in place, their padding masked.
SHARED_SHAPES = {
    "implicit_gemm": (Shape((2, 10, 9, 12), 88, (3, 3), strides=2, pads=1, group=2), 16),
    "gemm1x1": (Shape((2, 13, 5, 7), 44, (1, 1)), 8),
    "winograd": (Shape((2, 9, 10, 13), 44, (3, 3), pads=1), 8),
    "winograd63": (Shape((1, 6, 14, 12), 44, (3, 3), pads=1), 8),
}


@pytest.mark.parametrize("unroll", UNROLLS)
@pytest.mark.parametrize("kernel", SHARED_SHAPES)
def test_shared_rows_and_rows_per_step_match_onnxruntime(kernel, unroll):
    """Each rows kernel with subgroup-shared input rows and each rows-per-step (rows of 9-26, so
    most steps end past the last row), against onnxruntime."""
    shape, pb = SHARED_SHAPES[kernel]
    x, _, _ = shape.arrays()
    expected = shape.expected()
    reason = shared_unusable(vkconv.get_context(), vkconv.get_context().local_size())
    for shared in (False, True) if reason is None else (False,):
        cand = Candidate(kernel, 4, pb, shared=shared, unroll=unroll)
        with shape.conv(kernel=cand) as op:
            assert_close(op(x), expected, REL, what=f"{kernel} {op.choice_for(x.shape).candidate.label()}")


def test_rows_per_step_follows_the_kernel_width_and_the_rows():
    base = tuning(vkconv.get_context(), False)
    # 1x1 GEMMs (Winograd's too) take 4 rows a step, fewer where whole steps would add over 1/8 rows
    assert [rows_unroll(rows, 1, base) for rows in (64, 9, 10, 3)] == [4, 2, 2, 1]
    assert rows_unroll(27, 3, base) == 1   # a 3x3 kernel updates each accumulator 3 times a row already
    assert rows_unroll(64, 3, dataclasses.replace(base, unroll=8)) == 8


def test_candidate_space_is_restricted_to_eligible_kernels():
    assert {c.kernel for c in _candidates(SHAPES["depthwise-x2"])} >= {"depthwise"}
    assert "winograd" not in {c.kernel for c in _candidates(SHAPES["groups-batch2-s2"])}
    assert "gemm1x1" in {c.kernel for c in _candidates(SHAPES["1x1-batch2"])}
    assert "gemm1x1" not in {c.kernel for c in _candidates(SHAPES["3x3-odd"])}
    with pytest.raises(ValueError, match="multiples of 4"):
        Candidate("implicit_gemm", mb=6)
    with pytest.raises(ValueError, match="unroll"):
        Candidate("implicit_gemm", unroll=3)
    x, _, _ = SHAPES["depthwise-x2"].arrays()
    with SHAPES["depthwise-x2"].conv(kernel=Candidate("depthwise", shared=True)) as op, \
            pytest.raises(ValueError, match="shared input rows"):
        op(x)
    x, _, _ = SHAPES["3x3-odd"].arrays()
    with SHAPES["3x3-odd"].conv(kernel=Candidate("gemm1x1")) as op, pytest.raises(ValueError, match="1x1"):
        op(x)


def test_candidates_round_trip_through_json():
    for name in SHAPES:
        for cand in _candidates(SHAPES[name]):
            assert Candidate.from_json(json.loads(json.dumps(cand.to_json()))) == cand
    with pytest.raises(ValueError):
        Candidate.from_json({"kernel": "nonesuch"})


def test_tune_stores_a_correct_choice_and_a_new_process_reads_it(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VKCONV_TUNE_BUDGET_MS", "1500")
    shape = SHAPES["3x3-odd"]
    x, _, _ = shape.arrays()
    with shape.conv(tune=True) as op:
        choice = op.choice_for(x.shape)
        assert choice.source == "tuner"
        assert_close(op(x), shape.expected(), REL, what=f"tuned {choice}")
        signature = op.signature(x.shape)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["vkconv"] == vkconv.__version__
    entry = data["entries"][signature]
    assert Candidate.from_json(entry["candidate"]) == choice.candidate
    assert entry["trials"] >= 1 and entry["ms"] > 0
    # A fresh process, default VKCONV_TUNE (cache): the cached candidate, no tuning.
    _, w, b = shape.arrays()
    np.savez(tmp_path / "conv.npz", w=w, b=b)
    script = ("import json, sys, numpy as np, vkconv; a = np.load(sys.argv[1]);"
              f"op = vkconv.Conv(a['w'], a['b'], pads={shape.pads}); c = op.choice_for({shape.x});"
              "print(json.dumps([c.source, c.candidate.to_json()]))")
    env = {k: v for k, v in os.environ.items() if k != "VKCONV_TUNE"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "conv.npz")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    source, record = json.loads(out.stdout.strip().splitlines()[-1])
    assert source == "cache" and Candidate.from_json(record) == choice.candidate


def test_cached_candidate_is_used_and_vkconv_tune_0_ignores_it(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    shape = SHAPES["groups-batch2-s2"]
    x, _, _ = shape.arrays()
    with shape.conv() as op:
        heuristic = op.choice_for(x.shape)
        assert heuristic.source == "heuristic"
        # an unlikely choice, so that using it cannot be mistaken for the heuristics
        planted = Candidate("implicit_gemm", 4, 4, 32, False)
        assert planted != heuristic.candidate
        cache_for(op.ctx).put(op.signature(x.shape), {"candidate": planted.to_json(), "ms": 1.0})
    with shape.conv() as op:
        choice = op.choice_for(x.shape)
        assert (choice.source, choice.candidate) == ("cache", planted)
        assert_close(op(x), shape.expected(), REL, what=str(choice))
    monkeypatch.setenv("VKCONV_TUNE", "0")
    with shape.conv() as op:
        assert op.choice_for(x.shape) == heuristic
    with shape.conv(tune=False) as op:
        assert op.choice_for(x.shape) == heuristic


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "entries": {"a"', "",
                                     json.dumps({"format": 1, "vkconv": "0.0.0-other", "device": {}, "entries": {}})])
def test_corrupt_truncated_or_foreign_cache_is_ignored_with_one_warning(monkeypatch, tmp_path, content):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    shape = SHAPES["1x1-batch2"]
    x, _, _ = shape.arrays()
    ctx = vkconv.get_context()
    path = TuneCache(device_identity(ctx), tmp_path).path
    path.write_text(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with shape.conv() as op:
                assert op.choice_for(x.shape).source == "heuristic"
    assert len([w for w in caught if "tuning cache" in str(w.message)]) == 1, [str(w.message) for w in caught]
    # the next write replaces the bad file with a valid one
    with shape.conv() as op:
        op.autotune(x.shape, budget=0)
    assert json.loads(path.read_text())["entries"]


def test_budget_zero_times_the_baseline_only(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    shape = SHAPES["3x3-odd"]
    x, _, _ = shape.arrays()
    with shape.conv() as op:
        heuristic = op.choice_for(x.shape).candidate
        result = op.autotune(x.shape, budget=0)
        assert result.best == result.baseline == heuristic
        timed = [t for t in result.trials if t.ms is not None]
        assert [t.note for t in timed] == ["baseline"]
        assert len(result.trials) > 1 and all(t.note == "over budget" for t in result.trials[1:])
        assert op.choice_for(x.shape).source == "tuner"
        assert_close(op(x), shape.expected(), REL)


def test_search_stops_at_the_budget_and_prunes_slow_candidates():
    """:func:`tune.search` with a fake clock-free measure: a slow candidate is pruned after one
    timing, a faster one replaces the best, and a large prior keeps a candidate out of budget."""
    times = {"base": 10.0, "slow": 50.0, "fast": 5.0, "huge": 1.0}
    calls: list[str] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def once(self):
            calls.append(self.name)
            return times[self.name]

        def close(self):
            pass

    result = tune.search("base", [lambda best: ["slow", "fast"], lambda best: ["huge"]], Fake, budget=1e6,
                         prior=lambda c: 1e9 if c == "huge" else 1.0)
    assert result.best == "fast" and result.best_ms == 5.0 and result.baseline_ms == 10.0
    # fast: 3 timings in its trial and REMATCH in the rematch against the baseline, which it wins
    assert calls.count("slow") == 1 and calls.count("fast") == calls.count("base") == 3 + tune.REMATCH
    assert "huge" not in calls
    assert [(t.candidate, t.note) for t in result.trials] == [
        ("base", "baseline"), ("slow", "pruned"), ("fast", ""), ("huge", "over budget"),
        ("fast", "rematch: baseline 10.000 ms")]


def test_the_budget_counts_what_a_trial_costs_beyond_its_runs():
    """Building and checking a candidate (here 40 ms each, its runs 1 ms) counts: with 100 ms, at
    most two of ten candidates start (the runs alone would have let all ten start)."""
    built: list[str] = []

    class Slow:
        def __init__(self, name):
            built.append(name)
            time.sleep(0.04)

        def once(self):
            return 1.0

        def close(self):
            pass

    cands = [f"c{i}" for i in range(10)]
    result = tune.search("base", [lambda best: cands], Slow, budget=100)
    assert built[0] == "base" and 1 <= len(built) <= 3, built
    assert [t.note for t in result.trials[len(built):]] == ["over budget"] * (11 - len(built))


def test_a_winner_that_loses_the_rematch_leaves_the_baseline():
    """Noise made "lucky" look fast in its trial; side by side with the baseline it is not."""
    rematch = tune.REMATCH
    # one lucky run in the rematch too: the median, not the fastest, decides
    timings = {"base": iter([10.0] * 3 + [10.0] * rematch), "lucky": iter([8.0] * 3 + [8.0] + [10.2] * (rematch - 1))}

    class Fake:
        def __init__(self, name):
            self.name = name

        def once(self):
            return next(timings[self.name])

        def close(self):
            pass

    result = tune.search("base", [lambda best: ["lucky"]], Fake, budget=1e6)
    assert result.best == "base" and result.best_ms == result.baseline_ms == 10.0


def test_tune_settings_are_checked(monkeypatch):
    assert tune.tune_mode(True) == "1" and tune.tune_mode(False) == "0"
    monkeypatch.setenv("VKCONV_TUNE", "sometimes")
    with pytest.raises(ValueError, match="VKCONV_TUNE"):
        tune.tune_mode()
    with pytest.raises(ValueError, match="VKCONV_TUNE"):
        SHAPES["1x1-batch2"].conv()
    monkeypatch.setenv("VKCONV_TUNE_BUDGET_MS", "lots")
    with pytest.raises(ValueError, match="VKCONV_TUNE_BUDGET_MS"):
        tune.budget_ms()
    with pytest.raises(ValueError, match="tune"):
        tune.tune_mode("yes")


_WRITER = """
import sys
from pathlib import Path
from vkconv.runtime.tunecache import TuneCache
who, directory = sys.argv[1], Path(sys.argv[2])
cache = TuneCache({"name": "test device", "vkconv": "test"}, directory)
for i in range(40):
    cache.put(f"{who}-{i}", {"candidate": {"kernel": "direct"}, "i": i})
"""


def test_processes_writing_at_once_lose_nothing(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(n), str(tmp_path)]) for n in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    cache = TuneCache({"name": "test device", "vkconv": "test"}, tmp_path)
    assert sorted(cache.entries()) == sorted(f"{n}-{i}" for n in range(4) for i in range(40))
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


def _three_convs() -> onnx.ModelProto:
    """x [1, 3, h, w] -> 3x3 conv + Relu -> grouped 3x3 stride-2 conv -> 1x1 conv."""
    rng = np.random.default_rng(0)
    specs = [("conv0", (8, 3, 3, 3), {"pads": [1] * 4}), ("conv1", (8, 4, 3, 3), {"group": 2, "strides": [2, 2]}),
             ("conv2", (6, 8, 1, 1), {})]
    nodes, inits, x = [], [], "x"
    for name, wshape, attrs in specs:
        inits.append(numpy_helper.from_array(rng.standard_normal(wshape).astype(np.float32), name + ".w"))
        nodes.append(helper.make_node("Conv", [x, name + ".w"], [name], name=name,
                                      kernel_shape=list(wshape[2:]), **attrs))
        x = name
        if name == "conv0":
            nodes.append(helper.make_node("Relu", [x], ["relu0"]))
            x = "relu0"
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 6, "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@needs_opencv_layers()
def test_cli_tune_then_run_uses_the_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "three.onnx"
    onnx.save(_three_convs(), path)
    assert cli.main(["tune", str(path), "--budget-ms", "0", "--input-shape", "x=1,3,10,14"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("conv")]
    assert [r[0] for r in rows] == ["conv0", "conv1", "conv2"]
    assert rows[0][1] == "1x3x10x14" and all(r[-1] == "tuner" for r in rows)
    assert cli.main(["tune", str(path), "--input-shape", "x=1,3,10,14"]) == 0  # now all from the cache
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("conv")]
    assert [r[-1] for r in rows] == ["cache"] * 3
    assert cli.main(["run", str(path), "--runs", "1", "--debug"]) == 0  # 224x224 by default: not tuned
    debug = [line for line in capsys.readouterr().out.splitlines() if line.startswith("conv ")]
    assert len(debug) == 3 and all(line.endswith("(heuristic)") for line in debug), debug
    assert cli.main(["tune", "--clear"]) == 0
    assert not list((tmp_path / "cache").glob("*.json"))
    assert cli.main(["tune", str(path), "--budget-ms", "0", "--time-limit", "0",
                     "--input-shape", "x=1,3,10,14"]) == 0  # the first shape only
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.strip().startswith("conv")]) == 1
    assert "2 layers not tuned: --time-limit 0 s reached" in out
    assert cli.main(["tune", str(path), "--input-shape", "y=1,3,8,8"]) == 1
    assert "'y' is not an input of the model" in capsys.readouterr().err


@needs_opencv_layers()
def test_read_net_tune_true_tunes_every_conv_and_matches_opencv(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VKCONV_TUNE_BUDGET_MS", "0")
    model = _three_convs()
    x = np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype(np.float32)
    model = fix_input_shapes(model, {"x": x.shape})
    cpu = compat.read_onnx(model.SerializeToString())
    cpu.setInput(x)
    expected = np.array(cpu.forward())
    for mode in ("layer", "subgraph"):
        with cv_plugin.read_net(model, mode=mode, tune=True) as net:
            net.setInput(x)
            assert_close(np.array(net.forward()), expected, REL, what=mode)
            sources = [c.source for _, conv in net_tuning.conv_ops(net.state) for c in conv.choices().values()]
            # layer mode tunes all three; subgraph mode then finds them in the cache
            assert sources == (["tuner"] * 3 if mode == "layer" else ["cache"] * 3), (mode, sources)
    with pytest.raises(ValueError, match="tune"):
        cv_plugin.read_net(model, tune="often")
