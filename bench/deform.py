#!/usr/bin/env python3
"""Deformable convolution (DCNv2: offsets + mask, 3x3, stride 1, pad 1): vkconv vs CPU peers.

Peers, each only where importable: ONNX Runtime CPU ``DeformConv`` (opset 19), torchvision's CPU
``deform_conv2d`` (run with ``torch.set_num_threads(2)``), ncnn's CPU ``DeformableConv2D``
(``import ncnn``, 2 threads, no offset groups).  This script installs nothing: torchvision does
not import beside the project venv's torch, so run it from a venv that has both, e.g.
``python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
vulkan onnx onnxruntime ncnn && /tmp/tvenv/bin/pip install --no-deps -e .``.

Every implementation runs in this one process on the same inputs.  One "round" times each of them
in turn as the median of ``--runs`` calls after ``--warmup`` calls (inputs already in memory;
vkconv: numpy in -> numpy out, one submit) and takes the ratios within the round.  Calls are not
interleaved one by one: the CPU peers' thread pools keep spinning after a call, and in a trial
that added 30 % to vkconv's wall time.  ``--repeat`` rounds (default 5); the table shows the
medians over rounds, of times and of ratios, so that a burst of load from other processes on the
machine during one round does not decide a ratio.  vkconv's on-device times come from Vulkan
timestamps written between its stages (pack, bilinear sampling, GEMM) in its command buffer.
GFLOP/s = 2 x MACs / wall time.

Acceptance (issue 4), per case: vkconv faster than torchvision (ratio > 1), and the sampling stage
under 25 % of vkconv's on-device time.  The last lines say PASS or FAIL for each.

Usage: python bench/deform.py [--runs 7] [--warmup 2] [--repeat 5] [--cases 64x56,256x28,128x56] [--og 1,4]
"""
from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

import vkconv
from vkconv.context import vk
from vkconv.deform_conv import DeformConv

SAMPLE_LIMIT = 0.25  # the sampling stage's share of vkconv's on-device time


class TimedDeformConv(DeformConv):
    """DeformConv that writes a timestamp at every stage boundary of its recorded command buffer."""

    def __init__(self, *args, **kwargs):
        self._marks: list[str] = []
        self._pool = None
        self._pool_size = 0
        super().__init__(*args, **kwargs)
        families = vk.vkGetPhysicalDeviceQueueFamilyProperties(self.ctx.physical_device)
        self.has_timestamps = families[self.ctx.queue_family].timestampValidBits > 0

    def _build_plan(self, x_shape, y_shape, has_mask):
        # One timestamp at the start, after the pack and after each chunk's two stages.
        need = 2 + 2 * len(self.chunks(x_shape[0], y_shape[2] * y_shape[3]))
        if self.has_timestamps and need > self._pool_size:
            self._destroy_pool()
            info = vk.VkQueryPoolCreateInfo(queryType=vk.VK_QUERY_TYPE_TIMESTAMP, queryCount=need)
            self._pool, self._pool_size = vk.vkCreateQueryPool(self.ctx.device, info, None), need
        return super()._build_plan(x_shape, y_shape, has_mask)

    def _stage(self, cmd, name):
        if not self.has_timestamps:
            return
        if name == "begin":
            self._marks = []
            vk.vkCmdResetQueryPool(cmd.handle, self._pool, 0, self._pool_size)
        vk.vkCmdWriteTimestamp(cmd.handle, vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, self._pool,
                               len(self._marks))
        self._marks.append(name)

    def stage_ms(self) -> dict[str, float]:
        """Device milliseconds per stage name, summed over chunks, for the last submitted call."""
        n = len(self._marks)
        if n < 2:
            return {}
        data = vk.ffi.new("uint64_t[]", n)
        vk.vkGetQueryPoolResults(self.ctx.device, self._pool, 0, n, 8 * n, data, 8,
                                 vk.VK_QUERY_RESULT_64_BIT | vk.VK_QUERY_RESULT_WAIT_BIT)
        period = vk.vkGetPhysicalDeviceProperties(self.ctx.physical_device).limits.timestampPeriod
        out: dict[str, float] = {}
        for i in range(1, n):
            out[self._marks[i]] = out.get(self._marks[i], 0.0) + (data[i] - data[i - 1]) * period * 1e-6
        out["total"] = (data[n - 1] - data[0]) * period * 1e-6
        return out

    def _destroy_pool(self):
        if self._pool is not None:
            vk.vkDestroyQueryPool(self.ctx.device, self._pool, None)
            self._pool, self._pool_size = None, 0

    def close(self):
        super().close()
        self._destroy_pool()


