"""Deformable convolution (DCNv2: offsets + mask, 3x3, stride 1, pad 1): vkconv vs CPU peers.

Peers, each only where importable (skipped with a note otherwise): ONNX Runtime CPU ``DeformConv``
(opset 19, 2 threads), torchvision's CPU ``deform_conv2d`` (run with ``torch.set_num_threads(2)``),
ncnn's CPU ``DeformableConv2D`` (``import ncnn``, 2 threads, no offset groups).  Nothing is
installed here: torchvision does not import beside the project venv's torch, so run it from a venv
that has both, e.g. ``python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1
torchvision==0.29.1 numpy vulkan onnx onnxruntime ncnn && /tmp/tvenv/bin/pip install --no-deps -e .``.

Every implementation runs in this one process on the same inputs.  One "round" times each of them
in turn as the median of ``runs`` calls after ``warmup`` calls (inputs already in memory; vkconv:
numpy in -> numpy out, one submit) and takes the ratios within the round.  Calls are not
interleaved one by one: the CPU peers' thread pools keep spinning after a call, and in a trial
that added 30 % to vkconv's wall time.  ``repeat`` rounds (default 5); the table shows the medians
over rounds, of times and of ratios, so that a burst of load from other processes on the machine
during one round does not decide a ratio.  vkconv's on-device times come from Vulkan timestamps
written between its stages (pack, bilinear sampling, GEMM) in its command buffer.
GFLOP/s = 2 x MACs / wall time.  ``quick``: 16 channels at 16x16 with 1 and 2 offset groups, one
round of 5 calls.

Efficiency (issue 16): vkconv's DeformConv GFLOP/s divided by that of the dense 3x3 convolution
of the same channels and size (``vkconv.Conv`` forced to ``kernel="implicit_gemm"``: the raw
arithmetic rate, no Winograd savings; the same 2 x MACs).  The two are called alternately, call by
call, in one loop per round (both are vkconv on the same device, so neither leaves spinning
threads behind), and the efficiency is the median over calls of the time ratio, then over rounds.

Acceptance, per case: vkconv faster than torchvision (issue 4, ratio > 1), the sampling stage under
25 % of vkconv's on-device time (issue 4) and an efficiency of at least 0.6 (issue 16).  The last
lines say PASS or FAIL for each.  Writes
``deform-<time>.jsonl`` (a meta record, then one record per case) and, with matplotlib,
``deform-<time>.png`` into the results folder.
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cv_plugin.bench import report
from vkconv.ops.conv.op import Conv
from vkconv.ops.deform_conv import DeformCandidate, DeformConv
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import get_context, vk
from vkconv.runtime.plan import Plan
from vkconv.runtime.timestamps import Timestamps

SAMPLE_LIMIT = 0.25  # the sampling stage's share of vkconv's on-device time
EFFICIENCY_TARGET = 0.6  # DeformConv GFLOP/s / the dense implicit-GEMM 3x3 conv's (issue 16)
CASES = ((64, 56), (256, 28), (128, 56))  # (channels, size)
OFFSET_GROUPS = (1, 4)
QUICK_CASES, QUICK_OFFSET_GROUPS = ((16, 16),), (1, 2)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Runner = Callable[[], Any]


class PeerUnavailable(Exception):
    """A peer that cannot run at all here (not importable): skipped for every case."""


class TimedDeformConv(DeformConv):
    """DeformConv that writes a timestamp at every stage boundary of its recorded command buffer."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._stamps: Timestamps | None = None
        super().__init__(*args, **kwargs)
        families = vk.vkGetPhysicalDeviceQueueFamilyProperties(self.ctx.physical_device)
        self.has_timestamps = families[self.ctx.queue_family].timestampValidBits > 0

    def _build_plan(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...], has_mask: bool,
                    cand: DeformCandidate) -> Plan:
        # One timestamp at the start, after the pack and after each chunk's two stages (the fused
        # method: one stage, no chunks).
        need = 2 + 2 * len(self.chunks(x_shape[0], y_shape[2] * y_shape[3], cand))
        if self.has_timestamps and (self._stamps is None or need > self._stamps.capacity):
            self._close_stamps()
            self._stamps = Timestamps(self.ctx, need)
        return super()._build_plan(x_shape, y_shape, has_mask, cand)

    def _stage(self, cmd: CommandBuffer, name: str) -> None:
        if self._stamps is None:
            return
        if name == "begin":
            self._stamps.reset(cmd)
        self._stamps.mark(cmd, name)

    def stage_ms(self) -> dict[str, float]:
        """Device milliseconds per stage name, summed over chunks, for the last submitted call."""
        out: dict[str, float] = {}
        for name, ms in self._stamps.intervals() if self._stamps is not None else []:
            out[name] = out.get(name, 0.0) + ms
        if out:
            out["total"] = sum(out.values())
        return out

    def _close_stamps(self) -> None:
        if self._stamps is not None:
            self._stamps.close()
            self._stamps = None

    def close(self) -> None:
        super().close()
        self._close_stamps()


