"""``profile``: where a ``cv2.dnn`` forward of a net loaded with :func:`cv_plugin.read_net` spends
its device time, from Vulkan timestamp queries.

    net = cv_plugin.read_net("model.onnx", mode="subgraph")
    report = cv_plugin.profile(net, blob)
    print(report.table())
    report.chart("profile.svg")

Each vkconv layer runs once more in the profiled forward with timestamps recorded in: a subgraph
reports every fused node (an ``Elementwise`` node is a chain of ONNX elementwise ops run as one
dispatch), a single conv layer its own dispatches.  Transfers are the bytes each layer took from
OpenCV and gave back (a subgraph's inputs and outputs), which on a discrete GPU cross the bus.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from html import escape

import numpy as np

from cv_plugin.layers import LayerProfile
from cv_plugin.net import Net


@dataclass
class Profile:
    """One profiled forward: ``layers`` in the order OpenCV ran them, ``forward_ms`` its wall time
    (with the timestamp replays, so above an unprofiled forward)."""

    layers: list[LayerProfile]
    forward_ms: float

    @property
    def device_ms(self) -> float:
        return sum(layer.device_ms for layer in self.layers)

    @property
    def transfer_bytes(self) -> int:
        return sum(layer.upload_bytes + layer.download_bytes for layer in self.layers)

    def by_kernel(self) -> dict[str, tuple[int, float]]:
        """Kernel name -> (steps, device ms), the most expensive first."""
        totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
        for layer in self.layers:
            for step in layer.steps:
                totals[step.kernel][0] += 1
                totals[step.kernel][1] += step.ms
        return {k: (n, ms) for k, (n, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])}

    def table(self, steps: bool = True) -> str:
        """Per layer (and, with ``steps``, per step) device ms, shapes and transfers; totals per
        kernel and for the forward."""
        # kernel: for a conv, the candidate that ran and where the choice came from
        lines = [f"{'layer / step':44s} {'kernel':50s} {'output':22s} {'device ms':>10s} {'transfer KiB':>12s}"]
        for layer in self.layers:
            kib = (layer.upload_bytes + layer.download_bytes) / 1024
            lines.append(f"{layer.key[:44]:44s} {layer.kind:50s} {'':22s} {layer.device_ms:10.3f} {kib:12.1f}")
            for s in layer.steps if steps else []:
                lines.append(f"  {s.name[:42]:42s} {s.kernel[:50]:50s} {str(s.output_shape)[:22]:22s} {s.ms:10.3f}")
        lines.append("")
        lines.append(f"{'kernel':50s} {'steps':>6s} {'device ms':>10s}")
        for kernel, (n, ms) in self.by_kernel().items():
            lines.append(f"{kernel:50s} {n:6d} {ms:10.3f}")
        lines.append(f"forward {self.forward_ms:.1f} ms wall; {self.device_ms:.1f} ms on the device in "
                     f"{len(self.layers)} vkconv layers; {self.transfer_bytes / 2**20:.2f} MiB host<->device")
        return "\n".join(lines)

    def chart(self, path: str) -> None:
        """An SVG bar chart of device ms per kernel, written to ``path``."""
        rows = list(self.by_kernel().items())
        scale = 400 / max([ms for _, (_, ms) in rows] + [1e-9])
        height = 24 * len(rows) + 40
        bars = [f'<text x="10" y="20" font-size="14">device ms per kernel ({self.device_ms:.1f} ms in all)</text>']
        for i, (kernel, (n, ms)) in enumerate(rows):
            y = 36 + 24 * i
            bars.append(f'<text x="210" y="{y + 14}" font-size="12" text-anchor="end">{escape(kernel)} ({n})</text>'
                        f'<rect x="220" y="{y}" width="{ms * scale:.1f}" height="18" fill="#4a7ab0"/>'
                        f'<text x="{226 + ms * scale:.1f}" y="{y + 14}" font-size="12">{ms:.2f}</text>')
        with open(path, "w", encoding="utf-8") as f:
            f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="720" height="{height}">'
                    + "".join(bars) + "</svg>\n")


def profile(net: Net, inputs: np.ndarray | Mapping[str, np.ndarray]) -> Profile:
    """Run one forward of ``net`` (a :class:`cv_plugin.Net`) on ``inputs`` (one blob, or
    ``{input name: blob}``) with every vkconv layer timing its device work; the net's outputs are
    not returned (use ``forward`` for them)."""
    if not isinstance(net, Net):
        raise ValueError(f"net: expected a cv_plugin.Net from cv_plugin.read_net, got {type(net).__name__}")
    feeds = dict(inputs) if isinstance(inputs, Mapping) else {"": inputs}
    for name, blob in feeds.items():
        net.setInput(blob, name) if name else net.setInput(blob)
    net.state.profiles = {}
    try:
        start = time.perf_counter()
        net.forward()
        forward_ms = 1e3 * (time.perf_counter() - start)
        layers = list(net.state.profiles.values())
    finally:
        net.state.profiles = None
    return Profile(layers, forward_ms)
