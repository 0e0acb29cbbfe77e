"""``read_net``: load an ONNX model into ``cv2.dnn`` with its convolutions routed to vkconv."""
from __future__ import annotations

import itertools
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import vkconv
from cv_plugin import compat, registry, subgraph, tuning
from cv_plugin.input_shapes import fix_input_shapes, reads_shapes, runtime_inputs, symbolic_inputs
from cv_plugin.layers import NETS, NetState
from cv_plugin.rewrite import RewriteReport, rewrite
from vkconv.ops.tune import tune_mode

_ids = itertools.count(1)
_ids_lock = threading.Lock()


@dataclass
class _Loaded:
    """One import of the (rewritten) model into ``cv2.dnn`` and the vkconv state it owns."""

    cv_net: Any
    net_id: int
    state: NetState
    report: RewriteReport

    def close(self) -> None:
        self.state.close()
        NETS.pop(self.net_id, None)


class Net:
    """A ``cv2.dnn.Net`` whose vkconv layers report their errors to the caller.

    Every attribute of the underlying net is available (``setInput``, ``getLayerNames``...);
    ``forward`` raises the first error a vkconv layer met during that call, with its real message.
    ``close()`` (or ``with``) frees the Vulkan resources of this net's layers.

    A model with symbolic input dims (and no ``input_shapes`` fixing them) whose graph computes
    with shapes (``Shape``/``Size`` nodes, which OpenCV evaluates once at import) is imported once
    per input shape: ``forward`` imports it with its inputs fixed to the shapes of the blobs given
    to ``setInput`` (the last ``max_shapes`` imports are kept, the others closed); a layer's error
    at load then surfaces at that forward.  ``cv_net``, ``state`` and ``report`` are those of the import the last
    forward used.
    """

    def __init__(self, load: Callable[[dict[str, tuple[int, ...]]], _Loaded], *,
                 dynamic: list[str] | None = None, inputs: Sequence[str] = (), max_shapes: int = 4):
        self._load = load
        self._dynamic = dynamic or []
        self._inputs = list(inputs)
        self._max_shapes = max_shapes
        self._by_shape: OrderedDict[tuple, _Loaded] = OrderedDict()
        self._blobs: dict[str, tuple] = {}  # input name -> setInput's arguments (dynamic nets only)
        self._current: _Loaded | None = None if self._dynamic else load({})

    def _loaded(self) -> _Loaded:
        if self._current is None:  # a dynamic net asked for its layers before any forward
            self._current = self._import({})
        return self._current

    def _import(self, shapes: dict[str, tuple[int, ...]]) -> _Loaded:
        key = tuple(sorted(shapes.items()))
        loaded = self._by_shape.get(key)
        if loaded is None:
            loaded = self._by_shape[key] = self._load(shapes)
            while len(self._by_shape) > self._max_shapes:
                self._by_shape.popitem(last=False)[1].close()
        self._by_shape.move_to_end(key)
        return loaded

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._loaded().cv_net, name)

    @property
    def cv_net(self):
        """The wrapped ``cv2.dnn.Net`` (its forward does not raise vkconv's errors)."""
        return self._loaded().cv_net

    @property
    def state(self) -> NetState:
        return self._loaded().state

    @property
    def report(self) -> RewriteReport:
        return self._loaded().report

    @property
    def net_id(self) -> int:
        return self._loaded().net_id

    def _raise_pending(self) -> None:
        errors = self.state.take_errors()
        if errors:
            raise errors[0]

    def setInput(self, blob, name: str = "", *args, **kwargs):  # noqa: N802 - the cv2.dnn.Net name
        """``cv2.dnn.Net.setInput``; a 3-D blob keeps its 3 dimensions on every OpenCV version."""
        if self._dynamic:
            self._blobs[name or (self._inputs[0] if self._inputs else "")] = (blob, args, kwargs)
        else:
            self.cv_net.setInput(compat.as_nd_mat(blob), name, *args, **kwargs)

    def _select(self) -> None:
        """For a dynamic net: the import for the shapes of the blobs set, with the blobs set on it."""
        shapes = {name: tuple(int(d) for d in np.shape(blob)) for name, (blob, _, _) in self._blobs.items()
                  if name in self._dynamic}
        self._current = self._import(shapes)
        for name, (blob, args, kwargs) in self._blobs.items():
            self._current.cv_net.setInput(compat.as_nd_mat(blob), name, *args, **kwargs)

    def forward(self, *args, **kwargs):
        if self._dynamic:
            self._select()
        self._raise_pending()  # errors left over from an earlier, unchecked call
        try:
            out = self.cv_net.forward(*args, **kwargs)
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
        for loaded in self._by_shape.values():
            loaded.close()
        self._by_shape.clear()
        if self._current is not None:
            self._current.close()

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def load_model(model) -> onnx.ModelProto:
    """``model`` (a path, serialized bytes or ``onnx.ModelProto``) as a ModelProto; ValueError
    saying what is wrong otherwise."""
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


