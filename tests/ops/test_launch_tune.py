"""Measured launch shapes of the loop kernels (vkconv.ops.launch): every candidate forced gives the
heuristic launch's output bit for bit and matches an independent oracle (numpy for Add / Relu /
MaxPool / Transpose, exact; onnx.reference for AveragePool and Resize, max abs diff <= 1e-5 x
max|expected|); the tuning cache round trip; a corrupt entry ignored; the budget respected;
``vkconv tune --mode subgraph`` covering a subgraph's loop kernels.  No test
depends on a timing: the tuner may pick any candidate, and each is checked.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close, onnx_reference

from cv_plugin import cli
from tests.conftest import needs_opencv_layers
from vkconv.graph.steps import run_step
from vkconv.ops.elementwise import Binary, Unary
from vkconv.ops.launch import LaunchCandidate, heuristic_launch, launch_candidates, launch_signature, tune_launch
from vkconv.ops.pool import Pool
from vkconv.ops.resize import Resize
from vkconv.ops.transpose import Transpose
from vkconv.runtime.context import get_context
from vkconv.runtime.tunecache import cache_for

REL = 1e-5


def _maxpool_2x2(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


# (op, input shapes, oracle or None for onnx.reference); sizes need more invocations than the
# smallest candidates have (64 x 64), so that the loops go round more than once
CASES = {
    "add broadcast": (lambda: Binary("Add"), [(1, 16, 30, 40), (16, 1, 1)], lambda a, b: a + b),
    "relu odd": (lambda: Unary("Relu"), [(1, 5, 37, 41)], lambda x: np.maximum(x, 0)),
    "maxpool vec4": (lambda: Pool("MaxPool", kernel_shape=(2, 2), strides=(2, 2)), [(1, 8, 64, 64)], _maxpool_2x2),
    "averagepool 3x3": (lambda: Pool("AveragePool", kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1)),
                        [(1, 8, 61, 59)], None),
    "resize nearest": (lambda: Resize("nearest", scales=(1, 1, 2, 2)), [(1, 8, 30, 32)], None),
    "transpose": (lambda: Transpose((0, 2, 3, 1)), [(1, 16, 37, 41)], lambda x: np.transpose(x, (0, 2, 3, 1))),
}


def _oracle(name: str, arrays):
    if name.startswith("averagepool"):
        return onnx_reference("AveragePool", {"x": arrays[0]}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                                                  "pads": [1, 1, 1, 1]})
    return onnx_reference("Resize", {"x": arrays[0], "roi": None, "scales": np.array([1, 1, 2, 2], np.float32)},
                          {"mode": "nearest"})


@pytest.mark.parametrize("name", list(CASES))
def test_every_candidate_gives_the_heuristic_result(name):
    make, in_shapes, oracle = CASES[name]
    rng = np.random.default_rng(len(name))
    arrays = [rng.standard_normal(s).astype(np.float32) for s in in_shapes]
    op = make()
    expected = run_step(op, arrays)[0]
    assert op.last_launch is not None and op.last_launch.choice.source == "heuristic"
    if oracle is not None:
        np.testing.assert_array_equal(expected, oracle(*arrays))
    else:
        assert_close(expected, _oracle(name, arrays), REL)
    for cand in launch_candidates(op.ctx):
        op.launch = cand
        got = run_step(op, arrays)[0]
        assert op.last_launch.choice.source == "forced"
        np.testing.assert_array_equal(got, expected, err_msg=cand.label())


def test_candidates_fit_the_device():
    ctx = get_context()
    cands = launch_candidates(ctx)
    assert heuristic_launch(ctx, "elementwise") in cands
    assert all(c.local == ctx.local_size(c.local) for c in cands)
    assert LaunchCandidate.from_json(cands[-1].to_json()) == cands[-1]
    with pytest.raises(ValueError):
        LaunchCandidate.from_json({"local": "64", "cap": 0})


def test_tune_stores_a_choice_that_later_ops_read(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    x = np.random.default_rng(0).standard_normal((1, 8, 64, 64)).astype(np.float32)
    result = tune_launch(Pool("MaxPool", kernel_shape=(2, 2), strides=(2, 2)), [x.shape], budget=2000)
    assert result.baseline == heuristic_launch(get_context(), "pool_vec4")
    assert result.trials[0].note == "baseline" and len(result.trials) > 1
    signature = launch_signature("pool_vec4", 8 * 32 * 32 // 4)
    entry = json.loads(next(tmp_path.glob("*.json")).read_text())["entries"][signature]
    assert LaunchCandidate.from_json(entry["candidate"]) == result.best
    op = Pool("MaxPool", kernel_shape=(2, 2), strides=(2, 2))
    np.testing.assert_array_equal(run_step(op, [x])[0], _maxpool_2x2(x))
    assert op.last_launch.choice.candidate == result.best and op.last_launch.choice.source == "cache"
    monkeypatch.setenv("VKCONV_TUNE", "0")
    run_step(op, [x])
    assert op.last_launch.choice.source == "heuristic"
    op.tune = "cache"  # the op's request outranks VKCONV_TUNE
    run_step(op, [x])
    assert op.last_launch.choice.source == "cache"


def test_vkconv_tune_1_tunes_at_record_time(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VKCONV_TUNE", "1")
    monkeypatch.setenv("VKCONV_TUNE_BUDGET_MS", "0")  # the baseline alone
    a = np.random.default_rng(1).standard_normal((1, 4, 50, 50)).astype(np.float32)
    op = Unary("Relu")
    np.testing.assert_array_equal(run_step(op, [a])[0], np.maximum(a, 0))
    kernel, count, _, choice = op.last_launch
    assert choice.source == "tuner" and op.launch is None and op.tune is None
    assert cache_for(op.ctx).get(launch_signature(kernel, count)) is not None


def test_corrupt_or_unfit_entry_is_ignored(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    a = np.ones((1, 4, 16, 16), np.float32)
    op = Binary("Add")
    run_step(op, [a, a])
    kernel, count = op.last_launch.kernel, op.last_launch.items
    cache = cache_for(op.ctx)
    for bad in ({"local": "x"}, None, {"local": 1 << 20, "cap": 0}):
        cache.put(launch_signature(kernel, count), {"candidate": bad, "ms": 1.0})
        with caplog.at_level(logging.WARNING, logger="vkconv.ops.launch"):
            caplog.clear()
            np.testing.assert_array_equal(run_step(op, [a, a])[0], a + a)
        assert op.last_launch.choice.source == "heuristic"
        assert "ignored" in caplog.text


def test_budget_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    result = tune_launch(Transpose((0, 2, 3, 1)), [(1, 8, 20, 20)], budget=0)
    assert result.best == result.baseline
    assert [t.note for t in result.trials[1:]] == ["over budget"] * (len(result.trials) - 1)


def test_no_loop_kernel_is_refused():
    with pytest.raises(ValueError, match="no loop kernel"):
        tune_launch(Pool("GlobalAveragePool"), [(1, 8, 7, 7)])


def _conv_pool_sigmoid():
    """x [1, 3, 16, 16] -> 3x3 conv -> MaxPool 2x2 -> Sigmoid -> Transpose to NHWC."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sigmoid", ["p"], ["s"], name="sigmoid"),
             helper.make_node("Transpose", ["s"], ["y"], name="nhwc", perm=[0, 2, 3, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@needs_opencv_layers()
def test_cli_tune_subgraph_covers_the_loop_kernels(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.onnx"
    onnx.save(_conv_pool_sigmoid(), path)
    argv = ["tune", str(path), "--mode", "subgraph", "--budget-ms", "0"]
    assert cli.main(argv) == 0
    rows = {line.split()[0].split("/")[-1]: line.split() for line in capsys.readouterr().out.splitlines()
            if "/" in line.split()[0]}
    assert set(rows) >= {"conv", "pool", "sigmoid", "nhwc"}, rows
    assert all(rows[k][-1] == "tuner" for k in ("pool", "sigmoid", "nhwc"))
    assert rows["pool"][1] == "1x8x16x16"
    assert cli.main(argv) == 0  # now from the cache
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "/" in line.split()[0]]
    assert len(rows) >= 4 and all(r[-1] == "cache" for r in rows)
