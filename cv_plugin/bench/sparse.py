"""Sparse 3-D convolution: vkconv vs spconv 2.x CPU vs a dense conv3d, in one run.

A voxelized point cloud on a 41 x 400 x 352 grid (SECOND's KITTI grid) with 30,000 active voxels;
SubM 3x3x3 and SparseConv 3x3x3 stride 2 padding 1, at 16 -> 16 and 64 -> 64 channels.  For vkconv
the rulebook (built on the device), the compute with that rulebook cached, and the total of a fresh
call are timed separately; spconv (PyPI ``spconv`` 2.3.x with CPU torch, one thread: its CPU
kernels give wrong results with more, spconv issues #679 and #719) the same way when installed
(skipped with a note otherwise); the dense conv3d (torch on one thread, else numpy) runs on a slab
of the densified grid and is scaled to the whole grid, which the output says.

Two clouds: ``uniform`` (30,000 distinct random voxels: the literal reading of "random point
cloud", where a voxel has about one active neighbour) and ``scan`` (points on a ground plane, walls
and box-shaped objects, voxelized, the 30,000 voxels nearest the sensor: surfaces, about 12 active
neighbours per voxel, closer to what a LiDAR sweep gives a SubM layer).  ``quick``: the scan cloud
at 16 channels, 3 rounds.

Times are the best of ``repeat`` rounds in which every measured call of a case runs once in turn
(the machine is shared: the best round is the least disturbed, and interleaving exposes vkconv and
spconv to the same load); ratios are taken within this run.  Writes ``sparse-<time>.jsonl`` (a meta
record, then one record per case) and, with matplotlib, ``sparse-<time>.png`` into the results folder.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import vkconv
from cv_plugin.bench import report
from vkconv.ops.sparse.rulebook import build_rulebook, make_geometry
from vkconv.ops.sparse.tensor import SparseTensor, sparse_conv3d, subm_conv3d
from vkconv.runtime.context import get_context

GRID = (41, 400, 352)
CLOUDS = ("uniform", "scan")
LAYERS: dict[str, dict[str, Any]] = {"SubM k3": dict(subm=True),
                                     "SparseConv k3 s2": dict(subm=False, stride=2, padding=1)}


def best(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` calls after one warm-up (pipelines, caches)."""
    return min(report.times(fn, 1, repeat))


def best_interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Best time of each function, running them in turn ``repeat`` times: on a shared machine the
    load then changes for all of them alike, which keeps the ratios honest."""
    for fn in fns.values():
        fn()  # warm-up: pipelines, caches
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name] += report.times(fn, 0, 1)
    return {name: min(t) for name, t in times.items()}


def uniform_cloud(rng: np.random.Generator, n: int, grid: Sequence[int]) -> np.ndarray:
    """``n`` distinct random voxels of ``grid``: [n, 4] int32 (batch 0, z, y, x), sorted."""
    lin = np.sort(rng.choice(math.prod(grid), size=n, replace=False))
    z, rest = np.divmod(lin, grid[1] * grid[2])
    y, x = np.divmod(rest, grid[2])
    return np.column_stack([np.zeros_like(z), z, y, x]).astype(np.int32)


def scan_cloud(rng: np.random.Generator, n: int, grid: Sequence[int]) -> np.ndarray:
    """Surfaces like a LiDAR sweep sees: a gently sloped ground, a few walls, box-shaped objects;
    [n, 4] int32 (batch 0, z, y, x), sorted."""
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


def vkconv_runs(st: SparseTensor, weight: np.ndarray, layer: dict, tune: bool = False) -> tuple[dict, dict]:
    """The timed vkconv calls (rulebook, compute with the rulebook cached, fresh call) and facts;
    ``tune``: the layer's tile is tuned first (and cached: the timed calls take it from the cache)."""
    ctx = get_context()
    geom = make_geometry(st.spatial_shape, 1, weight.shape[1:4], **layer)
    conv = subm_conv3d if layer["subm"] else sparse_conv3d
    kwargs = {} if layer["subm"] else dict(stride=layer["stride"], padding=layer["padding"])
    cached = SparseTensor(st.features, st.indices, st.spatial_shape, 1)
    rb = cached.indice_dict["bench"] = build_rulebook(ctx, st.indices, geom)
    if tune:
        conv(cached, weight, activation="Relu", indice_key="bench", tune=True, **kwargs)
    runs = {"vk rulebook": lambda: build_rulebook(ctx, st.indices, geom).close(),
            "vk compute": lambda: conv(cached, weight, activation="Relu", indice_key="bench", **kwargs),
            "vk total": lambda: conv(st, weight, activation="Relu", **kwargs)}
    pairs = sum(len(o) for _, o in rb.pairs())
    return runs, dict(n_out=rb.n_out, pairs=pairs)