def prepare_model(model, mode: str, input_shapes: Mapping[str, Sequence[int]] | None) -> onnx.ModelProto:
    """What :func:`read_net` and :func:`cv_plugin.convert` start from: ``model`` loaded (see
    :func:`load_model`) and checked, with ``input_shapes`` fixed; ValueError naming the problem."""
    if mode not in subgraph.MODES:
        raise ValueError(f"mode: expected one of {', '.join(subgraph.MODES)}, got {mode!r}")
    proto = load_model(model)
    if not proto.graph.node:
        raise ValueError("model: the ONNX model has no nodes (empty or not an ONNX file)")
    return fix_input_shapes(proto, input_shapes) if input_shapes else proto


def read_net(model, *, fuse: bool = True, fallback: bool = False, mode: str = "layer",
             min_ops: int = 2, input_shapes: Mapping[str, Sequence[int]] | None = None,
             max_shapes: int = 4, tune: bool | str | None = None) -> Net:
    """Load ``model`` (a path, serialized bytes or ``onnx.ModelProto``) with Conv on Vulkan.

    ``fuse``: fold a following BatchNormalization and fuse a following activation into the conv.
    ``fallback``: when there is no usable Vulkan device, warn and load the unmodified model with
    OpenCV's own layers instead of raising :class:`vkconv.NoDeviceError`.
    ``mode``: ``"layer"`` runs each routed node as its own layer; ``"subgraph"`` runs each
    connected group of at least ``min_ops`` supported ops as one device-resident layer
    (:mod:`cv_plugin.subgraph`).
    ``input_shapes``: input name -> shape, fixing symbolic input dims before import (with ONNX
    shape inference).  A model left with symbolic input dims that computes with shapes is
    imported per input shape at ``forward`` (see :class:`Net`), keeping the last ``max_shapes``.
    ``tune``: handed to every convolution (see :class:`vkconv.Conv`): True measures the kernel
    candidates of each new shape the tuning cache lacks (at the first forward) and stores the
    fastest; False ignores the cache; None follows ``VKCONV_TUNE`` (default: cached choices only).
    Registers vkconv's layers first if :func:`cv_plugin.register` was not called.
    """
    if not isinstance(max_shapes, int) or max_shapes < 1:
        raise ValueError(f"max_shapes: expected a positive int, got {max_shapes!r}")
    tune_mode(tune)  # a bad value fails before the model loads
    proto = prepare_model(model, mode, input_shapes)
    try:
        vkconv.get_context()
    except vkconv.NoDeviceError as exc:
        if not fallback:
            raise
        warnings.warn(f"vkconv: {exc}; running the model on OpenCV's own layers", RuntimeWarning,
                      stacklevel=2)
        return Net(lambda _: _Loaded(compat.read_onnx(proto.SerializeToString()), 0, NetState(),
                                     RewriteReport(routed=[])))
    registry.register()

    def load(shapes: dict[str, tuple[int, ...]]) -> _Loaded:
        return _import(fix_input_shapes(proto, shapes) if shapes else proto, fuse, mode, min_ops, tune)

    # OpenCV follows other models' input shapes itself (the layers' getMemoryShapes runs again)
    dynamic = symbolic_inputs(proto) if reads_shapes(proto) else []
    return Net(load, dynamic=dynamic, inputs=[vi.name for vi in runtime_inputs(proto)], max_shapes=max_shapes)


def _import(proto: onnx.ModelProto, fuse: bool, mode: str, min_ops: int, tune: bool | str | None) -> _Loaded:
    """Rewrite ``proto`` and import it into ``cv2.dnn`` under a new net id; its convolutions get
    ``tune``."""
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
    loaded = _Loaded(cv_net, net_id, state, report)
    tuning.apply(state, tune)
    errors = state.take_errors()
    if errors:  # a layer that could not be built: report it now, not at forward
        loaded.close()
        raise errors[0]
    compat.log.debug("read_net: routed to vkconv %s; left to OpenCV %s; %d BatchNorm folded, %d activations "
                     "fused", report.routed, report.left_to_opencv, report.folded_batchnorm, report.fused_activations)
    return loaded
