#!/usr/bin/env python3
"""Sparse 3-D convolution: vkconv vs spconv 2.x CPU vs a dense conv3d, in one run.

A voxelized point cloud on a 41 x 400 x 352 grid (SECOND's KITTI grid) with 30,000 active voxels;
SubM 3x3x3 and SparseConv 3x3x3 stride 2 padding 1, at 16 -> 16 and 64 -> 64 channels.  For vkconv
the rulebook (built on the device), the compute with that rulebook cached, and the total of a fresh
call are timed separately; spconv (PyPI ``spconv`` 2.3.x with CPU torch, one thread: its CPU
kernels give wrong results with more, spconv issues #679 and #719) the same way when installed;
the dense conv3d (torch on one thread, else numpy) runs on a slab of the densified grid and is
scaled to the whole grid, which the output says.

Two clouds: ``uniform`` (30,000 distinct random voxels: the literal reading of "random point
cloud", where a voxel has about one active neighbour) and ``scan`` (points on a ground plane, walls
and box-shaped objects, voxelized, the 30,000 voxels nearest the sensor: surfaces, about 12 active
neighbours per voxel, closer to what a LiDAR sweep gives a SubM layer).

    python bench/sparse.py                 # both clouds, everything (a few minutes at most)
    python bench/sparse.py --cloud scan --channels 16 --no-dense

Times are the best of ``--repeat`` rounds in which every measured call of a case runs once in turn
(the machine is shared: the best round is the least disturbed, and interleaving exposes vkconv and
spconv to the same load); ratios are taken within this run.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vkconv  # noqa: E402
from vkconv.sparse_rulebook import build_rulebook, make_geometry  # noqa: E402

GRID = (41, 400, 352)


def best(fn, repeat: int) -> float:
    fn()  # warm-up: pipelines, caches
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_interleaved(fns: dict, repeat: int) -> dict:
    """Best time of each function, running them in turn ``repeat`` times: on a shared machine the
    load then changes for all of them alike, which keeps the ratios honest."""
    for fn in fns.values():
        fn()  # warm-up: pipelines, caches
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: min(t) for name, t in times.items()}


def uniform_cloud(rng, n: int, grid) -> np.ndarray:
    lin = np.sort(rng.choice(math.prod(grid), size=n, replace=False))
    z, rest = np.divmod(lin, grid[1] * grid[2])
    y, x = np.divmod(rest, grid[2])
    return np.column_stack([np.zeros_like(z), z, y, x]).astype(np.int32)


def scan_cloud(rng, n: int, grid) -> np.ndarray:
    """Surfaces like a LiDAR sweep sees: a gently sloped ground, a few walls, box-shaped objects."""
    d, h, w = grid
    pts = []
    ground = rng.uniform([0, 0], [h, w], (400_000, 2))
    z = 6 + 0.01 * ground[:, 0] + 0.004 * ground[:, 1] + rng.normal(0, 0.4, len(ground))
    pts.append(np.column_stack([z, ground]))
    for _ in range(6):  # walls along x or y
        y0, x0, length = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(60, 200)
        t = rng.uniform(0, length, 60_000)
        zz = rng.uniform(6, 30, len(t))
        along_x = rng.integers(2)
        pts.append(np.column_stack([zz, np.full_like(t, y0) if along_x else y0 + t,
                                    x0 + t if along_x else np.full_like(t, x0)]))
    for _ in range(40):  # cars: the sides and top of a box
        c = rng.uniform([0, 0], [h, w])
        size = rng.uniform([8, 16], [10, 22])  # 0.4 m voxels x (1.6-2 m, 3.2-4.4 m)
        u = rng.uniform(0, 1, (8000, 3))
        face = rng.integers(5, size=len(u))
        yy = c[0] + size[0] * np.where(face == 0, 0, np.where(face == 1, 1, u[:, 0]))
        xx = c[1] + size[1] * np.where(face == 2, 0, np.where(face == 3, 1, u[:, 1]))
        zz = 6 + 4 * np.where(face == 4, 1, u[:, 2])
        pts.append(np.column_stack([zz, yy, xx]))
    v = np.floor(np.concatenate(pts)).astype(np.int64)
    v = v[np.all((v >= 0) & (v < np.array(grid)), axis=1)]
    lin = np.unique((v[:, 0] * h + v[:, 1]) * w + v[:, 2])
    # keep the n voxels nearest the sensor (y = H / 2, x = 0): a range limit keeps surfaces whole,
    # where a random subset would thin them out
    ys, xs = (lin // w) % h, lin % w
    lin = np.sort(lin[np.argsort((ys - h / 2) ** 2 + xs ** 2, kind="stable")[:n]])
    z, rest = np.divmod(lin, h * w)
    y, x = np.divmod(rest, w)
    return np.column_stack([np.zeros_like(z), z, y, x]).astype(np.int32)


LAYERS = {"SubM k3": dict(subm=True), "SparseConv k3 s2": dict(subm=False, stride=2, padding=1)}


def vkconv_runs(st: vkconv.SparseTensor, weight: np.ndarray, layer: dict) -> tuple[dict, dict]:
    """The timed vkconv calls (rulebook, compute with the rulebook cached, fresh call) and facts."""
    ctx = vkconv.get_context()
    geom = make_geometry(st.spatial_shape, 1, weight.shape[1:4], **layer)
    conv = vkconv.subm_conv3d if layer["subm"] else vkconv.sparse_conv3d
    kwargs = {} if layer["subm"] else dict(stride=layer["stride"], padding=layer["padding"])
    cached = vkconv.SparseTensor(st.features, st.indices, st.spatial_shape, 1)
    rb = cached.indice_dict["bench"] = build_rulebook(ctx, st.indices, geom)
    runs = {"vk rulebook": lambda: build_rulebook(ctx, st.indices, geom).close(),
            "vk compute": lambda: conv(cached, weight, activation="Relu", indice_key="bench", **kwargs),
            "vk total": lambda: conv(st, weight, activation="Relu", **kwargs)}
    pairs = int(rb.counts.sum()) + (rb.n_out if layer["subm"] else 0)
    return runs, dict(n_out=rb.n_out, pairs=pairs)


def spconv_runs(spc, torch, st, weight: np.ndarray, layer: dict) -> dict:
    """The timed spconv calls: index building, the native gather-GEMM-scatter with those indices
    (spconv.pytorch.functional), and a fresh layer call."""
    from spconv.core import ConvAlgo
    from spconv.pytorch import functional as fsp
    from spconv.pytorch import ops

    c = weight.shape[0]
    idx = torch.from_numpy(st.indices)
    feats = torch.from_numpy(st.features)
    if layer["subm"]:
        module = spc.SubMConv3d(c, c, 3, bias=False, algo=ConvAlgo.Native)
    else:
        module = spc.SparseConv3d(c, c, 3, stride=2, padding=1, bias=False, algo=ConvAlgo.Native)
    stride = [1] * 3 if layer["subm"] else [2] * 3
    shape = list(st.spatial_shape)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
    module.requires_grad_(False)

    def indices():
        return ops.get_indice_pairs(idx, 1, shape, ConvAlgo.Native, [3] * 3, stride, [1] * 3, [1] * 3,
                                    [0] * 3, layer["subm"], False)

    out_inds, pairs, pair_num = indices()
    conv = fsp.indice_subm_conv if layer["subm"] else fsp.indice_conv

    def compute():
        with torch.no_grad():
            return torch.relu_(conv(feats, module.weight, pairs, pair_num, len(out_inds), ConvAlgo.Native))

    def fresh():
        with torch.no_grad():
            return torch.relu_(module(spc.SparseConvTensor(feats, idx, shape, 1)).features)

    return {"sp rulebook": indices, "sp compute": compute, "sp total": fresh}


def dense_conv3d_time(c: int, stride: int, repeat: int, torch) -> tuple[float, str]:
    """Dense conv3d time on the whole densified grid, scaled from a slab of it."""
    d, h, w = GRID
    if torch is not None:
        slab_w = 44
        x = torch.randn(1, c, d, h, slab_w)
        wt = torch.randn(c, c, 3, 3, 3)
        with torch.no_grad():
            t = best(lambda: torch.nn.functional.conv3d(x, wt, stride=stride, padding=1), max(1, repeat // 2))
        return t * w / slab_w, f"torch conv3d, 1 thread, on 41x400x{slab_w} scaled x{w / slab_w:g}"
    slab = (d, 50, 44)
    x = np.random.default_rng(0).standard_normal((c, *[s + 2 for s in slab])).astype(np.float32)
    wt = np.random.default_rng(1).standard_normal((27, c, c)).astype(np.float32)
    out = [(s - 1) // stride + 1 for s in slab]

    def run():
        y = np.zeros((c, *out), np.float32)
        for t, (kz, ky, kx) in enumerate(np.ndindex(3, 3, 3)):
            win = x[:, kz:kz + (out[0] - 1) * stride + 1:stride, ky:ky + (out[1] - 1) * stride + 1:stride,
                    kx:kx + (out[2] - 1) * stride + 1:stride]
            y += np.tensordot(wt[t], win, axes=(1, 0))
        return y

    scale = math.prod(GRID) / math.prod(slab)
    return best(run, 1) * scale, f"numpy conv3d on 41x50x44 scaled x{scale:.0f} (torch not installed)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=30_000)
    ap.add_argument("--cloud", choices=["uniform", "scan", "both"], default="both")
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-spconv", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    args = ap.parse_args(argv)

    torch = spc = None
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    if not args.no_spconv:
        try:
            import spconv.pytorch as spc
        except Exception as exc:  # noqa: BLE001 - any import failure means: skip this peer
            print(f"spconv: skipped ({type(exc).__name__}: {exc}); "
                  "install with: pip install torch spconv==2.3.8")
    ctx = vkconv.get_context()
    print(f"device: {ctx.info.name} ({ctx.info.type}); grid {GRID}; {args.points} voxels; "
          f"best of {args.repeat}")
    rng = np.random.default_rng(0)
    clouds = ["uniform", "scan"] if args.cloud == "both" else [args.cloud]
    dense = {}
    if not args.no_dense:
        for c in args.channels:
            for name, layer in LAYERS.items():
                dense[c, name], how = dense_conv3d_time(c, 1 if layer["subm"] else 2, args.repeat, torch)
        print(f"dense: {how}")
    header = (f"{'cloud':8} {'layer':17} {'C':>3} {'n_out':>6} {'pairs':>7} | {'vk rb':>7} {'vk comp':>8} "
              f"{'vk total':>8} | {'sp rb':>7} {'sp comp':>8} {'sp total':>8} | {'dense':>8} | "
              f"{'rb sp/vk':>8} {'total sp/vk':>11} {'dense/vk':>8}")
    print(header)
    print("-" * len(header))
    for cloud in clouds:
        idx = (uniform_cloud if cloud == "uniform" else scan_cloud)(rng, args.points, GRID)
        for c in args.channels:
            feats = rng.standard_normal((len(idx), c)).astype(np.float32)
            st = vkconv.SparseTensor(feats, idx, GRID, 1)
            for name, layer in LAYERS.items():
                weight = (rng.standard_normal((c, 3, 3, 3, c)) / math.sqrt(27 * c)).astype(np.float32)
                runs, facts = vkconv_runs(st, weight, layer)
                if spc:
                    runs.update(spconv_runs(spc, torch, st, weight, layer))
                t = best_interleaved(runs, args.repeat)
                dn = dense.get((c, name))
                ms = lambda v: f"{1e3 * v:8.2f}" if v is not None else f"{'-':>8}"  # noqa: E731
                ratio = lambda a, b: f"{a / b:8.2f}" if a is not None and b else f"{'-':>8}"  # noqa: E731
                print(f"{cloud:8} {name:17} {c:3d} {facts['n_out']:6d} {facts['pairs']:7d} | "
                      f"{ms(t['vk rulebook'])[1:]} {ms(t['vk compute'])} {ms(t['vk total'])} | "
                      f"{ms(t.get('sp rulebook'))[1:]} {ms(t.get('sp compute'))} {ms(t.get('sp total'))} | "
                      f"{ms(dn)} | {ratio(t.get('sp rulebook'), t['vk rulebook'])} "
                      f"{ratio(t.get('sp total'), t['vk total']):>11} {ratio(dn, t['vk total'])}")
    print("times in ms; 'comp' = the convolution with its rulebook already built, 'total' = a fresh "
          "call; ratios > 1 mean vkconv is faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
