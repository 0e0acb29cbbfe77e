"""Issue 6 benches, one process: Keras' next-frame ConvLSTM model per frame through cv2.dnn+vkconv vs
Keras (torch backend, CPU), and a 4x-upsampling ConvTranspose 256->128 at 28x28 (k=4, s=4) through
vkconv vs OpenCV's own CPU layer.  Medians of --runs after one warm-up call.

    python bench/conv_lstm.py [--runs 5] [--frames 10] [--size 40]
"""
from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import cv_plugin
import vkconv
from cv_plugin import compat
from cv_plugin.bench import report


def _median_ms(fn, runs: int) -> float:
    return 1e3 * statistics.median(report.times(fn, warmup=1, repeat=runs))


def bench_next_frame(runs: int, frames: int, size: int) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras

        from cv_plugin.keras import next_frame_model, to_onnx
    except ImportError as exc:
        print(f"ConvLSTM next-frame: skipped, Keras is not installed ({exc}); pip install '.[keras]'")
        return
    model = next_frame_model(size=size, seed=0)
    x = (np.random.default_rng(1).uniform(size=(1, frames, size, size, 1)) > 0.8).astype(np.float32)
    keras_ms = _median_ms(lambda: keras.ops.convert_to_numpy(model(x, training=False)), runs)
    with cv_plugin.read_net(to_onnx(model)) as net:
        def forward():
            net.setInput(x)
            return net.forward()
        vk_ms = _median_ms(forward, runs)
    print(f"ConvLSTM next-frame model ({frames} frames {size}x{size}, 3 x ConvLSTM2D(64)):")
    print(f"  Keras-torch CPU   : {keras_ms:8.1f} ms/forward  {keras_ms / frames:7.1f} ms/frame")
    print(f"  cv2.dnn + vkconv  : {vk_ms:8.1f} ms/forward  {vk_ms / frames:7.1f} ms/frame"
          f"  (vkconv/Keras {vk_ms / keras_ms:.2f}x)")


def bench_conv_transpose(runs: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 256, 28, 28)).astype(np.float32)
    w = (rng.standard_normal((256, 128, 4, 4)) * 0.05).astype(np.float32)
    flops = 2.0 * x.size * 128 * 16
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[4, 4], kernel_shape=[4, 4])
    graph = helper.make_graph([node], "up", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 112, 112])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cpu = compat.read_onnx(model.SerializeToString())

    def cpu_forward():
        cpu.setInput(x)
        return cpu.forward()
    with vkconv.ConvTranspose(w, strides=4) as op:
        vk_ms = _median_ms(lambda: op(x), runs)
        diff = float(np.abs(op(x) - cpu_forward()).max())
    cpu_ms = _median_ms(cpu_forward, runs)
    print("ConvTranspose 256->128, 28x28 -> 112x112 (k4 s4):")
    print(f"  OpenCV CPU        : {cpu_ms:8.1f} ms  {flops / cpu_ms / 1e6:6.1f} GFLOP/s")
    print(f"  vkconv            : {vk_ms:8.1f} ms  {flops / vk_ms / 1e6:6.1f} GFLOP/s"
          f"  (vkconv/OpenCV {vk_ms / cpu_ms:.2f}x, max diff {diff:.2g})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--size", type=int, default=40)
    args = parser.parse_args()
    print(f"device: {vkconv.get_context().info.name}")
    bench_conv_transpose(args.runs)
    bench_next_frame(args.runs, args.frames, args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
