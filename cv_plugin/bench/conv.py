"""Dense convolution benchmark: vkconv vs ncnn's Vulkan convolution (fp32) vs OpenCV's dnn on the CPU
and on its OpenCL target.

Cases: the 13 VGG-16 convolutions at 224x224 (batch 1, 3x3, pad 1), a 3x3 depthwise conv with 96
channels at 56x56, a 1x1 96->384 conv at 56x56 and a 3x3 stride-2 128->256 conv at 56x56 (and
``tiny``, a 8->8 3x3 conv at 16x16 that only ``cases=["tiny"]`` selects: a smoke test).
Every peer runs in its own process (``--peer``), on the same inputs and weights, so that no peer
shares a Vulkan instance or a thread pool with another; a peer whose package is not installed
(ncnn, OpenCV) is skipped with a note, and so is OpenCV's OpenCL target (``opencl``) where OpenCV
finds no OpenCL device (``cv2.ocl.haveOpenCL()``; a dnn net would silently run on the CPU).
Per case and peer: the median of ``repeat`` (>= 5) timed runs after ``warmup`` runs, "numpy in ->
numpy out" (what a cv2 layer pays); for vkconv also "on-device": the recorded dispatches alone
between two GPU timestamps. GFLOP/s counts 2 x MACs of the direct convolution (Winograd's
"effective" rate). The FMA peak comes from bench/shaders/fma_probe.comp (independent vec4 fma chains, best
of 8/16/32 chains). Outputs of ncnn and OpenCV are compared
with vkconv's (max abs diff / max |y|).

Writes ``conv-<time>.jsonl`` (one JSON object per peer and case, plus the probe, one row per case
and a summary) and, when matplotlib is installed, ``conv-<time>.png`` into the results folder.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cv_plugin.bench import report
from cv_plugin.bench._spirv import SPIRV as BENCH_SPIRV

PEERS = ("vkconv", "ncnn", "opencv", "opencl")
# The module each peer needs; a peer whose module is missing is skipped before its process starts.
PEER_MODULES = {"vkconv": "vulkan", "ncnn": "ncnn", "opencv": "cv2", "opencl": "cv2"}
PEER_INSTALL = {"vkconv": "pip install vulkan", "ncnn": "pip install ncnn",
                "opencv": "pip install opencv-python-headless", "opencl": "pip install opencv-python-headless"}


@dataclass(frozen=True)
class Case:
    """One convolution: batch 1, square ``size`` x ``size`` input, square kernel, pad ``k // 2``."""

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

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x [1, C_in, size, size], w [C_out, C_in / group, k, k], b [C_out]; seeded by the name."""
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
# Selectable by name only: part of neither the full set nor --quick.
EXTRA = [Case("tiny", 8, 8, 3, 1, 16)]


def select(names: Sequence[str] | None, quick: bool) -> list[Case]:
    """The cases named (any of CASES and EXTRA), else QUICK or all of CASES; ValueError names an
    unknown case."""
    known = {c.name: c for c in CASES + EXTRA}
    wanted = list(names) if names else QUICK if quick else [c.name for c in CASES]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"cases: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return [known[n] for n in wanted]


def _emit(record: dict) -> None:
    print("BENCH " + json.dumps(record), flush=True)


# -- peers (each runs in its own process) ------------------------------------------------------
class DeviceTimer:
    """GPU timestamps around whatever ``record(cmd)`` puts in a command buffer."""

    def __init__(self, ctx: Any):
        self.ctx = ctx

    def times(self, record: Callable[[Any], None], warmup: int, repeat: int) -> list[float]:
        """Seconds between the two timestamps for each of ``repeat`` submits after ``warmup``."""
        from vkconv.runtime.timestamps import device_times

        return [1e-3 * ms for ms in device_times(self.ctx, record, warmup, repeat)]

    def close(self) -> None:
        pass


_FMA_ITERATIONS, _FMA_GROUPS = 2048, 512


def _fma_gflops(ctx: Any, timer: DeviceTimer, out: Any, chains: int, runs: int) -> float:
    """GFLOP/s of the best of ``runs`` dispatches of bench/shaders/fma_probe.comp with ``chains`` chains."""
    import struct

    from vkconv.runtime.pipeline import DescriptorSet, get_pipeline

    local = ctx.local_size()
    pipe = get_pipeline(ctx, "fma_probe", 1, 8, (local, 1, 1, 0, chains), modules=BENCH_SPIRV)
    dset = DescriptorSet(pipe, [out])
    push = struct.pack("<if", _FMA_ITERATIONS, 0.999)
    try:
        # A peak: the best of the runs (other processes on the machine only ever slow it).
        t = min(timer.times(lambda cmd: cmd.dispatch(pipe, dset, push, (_FMA_GROUPS, 1, 1)), 1, runs))
    finally:
        dset.close()
    return 8 * chains * _FMA_ITERATIONS * local * _FMA_GROUPS / t / 1e9


def fma_peak(ctx: Any, timer: DeviceTimer, runs: int = 7) -> dict:
    """GFLOP/s of bench/shaders/fma_probe.comp: the best of ``runs`` runs over 8, 16 and 32 independent
    vec4 chains."""
    from vkconv.runtime.buffer import Buffer

    with Buffer(ctx, 16 * ctx.local_size() * _FMA_GROUPS, name="fma probe output") as out:
        results = {n: _fma_gflops(ctx, timer, out, n, runs) for n in (8, 16, 32)}
    best = max(results, key=lambda n: results[n])
    return {"peer": "probe", "gflops": results[best], "chains": best, "by_chains": results}


def run_vkconv(cases: Sequence[Case], warmup: int, repeat: int, outdir: Path, quick: bool = False) -> None:
    """``quick``: the FMA peak from one probe of 3 runs instead of two of 7 (it takes seconds)."""
    import vkconv

    ctx = vkconv.get_context()
    timer = DeviceTimer(ctx)
    probe = fma_peak(ctx, timer, 3 if quick else 7)
    for case in cases:
        x, w, b = case.arrays()
        with vkconv.Conv(w, b, strides=case.stride, pads=case.pad, group=case.group) as op:
            y = op(x)
            host = report.times(functools.partial(op, x), warmup, repeat)
            body = op.plan(x.shape).body
            assert body is not None  # a built plan has recorded its body
            device = timer.times(body, warmup, repeat)
            choice = op.choice_for(x.shape)
        np.save(outdir / f"vkconv-{case.name}.npy", y)
        _emit({"peer": "vkconv", "case": case.name, "kernel": choice.candidate.kernel,
               "candidate": choice.candidate.label(), "choice": choice.source, "ms": report.median_ms(host),
               "ms_device": report.median_ms(device), "runs": len(host)})
    if not quick:  # probed before and after the cases: the better of the two is the peak
        probe = max(probe, fma_peak(ctx, timer), key=lambda r: r["gflops"])
    _emit(probe | {"device": ctx.info.name})
    timer.close()


def run_ncnn(cases: Sequence[Case], warmup: int, repeat: int, outdir: Path) -> None:
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

        def forward(net: Any = net, x: np.ndarray = x) -> np.ndarray:
            ex = net.create_extractor()
            ex.input("data", ncnn.Mat(x[0]))
            ret, out = ex.extract("out")
            if ret != 0:
                raise RuntimeError(f"ncnn extract failed ({ret})")
            return np.array(out)

        y = forward()[None]
        host = report.times(forward, warmup, repeat)
        np.save(outdir / f"ncnn-{case.name}.npy", y)
        _emit({"peer": "ncnn", "case": case.name, "ms": report.median_ms(host), "runs": len(host),
               "device": device})
        net.clear()


def run_opencv(cases: Sequence[Case], warmup: int, repeat: int, outdir: Path, opencl: bool = False) -> None:
    """OpenCV's dnn on the CPU, or (``opencl``) on its OpenCL target, fp32."""
    import cv2
    from onnx import TensorProto, helper, numpy_helper

    peer = "opencl" if opencl else "opencv"
    if opencl:
        if not cv2.ocl.haveOpenCL():
            raise RuntimeError("OpenCV finds no OpenCL device (cv2.ocl.haveOpenCL() is False)")
        cv2.ocl.setUseOpenCL(True)

    for case in cases:
        x, w, b = case.arrays()
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[case.stride] * 2,
                                pads=[case.pad] * 4, group=case.group, kernel_shape=[case.k] * 2)
        graph = helper.make_graph(
            [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, case.cout, case.out, case.out])],
            initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "conv.onnx")
            path.write_bytes(model.SerializeToString())
            net = cv2.dnn.readNetFromONNX(str(path))
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_OPENCL if opencl else cv2.dnn.DNN_TARGET_CPU)

        def forward(net: Any = net, x: np.ndarray = x) -> np.ndarray:
            net.setInput(x)
            return net.forward()

        y = forward()
        host = report.times(forward, warmup, repeat)
        np.save(outdir / f"{peer}-{case.name}.npy", y)
        extra = {"device": cv2.ocl.Device.getDefault().name()} if opencl else {"threads": cv2.getNumThreads()}
        _emit({"peer": peer, "case": case.name, "ms": report.median_ms(host), "runs": len(host), **extra})