def median_ms(fn: Runner, runs: int, warmup: int) -> float:
    """Median wall milliseconds of ``runs`` calls of ``fn()`` after ``warmup`` untimed ones."""
    return report.median_ms(report.times(fn, warmup, runs))


def paired_ms(fn: Runner, dense: Runner, runs: int, warmup: int,
              after: Callable[[], dict[str, float]]) -> tuple[float, float, float, dict[str, float]]:
    """``fn`` and ``dense`` called alternately ``runs`` times each (after ``warmup`` pairs): their
    median wall milliseconds, the median over pairs of ``dense time / fn time`` (the efficiency
    when both do the same FLOPs), and the median of each value of ``after()`` (read after each
    call of ``fn``)."""
    for _ in range(warmup):
        fn()
        dense()
    ours: list[float] = []
    theirs: list[float] = []
    extra: list[dict[str, float]] = []
    for _ in range(runs):
        ours += report.times(fn, 0, 1)
        extra.append(after())
        theirs += report.times(dense, 0, 1)
    med = {k: statistics.median(e[k] for e in extra) for k in extra[0]} if extra[0] else {}
    ratio = statistics.median(d / o for d, o in zip(theirs, ours))
    return report.median_ms(ours), report.median_ms(theirs), ratio, med


def make_case(c: int, size: int, og: int, seed: int = 0) -> Arrays:
    """x [1, c, size, size], w [c, c, 3, 3], b [c], offset [1, og * 18, size, size] (about +-2
    pixels), mask [1, og * 9, size, size] in [0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, c, size, size)).astype(np.float32)
    w = (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    offset = (rng.standard_normal((1, og * 18, size, size)) * 2).astype(np.float32)
    mask = rng.random((1, og * 9, size, size)).astype(np.float32)
    return x, w, b, offset, mask


def ort_runner(arrays: Arrays, og: int) -> Runner:
    """ONNX Runtime's CPU DeformConv (opset 19) on 2 threads."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise PeerUnavailable(f"onnxruntime not importable ({exc}); pip install onnx onnxruntime") from exc
    x, w, b, offset, mask = arrays
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
    return lambda: sess.run(None, feeds)[0]


def torchvision_runner(arrays: Arrays, og: int) -> Runner:
    """torchvision's CPU deform_conv2d with torch on 2 threads (offset groups come from the shape)."""
    try:
        import torch
        from torchvision.ops import deform_conv2d
    except (ImportError, RuntimeError) as exc:
        raise PeerUnavailable(f"torchvision not importable ({exc}); see this benchmark's docstring") from exc
    torch.set_num_threads(2)
    tx, tw, tb, to, tm = (torch.from_numpy(a) for a in arrays)

    def run() -> np.ndarray:
        with torch.no_grad():
            return deform_conv2d(tx, to, tw, tb, padding=(1, 1), mask=tm).numpy()
    return run


def ncnn_runner(arrays: Arrays, og: int) -> Runner | str:
    """ncnn's CPU DeformableConv2D on 2 threads; a string says why this case cannot run."""
    try:
        import ncnn
    except ImportError as exc:
        raise PeerUnavailable(f"ncnn not importable ({exc}); pip install ncnn") from exc
    if og != 1:
        return "ncnn's DeformableConv2D has no offset groups"
    x, w, b, offset, mask = arrays
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
            return "ncnn refused the generated DeformableConv2D net"
    mats = {name: ncnn.Mat(np.ascontiguousarray(a[0])) for name, a in
            (("x", x), ("offset", offset), ("mask", mask))}

    def run() -> np.ndarray:
        ex = net.create_extractor()
        for name, mat in mats.items():
            ex.input(name, mat)
        _, out = ex.extract("y")
        return np.array(out)[None]
    return run


PEERS: dict[str, Callable[[Arrays, int], Runner | str]] = {
    "onnxruntime": ort_runner, "torchvision": torchvision_runner, "ncnn": ncnn_runner}


