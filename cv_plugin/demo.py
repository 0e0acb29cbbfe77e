"""The README's demo: VGG-16 through ``cv2.dnn`` with every convolution on Vulkan.

    python -m cv_plugin.demo [--size 224] [--runs 3] [--seed 0]

Builds VGG-16 with seeded random weights (no download), runs it with OpenCV's own CPU layers and
through :func:`cv_plugin.read_net`, and prints the Vulkan device, the max difference between the
two outputs, how many convolutions ran on Vulkan, and the time per forward of each.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

import cv_plugin
import vkconv
from cv_plugin import compat, zoo
from vkconv.benchmarks import report


def _timed(net, blob: np.ndarray, runs: int) -> tuple[np.ndarray, float, list[float]]:
    """Output, first-call seconds, and the seconds of ``runs`` further calls."""
    last: list[np.ndarray] = []

    def forward() -> None:
        net.setInput(blob)
        last[:] = [net.forward()]
    first = report.times(forward, warmup=0, repeat=1)[0]
    rest = report.times(forward, warmup=0, repeat=runs)
    return last[0], first, rest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--runs", type=int, default=3, help="timed forwards after the first (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    ctx = vkconv.get_context()
    info = ctx.info
    print(f"Vulkan device: {info.name} ({info.type}, Vulkan {info.api_version})")
    print(f"OpenCV {compat.cv2_module().__version__}, vkconv {vkconv.__version__}")
    model = zoo.vgg16(seed=args.seed, size=args.size)
    blob = np.random.default_rng(args.seed).random((1, 3, args.size, args.size), dtype=np.float32)
    flops = zoo.vgg16_conv_flops(args.size)

    cpu_net = compat.read_onnx(model.SerializeToString())
    ref, cpu_first, cpu_times = _timed(cpu_net, blob, args.runs)
    with cv_plugin.read_net(model) as net:
        before = ctx.stats.copy()
        out, vk_first, vk_times = _timed(net, blob, args.runs)
        forwards = args.runs + 1
        submits = (ctx.stats["submits"] - before["submits"]) / forwards
        dispatches = (ctx.stats["dispatches"] - before["dispatches"]) / forwards
        routed = len(net.report.routed)
        on_vulkan = sum(1 for n in net.vulkan_forwards().values() if n == forwards)

    diff = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    cpu_ms, vk_ms = 1e3 * statistics.median(cpu_times), 1e3 * statistics.median(vk_times)
    print(f"VGG-16 at {args.size}x{args.size}: {routed} Conv layers routed to Vulkan, {on_vulkan} ran there "
          f"on every forward ({submits:.0f} queue submits, {dispatches:.0f} dispatches per forward)")
    print(f"max |vkconv - OpenCV CPU| = {diff:.3g} (output max |x| = {scale:.3g}, "
          f"relative {diff / max(scale, 1e-30):.2g})")
    print(f"top-5 classes  OpenCV CPU: {np.argsort(-ref[0])[:5].tolist()}  "
          f"vkconv: {np.argsort(-out[0])[:5].tolist()}")
    print(f"OpenCV CPU          : {cpu_ms:8.1f} ms per forward (first {1e3 * cpu_first:.1f} ms)")
    print(f"cv2.dnn + vkconv    : {vk_ms:8.1f} ms per forward (first {1e3 * vk_first:.1f} ms, "
          f"conv {flops / 1e9:.1f} GFLOP -> {flops / (vk_ms * 1e6):.1f} GFLOP/s incl. copies and CPU layers)")
    ok = diff <= 1e-3 * max(scale, 1e-30) and on_vulkan == routed == submits
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
