#!/usr/bin/env python3
"""Dense convolution benchmark: vkconv vs ncnn's Vulkan convolution (fp32) vs OpenCV's CPU dnn.

The benchmark itself is :mod:`cv_plugin.bench.conv` (also ``vkconv bench conv``); this script
keeps its results in ``bench/results/conv-<time>.jsonl`` (+ ``.png`` when matplotlib is installed).

Usage::

    python bench/conv.py            # everything (about a minute of CPU on lavapipe)
    python bench/conv.py --quick    # a few cases, 5 runs each
    python bench/conv.py --peers vkconv,ncnn
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cv_plugin.bench import conv  # noqa: E402

if __name__ == "__main__":
    sys.exit(conv.main(default_out=ROOT / "bench" / "results"))