def _setup_peers(arrays: Arrays, og: int, peers: Sequence[str], unavailable: dict[str, str],
                 progress: report.Progress) -> tuple[dict[str, Runner], dict[str, str]]:
    """The runnable peers of one case and, for the others, why not (``unavailable`` collects the
    peers that cannot run at all, noted once)."""
    runners: dict[str, Runner] = {}
    notes: dict[str, str] = {}
    for peer in peers:
        if peer in unavailable:
            continue
        try:
            made = PEERS[peer](arrays, og)
        except PeerUnavailable as exc:
            unavailable[peer] = str(exc)
            progress.note(f"{peer}: skipped, {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - a peer's API mismatch must not stop the others
            made = f"failed to set up: {type(exc).__name__}: {exc}"
        if isinstance(made, str):
            notes[peer] = made
        else:
            runners[peer] = made
    return runners, notes


def bench_case(c: int, size: int, og: int, *, runs: int, warmup: int, repeat: int, peers: Sequence[str],
               unavailable: dict[str, str], progress: report.Progress) -> dict[str, Any]:
    """Medians over rounds for one case: times, stage times, ratios and max differences."""
    arrays = make_case(c, size, og)
    x, w, b, offset, mask = arrays
    flops = 2.0 * c * c * 9 * size * size
    runners, notes = _setup_peers(arrays, og, peers, unavailable, progress)
    rounds: list[dict[str, float]] = []
    op = TimedDeformConv(w, b, pads=1, offset_group=og)
    dense = Conv(w, b, pads=1, kernel="implicit_gemm")
    with op, dense:  # not `as op`: __enter__ is typed as returning the base class
        expected = op(x, offset, mask)
        diffs = {p: float(np.abs(np.asarray(run()).reshape(expected.shape) - expected).max()
                          / np.abs(expected).max()) for p, run in runners.items()}
        for _ in range(repeat):
            ours, dense_ms, efficiency, stages = paired_ms(lambda: op(x, offset, mask), lambda: dense(x),
                                                           runs, warmup, op.stage_ms)
            r = {"vkconv": ours, "dense": dense_ms, "efficiency": efficiency,
                 **{f"dev_{k}": v for k, v in stages.items()}}
            if "sample" in stages:  # (the fused method samples inside its one stage)
                r["sample_share"] = stages["sample"] / stages["total"]
            for peer, run in runners.items():
                r[peer] = median_ms(run, runs, warmup)
                r[f"{peer}_ratio"] = r[peer] / ours
            rounds.append(r)
        label = op.choice_for(x.shape, True).candidate.label()
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {"name": f"{c}->{c} {size}x{size} og={og}", "label": label, "channels": c, "size": size, "offset_group": og,
            "flops": flops, "med": med, "diffs": diffs, "notes": notes, "peers": list(runners),
            "rounds": len(rounds)}


def verdicts(med: dict[str, float]) -> tuple[bool | None, bool | None, bool]:
    """(faster than torchvision, sampling under :data:`SAMPLE_LIMIT` of device time, efficiency
    at least :data:`EFFICIENCY_TARGET`); None: n/a."""
    faster, share = med.get("torchvision_ratio"), med.get("sample_share")
    return ((None if faster is None else faster > 1), (None if share is None else share < SAMPLE_LIMIT),
            med["efficiency"] >= EFFICIENCY_TARGET)


def _print_case(res: dict[str, Any]) -> None:
    m = res["med"]
    stages = "  ".join(f"{k[4:]} {v:.2f}" for k, v in m.items() if k.startswith("dev_"))
    share = f"  sampling {100 * m['sample_share']:.0f}%" if "sample_share" in m else ""
    print(f"\n{res['name']}: {res['flops'] / 1e9:.3f} GFLOP, {res['label']}")
    print(f"  {'vkconv':<12}{m['vkconv']:9.2f} ms {res['flops'] / m['vkconv'] / 1e6:7.1f} GFLOP/s"
          f"   on-device: {stages or 'no timestamps on this queue'}{share}")
    print(f"  {'dense 3x3':<12}{m['dense']:9.2f} ms {res['flops'] / m['dense'] / 1e6:7.1f} GFLOP/s"
          f"   (vkconv.Conv, implicit_gemm)   efficiency {m['efficiency']:.2f}")
    for peer in res["peers"]:
        print(f"  {peer:<12}{m[peer]:9.2f} ms {res['flops'] / m[peer] / 1e6:7.1f} GFLOP/s"
              f"   peer / vkconv {m[peer + '_ratio']:5.2f}   (max rel. diff from vkconv "
              f"{res['diffs'][peer]:.1e})")
    for peer, why in res["notes"].items():
        print(f"  {peer:<12}skipped: {why}")


def _print_summary(results: Sequence[dict[str, Any]]) -> None:
    """The markdown table over cases, then one PASS/FAIL line per case."""
    print("\n| case | vkconv ms | on-device ms | sampling ms | sampling % | GFLOP/s | dense 3x3 GFLOP/s | "
          "efficiency | ORT ms | torchvision ms | ncnn ms | ORT / vk | tv / vk | ncnn / vk |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = []
    for res in results:
        m = res["med"]

        def cell(key: str, fmt: str = "{:.1f}", m: dict[str, float] = m) -> str:
            return fmt.format(m[key]) if key in m else "-"
        print(f"| {res['name']} | {m['vkconv']:.1f} | {cell('dev_total')} | {cell('dev_sample')} | "
              f"{cell('sample_share', '{:.0%}')} | "
              f"{res['flops'] / m['vkconv'] / 1e6:.1f} | {res['flops'] / m['dense'] / 1e6:.1f} | "
              f"{m['efficiency']:.2f} | {cell('onnxruntime')} | {cell('torchvision')} | "
              f"{cell('ncnn')} | {cell('onnxruntime_ratio', '{:.2f}')} | {cell('torchvision_ratio', '{:.2f}')} | "
              f"{cell('ncnn_ratio', '{:.2f}')} |")
        faster, under, efficient = verdicts(m)
        lines.append(
            f"{res['name']}: faster than torchvision: "
            + ("n/a (torchvision not importable)" if faster is None else
               f"{'PASS' if faster else 'FAIL'} ({m['torchvision_ratio']:.2f}x)")
            + f"; sampling under {SAMPLE_LIMIT:.0%} of device time: "
            + ("n/a (" + ("no timestamps" if "dev_total" not in m else "no stage of its own: " + res["label"]) + ")"
               if under is None else
               f"{'PASS' if under else 'FAIL'} ({m['sample_share']:.0%})")
            + f"; efficiency >= {EFFICIENCY_TARGET}: {'PASS' if efficient else 'FAIL'} ({m['efficiency']:.2f})")
    print("peer / vk = peer time / vkconv time, median over rounds (above 1: vkconv is faster)\n")
    print("\n".join(lines))


def _record(res: dict[str, Any]) -> dict[str, Any]:
    """The JSON record of one case: times in ms (medians over rounds), ratios peer / vkconv (> 1
    when vkconv is faster), the relative max differences from vkconv and the verdicts."""
    m = res["med"]
    faster, under, efficient = verdicts(m)
    rec: dict[str, Any] = {"case": res["name"], "method": res["label"], "channels": res["channels"],
                           "size": res["size"], "offset_group": res["offset_group"], "gflop": res["flops"] / 1e9,
                           "rounds": res["rounds"], "vkconv_ms": m["vkconv"],
                           "gflops": res["flops"] / m["vkconv"] / 1e6, "dense_ms": m["dense"],
                           "dense_gflops": res["flops"] / m["dense"] / 1e6, "efficiency": m["efficiency"]}
    rec.update({f"{k}_ms": v for k, v in m.items() if k.startswith("dev_")})
    if "sample_share" in m:
        rec["sample_share"] = m["sample_share"]
    for peer in res["peers"]:
        rec[f"{peer}_ms"] = m[peer]
        rec[f"ratio_{peer}_vkconv"] = m[f"{peer}_ratio"]
        rec[f"{peer}_diff"] = res["diffs"][peer]
    rec.update({f"{peer}_skipped": why for peer, why in res["notes"].items()})
    rec["faster_than_torchvision"] = faster
    rec["sampling_under_limit"] = under
    rec["efficient"] = efficient
    return rec


def chart(records: Sequence[dict[str, Any]], path: Path) -> str:
    """Bars of each implementation's median time per case (log scale)."""
    keys = [("vkconv_ms", "vkconv"), ("dev_total_ms", "vkconv on-device"), ("onnxruntime_ms", "ONNX Runtime CPU"),
            ("torchvision_ms", "torchvision CPU"), ("ncnn_ms", "ncnn CPU")]
    series = {label: [r.get(key) for r in records] for key, label in keys if any(key in r for r in records)}
    return report.bar_chart(path, [r["case"] for r in records], series, ylabel="ms (median, log scale)",
                            title="Deformable convolution (DCNv2 3x3), batch 1, fp32")


def check(*, cases: Sequence[tuple[int, int]], offset_groups: Sequence[int], runs: int, warmup: int,
          repeat: int, peers: Sequence[str]) -> None:
    """ValueError naming the first of :func:`run`'s arguments that cannot be used."""
    if not cases or any(c < 1 or size < 1 for c, size in cases):
        raise ValueError(f"cases: expected (channels, size) pairs of positive ints, got {list(cases)}")
    if not offset_groups or any(og < 1 or c % og for og in offset_groups for c, _ in cases):
        raise ValueError(f"offset_groups: expected positive divisors of every case's channels, "
                         f"got {list(offset_groups)}")
    if runs < 5:
        raise ValueError(f"runs: must be at least 5 (medians of >= 5 calls), got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup: must be at least 0, got {warmup}")
    if repeat < 1:
        raise ValueError(f"repeat: must be at least 1, got {repeat}")
    bad = sorted(set(peers) - set(PEERS))
    if bad:
        raise ValueError(f"peers: unknown {bad}; choose from {', '.join(PEERS)}")


def run(*, quick: bool = False, out: Path, cases: Sequence[tuple[int, int]] = CASES,
        offset_groups: Sequence[int] = OFFSET_GROUPS, runs: int = 7, warmup: int = 2, repeat: int = 5,
        peers: Sequence[str] = tuple(PEERS)) -> list[Path]:
    """Run the benchmark, print its table and verdicts, write ``deform-<time>.jsonl`` (and the PNG
    chart when matplotlib is installed) into ``out``; returns the files written.  ``cases``:
    (channels, size) pairs, each run with every offset group count of ``offset_groups``; ``quick``
    overrides them and ``runs``, ``warmup``, ``repeat`` with :data:`QUICK_CASES`,
    :data:`QUICK_OFFSET_GROUPS`, 5, 1, 1.  ValueError names a bad argument."""
    if quick:
        cases, offset_groups, runs, warmup, repeat = QUICK_CASES, QUICK_OFFSET_GROUPS, 5, 1, 1
    check(cases=cases, offset_groups=offset_groups, runs=runs, warmup=warmup, repeat=repeat, peers=peers)
    info = get_context().info
    print(f"vkconv device: {info.name} ({info.type}); {repeat} round(s), each the median of "
          f"{runs} calls after {warmup} warm-up; medians over rounds")
    unavailable: dict[str, str] = {}
    results = []
    with report.Progress(len(cases) * len(offset_groups), "bench deform") as progress:
        for c, size in cases:
            for og in offset_groups:
                res = bench_case(c, size, og, runs=runs, warmup=warmup, repeat=repeat, peers=peers,
                                 unavailable=unavailable, progress=progress)
                results.append(res)
                progress.step(f"{res['name']}: {res['med']['vkconv']:.1f} ms")
    for res in results:  # after the bar: printing under a live tqdm bar garbles it
        _print_case(res)
    for peer, why in unavailable.items():
        print(f"skipped {peer}: {why}")
    _print_summary(results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"peer": "meta", "time": stamp, "device": info.name, "runs": runs, "warmup": warmup,
            "repeat": repeat, "timing": "median of runs per round, median over rounds",
            "sample_limit": SAMPLE_LIMIT, "efficiency_target": EFFICIENCY_TARGET,
            "peers": [p for p in peers if p not in unavailable],
            "skipped": unavailable, "cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    records = [_record(res) for res in results]
    jsonl = report.write_jsonl(out / f"deform-{stamp}.jsonl", [meta, *records])
    print(f"results: {jsonl}")
    png = out / f"deform-{stamp}.png"
    print(chart(records, png))
    return [jsonl, png] if png.exists() else [jsonl]


def _cases(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in case.split("x")) for case in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected CHANNELSxSIZE,... (e.g. 64x56,256x28), got {text!r}")
    return [(p[0], p[1]) for p in pairs]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def main(argv: Sequence[str] | None = None, default_out: Path = Path("vkconv-bench")) -> int:
    """``python -m cv_plugin.bench.deform`` (and bench/deform.py): the flags of :func:`run`."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed calls per round (at least 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the table shows medians over them")
    parser.add_argument("--cases", type=_cases, default=list(CASES), metavar="CxS,...",
                        help="CHANNELSxSIZE,... (default 64x56,256x28,128x56)")
    parser.add_argument("--og", type=_ints, default=list(OFFSET_GROUPS), metavar="N,...",
                        help="offset groups, comma separated (default 1,4)")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ", ".join(PEERS))
    parser.add_argument("--quick", action="store_true",
                        help="16 channels at 16x16 with 1 and 2 offset groups, one round of 5 calls")
    parser.add_argument("--out", type=Path, default=default_out, help=f"results folder (default {default_out})")
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    try:
        check(cases=args.cases, offset_groups=args.og, runs=args.runs, warmup=args.warmup,
              repeat=args.repeat, peers=peers)
    except ValueError as exc:
        parser.error(str(exc))
    run(quick=args.quick, out=args.out, cases=args.cases, offset_groups=args.og, runs=args.runs,
        warmup=args.warmup, repeat=args.repeat, peers=peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