_RUNNERS: dict[str, Callable[[Sequence[Case], int, int, Path], None]] = {
    "ncnn": run_ncnn, "opencv": run_opencv, "opencl": functools.partial(run_opencv, opencl=True)}


# -- driver ------------------------------------------------------------------------------------
def _child_env() -> dict[str, str]:
    """This environment with vkconv's own folder first on PYTHONPATH, so that ``-m`` finds this
    package when it runs from a checkout that is not installed."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return os.environ | {"PYTHONPATH": root + (os.pathsep + path if path else "")}


def _run_peer(peer: str, cases: Sequence[Case], warmup: int, repeat: int, outdir: Path, quick: bool,
              progress: report.Progress) -> list[dict]:
    """The peer's records, read from its process as it prints them (one progress step per case)."""
    if importlib.util.find_spec(PEER_MODULES[peer]) is None:
        progress.note(f"{peer}: skipped, {PEER_MODULES[peer]} is not installed ({PEER_INSTALL[peer]})")
        for case in cases:
            progress.step(f"{peer} {case.name} skipped")
        return [{"peer": peer, "skipped": f"{PEER_MODULES[peer]} is not installed"}]
    cmd = [sys.executable, "-m", "cv_plugin.bench.conv", "--peer", peer, "--cases", ",".join(c.name for c in cases),
           "--warmup", str(warmup), "--repeat", str(repeat), "--outdir", str(outdir)] + ["--quick"] * quick
    records = []
    # stderr goes to a file: a pipe that nobody reads while stdout is read could fill and block.
    with tempfile.TemporaryFile("w+") as err:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_child_env()) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("BENCH "):
                    record = json.loads(line[6:])
                    records.append(record)
                    if "case" in record:
                        progress.step(f"{peer} {record['case']} {record['ms']:.1f} ms")
        err.seek(0)
        tail = err.read().strip().splitlines()[-3:]
    if proc.returncode != 0:
        why = " | ".join(tail) or f"exit status {proc.returncode}"
        progress.note(f"{peer}: skipped ({why})")
        for case in cases[len([r for r in records if "case" in r]):]:
            progress.step(f"{peer} {case.name} skipped")
        return [{"peer": peer, "skipped": why}, *records]
    return records