def median_ms(fn, runs: int, warmup: int, after=None) -> tuple[float, dict]:
    """Median wall milliseconds of ``fn()``; with ``after``, also the median of each value of the
    dict ``after()`` returns after every timed call."""
    for _ in range(warmup):
        fn()
    wall, extra = [], []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t)
        if after is not None:
            extra.append(after())
    med = {k: statistics.median(e[k] for e in extra) for k in extra[0]} if extra and extra[0] else {}
    return statistics.median(wall) * 1e3, med


def make_case(c: int, size: int, og: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, c, size, size)).astype(np.float32)
    w = (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    offset = (rng.standard_normal((1, og * 18, size, size)) * 2).astype(np.float32)
    mask = rng.random((1, og * 9, size, size)).astype(np.float32)
    return x, w, b, offset, mask


def ort_runner(x, w, b, offset, mask, og):
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        return None, f"onnxruntime not importable ({exc})"
    node = helper.make_node("DeformConv", ["X", "W", "offset", "B", "mask"], ["Y"], kernel_shape=[3, 3],
                            pads=[1, 1, 1, 1], offset_group=og)
    graph = helper.make_graph(
        [node], "dcn",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape))
         for n, a in (("X", x), ("offset", offset), ("mask", mask))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"X": x, "offset": offset, "mask": mask}
    return (lambda: sess.run(None, feeds)[0]), None


def torchvision_runner(x, w, b, offset, mask, og):
    try:
        import torch
        from torchvision.ops import deform_conv2d
    except (ImportError, RuntimeError) as exc:
        return None, f"torchvision not importable ({exc})"
    torch.set_num_threads(2)
    tx, tw, tb, to, tm = (torch.from_numpy(a) for a in (x, w, b, offset, mask))

    def run():
        with torch.no_grad():
            return deform_conv2d(tx, to, tw, tb, padding=(1, 1), mask=tm).numpy()
    return run, None


def ncnn_runner(x, w, b, offset, mask, og):
    try:
        import ncnn
    except ImportError as exc:
        return None, f"ncnn not importable ({exc})"
    if og != 1:
        return None, "ncnn's DeformableConv2D has no offset groups"
    # A one-layer net from an in-memory param text and a model file: weights behind the 4-byte
    # "raw float32" tag, then the bias.
    param = (f"7767517\n4 4\nInput x 0 1 x\nInput offset 0 1 offset\nInput mask 0 1 mask\n"
             f"DeformableConv2D dcn 3 1 x offset mask y 0={w.shape[0]} 1=3 11=3 4=1 14=1 15=1 "
             f"16=1 5=1 6={w.size}\n")
    net = ncnn.Net()
    net.opt.num_threads = 2
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "dcn.bin"
        model.write_bytes(struct.pack("<I", 0) + w.tobytes() + b.tobytes())
        if net.load_param_mem(param) or net.load_model(str(model)):
            return None, "ncnn refused the generated DeformableConv2D net"
    mats = {name: ncnn.Mat(np.ascontiguousarray(a[0])) for name, a in
            (("x", x), ("offset", offset), ("mask", mask))}

    def run():
        ex = net.create_extractor()
        for name, mat in mats.items():
            ex.input(name, mat)
        _, out = ex.extract("y")
        return np.array(out)[None]
    return run, None


PEERS = {"onnxruntime": ort_runner, "torchvision": torchvision_runner, "ncnn": ncnn_runner}


