"""The ``vkconv`` command line (also ``python -m vkconv``).

Subcommands:

``info``
    every Vulkan device with the limits vkconv sizes its kernels from, and which one
    ``VKCONV_DEVICE`` / the default preference (discrete > integrated > virtual > CPU) chooses.
``run MODEL.onnx``
    load the model through :func:`cv_plugin.read_net`, feed it an image, a ``.npy`` array or a
    seeded random input, and print its outputs' shapes, the time per forward and (``--compare-cpu``)
    the largest difference from OpenCV's own CPU run of the unmodified model.
``profile MODEL.onnx``
    per-layer wall time: OpenCV's own per-layer profile (``getPerfProfile``) beside the time spent
    inside each vkconv layer's op.
``tune MODEL.onnx``
    measure the kernel candidates of every convolution of the model at its input shape (within
    ``--budget-ms`` per shape), store the fastest in the tuning cache (which later runs use by
    default), and print a before (heuristic) / after (tuned) table per layer; ``--clear`` empties
    the cache first.
``convert IN.onnx OUT.onnx``
    write the model rewritten for vkconv's layers, self-contained (weights inside), so that plain
    ``cv2.dnn.readNet(OUT)`` runs it after ``cv_plugin.register()`` (:func:`cv_plugin.convert`).
``bench [conv|deform|sparse|all]``
    the benchmarks of :mod:`cv_plugin.bench` with a progress bar over their cases; each prints
    its table and writes JSON lines and a PNG chart (with matplotlib) into ``--out``.

Exit status: 0 on success, 1 when vkconv reports an error (no loader, no device, a device
selector that matches nothing, a model or input that cannot be used), 2 for a usage error.
Errors are one line on stderr; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import cv_plugin
from cv_plugin import bench as benchmarks
from cv_plugin import compat, tuning
from cv_plugin.input_shapes import fix_input_shapes, parse_shape, runtime_inputs, symbolic_inputs
from cv_plugin.subgraph import MODES
from vkconv import __version__
from vkconv.onnx.model import value_dims
from vkconv.ops.conv.selection import Candidate
from vkconv.ops.conv_lstm import ConvLSTMCandidate
from vkconv.ops.conv_transpose import TransposeCandidate
from vkconv.ops.deform_conv import DeformCandidate
from vkconv.ops.launch import LaunchCandidate, launch_signature, tune_launch
from vkconv.ops.tune import budget_ms
from vkconv.runtime.context import DeviceInfo, choose_device, get_context, list_devices
from vkconv.runtime.errors import VkconvError
from vkconv.runtime.tunecache import cache_for

if TYPE_CHECKING:  # onnx and cv2 are imported only by the commands that load a model
    import onnx

# A dynamic (symbolic) input dimension gets this size in a random input; a dynamic batch gets 1.
DEFAULT_DIM = 224


class CliError(Exception):
    """A model, input file or option that cannot be used: reported as one line, like VkconvError."""


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps an integer (limits are powers of two)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _device_record(d: DeviceInfo, chosen: bool) -> dict:
    record = dataclasses.asdict(d)
    record.pop("rank")  # internal sort key, derived from the type
    record["max_workgroup_size"] = list(d.max_workgroup_size)
    record["max_workgroup_count"] = list(d.max_workgroup_count)
    record["chosen"] = chosen
    return record


def _device_lines(d: DeviceInfo, chosen: bool) -> list[str]:
    mark = "*" if chosen else " "
    tail = "  <- chosen" if chosen else ""
    size = "x".join(map(str, d.max_workgroup_size))
    count = "x".join(map(str, d.max_workgroup_count))
    return [
        f"{mark} [{d.index}] {d.name}  ({d.type}, Vulkan {d.api_version}){tail}",
        f"      driver:    {d.driver}",
        f"      workgroup: max {d.max_workgroup_invocations} invocations, size {size}, count {count}",
        f"      memory:    shared {_size(d.max_shared_memory)}, max storage buffer range "
        f"{_size(d.max_storage_buffer_range)}, push constants {_size(d.max_push_constants_size)}, "
        f"unified {_yes(d.unified_memory)}",
        f"      features:  subgroup size {d.subgroup_size}, fp16 storage {_yes(d.fp16_storage)}, "
        f"fp16 arithmetic {_yes(d.fp16_arithmetic)}, compute queue {_yes(d.has_compute_queue)}",
    ]


def cmd_info(args: argparse.Namespace) -> int:
    selector = os.environ.get("VKCONV_DEVICE") or None
    devices = list_devices()
    chosen = choose_device(devices, selector)  # NoDeviceError when none is usable or matches
    if args.json:
        print(json.dumps({
            "vkconv": __version__,
            "selector": selector,
            "chosen": chosen.index,
            "devices": [_device_record(d, d.index == chosen.index) for d in devices],
        }, indent=2))
        return 0
    how = f"VKCONV_DEVICE={selector}" if selector else "preference discrete > integrated > virtual > cpu"
    print(f"vkconv {__version__}: {len(devices)} Vulkan device(s), chosen by {how}")
    for d in devices:
        print("\n".join(_device_lines(d, d.index == chosen.index)))
    return 0


# -- run / profile ------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelInput:
    """A graph input fed at run time; ``dims`` holds None for each dynamic dimension, and is None
    itself when the model gives no shape."""

    name: str
    dims: list[int | None] | None

    def describe(self) -> str:
        if self.dims is None:
            return f"{self.name!r} (shape not given)"
        return f"{self.name!r} [{', '.join('?' if d is None else str(d) for d in self.dims)}]"


def _load_model(path: str) -> onnx.ModelProto:
    import onnx

    if not Path(path).is_file():
        raise CliError(f"{path}: no such model file")
    try:
        model = onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise CliError(f"{path}: not an ONNX model ({type(exc).__name__}: {compat.one_line(exc)})") from exc
    if not model.graph.node:
        raise CliError(f"{path}: the ONNX model has no nodes (empty or not an ONNX file)")
    return model


def model_inputs(model: onnx.ModelProto) -> list[ModelInput]:
    """The graph inputs that are not initializers, in graph order."""
    return [ModelInput(vi.name, value_dims(vi)) for vi in runtime_inputs(model)]


def random_input(inp: ModelInput, rng: np.random.Generator) -> np.ndarray:
    """Uniform [0, 1) float32 of ``inp``'s shape; a dynamic batch is 1, other dynamic dims 224."""
    if inp.dims is None:
        raise CliError(f"input {inp.describe()}: the model does not give its shape; pass --input FILE.npy")
    shape = [d if d is not None else 1 if i == 0 and len(inp.dims) > 1 else DEFAULT_DIM
             for i, d in enumerate(inp.dims)]
    return rng.random(shape, dtype=np.float32)


