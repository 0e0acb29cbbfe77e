"""``read_net``: load an ONNX model into ``cv2.dnn`` with its convolutions routed to vkconv."""
from __future__ import annotations

import itertools
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import onnx

import vkconv
from cv_plugin import compat, registry, subgraph, tuning
from cv_plugin.layers import NETS, NetState
from cv_plugin.rewrite import RewriteReport, rewrite
from vkconv.ops.tune import tune_mode

_ids = itertools.count(1)
_ids_lock = threading.Lock()


class Net:
    """A ``cv2.dnn.Net`` whose vkconv layers report their errors to the caller.

    Every attribute of the underlying net is available (``setInput``, ``getLayerNames``...);
    ``forward`` raises the first error a vkconv layer met during that call, with its real message.
    ``close()`` (or ``with``) frees the Vulkan resources of this net's layers.
    """

    def __init__(self, cv_net, net_id: int, state: NetState, report: RewriteReport):
        self._net = cv_net
        self.net_id = net_id
        self.state = state
        self.report = report

    def __getattr__(self, name):
        return getattr(self._net, name)

    @property
    def cv_net(self):
        """The wrapped ``cv2.dnn.Net`` (its forward does not raise vkconv's errors)."""
        return self._net

    def _raise_pending(self) -> None:
        errors = self.state.take_errors()
        if errors:
            raise errors[0]

    def setInput(self, blob, *args, **kwargs):  # noqa: N802 - the cv2.dnn.Net name
        """``cv2.dnn.Net.setInput``; a 3-D blob keeps its 3 dimensions on every OpenCV version."""
        self._net.setInput(compat.as_nd_mat(blob), *args, **kwargs)

    def forward(self, *args, **kwargs):
        self._raise_pending()  # errors left over from an earlier, unchecked call
        try:
            out = self._net.forward(*args, **kwargs)
        except compat.cv2_module().error as exc:
            errors = self.state.take_errors()
            if errors:
                raise errors[0] from exc  # the layer's own error, not OpenCV's wrapper of it
            raise
        self._raise_pending()
        return out

    def vulkan_forwards(self) -> dict[str, int]:
        """How many times each routed node ran on Vulkan so far (node key -> count)."""
        with self.state.lock:
            return dict(self.state.forwards)

    def close(self) -> None:
        self.state.close()
        NETS.pop(self.net_id, None)

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray, memoryview, np.ndarray)):
        try:
            return onnx.load_from_string(bytes(model))
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise ValueError(f"model: not a serialized ONNX model ({type(exc).__name__}: {exc})") from exc
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ValueError(f"model: no such file {str(path)!r}")
        try:
            return onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"model: {str(path)!r} is not an ONNX model ({type(exc).__name__}: {exc})") from exc
    raise ValueError(f"model: expected a path, bytes or onnx.ModelProto, got {type(model).__name__}")


def read_net(model, *, fuse: bool = True, fallback: bool = False, mode: str = "layer",
             min_ops: int = 2, tune: bool | str | None = None) -> Net:
    """Load ``model`` (a path, serialized bytes or ``onnx.ModelProto``) with Conv on Vulkan.

    ``fuse``: fold a following BatchNormalization and fuse a following activation into the conv.
    ``fallback``: when there is no usable Vulkan device, warn and load the unmodified model with
    OpenCV's own layers instead of raising :class:`vkconv.NoDeviceError`.
    ``mode``: ``"layer"`` runs each routed node as its own layer; ``"subgraph"`` runs each
    connected group of at least ``min_ops`` supported ops as one device-resident layer
    (:mod:`cv_plugin.subgraph`).
    ``tune``: handed to every convolution (see :class:`vkconv.Conv`): True measures the kernel
    candidates of each new shape the tuning cache lacks (at the first forward) and stores the
    fastest; False ignores the cache; None follows ``VKCONV_TUNE`` (default: cached choices only).
    Registers vkconv's layers first if :func:`cv_plugin.register` was not called.
    """
    if mode not in subgraph.MODES:
        raise ValueError(f"mode: expected one of {', '.join(subgraph.MODES)}, got {mode!r}")
    tune_mode(tune)  # a bad value fails before the model loads
    proto = _load(model)
    if not proto.graph.node:
        raise ValueError("model: the ONNX model has no nodes (empty or not an ONNX file)")
    try:
        vkconv.get_context()
    except vkconv.NoDeviceError as exc:
        if not fallback:
            raise
        warnings.warn(f"vkconv: {exc}; running the model on OpenCV's own layers", RuntimeWarning,
                      stacklevel=2)
        return Net(compat.read_onnx(proto.SerializeToString()), 0, NetState(), RewriteReport(routed=[]))
    registry.register()
    with _ids_lock:
        net_id = next(_ids)
    specs: dict = {}
    if mode == "subgraph":
        proto, specs = subgraph.partition(proto, min_ops=min_ops)
    routed, report = rewrite(proto, net_id, fuse=fuse)
    state = NETS[net_id] = NetState(constants=report.constants)
    subgraph.attach(state, specs)
    try:
        cv_net = compat.read_onnx(routed.SerializeToString())
    except BaseException as exc:
        errors = state.take_errors()
        state.close()
        NETS.pop(net_id, None)
        if errors:
            raise errors[0] from exc
        raise
    net = Net(cv_net, net_id, state, report)
    tuning.apply(state, tune)
    net._raise_pending()  # a layer that could not be built: report it now, not at forward
    compat.log.debug("read_net: routed to vkconv %s; left to OpenCV %s; %d BatchNorm folded, %d activations "
                     "fused", report.routed, report.left_to_opencv, report.folded_batchnorm, report.fused_activations)
    return net
