#!/usr/bin/env python3
"""ConvTranspose benchmark: vkconv's gather kernel vs its stride-phase decomposition, each next to a
dense 3x3 ``vkconv.Conv`` of comparable work forced to ``kernel="implicit_gemm"`` (the dense conv's
raw arithmetic rate), and ncnn's Vulkan Deconvolution (fp32) where ``import ncnn`` works.

GFLOP/s = 2 x MACs of the direct formulation (every input pixel times every tap) / median time,
numpy in and out.  The dense conv has the layer's channels and a 3x3 kernel over a square image
(side a multiple of 4) of about the same MACs.  ``--rounds`` repeats the whole set; each round's
ratios come from that round's own medians (the machine is shared: compare within a round), and the
summary is the median over rounds.  Within a case the three are timed in turns (gather, phases,
dense, gather, ...), so that load changes hit all three alike.

    python bench/conv_transpose.py [--runs 5] [--rounds 3] [--cases k4s2p1-128-64-56,...]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import vkconv  # noqa: E402
from cv_plugin.bench import report  # noqa: E402


@dataclass(frozen=True)
class Case:
    """A 2-D (or 3-D) ConvTranspose: square kernel ``k``, stride ``s``, symmetric pad ``p``."""

    name: str
    cin: int
    cout: int
    k: int
    s: int
    p: int
    size: int
    output_padding: int = 0
    nd: int = 2
    batch: int = 1

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (self.batch, self.cin) + (self.size,) * self.nd

    @property
    def macs(self) -> int:
        return math.prod(self.x_shape) * self.cout * self.k ** self.nd

    def dense_side(self) -> int:
        """Side of the 3x3 (3x3x3) conv image with about this layer's MACs, a multiple of 4."""
        pixels = self.macs / (self.cin * self.cout * 3 ** self.nd * self.batch)
        return max(4, 4 * round(pixels ** (1 / self.nd) / 4))


CASES = [
    Case("k4s2p1-128-64-56", 128, 64, 4, 2, 1, 56),       # the decoder / GAN upsampler (issue 16)
    Case("k4s2p1-256-128-28", 256, 128, 4, 2, 1, 28),
    Case("k3s2p1a1-64-32-56", 64, 32, 3, 2, 1, 56, 1),    # 3x3 stride 2 + output_padding (unequal phases)
    Case("k5s3p1-64-64-30", 64, 64, 5, 3, 1, 30),        # stride 3: 2x2, 2x1, 1x1 sub-kernels
    Case("k4s2p1-64-3-64", 64, 3, 4, 2, 1, 64),           # a GAN's last layer: 3 output channels
    Case("k4s2p1-32-16-16-3d", 32, 16, 4, 2, 1, 16, nd=3),
]


def bench_round(cases: list[Case], runs: int) -> list[dict]:
    rows = []
    for case in cases:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(case.x_shape).astype(np.float32)
        w = (rng.standard_normal((case.cin, case.cout) + (case.k,) * case.nd) / 20).astype(np.float32)
        b = rng.standard_normal(case.cout).astype(np.float32)
        side = case.dense_side()
        xd = rng.standard_normal((case.batch, case.cin) + (side,) * case.nd).astype(np.float32)
        wd = (rng.standard_normal((case.cout, case.cin) + (3,) * case.nd) / 20).astype(np.float32)
        ops = {method: vkconv.ConvTranspose(w, b, strides=case.s, pads=case.p, output_padding=case.output_padding,
                                            method=method) for method in ("gather", "phases")}
        conv = vkconv.Conv(wd, b, pads=1, kernel="implicit_gemm")
        try:
            for method, op in ops.items():
                assert op.method_for(x.shape) == method, (case, method)
            outs = {method: op(x) for method, op in ops.items()}
            row = {"case": case.name}
            fns = {f"{m}_ms": (lambda op=op, x=x: op(x)) for m, op in ops.items()}
            row |= report.interleaved_ms(fns | {"dense_ms": lambda conv=conv, xd=xd: conv(xd)}, runs)
        finally:
            for op in ops.values():
                op.close()
            conv.close()
        row["diff"] = float(np.abs(outs["phases"] - outs["gather"]).max() / np.abs(outs["gather"]).max())
        dense_macs = case.batch * side ** case.nd * case.cin * case.cout * 3 ** case.nd
        row["dense_gflops"] = 2e-6 * dense_macs / row["dense_ms"]
        for method in ("gather", "phases"):
            row[f"{method}_gflops"] = 2e-6 * case.macs / row[f"{method}_ms"]
            row[f"{method}_eff"] = row[f"{method}_gflops"] / row["dense_gflops"]
        rows.append(row)
    return rows


