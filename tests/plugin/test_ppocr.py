"""Real models with real weights: PaddleOCR's PP-OCR classifier and PP-OCRv4 text detector, shipped
inside the `rapidocr-onnxruntime` wheel (fetched with pip once, into a cache directory), through
cv2.dnn in layer and subgraph modes, against OpenCV's own CPU run of the unmodified model.

The detector sees a rendered text image (its outputs on noise are all ~1e-6, where a relative
comparison means nothing).  Tolerance: max abs diff <= 1e-3 x max |expected|.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import needs_opencv_layers
from oracles import assert_close

import cv_plugin
from cv_plugin import compat
from cv_plugin.bench import zoo

pytestmark = needs_opencv_layers()


@pytest.fixture(scope="session")
def ppocr_models() -> dict[str, Path]:
    try:
        return zoo.ppocr_models()
    except RuntimeError as exc:
        pytest.skip(f"{exc} (no package index?)")


def _cpu(path: Path, x: np.ndarray) -> np.ndarray:
    net = compat.read_onnx(path.read_bytes())
    net.setInput(x)
    return net.forward()


@pytest.mark.parametrize("mode", ["layer", "subgraph"])
def test_ppocr_classifier(ppocr_models, mode):
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
    with cv_plugin.read_net(ppocr_models["cls"], mode=mode) as net:
        net.setInput(x)
        out = net.forward()
        assert len(net.report.routed) >= 1 and sum(net.vulkan_forwards().values()) >= 1
    assert_close(out, _cpu(ppocr_models["cls"], x), 1e-3, f"cls {mode}")


@pytest.mark.parametrize("mode", ["layer", "subgraph"])
def test_ppocr_v4_detector(ppocr_models, mode):
    x = zoo.text_image_blob(320)
    expected = _cpu(ppocr_models["det"], x)
    assert (expected > 0.3).mean() > 0.02  # text was found: the comparison is not on a flat output
    with cv_plugin.read_net(ppocr_models["det"], mode=mode) as net:
        net.setInput(x)
        out = net.forward()
        routed = net.report.routed
    assert len(routed) == (64 if mode == "layer" else 1)  # 62 Conv + 2 ConvTranspose, or one subgraph
    assert_close(out, expected, 1e-3, f"det {mode}")
