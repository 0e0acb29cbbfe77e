#!/usr/bin/env python3
"""Dense convolution benchmark: vkconv vs ncnn's Vulkan convolution (fp32) vs OpenCV's CPU dnn.

Cases: the 13 VGG-16 convolutions at 224x224 (batch 1, 3x3, pad 1), a 3x3 depthwise conv with 96
channels at 56x56, a 1x1 96->384 conv at 56x56 and a 3x3 stride-2 128->256 conv at 56x56.
Every peer runs in its own process (``--peer``), on the same inputs and weights, so that no peer
shares a Vulkan instance or a thread pool with another.  Per case and peer: the median of
``--repeat`` (>= 5) timed runs after ``--warmup`` runs, "numpy in -> numpy out" (what a cv2
layer pays); for vkconv also "on-device": the recorded dispatches alone between two GPU
timestamps.  GFLOP/s counts 2 x MACs of the direct convolution (Winograd's "effective" rate).
The FMA peak comes from shaders/fma_probe.comp (independent vec4 fma chains, best of 8/16/32
chains).  Outputs of ncnn and OpenCV are compared with vkconv's (max abs diff / max |y|).

Writes ``bench/results/conv-<time>.jsonl`` (one JSON object per peer and case, plus the probe and
the summary) and, when matplotlib is installed, ``conv-<time>.png``.

Usage::

    python bench/conv.py            # everything (about a minute of CPU on lavapipe)
    python bench/conv.py --quick    # a few cases, 5 runs each
    python bench/conv.py --peers vkconv,ncnn
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PEERS = ("vkconv", "ncnn", "opencv")


@dataclass(frozen=True)
class Case:
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    size: int
    group: int = 1

    @property
    def pad(self) -> int:
        return self.k // 2

    @property
    def out(self) -> int:
        return (self.size + 2 * self.pad - self.k) // self.stride + 1

    @property
    def flops(self) -> int:
        return 2 * self.cout * (self.cin // self.group) * self.k * self.k * self.out * self.out

    @property
    def vgg(self) -> bool:
        return self.name.startswith("vgg")

    def arrays(self):
        rng = np.random.default_rng(sum(map(ord, self.name)))
        x = rng.standard_normal((1, self.cin, self.size, self.size)).astype(np.float32)
        fan_in = self.cin // self.group * self.k * self.k
        w = (rng.standard_normal((self.cout, self.cin // self.group, self.k, self.k))
             / math.sqrt(fan_in)).astype(np.float32)
        b = rng.standard_normal(self.cout).astype(np.float32) * 0.1
        return x, w, b


_VGG = [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56), (256, 256, 56),
        (256, 256, 56), (256, 512, 28), (512, 512, 28), (512, 512, 28), (512, 512, 14), (512, 512, 14),
        (512, 512, 14)]
_VGG_NAMES = ["1_1", "1_2", "2_1", "2_2", "3_1", "3_2", "3_3", "4_1", "4_2", "4_3", "5_1", "5_2", "5_3"]
CASES = [Case(f"vgg{n}", cin, cout, 3, 1, size) for n, (cin, cout, size) in zip(_VGG_NAMES, _VGG)] + [
    Case("dw3x3_c96_56", 96, 96, 3, 1, 56, group=96),
    Case("pw1x1_96to384_56", 96, 384, 1, 1, 56),
    Case("s2_3x3_128to256_56", 128, 256, 3, 2, 56),
]
QUICK = ["vgg1_1", "vgg4_2", "vgg5_1", "dw3x3_c96_56", "pw1x1_96to384_56", "s2_3x3_128to256_56"]


def _times(fn, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _emit(record: dict) -> None:
    print("BENCH " + json.dumps(record), flush=True)


# -- peers (each runs in its own process) ------------------------------------------------------
class DeviceTimer:
    """GPU timestamps around whatever ``record(cmd)`` puts in a command buffer."""

    def __init__(self, ctx):
        import vulkan as vk

        self.vk, self.ctx = vk, ctx
        self.period_ns = vk.vkGetPhysicalDeviceProperties(ctx.physical_device).limits.timestampPeriod
        self.pool = vk.vkCreateQueryPool(ctx.device, vk.VkQueryPoolCreateInfo(
            queryType=vk.VK_QUERY_TYPE_TIMESTAMP, queryCount=2), None)
        self._data = vk.ffi.new("uint64_t[2]")

    def times(self, record, warmup: int, repeat: int) -> list[float]:
        from vkconv.command import CommandBuffer

        vk = self.vk
        with CommandBuffer(self.ctx) as cmd:
            cmd.begin()
            vk.vkCmdResetQueryPool(cmd.handle, self.pool, 0, 2)
            vk.vkCmdWriteTimestamp(cmd.handle, vk.VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, self.pool, 0)
            record(cmd)
            vk.vkCmdWriteTimestamp(cmd.handle, vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, self.pool, 1)
            cmd.end()
            out = []
            for i in range(warmup + repeat):
                cmd.submit()
                vk.vkGetQueryPoolResults(self.ctx.device, self.pool, 0, 2, 16, self._data, 8,
                                         vk.VK_QUERY_RESULT_64_BIT | vk.VK_QUERY_RESULT_WAIT_BIT)
                if i >= warmup:
                    out.append((self._data[1] - self._data[0]) * self.period_ns * 1e-9)
        return out

    def close(self) -> None:
        self.vk.vkDestroyQueryPool(self.ctx.device, self.pool, None)


def fma_peak(ctx, timer: DeviceTimer) -> dict:
    """GFLOP/s of shaders/fma_probe.comp: the best run over 8, 16 and 32 independent vec4 chains."""
    import struct

    from vkconv.buffer import Buffer
    from vkconv.conv_kernels import local_size
    from vkconv.pipeline import DescriptorSet

    local, iterations, groups = local_size(ctx), 2048, 512
    results = {}
    with Buffer(ctx, 16 * local * groups, name="fma probe output") as out:
        for chains in (8, 16, 32):
            pipe = ctx.pipeline("fma_probe", 1, 8, (local, 1, 1, 0, chains))
            dset = DescriptorSet(pipe, [out])
            push = struct.pack("<if", iterations, 0.999)
            # A peak: the best of the runs (other processes on the machine only ever slow it).
            t = min(timer.times(lambda cmd: cmd.dispatch(pipe, dset, push, (groups, 1, 1)), 1, 7))
            results[chains] = 8 * chains * iterations * local * groups / t / 1e9
            dset.close()
    best = max(results, key=results.get)
    return {"peer": "probe", "gflops": results[best], "chains": best, "by_chains": results}


def run_vkconv(cases, warmup, repeat, outdir):
    import vkconv

    ctx = vkconv.get_context()
    timer = DeviceTimer(ctx)
    probe = fma_peak(ctx, timer)
    for case in cases:
        x, w, b = case.arrays()
        with vkconv.Conv(w, b, strides=case.stride, pads=case.pad, group=case.group) as op:
            y = op(x)
            host = _times(lambda: op(x), warmup, repeat)
            plan = op.plan(x.shape)
            device = timer.times(plan.body, warmup, repeat)
            kernel = op.kernel_for(x.shape)
        np.save(outdir / f"vkconv-{case.name}.npy", y)
        _emit({"peer": "vkconv", "case": case.name, "kernel": kernel, "ms": 1e3 * statistics.median(host),
               "ms_device": 1e3 * statistics.median(device), "runs": len(host)})
    # Probed before and after the cases: the better of the two is the peak.
    again = fma_peak(ctx, timer)
    _emit(max(probe, again, key=lambda r: r["gflops"]) | {"device": ctx.info.name})
    timer.close()


def run_ncnn(cases, warmup, repeat, outdir):
    import ncnn

    if ncnn.get_gpu_count() < 1:
        raise RuntimeError("ncnn sees no Vulkan device")
    device = ncnn.get_gpu_device(0).info().device_name()
    for case in cases:
        x, w, b = case.arrays()
        with tempfile.TemporaryDirectory() as tmp:
            layer = "ConvolutionDepthWise" if case.group > 1 else "Convolution"
            extra = f" 7={case.group}" if case.group > 1 else ""
            Path(tmp, "m.param").write_text(
                f"7767517\n2 2\nInput data 0 1 data 0={case.size} 1={case.size} 2={case.cin}\n"
                f"{layer} conv 1 1 data out 0={case.cout} 1={case.k} 2=1 3={case.stride} 4={case.pad} "
                f"5=1 6={w.size}{extra}\n")
            # Weight blob: a 0 tag (raw float32), the weights, then the bias.
            Path(tmp, "m.bin").write_bytes(np.zeros(1, np.uint32).tobytes() + w.tobytes() + b.tobytes())
            net = ncnn.Net()
            net.opt.use_vulkan_compute = True
            net.opt.use_fp16_packed = False
            net.opt.use_fp16_storage = False
            net.opt.use_fp16_arithmetic = False
            net.load_param(str(Path(tmp, "m.param")))
            net.load_model(str(Path(tmp, "m.bin")))

        def run():
            ex = net.create_extractor()
            ex.input("data", ncnn.Mat(x[0]))
            ret, out = ex.extract("out")
            if ret != 0:
                raise RuntimeError(f"ncnn extract failed ({ret})")
            return np.array(out)

        y = run()[None]
        host = _times(run, warmup, repeat)
        np.save(outdir / f"ncnn-{case.name}.npy", y)
        _emit({"peer": "ncnn", "case": case.name, "ms": 1e3 * statistics.median(host), "runs": len(host),
               "device": device})
        net.clear()


def run_opencv(cases, warmup, repeat, outdir):
    import cv2
    from onnx import TensorProto, helper, numpy_helper

    for case in cases:
        x, w, b = case.arrays()
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[case.stride] * 2,
                                pads=[case.pad] * 4, group=case.group, kernel_shape=[case.k] * 2)
        graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                 [1, case.cout, case.out, case.out])],
                                  initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "conv.onnx")
            path.write_bytes(model.SerializeToString())
            net = cv2.dnn.readNetFromONNX(str(path))
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

        def run():
            net.setInput(x)
            return net.forward()

        y = run()
        host = _times(run, warmup, repeat)
        np.save(outdir / f"opencv-{case.name}.npy", y)
        _emit({"peer": "opencv", "case": case.name, "ms": 1e3 * statistics.median(host), "runs": len(host),
               "threads": cv2.getNumThreads()})


_RUNNERS = {"vkconv": run_vkconv, "ncnn": run_ncnn, "opencv": run_opencv}


# -- driver ------------------------------------------------------------------------------------
def _run_peer(peer: str, args, outdir: Path) -> list[dict]:
    cmd = [sys.executable, __file__, "--peer", peer, "--cases", ",".join(c.name for c in args.selected),
           "--warmup", str(args.warmup), "--repeat", str(args.repeat), "--outdir", str(outdir)]
    print(f"-- {peer} ...", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    records = [json.loads(line[6:]) for line in res.stdout.splitlines() if line.startswith("BENCH ")]
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        print(f"   {peer} skipped: {' | '.join(tail)}", file=sys.stderr)
        return [{"peer": peer, "skipped": " | ".join(tail)}] + records
    return records


def _max_rel_diff(a: Path, b: Path) -> float | None:
    if not (a.exists() and b.exists()):
        return None
    ya, yb = np.load(a), np.load(b)
    if ya.shape != yb.shape:
        return float("inf")
    return float(np.abs(ya.astype(np.float64) - yb).max() / max(np.abs(yb).max(), 1e-12))


def summarize(cases, records, outdir: Path) -> tuple[list[dict], str]:
    by = {(r.get("peer"), r.get("case")): r for r in records}
    probe = by.get(("probe", None), {}).get("gflops")
    rows, lines = [], []
    head = (f"{'case':20s} {'GFLOP':>6s} {'kernel':>13s} {'vk ms':>8s} {'vk dev':>8s} {'GFLOP/s':>7s} "
            f"{'%peak':>5s} {'ncnn ms':>8s} {'vk/ncnn':>7s} {'cv ms':>8s} {'vk/cv':>6s} {'diff ncnn':>9s}")
    lines += [head, "-" * len(head)]
    sums = {"vkconv": 0.0, "vkconv_device": 0.0, "ncnn": 0.0, "opencv": 0.0}
    vgg_complete = {"ncnn": True, "opencv": True}
    for case in cases:
        vk, nc, cv = by.get(("vkconv", case.name)), by.get(("ncnn", case.name)), by.get(("opencv", case.name))
        row = {"case": case.name, "gflop": case.flops / 1e9, **{k: v for k, v in asdict(case).items() if k != "name"}}
        if vk:
            row |= {"kernel": vk["kernel"], "vkconv_ms": vk["ms"], "vkconv_device_ms": vk["ms_device"],
                    "gflops": case.flops / vk["ms"] / 1e6, "gflops_device": case.flops / vk["ms_device"] / 1e6}
            if probe:
                row["pct_peak_device"] = 100 * row["gflops_device"] / probe
        if nc:
            row["ncnn_ms"] = nc["ms"]
            row["ncnn_diff"] = _max_rel_diff(outdir / f"ncnn-{case.name}.npy", outdir / f"vkconv-{case.name}.npy")
        if cv:
            row["opencv_ms"] = cv["ms"]
            row["opencv_diff"] = _max_rel_diff(outdir / f"opencv-{case.name}.npy", outdir / f"vkconv-{case.name}.npy")
        if vk and nc:
            row["ratio_vkconv_ncnn"] = vk["ms"] / nc["ms"]
        if vk and cv:
            row["ratio_vkconv_opencv"] = vk["ms"] / cv["ms"]
        if case.vgg:
            sums["vkconv"] += row.get("vkconv_ms", 0.0)
            sums["vkconv_device"] += row.get("vkconv_device_ms", 0.0)
            for peer in ("ncnn", "opencv"):
                sums[peer] += row.get(f"{peer}_ms", 0.0)
                vgg_complete[peer] &= f"{peer}_ms" in row
        rows.append(row)

        def f(key, fmt):
            return format(row[key], fmt) if row.get(key) is not None else format("-", f">{fmt.split('.')[0]}")
        lines.append(f"{case.name:20s} {row['gflop']:6.2f} {row.get('kernel', '-'):>13s} {f('vkconv_ms', '8.1f')} "
                     f"{f('vkconv_device_ms', '8.1f')} {f('gflops', '7.1f')} {f('pct_peak_device', '5.0f')} "
                     f"{f('ncnn_ms', '8.1f')} {f('ratio_vkconv_ncnn', '7.2f')} {f('opencv_ms', '8.1f')} "
                     f"{f('ratio_vkconv_opencv', '6.2f')} {f('ncnn_diff', '9.1e')}")
    summary = {"peer": "summary", "vgg_ms": sums, "fma_peak_gflops": probe}
    if any(c.vgg for c in cases):
        lines.append(f"{'VGG-16 sum':20s} {sum(c.flops for c in cases if c.vgg) / 1e9:6.2f} {'':13s} "
                     f"{sums['vkconv']:8.1f} {sums['vkconv_device']:8.1f} {'':7s} {'':5s} "
                     f"{sums['ncnn'] if vgg_complete['ncnn'] else float('nan'):8.1f} "
                     f"{sums['vkconv'] / sums['ncnn'] if vgg_complete['ncnn'] and sums['ncnn'] else float('nan'):7.2f} "
                     f"{sums['opencv'] if vgg_complete['opencv'] else float('nan'):8.1f}")
        if vgg_complete["ncnn"] and sums["ncnn"]:
            summary["vgg_ratio_vkconv_ncnn"] = sums["vkconv"] / sums["ncnn"]
    if probe:
        lines.append(f"FMA probe peak: {probe:.1f} GFLOP/s "
                     f"({by[('probe', None)]['chains']} chains; {by[('probe', None)].get('device', '')})")
    rows.append(summary)
    return rows, "\n".join(lines)


def chart(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    cases = [r for r in rows if "case" in r]
    peers = [("vkconv_ms", "vkconv (numpy in/out)"), ("vkconv_device_ms", "vkconv (on device)"),
             ("ncnn_ms", "ncnn Vulkan fp32"), ("opencv_ms", "OpenCV CPU")]
    peers = [(k, label) for k, label in peers if any(k in r for r in cases)]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cases)), 5))
    width = 0.8 / max(1, len(peers))
    for i, (key, label) in enumerate(peers):
        ax.bar([j + i * width for j in range(len(cases))], [r.get(key, 0) for r in cases], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([r["case"] for r in cases], rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, log scale)")
    ax.set_title("Convolution time per layer, batch 1, fp32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"chart: {path}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ", ".join(PEERS))
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (median), at least 5")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--outdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 5:
        parser.error("--repeat must be at least 5 (medians of >= 5 runs)")
    names = args.cases.split(",") if args.cases else (QUICK if args.quick else [c.name for c in CASES])
    args.selected = [c for c in CASES if c.name in names]
    if args.peer:  # child process: one peer
        _RUNNERS[args.peer](args.selected, args.warmup, args.repeat, args.outdir)
        return 0
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = sorted(set(peers) - set(PEERS))
    if bad:
        parser.error(f"unknown peers {bad}; choose from {', '.join(PEERS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory() as tmp:
        records = []
        for peer in peers:
            records += _run_peer(peer, args, Path(tmp))
        rows, table = summarize(args.selected, records, Path(tmp))
    meta = {"peer": "meta", "time": stamp, "repeat": args.repeat, "warmup": args.warmup,
            "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    jsonl = args.out / f"conv-{stamp}.jsonl"
    with jsonl.open("w") as f:
        for rec in [meta] + records + rows:
            f.write(json.dumps(rec) + "\n")
    print(table)
    print(f"results: {jsonl}")
    print(chart(rows, args.out / f"conv-{stamp}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
