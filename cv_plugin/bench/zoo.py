"""Models built with ``onnx.helper`` from their published architectures, with seeded random weights.

Nothing is downloaded: the weights are He-initialised so activations keep a sane range through the
whole network, which keeps comparisons against OpenCV's CPU layers meaningful.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# VGG-16 (Simonyan & Zisserman, configuration D): conv widths, "M" = 2x2 max pool
VGG16_CONFIG: tuple[int | Literal["M"], ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                                512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(seed: int = 0, size: int = 224, classes: int = 1000, head: bool = True) -> onnx.ModelProto:
    """VGG-16 for a ``[1, 3, size, size]`` NCHW input ``input``, output ``logits [1, classes]``.

    13 Conv(3x3, pad 1)+Relu, 5 MaxPool(2x2), Flatten and 3 Gemm layers (the first two with Relu),
    as torchvision's ``vgg16`` exports to ONNX (its adaptive pool is the identity at 224x224).
    ``head=False`` stops after the last pool (output ``features [1, 512, size/32, size/32]``): the
    convolutions without the 480 MB of fully connected weights.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    x, channels, spatial = "input", 3, size
    for i, item in enumerate(VGG16_CONFIG):
        if item == "M":
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            x, spatial = f"pool{i}", spatial // 2
            continue
        fan_in = channels * 9
        w = rng.standard_normal((item, channels, 3, 3), dtype=np.float32) * np.sqrt(2.0 / fan_in)
        b = rng.standard_normal(item, dtype=np.float32) * 0.01
        nodes.append(helper.make_node("Conv", [x, const(f"conv{i}.w", w), const(f"conv{i}.b", b)],
                                      [f"conv{i}"], name=f"conv{i}", kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        x, channels = f"relu{i}", item
    if not head:
        nodes[-1].output[0] = "features"  # the last pool
        graph = helper.make_graph(
            nodes, "vgg16_features", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, channels, spatial, spatial])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))
    x, features = "flat", channels * spatial * spatial
    for j, width in enumerate((4096, 4096, classes)):
        w = rng.standard_normal((width, features), dtype=np.float32) * np.sqrt(2.0 / features)
        b = rng.standard_normal(width, dtype=np.float32) * 0.01
        out = "logits" if j == 2 else f"fc{j}"
        nodes.append(helper.make_node("Gemm", [x, const(f"fc{j}.w", w), const(f"fc{j}.b", b)], [out],
                                      transB=1))
        if j < 2:
            nodes.append(helper.make_node("Relu", [out], [f"fc{j}_relu"]))
            out = f"fc{j}_relu"
        x, features = out, width
    graph = helper.make_graph(
        nodes, "vgg16", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def vgg16_conv_flops(size: int = 224) -> float:
    """2 x multiply-accumulates of VGG-16's 13 convolutions at ``size`` x ``size`` (30.7 GFLOP at 224)."""
    total, channels, spatial = 0.0, 3, size
    for item in VGG16_CONFIG:
        if item == "M":
            spatial //= 2
        else:
            total += 2.0 * item * channels * 9 * spatial * spatial
            channels = item
    return total


# PP-LCNet-style backbone of a PP-OCR mobile text detector: (depthwise kernel, output channels,
# stride) per depthwise-separable block; the last block of each stride feeds the FPN.
_PPOCR_BLOCKS = ((3, 32, 1), (3, 64, 2), (3, 64, 1), (3, 128, 2), (3, 128, 1), (3, 256, 2), (5, 256, 1),
                 (5, 256, 1), (5, 512, 2), (5, 512, 1))


def ppocr_det_like(seed: int = 0, size: int = 640) -> onnx.ModelProto:
    """A text detector shaped like PP-OCR's mobile DBNet (seeded random weights), input ``x``
    ``[1, 3, size, size]`` (size a multiple of 32), output ``prob [1, 1, size, size]``.

    Backbone: a 3x3 stride-2 stem and depthwise-separable blocks (3x3 and 5x5 depthwise, 1x1
    pointwise, HardSwish) down to stride 32; neck: 1x1 lateral convs to 96 channels, nearest 2x
    upsampling and adds top-down, 3x3 convs to 24 channels, upsampled to stride 4 and concatenated;
    DB head: 3x3 conv + Relu, two 2x2 stride-2 ConvTransposes, Sigmoid.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = iter(range(10_000))

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, act: str | None = "HardSwish",
             transpose: bool = False) -> str:
        i = next(count)
        shape = (cin, cout // group, k, k) if transpose else (cout, cin // group, k, k)
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / (cin // group * k * k)))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(rng.standard_normal(cout, dtype=np.float32) * 0.01, f"b{i}"))
        attrs: dict[str, Any] = {"kernel_shape": [k, k], "strides": [stride] * 2, "group": group}
        if not transpose:
            attrs["pads"] = [k // 2] * 4
        nodes.append(helper.make_node("ConvTranspose" if transpose else "Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"],
                                      name=f"{'deconv' if transpose else 'conv'}{i}", **attrs))
        if act is None:
            return f"c{i}"
        nodes.append(helper.make_node(act, [f"c{i}"], [f"a{i}"]))
        return f"a{i}"

    def upsample(x: str, factor: int) -> str:
        i = next(count)
        inits.append(numpy_helper.from_array(np.array([1, 1, factor, factor], np.float32), f"scale{i}"))
        nodes.append(helper.make_node("Resize", [x, "", f"scale{i}"], [f"up{i}"], mode="nearest"))
        return f"up{i}"

    x, channels, stride, taps = conv("x", 3, 16, 3, 2), 16, 2, {}
    for k, cout, s in _PPOCR_BLOCKS:
        x = conv(conv(x, channels, channels, k, s, group=channels), channels, cout, 1)
        channels, stride = cout, stride * s
        taps[stride] = (x, channels)
    laterals = {s: conv(t, c, 96, 1, act=None) for s, (t, c) in taps.items() if s >= 4}
    top = laterals[32]
    merged = {32: top}
    for s in (16, 8, 4):
        i = next(count)
        nodes.append(helper.make_node("Add", [laterals[s], upsample(top, 2)], [f"sum{i}"]))
        top = merged[s] = f"sum{i}"
    parts = [upsample(conv(merged[s], 96, 24, 3, act=None), s // 4) if s > 4 else conv(merged[s], 96, 24, 3, act=None)
             for s in (32, 16, 8, 4)]
    nodes.append(helper.make_node("Concat", parts, ["fused"], axis=1))
    y = conv("fused", 96, 24, 3, act="Relu")
    y = conv(y, 24, 24, 2, 2, act="Relu", transpose=True)
    y = conv(y, 24, 1, 2, 2, act="Sigmoid", transpose=True)
    nodes.append(helper.make_node("Identity", [y], ["prob"]))
    graph = helper.make_graph(nodes, "ppocr_det_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])  # HardSwish


RAPIDOCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
PPOCR_MODELS = {"cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx", "det": "ch_PP-OCRv4_det_infer.onnx"}


def ppocr_models(cache: Path | None = None) -> dict[str, Path]:
    """PaddleOCR's PP-OCR mobile classifier and PP-OCRv4 detector (real weights), extracted from the
    ``rapidocr-onnxruntime`` wheel, which ``pip download`` fetches once into ``cache`` (default
    ``$VKCONV_TEST_CACHE`` or ``~/.cache/vkconv-tests``).  RuntimeError when pip cannot fetch it."""
    import os
    import subprocess
    import sys
    import zipfile

    cache = cache or Path(os.environ.get("VKCONV_TEST_CACHE", Path.home() / ".cache" / "vkconv-tests"))
    cache = cache / "rapidocr"
    paths = {k: cache / v for k, v in PPOCR_MODELS.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    cache.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                          RAPIDOCR_WHEEL], capture_output=True, text=True, timeout=300)
    wheels = sorted(cache.glob("rapidocr_onnxruntime-*.whl"))
    if res.returncode or not wheels:
        raise RuntimeError(f"could not fetch {RAPIDOCR_WHEEL} with pip: {res.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[-1]) as whl:
        for key, name in PPOCR_MODELS.items():
            paths[key].write_bytes(whl.read(f"rapidocr_onnxruntime/models/{name}"))
    return paths


def text_image_blob(size: int) -> np.ndarray:
    """A white page with four lines of black text, preprocessed as PP-OCR's detector expects
    (``[1, 3, size, size]``, ImageNet mean/std)."""
    import cv2

    img = np.full((size, size, 3), 255, np.uint8)
    for i, line in enumerate(["vkconv on Vulkan", "OpenCV dnn", "PP-OCRv4 det", "lavapipe CPU"]):
        cv2.putText(img, line, (10, (i + 1) * size // 5), cv2.FONT_HERSHEY_SIMPLEX, size / 320, (0, 0, 0), 2)
    return cv2.dnn.blobFromImage(img, 1 / 255.0 / 0.226, (size, size), (0.485 * 255, 0.456 * 255, 0.406 * 255),
                                 swapRB=True)
