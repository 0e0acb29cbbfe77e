"""Issue 7's table, one process: OpenCV CPU vs cv2.dnn + vkconv in layer mode vs subgraph mode for
PP-OCR cls (1x3x48x192), PP-OCRv4 det (1x3x640x640, a rendered text page) and VGG-16 (224x224):
median ms of --runs after one warm-up, host<->device transfers per forward, and how many of the
model's nodes run on Vulkan (every Conv does in both modes).

    python bench/subgraph.py [--runs 5] [--det-size 640]
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import onnx

import cv_plugin
import vkconv
from cv_plugin import compat
from cv_plugin.bench import report, zoo
from cv_plugin.subgraph import SubgraphOp


def _median_ms(net, x, runs: int) -> tuple[float, np.ndarray]:
    last: list[np.ndarray] = []

    def forward() -> None:
        net.setInput(x)
        last[:] = [net.forward()]
    return 1e3 * statistics.median(report.times(forward, warmup=1, repeat=runs)), last[0]


def _transfers_per_forward(net, forwards: int) -> float:
    """Host<->device tensor copies per forward: a subgraph counts its own; any other vkconv layer
    uploads its input and downloads its output."""
    total = 0
    for key, op in net.state.ops.items():
        graph = getattr(op, "graph", None)
        total += sum(graph.transfers.values()) if graph is not None else 2 * net.state.forwards.get(key, 0)
    return total / forwards


def _on_vulkan(net) -> int:
    """ONNX nodes the net runs on Vulkan: every node of each subgraph, and each layer-mode node
    (a conv with its folded BatchNormalization and fused activation counts as one)."""
    return sum(len(op.spec.nodes) if isinstance(op, SubgraphOp) else 1 for op in net.state.ops.values())


def _row(name: str, model: onnx.ModelProto, x: np.ndarray, runs: int) -> None:
    nodes = sum(1 for n in model.graph.node if n.op_type != "Constant")
    cpu_ms, ref = _median_ms(compat.read_onnx(model.SerializeToString()), x, runs)
    cells = [f"{name:20s} {cpu_ms:8.1f}"]
    for mode in ("layer", "subgraph"):
        with cv_plugin.read_net(model, mode=mode) as net:
            ms, out = _median_ms(net, x, runs)
            transfers = _transfers_per_forward(net, runs + 1)
            diff = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
            cells.append(f"{ms:8.1f} {transfers:5.0f} {diff:8.1e} {_on_vulkan(net):4d}")
    print(" | ".join(cells) + f" | {nodes}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--det-size", type=int, default=640)
    args = parser.parse_args()
    print(f"device: {vkconv.get_context().info.name}")
    print(f"{'model':20s} {'CPU ms':>8s} | {'layer ms':>8s} {'xfers':>5s} {'rel diff':>8s} {'vk':>4s} | "
          f"{'subgr ms':>8s} {'xfers':>5s} {'rel diff':>8s} {'vk':>4s} | nodes   (vk: nodes on Vulkan)")
    paths = zoo.ppocr_models()
    rng = np.random.default_rng(0)
    _row("PP-OCR cls 48x192", onnx.load(str(paths["cls"])),
         rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32), args.runs)
    _row(f"PP-OCRv4 det {args.det_size}", onnx.load(str(paths["det"])), zoo.text_image_blob(args.det_size),
         args.runs)
    _row("VGG-16 224", zoo.vgg16(), rng.random((1, 3, 224, 224), dtype=np.float32), args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
