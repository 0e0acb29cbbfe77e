"""Measured choice for ConvTranspose: every candidate the tuner can pick against onnxruntime, the
tuning cache round trip, and read_net / ``vkconv tune`` reaching ConvTranspose layers.

Tolerance: max abs difference <= 1e-4 x max |y| (the suite's).  No test depends on a timing: the
tuner's choice may be any candidate, and each is checked.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cv_plugin
import vkconv
from cv_plugin import cli
from cv_plugin import tuning as net_tuning
from cv_plugin.input_shapes import fix_input_shapes
from tests.conftest import needs_opencv_layers
from tests.oracles import assert_close, onnxruntime_reference
from vkconv.ops.conv_transpose import RUN_METHODS, TransposeCandidate, transpose_candidates
from vkconv.runtime.tunecache import cache_for

REL = 1e-4


@dataclass(frozen=True)
class Layer:
    x: tuple[int, ...]
    cout: int
    k: int
    strides: int
    pads: int = 0
    output_padding: int = 0
    methods: tuple[str, ...] = ()  # the paths that can run it

    def arrays(self):
        rng = np.random.default_rng(sum(self.x) + self.cout + self.k)
        x = rng.standard_normal(self.x).astype(np.float32)
        w = rng.standard_normal((self.x[1], self.cout, self.k, self.k)).astype(np.float32)
        return x, w, rng.standard_normal(self.cout).astype(np.float32)

    def op(self, **kw) -> vkconv.ConvTranspose:
        _, w, b = self.arrays()
        return vkconv.ConvTranspose(w, b, strides=self.strides, pads=self.pads,
                                    output_padding=self.output_padding, **kw)

    def expected(self) -> np.ndarray:
        x, w, b = self.arrays()
        return onnxruntime_reference("ConvTranspose", {"x": x, "w": w, "b": b}, {
            "strides": [self.strides] * 2, "pads": [self.pads] * 4, "kernel_shape": [self.k] * 2,
            "output_padding": [self.output_padding] * 2})


LAYERS = {
    # widths 12 and 13: phases of unequal widths (output padding), partial register tiles
    "k4s2p1": Layer((1, 8, 12, 13), 20, 4, 2, 1, methods=("subpixel", "phases", "gather")),
    "k3s2p1a1": Layer((2, 6, 7, 9), 12, 3, 2, 1, 1, methods=("subpixel", "phases", "gather")),
    "k2s2": Layer((1, 12, 5, 7), 8, 2, 2, methods=("subpixel", "phases", "gather")),
    # stride 1: one phase, on the kernel a Conv of its shape takes (the sub-pixel: and a shuffle)
    "k3s1p1": Layer((1, 8, 9, 10), 12, 3, 1, 1, methods=("subpixel", "phases", "gather")),
    # the sub-pixel convolution on Winograd (the heuristic's choice on CPU devices)
    "k4s2p1-64": Layer((1, 64, 8, 10), 32, 4, 2, 1, methods=("subpixel", "phases", "gather")),
}


@pytest.mark.parametrize("name", LAYERS)
def test_every_candidate_matches_onnxruntime(name):
    """Each candidate the tuner may time, forced: those of a path that applies run and match the
    oracle; the others are refused with a ValueError naming the candidate."""
    layer = LAYERS[name]
    x, _, _ = layer.arrays()
    expected = layer.expected()
    cands = transpose_candidates(vkconv.get_context())
    assert {c.method for c in cands} == set(RUN_METHODS)
    assert any(c.pb == 28 for c in cands) or vkconv.get_context().info.type != "cpu"
    for cand in cands:
        with layer.op(method=cand) as op:
            if cand.method not in layer.methods:
                with pytest.raises(ValueError, match="cannot run"):
                    op.choice_for(x.shape)
                continue
            choice = op.choice_for(x.shape)
            assert (choice.candidate, choice.source) == (cand, "forced")
            assert_close(op(x), expected, REL, what=f"{name} {cand.label()}")


def test_candidates_round_trip_through_json():
    for cand in transpose_candidates(vkconv.get_context()):
        assert TransposeCandidate.from_json(json.loads(json.dumps(cand.to_json()))) == cand
    for bad in ({"method": "nonesuch"}, {"kernel": "implicit_gemm"}, "phases"):
        with pytest.raises(ValueError):
            TransposeCandidate.from_json(bad)
    with pytest.raises(ValueError, match="multiples of 4"):
        TransposeCandidate("phases", 6, 28)
    with pytest.raises(ValueError, match="no register tile"):
        TransposeCandidate("gather", 16, 16)


def test_tune_stores_a_correct_choice_that_later_ops_read(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VKCONV_TUNE_BUDGET_MS", "3000")
    layer = LAYERS["k4s2p1"]
    x, _, _ = layer.arrays()
    with layer.op(tune=True) as op:
        choice = op.choice_for(x.shape)
        assert choice.source == "tuner"
        assert op.method_for(x.shape) == choice.candidate.method
        assert_close(op(x), layer.expected(), REL, what=f"tuned {choice}")
        signature = op.signature(x.shape)
        assert signature.startswith("ConvTranspose ")
    entry = json.loads(next(tmp_path.glob("*.json")).read_text())["entries"][signature]
    assert TransposeCandidate.from_json(entry["candidate"]) == choice.candidate
    assert TransposeCandidate.from_json(entry["heuristic"]).method == "phases"
    assert entry["trials"] >= 1 and entry["ms"] > 0
    with layer.op() as op:  # default VKCONV_TUNE (cache): the stored choice, no timing
        assert (op.choice_for(x.shape).source, op.choice_for(x.shape).candidate) == ("cache", choice.candidate)
        assert [str(c) for c in op.choices().values()] == [f"{choice.candidate.label()} (cache)"]


def test_cached_candidate_is_used_unless_forced_or_tune_0(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    layer = LAYERS["k3s2p1a1"]
    x, _, _ = layer.arrays()
    with layer.op() as op:
        heuristic = op.choice_for(x.shape)
        assert heuristic.source == "heuristic"
        planted = TransposeCandidate("gather") if heuristic.candidate.method == "phases" \
            else TransposeCandidate("phases", 8, 28)
        cache_for(op.ctx).put(op.signature(x.shape), {"candidate": planted.to_json(), "ms": 1.0})
    with layer.op() as op:
        choice = op.choice_for(x.shape)
        assert (choice.source, choice.candidate) == ("cache", planted)
        assert_close(op(x), layer.expected(), REL, what=str(choice))
    with layer.op(method="phases") as op:
        assert op.choice_for(x.shape).source == "forced"
    with layer.op(tune=False) as op:
        assert op.choice_for(x.shape) == heuristic
    monkeypatch.setenv("VKCONV_TUNE", "0")
    with layer.op() as op:
        assert op.choice_for(x.shape) == heuristic
    monkeypatch.setenv("VKCONV_TUNE", "cache")
    with layer.op() as op:  # an entry that is not a ConvTranspose candidate: a warning, the heuristic
        cache_for(op.ctx).put(op.signature(x.shape), {"candidate": {"kernel": "direct"}, "ms": 1.0})
        with caplog.at_level(logging.WARNING, logger="vkconv.ops.conv_transpose"):
            assert op.choice_for(x.shape) == heuristic
        assert "tuning cache entry" in caplog.text


def _decoder() -> onnx.ModelProto:
    """x [1, 4, h, w] -> 3x3 conv + Relu -> k4 s2 p1 ConvTranspose -> k2 s2 ConvTranspose."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             (("c.w", (8, 4, 3, 3)), ("t1.w", (8, 6, 4, 4)), ("t1.b", (6,)), ("t2.w", (6, 3, 2, 2)))]
    nodes = [helper.make_node("Conv", ["x", "c.w"], ["c"], name="c", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "t1.w", "t1.b"], ["t1"], name="t1", kernel_shape=[4, 4],
                              strides=[2, 2], pads=[1] * 4),
             helper.make_node("ConvTranspose", ["t1", "t2.w"], ["t2"], name="t2", kernel_shape=[2, 2],
                              strides=[2, 2])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "h", "w"])
    y = helper.make_tensor_value_info("t2", TensorProto.FLOAT, [1, 3, "H", "W"])
    graph = helper.make_graph(nodes, "decoder", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@needs_opencv_layers()
def test_read_net_and_cli_tune_cover_conv_transpose(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VKCONV_TUNE_BUDGET_MS", "0")  # the baseline alone: quick, and a cache entry
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 7)).astype(np.float32)
    model = fix_input_shapes(_decoder(), {"x": x.shape})
    expected = _onnxruntime(model, x)
    for mode in ("layer", "subgraph"):
        with cv_plugin.read_net(model, mode=mode, tune=True) as net:
            net.setInput(x)
            assert_close(np.array(net.forward()), expected, REL, what=mode)
            ops = net_tuning.conv_ops(net.state)
            assert [type(op).__name__ for _, op in ops] == ["Conv", "ConvTranspose", "ConvTranspose"], ops
            sources = [c.source for _, op in ops for c in op.choices().values()]
            # layer mode tunes all three; subgraph mode then finds them in the cache
            assert sources == (["tuner"] * 3 if mode == "layer" else ["cache"] * 3), (mode, sources)
    path = tmp_path / "decoder.onnx"
    onnx.save(_decoder(), path)
    assert cli.main(["tune", str(path), "--input-shape", "x=1,4,6,7"]) == 0  # all from the cache now
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:2] in ("c ", "t1", "t2")]
    assert [(r[0], r[-1]) for r in rows] == [("c", "cache"), ("t1", "cache"), ("t2", "cache")], rows
    assert cli.main(["run", str(path), "--runs", "1", "--debug", "--input-shape", "x=1,4,6,7"]) == 0
    debug = [line for line in capsys.readouterr().out.splitlines() if line.startswith("convtranspose ")]
    assert len(debug) == 2 and all(line.endswith("(cache)") for line in debug), debug
