#!/usr/bin/env python3
"""Tuned against heuristic kernel choice, layer by layer, timed in turns in one process.

For each case of ``bench/conv.py`` (VGG-16's 13 layers and the depthwise, 1x1 and stride-2 cases)
two ``vkconv.Conv`` ops are built on the same weights: one with ``tune=False`` (the heuristics)
and one with ``tune="cache"`` (the tuning cache's choice where it has the shape, which ``vkconv
tune`` or ``tune=True`` wrote; else the heuristics again).  Their on-device times (GPU timestamps
around the recorded plan) are taken in turns, ``--rounds`` times, so that a load change on the
machine hits both alike; the table shows the medians and tuned / heuristic per layer.

    python bench/tuned_vs_heuristic.py [--rounds 9] [--cases vgg1_2,vgg4_2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vkconv  # noqa: E402
from cv_plugin.bench import conv as conv_bench  # noqa: E402
from vkconv.runtime.timestamps import device_times  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="turns of (heuristic, tuned) per layer")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    cases = conv_bench.select(args.cases.split(",") if args.cases else None, quick=False)
    ctx = vkconv.get_context()
    print(f"device: {ctx.info.name}, driver: {ctx.info.driver}")
    print(f"{'case':20s} {'heuristic':32s} {'ms':>7s}  {'tuned (source)':40s} {'ms':>7s}  {'tuned/heur':>10s}")
    sums = [0.0, 0.0]
    for case in cases:
        x, w, b = case.arrays()
        ops = [vkconv.Conv(w, b, strides=case.stride, pads=case.pad, group=case.group, tune=mode)
               for mode in (False, "cache")]
        try:
            bodies = []
            for op in ops:
                op(x)
                body = op.plan(x.shape).body
                assert body is not None  # a built plan has recorded its body
                bodies.append(body)
            samples: list[list[float]] = [[], []]
            for _ in range(args.rounds):
                for i, body in enumerate(bodies):
                    samples[i] += device_times(ctx, body, 1 if not samples[i] else 0, 1)
            ms = [statistics.median(s) for s in samples]
            choices = [op.choice_for(x.shape) for op in ops]
        finally:
            for op in ops:
                op.close()
        sums = [s + m for s, m in zip(sums, ms)]
        tuned = f"{choices[1].candidate.label()} ({choices[1].source})"
        print(f"{case.name:20s} {choices[0].candidate.label():32s} {ms[0]:7.2f}  {tuned:40s} {ms[1]:7.2f}  "
              f"{ms[1] / ms[0]:10.3f}", flush=True)
    print(f"{'sum':20s} {'':32s} {sums[0]:7.2f}  {'':40s} {sums[1]:7.2f}  {sums[1] / sums[0]:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
