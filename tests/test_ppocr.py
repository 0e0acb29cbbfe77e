"""Real models with real weights: PaddleOCR's PP-OCR classifier and PP-OCRv4 text detector, shipped
inside the `rapidocr-onnxruntime` wheel (fetched with pip once, into a cache directory), through
cv2.dnn in layer and subgraph modes, against OpenCV's own CPU run of the unmodified model.

The detector sees a rendered text image (its outputs on noise are all ~1e-6, where a relative
comparison means nothing).  Tolerance: max abs diff <= 1e-3 x max |expected|.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cv_plugin
from conftest import needs_opencv_layers
from cv_plugin import compat
from oracles import assert_close

pytestmark = needs_opencv_layers()

WHEEL = "rapidocr-onnxruntime==1.4.4"
MODELS = {"cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx", "det": "ch_PP-OCRv4_det_infer.onnx"}


@pytest.fixture(scope="session")
def ppocr_models() -> dict[str, Path]:
    cache = Path(os.environ.get("VKCONV_TEST_CACHE", Path.home() / ".cache" / "vkconv-tests")) / "rapidocr"
    paths = {k: cache / v for k, v in MODELS.items()}
    if not all(p.is_file() for p in paths.values()):
        cache.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), WHEEL],
                             capture_output=True, text=True, timeout=300)
        wheels = sorted(cache.glob("rapidocr_onnxruntime-*.whl"))
        if res.returncode or not wheels:
            pytest.skip(f"could not fetch {WHEEL} with pip (no package index?): {res.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[-1]) as whl:
            for key, name in MODELS.items():
                paths[key].write_bytes(whl.read(f"rapidocr_onnxruntime/models/{name}"))
    return paths


def text_image(size: int) -> np.ndarray:
    """A white page with four lines of black text, as the detector's preprocessing makes it."""
    import cv2

    img = np.full((size, size, 3), 255, np.uint8)
    for i, line in enumerate(["vkconv on Vulkan", "OpenCV dnn", "PP-OCRv4 det", "lavapipe CPU"]):
        cv2.putText(img, line, (10, (i + 1) * size // 5), cv2.FONT_HERSHEY_SIMPLEX, size / 320, (0, 0, 0), 2)
    return cv2.dnn.blobFromImage(img, 1 / 255.0 / 0.226, (size, size), (0.485 * 255, 0.456 * 255, 0.406 * 255),
                                 swapRB=True)


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
    x = text_image(320)
    expected = _cpu(ppocr_models["det"], x)
    assert (expected > 0.3).mean() > 0.02  # text was found: the comparison is not on a flat output
    with cv_plugin.read_net(ppocr_models["det"], mode=mode) as net:
        net.setInput(x)
        out = net.forward()
        routed = net.report.routed
    assert len(routed) == (64 if mode == "layer" else 1)  # 62 Conv + 2 ConvTranspose, or one subgraph
    assert_close(out, expected, 1e-3, f"det {mode}")
