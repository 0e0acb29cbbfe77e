#!/usr/bin/env python3
"""ConvTranspose benchmark: vkconv's three paths (the gather kernel, one convolution per stride
phase, one sub-pixel convolution and a shuffle; each forced), what ``method="auto"`` picks, next to a
dense 3x3 ``vkconv.Conv`` of comparable work forced to ``kernel="implicit_gemm"`` (the dense conv's
raw arithmetic rate); then OpenCV's own CPU ConvTranspose (``cv2.dnn``) on the 2-D cases and ncnn's
Vulkan Deconvolution (fp32) on the first, each where it imports.

GFLOP/s = 2 x MACs of the direct formulation (every input pixel times every tap) / median time,
numpy in and out.  The dense conv has the layer's channels and a 3x3 kernel over a square image
(side a multiple of 4) of about the same MACs.  ``--rounds`` repeats the whole set; each round's
ratios come from that round's own medians (the machine is shared: compare within a round), and the
summary is the median over rounds.  Within a case they are timed in turns (gather, phases,
subpixel, dense, gather, ...), so that load changes hit all alike; a path that cannot run a case
shows as "-".

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
from vkconv.ops.conv_transpose import TransposeCandidate  # noqa: E402


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

    def arrays(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The case's input, weights (ONNX's ``[C_in, C_out, *k]``) and bias, drawn from ``rng``."""
        x = rng.standard_normal(self.x_shape).astype(np.float32)
        w = (rng.standard_normal((self.cin, self.cout) + (self.k,) * self.nd) / 20).astype(np.float32)
        return x, w, rng.standard_normal(self.cout).astype(np.float32)

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


PATHS = ("gather", "phases", "subpixel")


def bench_round(cases: list[Case], runs: int) -> list[dict]:
    rows = []
    for case in cases:
        rng = np.random.default_rng(0)
        x, w, b = case.arrays(rng)
        side = case.dense_side()
        xd = rng.standard_normal((case.batch, case.cin) + (side,) * case.nd).astype(np.float32)
        wd = (rng.standard_normal((case.cout, case.cin) + (3,) * case.nd) / 20).astype(np.float32)
        kw = dict(strides=case.s, pads=case.p, output_padding=case.output_padding)
        ops = {path: vkconv.ConvTranspose(w, b, method=TransposeCandidate(path), **kw) for path in PATHS}
        auto = vkconv.ConvTranspose(w, b, **kw)
        conv = vkconv.Conv(wd, b, pads=1, kernel="implicit_gemm")
        try:
            outs = {}
            for path, op in list(ops.items()):
                try:
                    outs[path] = op(x)
                except ValueError:  # the path does not apply to this case
                    ops.pop(path).close()
            row = {"case": case.name, "auto": auto.choice_for(x.shape).candidate.label()}
            fns = {f"{m}_ms": (lambda op=op, x=x: op(x)) for m, op in ops.items()}
            row |= report.interleaved_ms(fns | {"dense_ms": lambda conv=conv, xd=xd: conv(xd)}, runs)
        finally:
            for op in (*ops.values(), auto, conv):
                op.close()
        row["diff"] = max(float(np.abs(y - outs["gather"]).max() / np.abs(outs["gather"]).max())
                          for y in outs.values())
        dense_macs = case.batch * side ** case.nd * case.cin * case.cout * 3 ** case.nd
        row["dense_gflops"] = 2e-6 * dense_macs / row["dense_ms"]
        for path in ops:
            row[f"{path}_gflops"] = 2e-6 * case.macs / row[f"{path}_ms"]
            row[f"{path}_eff"] = row[f"{path}_gflops"] / row["dense_gflops"]
        rows.append(row)
    return rows


def bench_ncnn(case: Case, runs: int) -> dict | None:
    """ncnn's Vulkan Deconvolution (fp32) on ``case`` (2-D) and vkconv (``method="auto"``, heuristics or
    the tuning cache), timed in turns: median ms of each and the max |difference| (absolute and over
    max |y|), or None (with a note) when ncnn cannot run."""
    try:
        import ncnn
    except ImportError as exc:
        print(f"ncnn: skipped ({exc}); pip install ncnn")
        return None
    if ncnn.get_gpu_count() < 1:
        print("ncnn: skipped, it sees no Vulkan device")
        return None
    x, w, b = case.arrays(np.random.default_rng(0))
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

    with vkconv.ConvTranspose(w, b, strides=case.s, pads=case.p, output_padding=case.output_padding) as op:
        y, ours = forward()[None], op(x)
        path = op.choice_for(x.shape).candidate.label()
        ms = report.interleaved_ms({"ncnn": forward, "vkconv": lambda: op(x)}, runs)
    net.clear()
    diff = float(np.abs(y - ours).max())
    return {"ncnn_ms": ms["ncnn"], "vkconv_ms": ms["vkconv"], "path": path, "diff": diff,
            "rel_diff": diff / float(np.abs(ours).max()), "device": ncnn.get_gpu_device(0).info().device_name()}