def _max_rel_diff(a: Path, b: Path) -> float | None:
    if not (a.exists() and b.exists()):
        return None
    ya, yb = np.load(a), np.load(b)
    if ya.shape != yb.shape:
        return float("inf")
    return float(np.abs(ya.astype(np.float64) - yb).max() / max(np.abs(yb).max(), 1e-12))


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return format(value, fmt) if value is not None else format("-", f">{fmt.split('.')[0]}")


def summarize(cases: Sequence[Case], records: Sequence[dict], outdir: Path) -> tuple[list[dict], str]:
    """One row per case (times, ratios, GFLOP/s, differences) plus a summary record, and the table."""
    by = {(r.get("peer"), r.get("case")): r for r in records}
    probe_record = by.get(("probe", None), {})
    probe = probe_record.get("gflops")
    rows: list[dict] = []
    head = (f"{'case':20s} {'GFLOP':>6s} {'kernel':>13s} {'vk ms':>8s} {'vk dev':>8s} {'GFLOP/s':>7s} "
            f"{'%peak':>5s} {'ncnn ms':>8s} {'vk/ncnn':>7s} {'cv ms':>8s} {'vk/cv':>6s} {'ocl ms':>8s} "
            f"{'diff ncnn':>9s}")
    lines = [head, "-" * len(head)]
    sums = {"vkconv": 0.0, "vkconv_device": 0.0, "ncnn": 0.0, "opencv": 0.0, "opencl": 0.0}
    vgg_complete = {"ncnn": True, "opencv": True, "opencl": True}
    for case in cases:
        vk, nc, cv, ocl = (by.get((p, case.name)) for p in PEERS)
        row = {"case": case.name, "gflop": case.flops / 1e9,
               **{k: v for k, v in asdict(case).items() if k != "name"}}
        if vk:
            row |= {"kernel": vk["kernel"], "vkconv_ms": vk["ms"], "vkconv_device_ms": vk["ms_device"],
                    "gflops": case.flops / vk["ms"] / 1e6, "gflops_device": case.flops / vk["ms_device"] / 1e6}
            if probe:
                row["pct_peak_device"] = 100 * row["gflops_device"] / probe
        for peer, rec in (("ncnn", nc), ("opencv", cv), ("opencl", ocl)):
            if rec:
                row[f"{peer}_ms"] = rec["ms"]
                row[f"{peer}_diff"] = _max_rel_diff(outdir / f"{peer}-{case.name}.npy",
                                                    outdir / f"vkconv-{case.name}.npy")
                if vk:
                    row[f"ratio_vkconv_{peer}"] = vk["ms"] / rec["ms"]
        if case.vgg:
            sums["vkconv"] += row.get("vkconv_ms", 0.0)
            sums["vkconv_device"] += row.get("vkconv_device_ms", 0.0)
            for peer in ("ncnn", "opencv", "opencl"):
                sums[peer] += row.get(f"{peer}_ms", 0.0)
                vgg_complete[peer] &= f"{peer}_ms" in row
        rows.append(row)
        lines.append(f"{case.name:20s} {row['gflop']:6.2f} {row.get('kernel', '-'):>13s} "
                     f"{_cell(row, 'vkconv_ms', '8.1f')} {_cell(row, 'vkconv_device_ms', '8.1f')} "
                     f"{_cell(row, 'gflops', '7.1f')} {_cell(row, 'pct_peak_device', '5.0f')} "
                     f"{_cell(row, 'ncnn_ms', '8.1f')} {_cell(row, 'ratio_vkconv_ncnn', '7.2f')} "
                     f"{_cell(row, 'opencv_ms', '8.1f')} {_cell(row, 'ratio_vkconv_opencv', '6.2f')} "
                     f"{_cell(row, 'opencl_ms', '8.1f')} {_cell(row, 'ncnn_diff', '9.1e')}")
    summary: dict[str, Any] = {"peer": "summary", "vgg_ms": sums, "fma_peak_gflops": probe}
    if any(c.vgg for c in cases):
        nan = float("nan")
        ncnn_sum = sums["ncnn"] if vgg_complete["ncnn"] else nan
        ratio = sums["vkconv"] / sums["ncnn"] if vgg_complete["ncnn"] and sums["ncnn"] else nan
        lines.append(f"{'VGG-16 sum':20s} {sum(c.flops for c in cases if c.vgg) / 1e9:6.2f} {'':13s} "
                     f"{sums['vkconv']:8.1f} {sums['vkconv_device']:8.1f} {'':7s} {'':5s} "
                     f"{ncnn_sum:8.1f} {ratio:7.2f} {sums['opencv'] if vgg_complete['opencv'] else nan:8.1f}")
        if vgg_complete["ncnn"] and sums["ncnn"]:
            summary["vgg_ratio_vkconv_ncnn"] = ratio
    if probe:
        lines.append(f"FMA probe peak: {probe:.1f} GFLOP/s "
                     f"({probe_record['chains']} chains; {probe_record.get('device', '')})")
    rows.append(summary)
    return rows, "\n".join(lines)