def bench_ncnn(case: Case, runs: int) -> dict | None:
    """ncnn's Vulkan Deconvolution (fp32) on ``case`` (2-D) and vkconv's phases, timed in turns: median
    ms of each and the max |difference| (absolute and over max |y|), or None (with a note) when ncnn
    cannot run."""
    try:
        import ncnn
    except ImportError as exc:
        print(f"ncnn: skipped ({exc}); pip install ncnn")
        return None
    if ncnn.get_gpu_count() < 1:
        print("ncnn: skipped, it sees no Vulkan device")
        return None
    rng = np.random.default_rng(0)
    x = rng.standard_normal(case.x_shape).astype(np.float32)
    w = (rng.standard_normal((case.cin, case.cout, case.k, case.k)) / 20).astype(np.float32)
    b = rng.standard_normal(case.cout).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        # ncnn's Deconvolution takes its weights as [C_out][C_in][kh][kw] (onnx2ncnn transposes ONNX's).
        Path(tmp, "m.param").write_text(
            f"7767517\n2 2\nInput data 0 1 data 0={case.size} 1={case.size} 2={case.cin}\n"
            f"Deconvolution up 1 1 data out 0={case.cout} 1={case.k} 2=1 3={case.s} 4={case.p} "
            f"18={case.output_padding} 5=1 6={w.size}\n")
        wn = np.ascontiguousarray(w.transpose(1, 0, 2, 3))
        Path(tmp, "m.bin").write_bytes(np.zeros(1, np.uint32).tobytes() + wn.tobytes() + b.tobytes())
        net = ncnn.Net()
        net.opt.use_vulkan_compute = True
        net.opt.use_fp16_packed = False
        net.opt.use_fp16_storage = False
        net.opt.use_fp16_arithmetic = False
        net.load_param(str(Path(tmp, "m.param")))
        net.load_model(str(Path(tmp, "m.bin")))

    def forward() -> np.ndarray:
        ex = net.create_extractor()
        ex.input("data", ncnn.Mat(x[0]))
        ret, out = ex.extract("out")
        if ret != 0:
            raise RuntimeError(f"ncnn extract failed ({ret})")
        return np.array(out)

    with vkconv.ConvTranspose(w, b, strides=case.s, pads=case.p, output_padding=case.output_padding,
                              method="phases") as op:
        y, ours = forward()[None], op(x)
        ms = report.interleaved_ms({"ncnn": forward, "phases": lambda: op(x)}, runs)
    net.clear()
    diff = float(np.abs(y - ours).max())
    return {"ncnn_ms": ms["ncnn"], "phases_ms": ms["phases"], "diff": diff,
            "rel_diff": diff / float(np.abs(ours).max()), "device": ncnn.get_gpu_device(0).info().device_name()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of the whole set")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--no-ncnn", action="store_true")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    ctx = vkconv.get_context()
    print(f"device: {ctx.info.name} ({ctx.info.type}), Vulkan {ctx.info.api_version}")
    rounds = []
    for r in range(args.rounds):
        rows = bench_round(cases, args.runs)
        rounds.append(rows)
        for row in rows:
            print(f"round {r}: {row['case']:22s} gather {row['gather_ms']:7.1f} ms ({row['gather_eff']:.2f})  "
                  f"phases {row['phases_ms']:7.1f} ms ({row['phases_eff']:.2f})  dense {row['dense_gflops']:5.1f} "
                  f"GFLOP/s  diff {row['diff']:.1e}", flush=True)
    print("\nmedians over rounds (efficiency = GFLOP/s / dense implicit-GEMM 3x3 conv's GFLOP/s, same round)")
    print(f"{'case':22s} {'gather ms':>9s} {'eff':>5s} {'phases ms':>9s} {'eff':>5s} {'speedup':>7s} "
          f"{'dense GF/s':>10s}")
    for i, case in enumerate(cases):
        col = {key: statistics.median(rows[i][key] for rows in rounds) for key in rounds[0][i] if key != "case"}
        speedup = statistics.median(rows[i]["gather_ms"] / rows[i]["phases_ms"] for rows in rounds)
        print(f"{case.name:22s} {col['gather_ms']:9.1f} {col['gather_eff']:5.2f} {col['phases_ms']:9.1f} "
              f"{col['phases_eff']:5.2f} {speedup:7.2f} {col['dense_gflops']:10.1f}")
    if not args.no_ncnn:
        main_case = CASES[0]
        res = bench_ncnn(main_case, args.runs)
        if res is not None:
            print(f"\nncnn Vulkan Deconvolution fp32 on {res['device']}, {main_case.name}: {res['ncnn_ms']:.1f} ms; "
                  f"vkconv phases {res['phases_ms']:.1f} ms ({res['phases_ms'] / res['ncnn_ms']:.2f}x ncnn's time), "
                  f"max |diff| {res['diff']:.1e} ({res['rel_diff']:.1e} of max |y|)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