def bench_opencv(cases: list[Case], runs: int, rounds: int) -> list[dict]:
    """OpenCV's own CPU ConvTranspose (``cv2.dnn`` on a one-node ONNX model, its default CPU backend
    and threads) and vkconv (``method="auto"``) on each 2-D case: medians over ``rounds`` of the
    median of ``runs`` calls each, the two timed in blocks (OpenCV's worker threads keep spinning
    after a call, which would slow a vkconv call right after it), and the max |difference| over
    max |y|.  Empty (with a note) where cv2 does not import."""
    try:
        import cv2
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        print(f"OpenCV: skipped ({exc})")
        return []
    rows = []
    for case in (c for c in cases if c.nd == 2):
        x, w, b = case.arrays(np.random.default_rng(0))
        with vkconv.ConvTranspose(w, b, strides=case.s, pads=case.p, output_padding=case.output_padding) as op:
            node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[case.s] * 2,
                                    pads=[case.p] * 4, output_padding=[case.output_padding] * 2)
            graph = helper.make_graph(
                [node], "convt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, op.output_shape(x.shape))],
                [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
            net = cv2.dnn.readNetFromONNX(np.frombuffer(model.SerializeToString(), np.uint8))

            def cv_forward(net=net, x=x) -> np.ndarray:
                net.setInput(x)
                return net.forward()

            ours, theirs = op(x), cv_forward()
            cv_ms, vk_ms = [], []
            for _ in range(rounds):
                cv_ms.append(report.median_ms(report.times(cv_forward, 1, runs)))
                vk_ms.append(report.median_ms(report.times(lambda op=op, x=x: op(x), 1, runs)))
            path = op.choice_for(x.shape).candidate.label()
        rows.append({"case": case.name, "opencv_ms": statistics.median(cv_ms), "vkconv_ms": statistics.median(vk_ms),
                     "path": path, "rel_diff": float(np.abs(ours - theirs).max() / np.abs(theirs).max()),
                     "opencv": cv2.__version__})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of the whole set")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--no-ncnn", action="store_true")
    parser.add_argument("--no-opencv", action="store_true")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    ctx = vkconv.get_context()
    print(f"device: {ctx.info.name} ({ctx.info.type}), Vulkan {ctx.info.api_version}")
    rounds = []

    def cell(row: dict, path: str) -> str:
        return (f"{row[path + '_ms']:7.1f} ({row[path + '_eff']:.2f})" if path + "_ms" in row else f"{'-':>14s}")

    for r in range(args.rounds):
        rows = bench_round(cases, args.runs)
        rounds.append(rows)
        for row in rows:
            paths = "  ".join(f"{p} {cell(row, p)}" for p in PATHS)
            print(f"round {r}: {row['case']:22s} {paths}  dense {row['dense_gflops']:5.1f} GFLOP/s  "
                  f"auto {row['auto']}  diff {row['diff']:.1e}", flush=True)
    print("\nmedians over rounds, ms (efficiency = GFLOP/s / dense implicit-GEMM 3x3 conv's GFLOP/s, same round);"
          " auto: what method=\"auto\" runs (heuristics; a tuned cache may differ)")
    print(f"{'case':22s} " + " ".join(f"{p:>14s}" for p in PATHS) + f" {'dense GF/s':>10s}  auto")
    for i, case in enumerate(cases):
        col = {key: statistics.median(rows[i][key] for rows in rounds)
               for key in rounds[0][i] if key not in ("case", "auto")}
        print(f"{case.name:22s} " + " ".join(cell(col, p) for p in PATHS)
              + f" {col['dense_gflops']:10.1f}  {rounds[-1][i]['auto']}")
    if not args.no_opencv:
        rows = bench_opencv(cases, args.runs, args.rounds)
        if rows:
            print(f"\nOpenCV {rows[0]['opencv']} CPU ConvTranspose (cv2.dnn, its default threads) against vkconv "
                  "(auto), blocks of calls, medians over rounds:")
            for row in rows:
                print(f"{row['case']:22s} OpenCV {row['opencv_ms']:7.1f} ms  vkconv ({row['path']}) "
                      f"{row['vkconv_ms']:7.1f} ms  ({row['vkconv_ms'] / row['opencv_ms']:.2f}x OpenCV's time)  "
                      f"diff {row['rel_diff']:.1e} of max |y|")
    if not args.no_ncnn:
        main_case = CASES[0]
        res = bench_ncnn(main_case, args.runs)
        if res is not None:
            print(f"\nncnn Vulkan Deconvolution fp32 on {res['device']}, {main_case.name}: {res['ncnn_ms']:.1f} ms; "
                  f"vkconv ({res['path']}) {res['vkconv_ms']:.1f} ms ({res['vkconv_ms'] / res['ncnn_ms']:.2f}x ncnn's "
                  f"time), max |diff| {res['diff']:.1e} ({res['rel_diff']:.1e} of max |y|)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