def chart(rows: Sequence[dict], path: Path) -> str:
    """Bars of each peer's median ms per case (log scale); returns the line to print."""
    cases = [r for r in rows if "case" in r]
    peers = [("vkconv_ms", "vkconv (numpy in/out)"), ("vkconv_device_ms", "vkconv (on device)"),
             ("ncnn_ms", "ncnn Vulkan fp32"), ("opencv_ms", "OpenCV CPU"), ("opencl_ms", "OpenCV OpenCL")]
    series = {label: [r.get(key) for r in cases] for key, label in peers if any(key in r for r in cases)}
    return report.bar_chart(path, [r["case"] for r in cases], series, ylabel="ms (median, log scale)",
                            title="Convolution time per layer, batch 1, fp32")


def check(*, quick: bool, cases: Sequence[str] | None, peers: Sequence[str], repeat: int,
          warmup: int) -> list[Case]:
    """The selected cases, after checking :func:`run`'s arguments (ValueError names a bad one)."""
    selected = select(cases, quick)
    if repeat < 5:
        raise ValueError(f"repeat: must be at least 5 (medians of >= 5 runs), got {repeat}")
    if warmup < 0:
        raise ValueError(f"warmup: must be at least 0, got {warmup}")
    bad = sorted(set(peers) - set(PEERS))
    if bad or not peers:
        raise ValueError(f"peers: unknown {bad or 'none given'}; choose from {', '.join(PEERS)}")
    return selected


