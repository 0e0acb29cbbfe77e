#!/usr/bin/env python3
"""Sparse 3-D convolution: vkconv vs spconv 2.x CPU vs a dense conv3d, in one run.

The benchmark itself is :mod:`cv_plugin.bench.sparse` (also ``vkconv bench sparse``); this
script keeps its results in ``bench/results/sparse-<time>.jsonl`` (+ ``.png`` with matplotlib).

    python bench/sparse.py                 # both clouds, everything (a few minutes at most)
    python bench/sparse.py --cloud scan --channels 16 --no-dense
    python bench/sparse.py --quick         # the scan cloud at 16 channels, 3 rounds
    python bench/sparse.py --cloud scan --tune   # each layer's register tile tuned (and cached) first
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cv_plugin.bench import sparse  # noqa: E402

if __name__ == "__main__":
    sys.exit(sparse.main(default_out=ROOT / "bench" / "results"))
