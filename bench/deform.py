#!/usr/bin/env python3
"""Deformable convolution (DCNv2: offsets + mask, 3x3, stride 1, pad 1): vkconv vs CPU peers.

The benchmark itself is :mod:`cv_plugin.bench.deform` (also ``vkconv bench deform``): ONNX
Runtime, torchvision and ncnn where importable, vkconv's per-stage on-device times from GPU
timestamps, its efficiency against the dense implicit-GEMM 3x3 conv of the same size (timed
alternately in the same process), and PASS/FAIL against issue 4's targets and issue 16's
efficiency.  This script keeps its results in ``bench/results/deform-<time>.jsonl`` (+ ``.png`` with matplotlib).

    python bench/deform.py                 # 64x56, 256x28, 128x56 with 1 and 4 offset groups
    python bench/deform.py --runs 7 --warmup 2 --repeat 5 --cases 64x56,256x28 --og 1,4
    python bench/deform.py --quick         # 16 channels at 16x16, og 1 and 2, one round
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cv_plugin.bench import deform  # noqa: E402

if __name__ == "__main__":
    sys.exit(deform.main(default_out=ROOT / "bench" / "results"))
