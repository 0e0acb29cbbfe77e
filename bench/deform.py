#!/usr/bin/env python3
"""Deformable convolution (DCNv2: offsets + mask, 3x3, stride 1, pad 1): vkconv vs CPU peers.

Peers, each only where installed: ONNX Runtime CPU ``DeformConv`` (opset 19), torchvision's CPU
``deform_conv2d`` (never installed by this script), ncnn's CPU ``DeformableConv2D`` (``import ncnn``).
Every timing is the median of ``--runs`` calls after ``--warmup`` calls, inputs already in memory;
GFLOP/s = 2 x MACs / time.  vkconv's per-stage device time comes from Vulkan timestamps written
between the stages (pack, bilinear sampling, GEMM) of the same command buffer.

Usage: python bench/deform.py [--runs 5] [--warmup 2] [--cases 64x56,256x28,128x56] [--og 1,4]
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


class TimedDeformConv(DeformConv):
    """DeformConv that writes a timestamp at every stage boundary of its recorded command buffer."""

    def __init__(self, *args, **kwargs):
        self._marks: list[str] = []
        self._pool = None
        super().__init__(*args, **kwargs)
        families = vk.vkGetPhysicalDeviceQueueFamilyProperties(self.ctx.physical_device)
        self.has_timestamps = families[self.ctx.queue_family].timestampValidBits > 0

    def _stage(self, cmd, name):
        v = vk
        if not self.has_timestamps:
            return
        if name == "begin":
            if self._pool is None:
                info = v.VkQueryPoolCreateInfo(queryType=v.VK_QUERY_TYPE_TIMESTAMP, queryCount=64)
                self._pool = v.vkCreateQueryPool(self.ctx.device, info, None)
            self._marks = []
            v.vkCmdResetQueryPool(cmd.handle, self._pool, 0, 64)
        v.vkCmdWriteTimestamp(cmd.handle, v.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, self._pool,
                              len(self._marks))
        self._marks.append(name)

    def stage_ms(self) -> dict[str, float]:
        """Device milliseconds per stage name, summed over chunks, for the last submitted call."""
        v, n = vk, len(self._marks)
        if n < 2:
            return {}
        data = v.ffi.new("uint64_t[]", n)
        v.vkGetQueryPoolResults(self.ctx.device, self._pool, 0, n, 8 * n, data, 8,
                                v.VK_QUERY_RESULT_64_BIT | v.VK_QUERY_RESULT_WAIT_BIT)
        period = v.vkGetPhysicalDeviceProperties(self.ctx.physical_device).limits.timestampPeriod
        out: dict[str, float] = {}
        for i in range(1, n):
            out[self._marks[i]] = out.get(self._marks[i], 0.0) + (data[i] - data[i - 1]) * period * 1e-6
        out["total"] = (data[n - 1] - data[0]) * period * 1e-6
        return out

    def close(self):
        super().close()
        if self._pool is not None:
            vk.vkDestroyQueryPool(self.ctx.device, self._pool, None)
            self._pool = None


def median_ms(fn, runs: int, warmup: int) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds of ``fn()``.  CPU time (all threads, lavapipe's
    included) is the steadier figure when other work shares the cores."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


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
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"X": x, "offset": offset, "mask": mask}
    return (lambda: sess.run(None, feeds)[0]), None


def torchvision_runner(x, w, b, offset, mask, og):
    try:
        import torch
        from torchvision.ops import deform_conv2d
    except ImportError as exc:
        return None, f"torchvision not installed ({exc.name}); this script does not install it"
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", default="64x56,256x28,128x56", help="CHANNELSxSIZE,...")
    parser.add_argument("--og", default="1,4", help="offset groups, comma separated")
    args = parser.parse_args(argv)
    info = vkconv.get_context().info
    print(f"vkconv device: {info.name} ({info.type}); median of {args.runs} after {args.warmup} warm-up")
    peers = {"onnxruntime": ort_runner, "torchvision": torchvision_runner, "ncnn": ncnn_runner}
    unavailable: dict[str, str] = {}
    header = f"{'case':<22}{'impl':<13}{'ms':>9}{'GFLOP/s':>9}{'vs vkconv':>11}{'cpu ms':>9}"
    print(header + "   device stages (ms)")
    for case in args.cases.split(","):
        c, size = (int(v) for v in case.split("x"))
        for og in (int(v) for v in args.og.split(",")):
            x, w, b, offset, mask = make_case(c, size, og)
            flops = 2.0 * c * c * 9 * size * size
            name = f"{c}->{c} {size}x{size} og={og}"
            with TimedDeformConv(w, b, pads=1, offset_group=og) as op:
                ours, ours_cpu = median_ms(lambda: op(x, offset, mask), args.runs, args.warmup)
                stages = op.stage_ms()
                expected = op(x, offset, mask)
            detail = "  ".join(f"{k} {v:.1f}" for k, v in stages.items())
            if stages:
                detail += f"  (sampling {100.0 * stages['sample'] / stages['total']:.0f}% of device time)"
            print(f"{name:<22}{'vkconv':<13}{ours:9.1f}{flops / ours / 1e6:9.1f}{1.0:11.2f}{ours_cpu:9.1f}"
                  f"   {detail or 'no timestamps on this queue'}")
            for peer, make in peers.items():
                if peer in unavailable:
                    continue
                try:
                    run, why = make(x, w, b, offset, mask, og)
                except Exception as exc:  # a peer's API mismatch must not stop the others
                    run, why = None, f"failed to set up: {type(exc).__name__}: {exc}"
                if run is None:
                    if "not installed" in why or "not importable" in why:
                        unavailable[peer] = why
                    else:
                        print(f"{'':<22}{peer:<13}   skipped: {why}")
                    continue
                ms, cpu = median_ms(run, args.runs, args.warmup)
                got = np.asarray(run()).reshape(expected.shape)
                err = float(np.abs(got - expected).max() / np.abs(expected).max())
                print(f"{'':<22}{peer:<13}{ms:9.1f}{flops / ms / 1e6:9.1f}{ms / ours:11.2f}{cpu:9.1f}"
                      f"   (max rel. difference from vkconv {err:.1e})")
    for peer, why in unavailable.items():
        print(f"skipped {peer}: {why}")
    print("vs vkconv = peer time / vkconv time (above 1: vkconv is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
