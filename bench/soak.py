"""Full-count soak: 10,000 forwards of a small conv net through cv2.dnn, 1,000 net creations and
destructions, and 4 threads x 200 forwards; prints RSS and live-Vulkan-object growth per 1,000.

    python bench/soak.py [--forwards 10000] [--nets 1000] [--threads 4] [--thread-forwards 200]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cv_plugin.bench import soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forwards", type=int, default=10_000)
    parser.add_argument("--nets", type=int, default=1_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--thread-forwards", type=int, default=200)
    args = parser.parse_args()
    ok = True
    for label, run in (("forwards", lambda: soak.soak_forwards(args.forwards)),
                       ("net create/forward/close", lambda: soak.soak_nets(args.nets))):
        t0 = time.perf_counter()
        g = run()
        flat = g.live_after == g.live_before
        ok &= flat
        print(f"{label:26s}: {g.count:6d} in {time.perf_counter() - t0:6.1f} s, RSS growth "
              f"{g.rss_per_1000 / 2**20:7.3f} MiB per 1,000, live Vulkan objects "
              f"{'flat' if flat else f'{g.live_before} -> {g.live_after}'}")
    t0 = time.perf_counter()
    reference, results = soak.threaded_forwards(args.threads, args.thread_forwards)
    same = all(np.array_equal(o, r) for r, outs in zip(reference, results) for o in outs)
    ok &= same
    print(f"threads                   : {args.threads} x {args.thread_forwards} forwards in "
          f"{time.perf_counter() - t0:6.1f} s, bit-identical to single-threaded: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