def image_input(path: str, inp: ModelInput) -> np.ndarray:
    """``cv2.dnn.blobFromImage`` of the image at ``path``: [1, C, H, W] float32, BGR (or gray when
    the model takes 1 channel), pixels scaled by 1/255, resized to the model's H and W where they are
    fixed (no crop, aspect ratio not kept), at the image's own size where they are dynamic."""

    dims = inp.dims
    if dims is None or len(dims) != 4:
        raise CliError(f"--input {path}: an image feeds a 4-D [N, C, H, W] input, the model's is "
                       f"{inp.describe()}; pass a .npy array instead")
    n, c, h, w = dims
    if n not in (None, 1) or c not in (None, 1, 3):
        raise CliError(f"--input {path}: an image gives a batch of 1 with 1 or 3 channels, the model's "
                       f"input is {inp.describe()}; pass a .npy array instead")
    cv2 = compat.cv2_module()
    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE if c == 1 else cv2.IMREAD_COLOR)
    if image is None:
        raise CliError(f"--input {path}: OpenCV cannot read it as an image (arrays must end in .npy)")
    size = (w or image.shape[1], h or image.shape[0])
    return cv2.dnn.blobFromImage(image, 1.0 / 255.0, size)


def npy_input(path: str, inp: ModelInput) -> np.ndarray:
    """The array saved at ``path`` as float32, checked against ``inp``'s fixed dimensions."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CliError(f"--input {path}: not a .npy array ({compat.one_line(exc)})") from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise CliError(f"--input {path}: expected a numeric array, got {getattr(array, 'dtype', type(array))}")
    if inp.dims is not None and (array.ndim != len(inp.dims) or any(
            d is not None and d != a for d, a in zip(inp.dims, array.shape))):
        raise CliError(f"--input {path}: shape {tuple(array.shape)} does not fit input {inp.describe()}")
    return np.ascontiguousarray(array, dtype=np.float32)


def make_feeds(model: onnx.ModelProto, input_path: str | None, seed: int) -> tuple[dict[str, np.ndarray], str]:
    """Input name -> blob for every runtime input, and where the blobs came from."""
    inputs = model_inputs(model)
    if not inputs:
        raise CliError("the model has no runtime input to feed")
    if input_path is None:
        rng = np.random.default_rng(seed)
        return {i.name: random_input(i, rng) for i in inputs}, f"random uniform [0, 1), seed {seed}"
    if len(inputs) != 1:
        names = ", ".join(i.describe() for i in inputs)
        raise CliError(f"--input feeds a model with one input, this one has {len(inputs)} ({names}); "
                       "leave --input out for random inputs")
    if not Path(input_path).is_file():
        raise CliError(f"--input {input_path}: no such file")
    if input_path.lower().endswith(".npy"):
        return {inputs[0].name: npy_input(input_path, inputs[0])}, input_path
    return {inputs[0].name: image_input(input_path, inputs[0])}, f"{input_path} (BGR, scaled by 1/255)"


def _forward(net, feeds: dict[str, np.ndarray], names: list[str]) -> tuple[list[np.ndarray], float]:
    """Outputs ``names`` and the seconds that ``setInput`` + ``forward`` took."""

    start = time.perf_counter()
    for name, blob in feeds.items():
        net.setInput(compat.as_nd_mat(blob), name)
    outs = net.forward(names)
    return [np.array(o) for o in outs], time.perf_counter() - start


def _timed(net, feeds, names, runs: int) -> tuple[list[np.ndarray], float, list[float]]:
    """Outputs, the first call's seconds, and the seconds of ``runs`` further calls."""
    outs, first = _forward(net, feeds, names)
    times = [_forward(net, feeds, names)[1] for _ in range(runs)]
    return outs, first, times


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.1f} ms" if ms >= 10 else f"{ms:.3f} ms"


