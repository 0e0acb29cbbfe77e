"""Leaks and threads: repeated forwards and net creations keep Vulkan objects and RSS flat, and
concurrent nets give bit-identical results (issue: reliability). Full counts: bench/soak.py."""
from __future__ import annotations

import numpy as np
from conftest import needs_opencv_layers

from cv_plugin.bench import soak

pytestmark = needs_opencv_layers()

# RSS noise of the allocator and OpenCV's own caches over a few hundred calls stays well below this.
RSS_SLACK = 16 << 20


def test_forwards_do_not_leak():
    g = soak.soak_forwards(1000)
    assert g.live_after == g.live_before
    assert g.rss_bytes < RSS_SLACK, f"RSS grew {g.rss_bytes / 2**20:.1f} MiB over {g.count} forwards"


def test_net_creation_does_not_leak():
    g = soak.soak_nets(100)
    assert g.live_after == g.live_before
    assert g.rss_bytes < RSS_SLACK, f"RSS grew {g.rss_bytes / 2**20:.1f} MiB over {g.count} nets"


def test_threads_are_bit_identical_to_single_thread():
    reference, results = soak.threaded_forwards(threads=4, forwards=25)
    for ref, outs in zip(reference, results):
        assert len(outs) == 25
        for out in outs:
            assert np.array_equal(out, ref)