def dense_gemm_run(c: int, pairs: int, rng: np.random.Generator) -> tuple[Callable[[], object], int, vkconv.Conv]:
    """The dense 3x3 implicit-GEMM conv of about the sparse layer's work (``pairs`` x C x C MACs):
    its timed call, its FLOPs and the op (the caller closes it)."""
    side = max(8, 4 * round(math.sqrt(pairs / 9) / 4))
    x = rng.standard_normal((1, c, side, side)).astype(np.float32)
    w = (rng.standard_normal((c, c, 3, 3)) / math.sqrt(9 * c)).astype(np.float32)
    conv = vkconv.Conv(w, None, pads=1, kernel="implicit_gemm")
    return (lambda: conv(x)), 2 * 9 * side * side * c * c, conv


def spconv_runs(spc: ModuleType, torch: ModuleType, st: SparseTensor, weight: np.ndarray,
                layer: dict) -> dict:
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


def dense_conv3d_time(c: int, stride: int, repeat: int, torch: ModuleType | None) -> tuple[float, str]:
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
    xs = np.random.default_rng(0).standard_normal((c, *[s + 2 for s in slab])).astype(np.float32)
    ws = np.random.default_rng(1).standard_normal((27, c, c)).astype(np.float32)
    out = [(s - 1) // stride + 1 for s in slab]

    def run() -> np.ndarray:
        y = np.zeros((c, *out), np.float32)
        for t, (kz, ky, kx) in enumerate(np.ndindex(3, 3, 3)):
            win = xs[:, kz:kz + (out[0] - 1) * stride + 1:stride, ky:ky + (out[1] - 1) * stride + 1:stride,
                     kx:kx + (out[2] - 1) * stride + 1:stride]
            y += np.tensordot(ws[t], win, axes=(1, 0))
        return y

    scale = math.prod(GRID) / math.prod(slab)
    return best(run, 1) * scale, f"numpy conv3d on 41x50x44 scaled x{scale:.0f} (torch not installed)"


def _peers(use_spconv: bool) -> tuple[ModuleType | None, ModuleType | None]:
    """(torch on one thread, spconv.pytorch), each None when not installed (or not wanted)."""
    torch: ModuleType | None
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        torch = None
    else:
        torch.set_num_threads(1)
    if not use_spconv:
        return torch, None
    try:
        import spconv.pytorch as spc
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip this peer
        print(f"spconv: skipped ({type(exc).__name__}: {exc}); install with: pip install torch spconv==2.3.8")
        return torch, None
    return torch, spc


def _ms(v: float | None) -> str:
    return f"{1e3 * v:8.2f}" if v is not None else f"{'-':>8}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:8.2f}" if a is not None and b else f"{'-':>8}"


def _record(cloud: str, name: str, c: int, facts: dict, t: dict[str, float], dense: float | None) -> dict:
    """The JSON record of one case: times in ms, ratios > 1 when vkconv is faster."""
    rec: dict[str, Any] = {"case": f"{cloud} {name} c{c}", "cloud": cloud, "layer": name, "channels": c, **facts}
    for key, value in t.items():
        rec[key.replace(" ", "_") + "_ms"] = 1e3 * value
    if dense is not None:
        rec["dense_ms"] = 1e3 * dense
        rec["ratio_dense_vk_total"] = dense / t["vk total"]
    if "sp total" in t:
        rec["ratio_sp_vk_rulebook"] = t["sp rulebook"] / t["vk rulebook"]
        rec["ratio_sp_vk_total"] = t["sp total"] / t["vk total"]
        rec["ratio_vk_sp_total"] = t["vk total"] / t["sp total"]  # issue 16: <= 1 at 16 channels, <= 1.4 at 64
    rec["vk_compute_gflops"] = 2e-9 * facts["pairs"] * c * c / t["vk compute"]
    if "dense gemm" in t:
        rec["dense_gemm_gflops"] = 1e-9 * facts["dense_gemm_flops"] / t["dense gemm"]
        rec["ratio_compute_dense_gemm"] = rec["vk_compute_gflops"] / rec["dense_gemm_gflops"]  # issue 16: >= 0.8
    return rec


def chart(records: Sequence[dict], path: Path) -> str:
    """Bars of vkconv's, spconv's and the dense conv3d's time per case (log scale)."""
    keys = [("vk_total_ms", "vkconv (fresh call)"), ("vk_compute_ms", "vkconv (rulebook cached)"),
            ("sp_total_ms", "spconv CPU (fresh call)"), ("dense_ms", "dense conv3d (scaled)")]
    series = {label: [r.get(key) for r in records] for key, label in keys if any(key in r for r in records)}
    return report.bar_chart(path, [r["case"] for r in records], series, ylabel="ms (best, log scale)",
                            title=f"Sparse 3-D convolution, grid {'x'.join(map(str, GRID))}")


def check(*, points: int, clouds: Sequence[str], channels: Sequence[int], repeat: int) -> None:
    """ValueError naming the first of :func:`run`'s arguments that cannot be used."""
    if points < 1 or points > math.prod(GRID):
        raise ValueError(f"points: expected 1 to {math.prod(GRID)}, got {points}")
    if not clouds or set(clouds) - set(CLOUDS):
        raise ValueError(f"clouds: expected some of {', '.join(CLOUDS)}, got {list(clouds)}")
    if not channels or min(channels) < 1:
        raise ValueError(f"channels: expected positive channel counts, got {list(channels)}")
    if repeat < 1:
        raise ValueError(f"repeat: must be at least 1, got {repeat}")


def run(*, quick: bool = False, out: Path, points: int = 30_000, clouds: Sequence[str] = CLOUDS,
        channels: Sequence[int] = (16, 64), repeat: int = 5, spconv: bool = True,
        dense: bool = True, tune: bool = False) -> list[Path]:
    """Run the benchmark, print its table, write ``sparse-<time>.jsonl`` (and the PNG chart when
    matplotlib is installed) into ``out``; returns the files written.  ``quick`` overrides
    ``clouds``, ``channels`` and ``repeat`` with scan, 16 and 3; ``tune``: each vkconv layer's tile
    is tuned (and cached) before it is timed.  ValueError names a bad argument."""
    if quick:
        clouds, channels, repeat = ("scan",), (16,), 3
    check(points=points, clouds=clouds, channels=channels, repeat=repeat)
    torch, spc = _peers(spconv)
    ctx = get_context()
    print(f"device: {ctx.info.name} ({ctx.info.type}); grid {GRID}; {points} voxels; best of {repeat}")
    rng = np.random.default_rng(0)
    dense_ms: dict[tuple[int, str], float] = {}
    how = None
    if dense:
        for c in channels:
            for name, layer in LAYERS.items():
                dense_ms[c, name], how = dense_conv3d_time(c, 1 if layer["subm"] else 2, repeat, torch)
        print(f"dense: {how}")
    header = (f"{'cloud':8} {'layer':17} {'C':>3} {'n_out':>6} {'pairs':>7} | {'vk rb':>7} {'vk comp':>8} "
              f"{'vk total':>8} | {'sp rb':>7} {'sp comp':>8} {'sp total':>8} | {'dense':>8} | "
              f"{'rb sp/vk':>8} {'total sp/vk':>11} {'dense/vk':>8}")
    lines = [header, "-" * len(header)]
    eff_header = (f"{'cloud':8} {'layer':17} {'C':>3} | {'vk/sp total':>11} | {'vk comp GFLOP/s':>15} "
                  f"{'dense GEMM GFLOP/s':>18} {'comp/dense':>10}")
    eff = [eff_header, "-" * len(eff_header)]
    records = []
    with report.Progress(len(clouds) * len(channels) * len(LAYERS), "bench sparse") as progress:
        for cloud in clouds:
            idx = (uniform_cloud if cloud == "uniform" else scan_cloud)(rng, points, GRID)
            for c in channels:
                feats = rng.standard_normal((len(idx), c)).astype(np.float32)
                st = SparseTensor(feats, idx, GRID, 1)
                for name, layer in LAYERS.items():
                    weight = (rng.standard_normal((c, 3, 3, 3, c)) / math.sqrt(27 * c)).astype(np.float32)
                    runs, facts = vkconv_runs(st, weight, layer, tune)
                    if spc is not None and torch is not None:
                        runs.update(spconv_runs(spc, torch, st, weight, layer))
                    runs["dense gemm"], facts["dense_gemm_flops"], gemm = dense_gemm_run(
                        c, facts["pairs"], np.random.default_rng(1))
                    try:
                        t = best_interleaved(runs, repeat)
                    finally:
                        gemm.close()
                    dn = dense_ms.get((c, name))
                    lines.append(
                        f"{cloud:8} {name:17} {c:3d} {facts['n_out']:6d} {facts['pairs']:7d} | "
                        f"{_ms(t['vk rulebook'])[1:]} {_ms(t['vk compute'])} {_ms(t['vk total'])} | "
                        f"{_ms(t.get('sp rulebook'))[1:]} {_ms(t.get('sp compute'))} {_ms(t.get('sp total'))} | "
                        f"{_ms(dn)} | {_ratio(t.get('sp rulebook'), t['vk rulebook'])} "
                        f"{_ratio(t.get('sp total'), t['vk total']):>11} {_ratio(dn, t['vk total'])}")
                    rec = _record(cloud, name, c, facts, t, dn)
                    records.append(rec)
                    vs_sp = f"{rec['ratio_vk_sp_total']:11.2f}" if "ratio_vk_sp_total" in rec else f"{'-':>11}"
                    eff.append(f"{cloud:8} {name:17} {c:3d} | {vs_sp} | {rec['vk_compute_gflops']:15.1f} "
                               f"{rec['dense_gemm_gflops']:18.1f} {rec['ratio_compute_dense_gemm']:10.2f}")
                    progress.step(f"{cloud} {name} c{c}: {1e3 * t['vk total']:.1f} ms")
    print("\n".join(lines))
    print("times in ms; 'comp' = the convolution with its rulebook already built, 'total' = a fresh "
          "call; ratios > 1 mean vkconv is faster")
    print("\n".join(eff))
    print("vk/sp total: vkconv's fresh call over spconv's (issue 16's targets: <= 1 at 16 channels, <= 1.4 at 64); "
          "comp/dense: the compute's GFLOP/s over the dense implicit-GEMM 3x3 conv's of comparable work (>= 0.8)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"peer": "meta", "time": stamp, "device": ctx.info.name, "grid": list(GRID), "points": points,
            "repeat": repeat, "timing": "best of interleaved rounds", "spconv": spc is not None,
            "tuned": tune,
            "dense": how, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    jsonl = report.write_jsonl(out / f"sparse-{stamp}.jsonl", [meta, *records])
    print(f"results: {jsonl}")
    png = out / f"sparse-{stamp}.png"
    print(chart(records, png))
    return [jsonl, png] if png.exists() else [jsonl]


def main(argv: Sequence[str] | None = None, default_out: Path = Path("vkconv-bench")) -> int:
    """``python -m cv_plugin.bench.sparse`` (and bench/sparse.py): the flags of :func:`run`."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--points", type=int, default=30_000)
    ap.add_argument("--cloud", choices=[*CLOUDS, "both"], default="both")
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-spconv", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the scan cloud at 16 channels, 3 rounds")
    ap.add_argument("--tune", action="store_true", help="tune each vkconv layer's tile first (cached)")
    ap.add_argument("--out", type=Path, default=default_out, help=f"results folder (default {default_out})")
    args = ap.parse_args(argv)
    clouds = CLOUDS if args.cloud == "both" else (args.cloud,)
    try:
        check(points=args.points, clouds=clouds, channels=args.channels, repeat=args.repeat)
    except ValueError as exc:
        ap.error(str(exc))
    run(quick=args.quick, out=args.out, points=args.points, clouds=clouds, channels=args.channels,
        repeat=args.repeat, spconv=not args.no_spconv, dense=not args.no_dense, tune=args.tune)
    return 0


if __name__ == "__main__":
    sys.exit(main())
