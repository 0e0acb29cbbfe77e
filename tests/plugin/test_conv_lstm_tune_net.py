"""``read_net(model, tune=True)`` and ``vkconv tune`` cover ConvLSTM2D layers (layer and subgraph mode).

Oracle: the float64 numpy ConvLSTM written from Keras 3's equations (tests/conv_lstm_reference.py);
tolerance max abs diff <= 1e-4 x max |expected|.  No timing is asserted: the budget is 0 ms,
which admits the heuristic choice alone.
"""
from __future__ import annotations

import numpy as np
import onnx
from conftest import needs_opencv_layers
from conv_lstm_reference import conv_lstm2d as reference
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close

import cv_plugin
import vkconv
from cv_plugin import cli
from cv_plugin import tuning as net_tuning

pytestmark = needs_opencv_layers()


def _lstm_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """One vkconv.ConvLSTM2D node (3x3, 'same', 6 filters) on 3 frames of 4 x 9 x 7."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 4, 9, 7)).astype(np.float32)
    weights = {"kernel": (0.3 * rng.standard_normal((3, 3, 4, 24))).astype(np.float32),
               "recurrent_kernel": (0.3 * rng.standard_normal((3, 3, 6, 24))).astype(np.float32),
               "bias": (0.3 * rng.standard_normal(24)).astype(np.float32)}
    node = helper.make_node("ConvLSTM2D", ["x", *weights], ["y"], domain="vkconv", name="lstm",
                            vk_padding="same", vk_strides=[1, 1], vk_dilations=[1, 1], vk_return_sequences=1,
                            vk_activation="tanh", vk_recurrent_activation="sigmoid")
    graph = helper.make_graph([node], "conv_lstm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 6, 9, 7])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("vkconv", 1)])
    return model, x, reference(x, *weights.values())


def test_read_net_tune_true_tunes_the_conv_lstm(monkeypatch, tmp_path):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VKCONV_TUNE_BUDGET_MS", "0")
    model, x, expected = _lstm_model()
    for mode in ("layer", "subgraph"):
        with cv_plugin.read_net(model, mode=mode, tune=True) as net:
            net.setInput(x)
            assert_close(np.array(net.forward()), expected, 1e-4, what=mode)
            ops = [(key, op) for key, op in net_tuning.conv_ops(net.state) if isinstance(op, vkconv.ConvLSTM2D)]
            assert len(ops) == 1, net_tuning.conv_ops(net.state)
            sources = [c.source for c in ops[0][1].choices().values()]
            # layer mode tunes it; subgraph mode then finds it in the cache
            assert sources == (["tuner"] if mode == "layer" else ["cache"]), (mode, sources)


def test_cli_tune_lists_the_conv_lstm(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VKCONV_CACHE_DIR", str(tmp_path / "cache"))
    model, _, _ = _lstm_model()
    path = tmp_path / "lstm.onnx"
    onnx.save(model, path)
    for source in ("tuner", "cache"):
        assert cli.main(["tune", str(path), "--budget-ms", "0"]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines() if "lstm " in line]
        assert len(rows) == 1 and rows[0][-1] == source, rows
