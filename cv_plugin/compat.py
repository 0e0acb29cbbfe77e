"""Every OpenCV-version difference the plugin cares about, in one place.

Measured facts (see shared/notes/opencv-python-layers.md): 4.10–4.14 host Python layers;
``readNetFromONNX(bytes)`` segfaults from 4.12 on, a uint8 numpy buffer works everywhere; 5.0.0
never calls ``getMemoryShapes``, so a layer whose output shape differs from its input cannot run.
Rather than trusting the version string alone, :func:`check_python_layers` runs a one-node probe
model once per process, so a fixed 5.x release is accepted without code changes.
"""
from __future__ import annotations

import logging

import numpy as np

from vkconv.runtime.errors import VkconvError

log = logging.getLogger("vkconv")

PROBE_TYPE = "vkconv.Probe"
_probe_result: str | None = None  # None: not run; "" ok; otherwise the reason it cannot host us


def cv2_module():
    try:
        import cv2
    except ImportError as exc:
        raise VkconvError("OpenCV is not installed: pip install 'opencv-python-headless>=4.10,<5' "
                          "(or keep the opencv-python / opencv-contrib-python you have)") from exc
    return cv2


def cv2_version() -> tuple[int, int, int]:
    parts = (cv2_module().__version__.split("-")[0].split(".") + ["0", "0"])[:3]
    major, minor, patch = (int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)
    return major, minor, patch


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line, followed by its one-line notes (``in vkconv layer ...``)."""
    parts = [" ".join(str(exc).split())]
    parts += [n for n in getattr(exc, "__notes__", []) if "\n" not in n]
    return "; ".join(p for p in parts if p)


def read_onnx(data: bytes):
    """``cv2.dnn.readNetFromONNX`` on serialized model bytes, the way every version accepts.

    The ``missing dispatch map for domain='vkconv'`` warning OpenCV prints for custom domains is
    expected, so OpenCV's log level is lowered around the import only.
    """
    cv2 = cv2_module()
    buf = np.frombuffer(data, np.uint8)
    logging_mod = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_mod is None:
        return cv2.dnn.readNetFromONNX(buf)
    level = logging_mod.getLogLevel()
    logging_mod.setLogLevel(min(level, logging_mod.LOG_LEVEL_ERROR))
    try:
        return cv2.dnn.readNetFromONNX(buf)
    finally:
        logging_mod.setLogLevel(level)


def as_nd_mat(array: np.ndarray):
    """``array`` wrapped so that OpenCV converts it to a Mat of exactly ``array.shape``.

    A plain 3-D ndarray whose last dimension is small becomes a 2-D multi-channel Mat: a 1-D conv's
    ``[N, C, W]`` tensor is then refused as a layer output (4.10-4.14) and misread as a net input
    (4.10). ``cv2.Mat(..., wrap_channels=False)`` keeps every dimension.
    """
    mat = getattr(cv2_module(), "Mat", None)
    if mat is None or not isinstance(array, np.ndarray) or isinstance(array, mat):
        return array
    return mat(array, wrap_channels=False)


def as_cv_output(array: np.ndarray):
    """A layer output: C-contiguous float32 of exactly the declared shape."""
    return as_nd_mat(np.ascontiguousarray(array, dtype=np.float32))


class _ProbeLayer:
    """Doubles the channel count: only a host that calls getMemoryShapes can run it."""

    calls = 0

    def __init__(self, params, blobs):
        pass

    def getMemoryShapes(self, inputs):
        type(self).calls += 1
        n, c, h, w = inputs[0]
        return [[n, 2 * c, h, w]]

    def forward(self, inputs):
        try:
            x = inputs[0]
            return [np.concatenate([x, x], axis=1)]
        except BaseException:  # never let an exception cross the bridge (it hangs)
            return [np.zeros((1, 2, 1, 1), np.float32)]


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Probe", ["x"], ["y"], domain="vkconv")
    graph = helper.make_graph([node], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("vkconv", 1)])
    return model.SerializeToString()


def check_python_layers(register_layer) -> None:
    """Raise VkconvError with one clear sentence when this cv2 cannot host our layers.

    ``register_layer(type_name, cls)`` is the plugin's once-only registration function.
    """
    global _probe_result
    if _probe_result is None:
        _probe_result = _run_probe(register_layer)
    if _probe_result:
        raise VkconvError(_probe_result)


def _run_probe(register_layer) -> str:
    cv2 = cv2_module()
    version = cv2.__version__
    if cv2_version() < (4, 10, 0):
        return f"OpenCV {version} is too old for vkconv's layers: install opencv-python-headless>=4.10,<5"
    register_layer(PROBE_TYPE, _ProbeLayer)
    before = _ProbeLayer.calls
    try:
        net = read_onnx(_probe_model())
        net.setInput(np.array([[[[1.0, 2.0]]]], np.float32))
        out = net.forward()
    except cv2.error as exc:
        log.debug("cv2 layer probe failed: %s", exc)
        out = None
    if out is None or out.shape != (1, 2, 1, 2) or _ProbeLayer.calls == before:
        return (f"OpenCV {version} cannot host vkconv's Python layers (it does not call getMemoryShapes "
                "for custom layers); install opencv-python-headless>=4.10,<5")
    return ""
