"""Issue 6 benches, one process: Keras' next-frame ConvLSTM model per frame through cv2.dnn+vkconv vs
Keras (torch backend, CPU), and a 4x-upsampling ConvTranspose 256->128 at 28x28 (k=4, s=4) through
vkconv vs OpenCV's own CPU layer.  Medians of --runs after one warm-up call.

Issue 16 bench (``--efficiency``, run once per driver): ``vkconv.ConvLSTM2D`` layers, numpy in and
out, GFLOP/s = 2 x MACs of the input convolution and the recurrent convolution over all frames /
median time, next to a dense 3x3 ``vkconv.Conv`` of the same MACs forced to
``kernel="implicit_gemm"`` (C + F -> 4F channels over the N*T frames: the dense conv's raw rate),
timed in turns with it (``--rounds`` rounds of ``--runs`` turns; the efficiency is each round's
ratio of medians, reported as the median over rounds), and Keras' ConvLSTM2D (torch backend, CPU)
as the peer where keras is importable.

    python bench/conv_lstm.py [--runs 5] [--frames 10] [--size 40] [--efficiency] [--rounds 3]
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


# (name, N, T, C, side, F): the layer, and a wider one with a batch of two
LSTM_CASES = [("t10-32-64-40", 1, 10, 32, 40, 64), ("t10-64-64-32-n2", 2, 10, 64, 32, 64)]


def _keras_layer(filters: int, weights: list, shape: tuple):
    """Keras' ConvLSTM2D (torch backend) with ``weights``, built for ``shape`` (N, T, H, W, C), or
    None when keras is not importable."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as exc:
        print(f"  Keras peer: skipped ({exc})")
        return None
    layer = keras.layers.ConvLSTM2D(filters, 3, padding="same", return_sequences=True)
    layer.build(shape)
    layer.set_weights(weights)
    return lambda x: keras.ops.convert_to_numpy(layer(x))


def bench_efficiency(runs: int, rounds: int) -> None:
    """ConvLSTM2D GFLOP/s and efficiency vs the dense implicit-GEMM 3x3 conv (see the docstring)."""
    for case in LSTM_CASES:
        _efficiency_case(*case, runs=runs, rounds=rounds)


def _efficiency_case(name: str, n: int, t: int, c: int, side: int, f: int, *, runs: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, t, c, side, side)).astype(np.float32)
    k = (rng.standard_normal((3, 3, c, 4 * f)) / np.sqrt(9 * c)).astype(np.float32)
    u = (rng.standard_normal((3, 3, f, 4 * f)) / np.sqrt(9 * f)).astype(np.float32)
    b = rng.standard_normal(4 * f).astype(np.float32)
    xd = rng.standard_normal((n * t, c + f, side, side)).astype(np.float32)
    wd = (rng.standard_normal((4 * f, c + f, 3, 3)) / 20).astype(np.float32)
    flops = 2.0 * n * t * side * side * 4 * f * 9 * (c + f)
    keras_fn = _keras_layer(f, [k, u, b], (n, t, side, side, c))
    xk = np.ascontiguousarray(x.transpose(0, 1, 3, 4, 2))
    effs, lstm_ms, dense_ms, keras_ms = [], [], [], []
    with vkconv.ConvLSTM2D(k, u, b) as op, vkconv.Conv(wd, pads=1, kernel="implicit_gemm") as conv:
        fns = {"lstm": lambda: op(x), "dense": lambda: conv(xd)}
        if keras_fn is not None:
            fns["keras"] = lambda: keras_fn(xk)
            diff = np.abs(np.moveaxis(op(x), 2, -1) - keras_fn(xk)).max()
        for _ in range(rounds):
            ms = report.interleaved_ms(fns, runs)
            effs.append(ms["dense"] / ms["lstm"])
            lstm_ms.append(ms["lstm"])
            dense_ms.append(ms["dense"])
            keras_ms.append(ms.get("keras", float("nan")))
    lstm, dense, peer = (statistics.median(v) for v in (lstm_ms, dense_ms, keras_ms))
    print(f"ConvLSTM2D {name} (N={n}, T={t}, {c} -> {f} filters, 3x3, {side}x{side}):")
    print(f"  vkconv ConvLSTM2D : {lstm:8.1f} ms  {flops / lstm / 1e6:6.1f} GFLOP/s  efficiency "
          f"{statistics.median(effs):.2f} (rounds: {', '.join(f'{e:.2f}' for e in effs)})")
    print(f"  dense 3x3 conv    : {dense:8.1f} ms  {flops / dense / 1e6:6.1f} GFLOP/s  "
          f"(implicit_gemm, {c + f} -> {4 * f}, {n * t} frames)")
    if keras_fn is not None:
        print(f"  Keras-torch CPU   : {peer:8.1f} ms  {flops / peer / 1e6:6.1f} GFLOP/s  "
              f"(vkconv/Keras {lstm / peer:.2f}x, max diff {diff:.2g})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--size", type=int, default=40)
    parser.add_argument("--efficiency", action="store_true",
                        help="only the issue 16 ConvLSTM2D efficiency bench")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    info = vkconv.get_context().info
    print(f"device: {info.name}, driver: {info.driver}")
    if args.efficiency:
        bench_efficiency(args.runs, args.rounds)
        return 0
    bench_conv_transpose(args.runs)
    bench_next_frame(args.runs, args.frames, args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