def bench_case(c: int, size: int, og: int, args, unavailable: dict[str, str]) -> dict:
    """Medians over rounds for one case: times, stage times, ratios and max differences."""
    x, w, b, offset, mask = make_case(c, size, og)
    flops = 2.0 * c * c * 9 * size * size
    peers, notes = {}, {}
    for peer, make in PEERS.items():
        if peer in unavailable:
            continue
        try:
            run, why = make(x, w, b, offset, mask, og)
        except Exception as exc:  # a peer's API mismatch must not stop the others
            run, why = None, f"failed to set up: {type(exc).__name__}: {exc}"
        if run is None:
            if "not importable" in why:
                unavailable[peer] = why
            else:
                notes[peer] = why
            continue
        peers[peer] = run
    rounds: list[dict] = []
    with TimedDeformConv(w, b, pads=1, offset_group=og) as op:
        expected = op(x, offset, mask)
        diffs = {p: float(np.abs(np.asarray(run()).reshape(expected.shape) - expected).max()
                          / np.abs(expected).max()) for p, run in peers.items()}
        for _ in range(args.repeat):
            ours, stages = median_ms(lambda: op(x, offset, mask), args.runs, args.warmup, op.stage_ms)
            r = {"vkconv": ours, **{f"dev_{k}": v for k, v in stages.items()}}
            if stages:
                r["sample_share"] = stages["sample"] / stages["total"]
            for peer, run in peers.items():
                r[peer] = median_ms(run, args.runs, args.warmup)[0]
                r[f"{peer}_ratio"] = r[peer] / ours
            rounds.append(r)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {"name": f"{c}->{c} {size}x{size} og={og}", "flops": flops, "med": med, "diffs": diffs,
            "notes": notes, "peers": list(peers), "rounds": len(rounds)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed calls per round (at least 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the table shows medians over them")
    parser.add_argument("--cases", default="64x56,256x28,128x56", help="CHANNELSxSIZE,...")
    parser.add_argument("--og", default="1,4", help="offset groups, comma separated")
    args = parser.parse_args(argv)
    if args.runs < 5 or args.repeat < 1:
        parser.error("--runs must be at least 5 and --repeat at least 1")
    info = vkconv.get_context().info
    print(f"vkconv device: {info.name} ({info.type}); {args.repeat} round(s), each the median of "
          f"{args.runs} calls after {args.warmup} warm-up; medians over rounds")
    unavailable: dict[str, str] = {}
    results = []
    for case in args.cases.split(","):
        c, size = (int(v) for v in case.split("x"))
        for og in (int(v) for v in args.og.split(",")):
            res = bench_case(c, size, og, args, unavailable)
            results.append(res)
            m = res["med"]
            stages = "  ".join(f"{k[4:]} {v:.2f}" for k, v in m.items() if k.startswith("dev_"))
            share = f"  sampling {100 * m['sample_share']:.0f}%" if "sample_share" in m else ""
            print(f"\n{res['name']}: {res['flops'] / 1e9:.3f} GFLOP")
            print(f"  {'vkconv':<12}{m['vkconv']:9.2f} ms {res['flops'] / m['vkconv'] / 1e6:7.1f} GFLOP/s"
                  f"   on-device: {stages or 'no timestamps on this queue'}{share}")
            for peer in res["peers"]:
                print(f"  {peer:<12}{m[peer]:9.2f} ms {res['flops'] / m[peer] / 1e6:7.1f} GFLOP/s"
                      f"   peer / vkconv {m[peer + '_ratio']:5.2f}   (max rel. diff from vkconv "
                      f"{res['diffs'][peer]:.1e})")
            for peer, why in res["notes"].items():
                print(f"  {peer:<12}skipped: {why}")
    for peer, why in unavailable.items():
        print(f"skipped {peer}: {why}")

    print("\n| case | vkconv ms | on-device ms | sampling ms | sampling % | GFLOP/s | ORT ms | "
          "torchvision ms | ncnn ms | ORT / vk | tv / vk | ncnn / vk |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for res in results:
        m = res["med"]

        def cell(key, fmt="{:.1f}", m=m):
            return fmt.format(m[key]) if key in m else "-"
        print(f"| {res['name']} | {m['vkconv']:.1f} | {cell('dev_total')} | {cell('dev_sample')} | "
              f"{cell('sample_share', '{:.0%}') if 'sample_share' in m else '-'} | "
              f"{res['flops'] / m['vkconv'] / 1e6:.1f} | {cell('onnxruntime')} | {cell('torchvision')} | "
              f"{cell('ncnn')} | {cell('onnxruntime_ratio', '{:.2f}')} | {cell('torchvision_ratio', '{:.2f}')} | "
              f"{cell('ncnn_ratio', '{:.2f}')} |")
        faster = m.get("torchvision_ratio")
        share = m.get("sample_share")
        verdicts.append(
            f"{res['name']}: faster than torchvision: "
            + ("n/a (torchvision not importable)" if faster is None else
               f"{'PASS' if faster > 1 else 'FAIL'} ({faster:.2f}x)")
            + "; sampling under 25% of device time: "
            + ("n/a (no timestamps)" if share is None else f"{'PASS' if share < SAMPLE_LIMIT else 'FAIL'} "
               f"({share:.0%})"))
    print("peer / vk = peer time / vkconv time, median over rounds (above 1: vkconv is faster)\n")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