def _input_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """``--input-shape NAME=D1,D2,...`` options as input name -> shape."""
    try:
        return dict(parse_shape(text) for text in getattr(args, "input_shape", None) or [])
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _prepare(args: argparse.Namespace) -> tuple[onnx.ModelProto, dict[str, np.ndarray], str, list[str]]:
    """The model (its symbolic input dims fixed by ``--input-shape``), its feeds and where they came
    from, and its output names; OpenCV's own log is silenced (unless ``--debug``) because it prints
    an ERROR line of its own for a node it cannot import before raising, and the command line
    reports every error as one line."""

    model = _load_model(args.model)
    if shapes := _input_shapes(args):
        model = fix_input_shapes(model, shapes)
    feeds, source = make_feeds(model, getattr(args, "input", None), args.seed)
    cv_log = getattr(getattr(compat.cv2_module(), "utils", None), "logging", None)
    if cv_log is not None and not getattr(args, "debug", False):
        cv_log.setLogLevel(cv_log.LOG_LEVEL_SILENT)
    return model, feeds, source, [o.name for o in model.graph.output]


def _header(model_path: str, model: onnx.ModelProto, report) -> None:

    info = get_context().info
    print(f"vkconv {__version__}, OpenCV {compat.cv2_module().__version__}, device {info.name} ({info.type})")
    left = f"; not routed: {', '.join(report.left_to_opencv)}" if report.left_to_opencv else ""
    print(f"model {model_path}: {len(model.graph.node)} nodes; {len(report.routed)} routed to vkconv layers "
          f"({report.folded_batchnorm} BatchNorm folded, {report.fused_activations} activations fused){left}")


