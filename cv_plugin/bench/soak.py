"""Repeated forwards, net creations and threads on a small conv net: the resource-leak checks.

Shared by ``tests/plugin/test_reliability.py`` (small counts) and ``bench/soak.py`` (the full counts).
"""
from __future__ import annotations

import gc
import threading
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import vkconv
from cv_plugin.net import read_net

INPUT_SHAPE = (1, 8, 19, 23)  # odd spatial sizes on purpose


def small_net(seed: int = 0) -> onnx.ModelProto:
    """Conv 3x3 (8->16) + BatchNorm + Relu, depthwise Conv 3x3 stride 2 + HardSwish, Conv 1x1 (16->4)."""
    rng = np.random.default_rng(seed)

    def t(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [t("w1", 16, 8, 3, 3), t("b1", 16), t("s", 16), t("beta", 16), t("mean", 16),
             numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "var"),
             t("w2", 16, 1, 3, 3), t("w3", 4, 16, 1, 1), t("b3", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "beta", "mean", "var"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=16),
        helper.make_node("HardSwish", ["c2"], ["h2"]),
        helper.make_node("Conv", ["h2", "w3", "b3"], ["y"]),
    ]
    out_shape = [1, 4, (INPUT_SHAPE[2] + 1) // 2, (INPUT_SHAPE[3] + 1) // 2]
    graph = helper.make_graph(nodes, "small",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(INPUT_SHAPE))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def live_objects() -> dict[str, int]:
    """Live Vulkan objects by kind, after a garbage collection: objects that earlier code dropped
    but Python had not yet collected would otherwise be freed in the middle of a measurement."""
    gc.collect()
    return {k: v for k, v in vkconv.get_context().live.items() if v}


@dataclass
class Growth:
    count: int
    rss_bytes: int
    live_before: dict[str, int]
    live_after: dict[str, int]

    @property
    def rss_per_1000(self) -> float:
        return self.rss_bytes * 1000.0 / max(self.count, 1)


def soak_forwards(count: int, warmup: int = 50) -> Growth:
    """``count`` forwards of one net after ``warmup``; RSS and live Vulkan objects before/after."""
    x = np.random.default_rng(1).standard_normal(INPUT_SHAPE).astype(np.float32)
    with read_net(small_net()) as net:
        for _ in range(warmup):
            net.setInput(x)
            net.forward()
        live, rss = live_objects(), rss_bytes()
        for _ in range(count):
            net.setInput(x)
            net.forward()
        return Growth(count, rss_bytes() - rss, live, live_objects())


def soak_nets(count: int, warmup: int = 10) -> Growth:
    """``count`` read_net / forward / close cycles after ``warmup`` cycles."""
    model = small_net()
    x = np.random.default_rng(1).standard_normal(INPUT_SHAPE).astype(np.float32)

    def cycle():
        with read_net(model) as net:
            net.setInput(x)
            net.forward()

    for _ in range(warmup):
        cycle()
    live, rss = live_objects(), rss_bytes()
    for _ in range(count):
        cycle()
    return Growth(count, rss_bytes() - rss, live, live_objects())


def threaded_forwards(threads: int, forwards: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Single-threaded outputs for ``threads`` inputs, and each thread's outputs when every thread
    runs its own net on its own input ``forwards`` times concurrently."""
    model = small_net()
    inputs = [np.random.default_rng(10 + i).standard_normal(INPUT_SHAPE).astype(np.float32)
              for i in range(threads)]
    reference = []
    for x in inputs:
        with read_net(model) as net:
            net.setInput(x)
            reference.append(net.forward().copy())
    results: list[list[np.ndarray]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with read_net(model) as net:
                for _ in range(forwards):
                    net.setInput(inputs[i])
                    results[i].append(net.forward().copy())
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return reference, results