def run(*, quick: bool = False, cases: Sequence[str] | None = None, peers: Sequence[str] = PEERS,
        repeat: int = 5, warmup: int = 1, out: Path) -> list[Path]:
    """Run the benchmark, print its table, write ``conv-<time>.jsonl`` (and the PNG chart when
    matplotlib is installed) into ``out``; returns the files written.  ``cases``: names (see
    :func:`select`); ``peers``: a subset of :data:`PEERS`.  ValueError names a bad argument."""
    selected = check(quick=quick, cases=cases, peers=peers, repeat=repeat, warmup=warmup)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory() as tmp, \
            report.Progress(len(peers) * len(selected), "bench conv") as progress:
        records = []
        for peer in peers:
            records += _run_peer(peer, selected, warmup, repeat, Path(tmp), quick, progress)
        rows, table = summarize(selected, records, Path(tmp))
    meta = {"peer": "meta", "time": stamp, "repeat": repeat, "warmup": warmup, "cpus": os.cpu_count(),
            "load_avg": os.getloadavg()}
    jsonl = report.write_jsonl(out / f"conv-{stamp}.jsonl", [meta, *records, *rows])
    print(table)
    print(f"results: {jsonl}")
    png = out / f"conv-{stamp}.png"
    print(chart(rows, png))
    return [jsonl, png] if png.exists() else [jsonl]


def main(argv: Sequence[str] | None = None, default_out: Path = Path("vkconv-bench")) -> int:
    """``python -m cv_plugin.bench.conv`` (and bench/conv.py): the flags of :func:`run`; the child
    processes of the peers run through here too (``--peer``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, and a shorter FMA probe")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ", ".join(PEERS))
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (median), at least 5")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=default_out, help=f"results folder (default {default_out})")
    parser.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--cases", help=argparse.SUPPRESS)
    parser.add_argument("--outdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.cases.split(",") if args.cases else None
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    try:
        selected = check(quick=args.quick, cases=names, peers=peers, repeat=args.repeat, warmup=args.warmup)
    except ValueError as exc:
        parser.error(str(exc))
    if args.peer:  # child process: one peer
        if args.peer == "vkconv":
            run_vkconv(selected, args.warmup, args.repeat, args.outdir, args.quick)
        else:
            _RUNNERS[args.peer](selected, args.warmup, args.repeat, args.outdir)
    else:
        run(quick=args.quick, cases=names, peers=peers, repeat=args.repeat, warmup=args.warmup, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