def _read_net(model: onnx.ModelProto, feeds: dict[str, np.ndarray], args: argparse.Namespace,
              tune: bool | None = None) -> cv_plugin.Net:
    """``read_net`` with the symbolic input dims left fixed to the feeds' shapes (one import)."""
    shapes = {name: tuple(feeds[name].shape) for name in symbolic_inputs(model) if name in feeds}
    return cv_plugin.read_net(model, mode=getattr(args, "mode", "layer"), input_shapes=shapes, tune=tune)


def cmd_run(args: argparse.Namespace) -> int:

    model, feeds, source, names = _prepare(args)
    with _read_net(model, feeds, args) as net:
        _header(args.model, model, net.report)
        outs, first, times = _timed(net, feeds, names, args.runs)
        ran = sum(1 for count in net.vulkan_forwards().values() if count)
        routed = len(net.report.routed)
        if getattr(args, "debug", False):  # which candidate each convolution ran, and why
            for key, conv in tuning.conv_ops(net.state):
                for shape, choice in conv.choices().items():
                    print(f"{type(conv).__name__.lower()} {key} x{list(shape)}: {choice}")
    for name, blob in feeds.items():
        print(f"input  {name}: {tuple(blob.shape)} float32, {source}")
    for name, out in zip(names, outs):
        print(f"output {name}: {tuple(out.shape)} {out.dtype}")
    print(f"cv2.dnn + vkconv: first forward {_ms(first)}, median {_ms(statistics.median(times))} over "
          f"{args.runs} more; {ran} of {routed} vkconv layers ran on Vulkan")
    if args.compare_cpu:
        cpu = compat.read_onnx(model.SerializeToString())
        refs, cpu_first, cpu_times = _timed(cpu, feeds, names, args.runs)
        print(f"OpenCV CPU (unmodified model): first forward {_ms(cpu_first)}, median "
              f"{_ms(statistics.median(cpu_times))}")
        for name, out, ref in zip(names, outs, refs):
            if out.shape != ref.shape:
                raise CliError(f"output {name}: vkconv gave shape {out.shape}, OpenCV CPU {ref.shape}")
            diff = float(np.abs(out.astype(np.float64) - ref).max()) if ref.size else 0.0
            scale = float(np.abs(ref).max()) if ref.size else 0.0
            print(f"max |vkconv - OpenCV CPU| {name}: {diff:.3g} (max |CPU| {scale:.3g}, "
                  f"relative {diff / scale if scale else 0.0:.2g})")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:

    model, feeds, _, names = _prepare(args)
    tick = compat.cv2_module().getTickFrequency()
    with _read_net(model, feeds, args) as net:
        _header(args.model, model, net.report)
        _forward(net, feeds, names)  # warm-up: pipelines, plans and OpenCV's buffers are made here
        layers = list(net.getLayerNames())
        types = {n: net.getLayer(n).type for n in layers}
        opencv: dict[str, list[float]] = {n: [] for n in layers}
        walls, totals = [], []
        net.state.timings = {}
        for _ in range(args.runs):
            walls.append(_forward(net, feeds, names)[1])
            total, per_layer = net.getPerfProfile()
            totals.append(total / tick)
            for n, ticks in zip(layers, np.ravel(per_layer)):
                opencv[n].append(float(ticks) / tick)
        vk_times = net.state.timings
        net.state.timings = None

    def vk_key(layer: str) -> str | None:
        # OpenCV names an ONNX node's layer "onnx_node!<node name>"; vkconv keys are node names.
        if not types[layer].startswith("vkconv."):
            return None
        key = layer.rpartition("!")[2]
        return key if key in vk_times else None

    rows = [(n, types[n], statistics.median(opencv[n]),
             statistics.median(vk_times[k]) if (k := vk_key(n)) else None) for n in layers]
    width = max([len("layer")] + [len(n) for n in layers])
    twidth = max([len("type")] + [len(t) for t in types.values()])
    print(f"per-layer wall time, median of {args.runs} forwards after one warm-up, in ms "
          "(OpenCV: getPerfProfile; vkconv op: inside the layer's vkconv op)")
    print(f"  {'layer':<{width}}  {'type':<{twidth}}  {'OpenCV':>9}  {'vkconv op':>9}")
    for name, kind, cv_s, vk_s in rows:
        vk_col = f"{1e3 * vk_s:9.3f}" if vk_s is not None else f"{'':>9}"
        print(f"  {name:<{width}}  {kind:<{twidth}}  {1e3 * cv_s:9.3f}  {vk_col}")
    cv_sum = sum(r[2] for r in rows)
    vk_rows = [r for r in rows if r[3] is not None]
    vk_sum = sum(vk_s for _, _, _, vk_s in rows if vk_s is not None)
    print(f"  {'sum':<{width}}  {'':<{twidth}}  {1e3 * cv_sum:9.3f}  {1e3 * vk_sum:9.3f}")
    print(f"forward (setInput + forward): median {_ms(statistics.median(walls))}, OpenCV's total "
          f"{_ms(statistics.median(totals))}; "
          f"{len(vk_rows)} vkconv layers took {_ms(sum(r[2] for r in vk_rows))} in OpenCV's profile, "
          f"{_ms(vk_sum)} of it inside vkconv ops (the rest: OpenCV's Python-layer call and copies)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    model = _load_model(args.model)
    report = cv_plugin.convert(model, args.out, mode=args.mode, input_shapes=_input_shapes(args))
    left = f"; left to OpenCV: {', '.join(report.left_to_opencv)}" if report.left_to_opencv else ""
    print(f"wrote {args.out}: {len(report.routed)} vkconv layers ({args.mode} mode, "
          f"{report.folded_batchnorm} BatchNorm folded, {report.fused_activations} activations fused){left}; "
          "run it with cv_plugin.register() and cv2.dnn.readNet")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    cache = cache_for(get_context())
    if args.clear:
        cache.clear()
        print(f"tuning cache cleared: {cache.path}")
    if args.model is None:
        if not args.clear:
            raise CliError("give MODEL.onnx to tune (or --clear alone to empty the cache)")
        return 0
    budget = budget_ms(args.budget_ms)
    model, feeds, _, names = _prepare(args)
    with _read_net(model, feeds, args, tune=False) as net:
        _header(args.model, model, net.report)
        _forward(net, feeds, names)  # builds every convolution at its input shape
        # (layer, input shape, cache key, tune it): each convolution's shapes, then (subgraph mode)
        # the launch shapes of the loop kernels, one per (kernel, count bucket)
        jobs: list[tuple[str, tuple[int, ...], str, Callable[[], object]]] = [
            (key, shape, conv.signature(shape), functools.partial(conv.autotune, shape, budget))
            for key, conv in tuning.conv_ops(net.state) for shape in conv.choices()]
        for key, op in tuning.loop_ops(net.state):
            launch = op.last_launch
            if launch is None:  # a global pool, a transpose that is a copy: no loop kernel
                continue
            jobs.append((key, launch.in_shapes[0], launch_signature(launch.kernel, launch.items),
                         functools.partial(tune_launch, op, launch.in_shapes, budget)))
        rows, start, skipped = [], time.perf_counter(), 0
        for i, (key, shape, signature, tune) in enumerate(jobs, 1):
            print(f"\rtune [{i}/{len(jobs)}] {key[:40]:40s} x{list(shape)}", end="", file=sys.stderr, flush=True)
            entry = cache.get(signature)
            if entry is not None:
                rows.append((key, shape, entry, "cache"))
            elif args.time_limit is not None and any(r[3] == "tuner" for r in rows) \
                    and time.perf_counter() - start > args.time_limit:  # one shape at least
                skipped += 1
            else:
                tune()
                entry = cache.get(signature)
                assert entry is not None  # the tuner stored it
                rows.append((key, shape, entry, "tuner"))
        print(file=sys.stderr)
        spent = time.perf_counter() - start
    _tune_table(rows, spent, budget, cache.path)
    if skipped:
        print(f"{skipped} layers not tuned: --time-limit {args.time_limit:g} s reached (run again to go on)")
    return 0


def _tune_table(rows: list[tuple[str, tuple[int, ...], dict, str]], spent: float, budget: float, path: Path) -> None:
    """Before (heuristic) / after (tuned) per layer, from the cache entries (device ms)."""
    def label(record: dict) -> str:  # a ConvTranspose's candidates name their method, the others' their op
        if "local" in record:  # a loop kernel's launch shape
            return LaunchCandidate.from_json(record).label()
        if record.get("op") == "DeformConv":
            return DeformCandidate.from_json(record).label()
        if record.get("op") == "ConvLSTM2D":
            return ConvLSTMCandidate.from_json(record).label()
        return (TransposeCandidate.from_json(record) if "method" in record else Candidate.from_json(record)).label()

    labels = [(label(entry["heuristic"])[:48], label(entry["candidate"])[:48]) for _, _, entry, _ in rows]
    width = max([len("layer")] + [len(r[0][:48]) for r in rows])
    lw = max([len("heuristic")] + [len(text) for pair in labels for text in pair])
    print(f"  {'layer':<{width}}  {'input':<18}  {'heuristic':<{lw}} {'ms':>8}  {'tuned':<{lw}} {'ms':>8}  "
          f"{'speedup':>7}  from")
    before = after = 0.0
    for (key, shape, entry, source), (heuristic, tuned) in zip(rows, labels):
        h_ms, t_ms = float(entry["heuristic_ms"]), float(entry["ms"])
        before, after = before + h_ms, after + t_ms
        print(f"  {key[:48]:<{width}}  {'x'.join(map(str, shape)):<18}  {heuristic:<{lw}} "
              f"{h_ms:8.3f}  {tuned:<{lw}} {t_ms:8.3f}  {h_ms / t_ms:7.2f}  {source}")
    ratio = before / after if after else float("nan")
    print(f"  {'sum':<{width}}  {'':<18}  {'':<{lw}} {before:8.3f}  {'':<{lw}} {after:8.3f}  {ratio:7.2f}")
    print(f"{len(rows)} layers; tuning took {spent:.1f} s (budget {budget:.0f} ms per shape); "
          f"device ms from the tuner's timings; cache {path}")


def cmd_bench(args: argparse.Namespace) -> int:

    if args.cases and args.name != "conv":
        raise CliError(f"--cases selects cases of `bench conv` only, not of `bench {args.name}`")
    names = benchmarks.available() if args.name == "all" else [args.name]
    if args.name == "all" and "deform" not in names:
        print("bench deform: not in this version of vkconv (no cv_plugin.bench.deform); skipped",
              file=sys.stderr)
    cases = {"cases": args.cases.split(",")} if args.cases else {}
    for name in names:
        module = benchmarks.load(name)  # ValueError (one line, status 1) for deform without its module
        if len(names) > 1:
            print(f"== bench {name}", flush=True)
        module.run(quick=args.quick, out=args.out, **cases)
    return 0


def _runs(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser, runs_help: str) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to load with cv_plugin.read_net")
    parser.add_argument("--input", metavar="FILE",
                        help="an image (read with cv2.imread; [1, C, H, W], BGR or gray, scaled by 1/255, "
                             "resized to the model's fixed H and W, else kept at its own size) or a .npy "
                             "array; default: seeded random values in [0, 1) of the model's input shape "
                             f"(a dynamic batch is 1, other dynamic dimensions {DEFAULT_DIM})")
    parser.add_argument("--runs", type=_runs, default=3, metavar="N", help=runs_help)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    _add_input_shape(parser)


def _add_mode(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--mode", choices=MODES, default=MODES[0], help=help_text)


def _add_input_shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...",
                        help="fix a symbolic input's dims before import (repeat per input), e.g. "
                             "x=1,3,48,320")


def _common() -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand.

    SUPPRESS keeps a subparser's default from overwriting a value given before the subcommand.
    """
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vkconv", parents=[_common()],
        description="ONNX-exact convolutions as GLSL compute shaders on any Vulkan device.")
    parser.add_argument("--version", action="version", version=f"vkconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = sub.add_parser("info", parents=[_common()], help="list Vulkan devices and the one vkconv uses",
                          description="List every Vulkan device, its limits, and which one vkconv "
                                      "chooses (VKCONV_DEVICE=<index|name part> overrides).")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)

    run = sub.add_parser(
        "run", parents=[_common()], help="run an ONNX model through cv2.dnn with vkconv's layers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load MODEL.onnx with cv_plugin.read_net (convolutions on Vulkan, the rest on\n"
                    "OpenCV's CPU layers), run it on one input, and print the outputs' shapes and the\n"
                    "time per forward (the first one includes building pipelines and plans).",
        epilog="examples:\n  vkconv run model.onnx --input cat.png --compare-cpu\n"
               "  vkconv run model.onnx --input batch.npy --runs 10")
    _add_model_options(run, "timed forwards after the first (default 3)")
    _add_mode(run, "layer (default): every routed node is its own cv2.dnn layer, with a copy in and out "
                   "per layer; subgraph: each connected group of supported ops runs as one layer with its "
                   "tensors on the device")
    run.add_argument("--compare-cpu", action="store_true",
                     help="also run the unmodified model on OpenCV's CPU layers and print the max abs "
                          "difference of every output")
    run.set_defaults(func=cmd_run)

    profile = sub.add_parser(
        "profile", parents=[_common()], help="per-layer time of an ONNX model through cv2.dnn + vkconv",
        description="Run MODEL.onnx through cv_plugin.read_net once to warm up, then N times, and print "
                    "a table of every cv2.dnn layer's median time from OpenCV's own profile "
                    "(getPerfProfile) beside the time spent inside each vkconv layer's op, with totals.")
    _add_model_options(profile, "profiled forwards after the warm-up (default 3)")
    profile.set_defaults(func=cmd_profile)

    convert = sub.add_parser(
        "convert", parents=[_common()], help="save a model rewritten for vkconv's layers (for plain readNet)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rewrite IN.onnx as cv_plugin.read_net does and write it to OUT.onnx self-contained\n"
                    "(weights inside). Any later process runs it with plain OpenCV:\n"
                    "  import cv2, cv_plugin; cv_plugin.register(); net = cv2.dnn.readNet('OUT.onnx')",
        epilog="examples:\n  vkconv convert dcn.onnx dcn.vkconv.onnx\n"
               "  vkconv convert crnn.onnx crnn.vkconv.onnx --mode subgraph --input-shape x=1,3,48,320")
    convert.add_argument("model", metavar="IN.onnx", help="the ONNX model to convert")
    convert.add_argument("out", metavar="OUT.onnx", help="where to write the converted model")
    _add_mode(convert, "layer (default): one vkconv layer per routed node; subgraph: each connected group "
                       "of supported ops as one device-resident layer")
    _add_input_shape(convert)
    convert.set_defaults(func=cmd_convert)

    tune = sub.add_parser(
        "tune", parents=[_common()], help="measure the fastest kernels for a model's convolutions on this device",
        description="Run MODEL.onnx once to find its convolutions' input shapes, then time each one's kernel "
                    "candidates on the device (within --budget-ms per shape) and store the fastest in the "
                    "tuning cache ($VKCONV_CACHE_DIR, else $XDG_CACHE_HOME/vkconv, else ~/.cache/vkconv), "
                    "which read_net and vkconv.Conv use from then on (VKCONV_TUNE=0 ignores it). Shapes the "
                    "cache already has are reported from it. Prints a before (heuristic) / after (tuned) "
                    "table per layer. With --mode subgraph the launch shapes (workgroup size x count) of the "
                    "subgraphs' elementwise, pool, resize and transpose kernels are tuned too, one per kernel "
                    "and power-of-two item count.")
    tune.add_argument("model", nargs="?", metavar="MODEL.onnx", help="the ONNX model (optional with --clear)")
    _add_input_shape(tune)
    _add_mode(tune, "load the model as in `vkconv run --mode` (the convolutions and shapes are the same)")
    tune.add_argument("--budget-ms", type=float, default=None, metavar="MS",
                      help="wall-time budget per shape (default $VKCONV_TUNE_BUDGET_MS, else 2000)")
    tune.add_argument("--time-limit", type=float, default=None, metavar="S",
                      help="start no new shape after S seconds of tuning, once one is tuned (the table covers "
                           "what was tuned; a later run goes on from the cache)")
    tune.add_argument("--clear", action="store_true", help="empty this device's tuning cache first")
    tune.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    tune.set_defaults(func=cmd_tune)

    bench = sub.add_parser(
        "bench", parents=[_common()], help="benchmark vkconv against its peers (progress bar, JSON, PNG)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run vkconv's benchmarks: each prints a table, and writes <name>-<time>.jsonl (one JSON\n"
                    "object per line) and, when matplotlib is installed, a PNG chart <name>-<time>.png into\n"
                    "--out. A progress bar (tqdm, when installed) counts the cases. Peers that are not\n"
                    "installed (ncnn, OpenCV, ONNX Runtime, torchvision, spconv/torch) are skipped\n"
                    "with a note.\n"
                    "pip install 'vkconv[bench]' brings tqdm and matplotlib.",
        epilog="benchmarks:\n"
               "  conv    dense Conv: VGG-16's 13 convolutions, a depthwise, a 1x1 and a stride-2\n"
               "          one, vs ncnn's Vulkan fp32 convolution and OpenCV's CPU dnn; FMA peak probe\n"
               "  sparse  SubM and strided sparse conv3d on a 41x400x352 grid with 30,000 voxels, vs\n"
               "          spconv 2.x on CPU and a dense conv3d\n"
               "  deform  DeformConv (DCNv2 3x3, offsets + mask) at 28-56 px, 64-256 channels, 1 and 4\n"
               "          offset groups, vs ONNX Runtime, torchvision and ncnn on CPU; vkconv's per-stage\n"
               "          device time, its efficiency vs the dense 3x3 conv and PASS/FAIL against issue 4's targets\n"
               "  all     each of the above that this vkconv has (the default)\n\n"
               "examples:\n  vkconv bench conv --quick --out results\n  vkconv bench all")
    bench.add_argument("name", nargs="?", default="all", choices=["conv", "deform", "sparse", "all"],
                       metavar="{conv,deform,sparse,all}", help="which benchmark (default all)")
    bench.add_argument("--quick", action="store_true",
                       help="a few cases only (conv: 6 layers; sparse: one cloud at 16 channels; deform: "
                            "16 channels at 16x16, one round); well under a minute each on lavapipe")
    bench.add_argument("--out", type=Path, default=Path("vkconv-bench"), metavar="DIR",
                       help="folder for the JSON-lines results and the charts (default ./vkconv-bench)")
    bench.add_argument("--cases", metavar="NAMES",
                       help="conv only: comma-separated case names, e.g. vgg1_1,dw3x3_c96_56 (or tiny, "
                            "an 8-channel 16x16 smoke test)")
    bench.set_defaults(func=cmd_bench)
    return parser


def _user_error(exc: BaseException) -> bool:
    """Errors about the device, the model or the input, whose message is written for users; cv2.error
    is one when OpenCV refuses a model."""
    cv2 = sys.modules.get("cv2")
    cv2_error = getattr(cv2, "error", None) if cv2 is not None else None
    return isinstance(exc, (VkconvError, CliError, ValueError, OSError)) or (
        isinstance(cv2_error, type) and isinstance(exc, cv2_error))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `vkconv info | head`: stop quietly, and keep Python's exit flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if debug:
            traceback.print_exc()
        # Users' errors are one line of their own; anything else is a bug worth a traceback.
        user = _user_error(exc)
        what = "" if user else f"internal error ({type(exc).__name__}): "
        hint = "" if debug or user else " (rerun with --debug for the traceback)"
        print(f"vkconv: error: {what}{compat.one_line(exc)}{hint}", file=sys.stderr)
        return 1
