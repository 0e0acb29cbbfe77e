"""The README's demo: VGG-16 through ``cv2.dnn`` with every convolution on Vulkan.

    python -m cv_plugin.demo [--size 224] [--runs 3] [--seed 0]

Builds VGG-16 with seeded random weights (no download), runs it with OpenCV's own CPU layers and
through :func:`cv_plugin.read_net` in subgraph mode (the 13 convolutions, their ReLUs and the max
pools as one device-resident layer: one upload, one readback) and in layer mode (one layer per
convolution), and prints the Vulkan device, the max difference from OpenCV's output, what ran on
Vulkan, and the time per forward of each.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

import cv_plugin
import vkconv
from cv_plugin import compat
from cv_plugin.bench import report, zoo


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
    scale = float(np.abs(ref).max())
    print(f"VGG-16 at {args.size}x{args.size}, conv {flops / 1e9:.1f} GFLOP; top-5 classes of OpenCV CPU: "
          f"{np.argsort(-ref[0])[:5].tolist()}")
    print(f"OpenCV CPU                 : {1e3 * statistics.median(cpu_times):8.1f} ms per forward "
          f"(first {1e3 * cpu_first:.1f} ms)")
    ok = True
    for mode in ("subgraph", "layer"):
        with cv_plugin.read_net(model, mode=mode) as net:
            before = ctx.stats.copy()
            out, vk_first, vk_times = _timed(net, blob, args.runs)
            forwards = args.runs + 1
            submits = (ctx.stats["submits"] - before["submits"]) / forwards
            dispatches = (ctx.stats["dispatches"] - before["dispatches"]) / forwards
            routed = len(net.report.routed)
            on_vulkan = sum(1 for n in net.vulkan_forwards().values() if n == forwards)
        diff = float(np.abs(out - ref).max())
        vk_ms = 1e3 * statistics.median(vk_times)
        print(f"cv2.dnn + vkconv, {mode + ' mode':13s}: {vk_ms:8.1f} ms per forward (first {1e3 * vk_first:.1f} ms)"
              f"\n    {on_vulkan} of {routed} vkconv layers ran on Vulkan every forward; {submits:.0f} queue submits, "
              f"{dispatches:.0f} dispatches per forward; max |vkconv - OpenCV CPU| = {diff:.3g} (relative "
              f"{diff / max(scale, 1e-30):.2g}); top-5 {np.argsort(-out[0])[:5].tolist()}")
        ok = ok and diff <= 1e-3 * max(scale, 1e-30) and on_vulkan == routed == submits
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
