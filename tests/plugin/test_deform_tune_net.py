"""``read_net(model, tune=True)`` and ``vkconv tune`` cover DeformConv layers (layer and subgraph mode).

Oracle: onnxruntime's CPU execution of the whole model (opset 19: Conv, Slice, Sigmoid,
DeformConv); tolerance max abs diff <= 1e-4 x max |expected|.  No timing is asserted: the budget
is 0 ms, which admits the heuristic choice alone.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import needs_opencv_layers
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close

import cv_plugin
import vkconv
from cv_plugin import cli
from cv_plugin import tuning as net_tuning

pytestmark = [needs_opencv_layers(),
              pytest.mark.skipif(vkconv.DeformConv not in getattr(net_tuning, "TUNABLE", ()),
                                 reason="cv_plugin.tuning does not list DeformConv among the tunable ops")]


def _dcn_block() -> tuple[onnx.ModelProto, np.ndarray]:
    """Conv -> (offset, sigmoid mask) -> DeformConv, as in DCNv2 blocks."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 8, 13, 11)).astype(np.float32)
    inits = {"w_off": (rng.standard_normal((27, 8, 3, 3)) * 0.1).astype(np.float32),
             "w": rng.standard_normal((6, 8, 3, 3)).astype(np.float32),
             "b": rng.standard_normal(6).astype(np.float32),
             "s0": np.array([0], np.int64), "s18": np.array([18], np.int64), "s27": np.array([27], np.int64),
             "ax": np.array([1], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w_off"], ["om"], pads=[1, 1, 1, 1], name="offsets"),
             helper.make_node("Slice", ["om", "s0", "s18", "ax"], ["offset"]),
             helper.make_node("Slice", ["om", "s18", "s27", "ax"], ["mlogit"]),
             helper.make_node("Sigmoid", ["mlogit"], ["mask"]),
             helper.make_node("DeformConv", ["x", "w", "offset", "b", "mask"], ["y"], pads=[1, 1, 1, 1],
                              name="dcn")]
    graph = helper.make_graph(nodes, "dcn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 13, 11])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), x


def _expected(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_read_net_tune_true_tunes_the_deform_conv(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VKCONV_TUNE_BUDGET_MS", "0")
    model, x = _dcn_block()
    expected = _expected(model, x)
    for mode in ("layer", "subgraph"):
        with cv_plugin.read_net(model, mode=mode, tune=True) as net:
            net.setInput(x)
            assert_close(np.array(net.forward()), expected, 1e-4, what=mode)
            ops = net_tuning.conv_ops(net.state)
            deform = [(key, op) for key, op in ops if isinstance(op, vkconv.DeformConv)]
            assert len(deform) == 1, ops
            sources = [c.source for c in deform[0][1].choices().values()]
            # layer mode tunes it; subgraph mode then finds it in the cache
            assert sources == (["tuner"] if mode == "layer" else ["cache"]), (mode, sources)


def test_cli_tune_lists_the_deform_conv(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path / "cache"))
    model, _ = _dcn_block()
    path = tmp_path / "dcn.onnx"
    onnx.save(model, path)
    assert cli.main(["tune", str(path), "--budget-ms", "0"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "deform " in line]
    assert len(rows) == 1 and rows[0][-1] == "tuner", rows
    assert cli.main(["tune", str(path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "deform " in line]
    assert len(rows) == 1 and rows[0][-1] == "cache", rows
