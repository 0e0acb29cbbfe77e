"""The Python layers OpenCV's dnn calls, and where their state really lives.

OpenCV never frees layer instances and hangs if ``forward`` raises, so a layer here is a thin,
exception-proof shell: it holds ``(net id, node key)`` and forwards to an *op* object kept in the
plugin-level :data:`NETS` registry.  Closing the :class:`cv_plugin.net.Net` drops its ops (weights,
Vulkan buffers, recorded commands).  Errors are stored on the net's state and raised by the wrapper
around ``forward``; the layer returns zeros of the declared shape meanwhile.

Every op node carries integer attributes written by the rewrite: ``vk_net`` (net id), ``vk_const``
(bit i set when node input i is not a runtime input: a constant, or an optional input left out with
an empty name, whose value is None) and ``vk_ninputs``, and the string ``vk_key`` (unique node key).
The rewrite takes constant inputs (weights, bias) out of the graph and keeps them in
``NetState.constants``: OpenCV never copies them into the layer instances it leaks, and they keep
their dtype and shape (OpenCV would make 1-D blobs ``(N, 1)`` and int64 int32).

A node without ``vk_net`` was not rewritten in this process: a model loaded with plain
``cv2.dnn.readNet`` after :func:`cv_plugin.register` (a saved converted model, or an op OpenCV lacks
such as ``DeformConv``).  Its constants are the blobs OpenCV hands the layer (None for an omitted
input), and its op lives in :data:`STANDALONE`, keyed by the layer's content (type, attributes,
constants), so loading the same model again reuses the device weights instead of leaking them
with the layer instances OpenCV never frees.  Such a layer cannot raise to the user: its error is
logged on the ``vkconv`` logger, kept for :func:`cv_plugin.take_errors`, and turned into a
``cv2.error`` by a wrongly sized output.
"""
from __future__ import annotations

import hashlib
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import vkconv
from cv_plugin import compat
from vkconv.graph import StepTime
from vkconv.kernels import shapes
from vkconv.kernels.activation import Instruction
from vkconv.ops.tune import choice_label
from vkconv.runtime.timestamps import device_times


@dataclass
class LayerProfile:
    """One vkconv layer's share of a profiled forward: bytes it took from and gave back to OpenCV
    (host<->device transfers), and its device time per step (a subgraph: per fused node)."""

    key: str
    kind: str
    upload_bytes: int
    download_bytes: int
    steps: list[StepTime]

    @property
    def device_ms(self) -> float:
        return sum(s.ms for s in self.steps)


@dataclass
class NetState:
    """What one loaded net owns: its ops, pending errors, and per-op forward counts."""

    # node key -> constants (arrays; for a vkconv.Subgraph node, its SubgraphSpec)
    constants: dict[str, list[Any]] = field(default_factory=dict)
    ops: dict[str, Op] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    forwards: dict[str, int] = field(default_factory=dict)
    timings: dict[str, list[float]] | None = None  # opt-in (vkconv profile): node key -> forward seconds
    # opt-in (cv_plugin.profile): node key -> (layer type, transfers, the op's per-step device times)
    profiles: dict[str, LayerProfile] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(exc)
            del self.errors[:-64]  # nobody may be taking them (plain cv2.dnn loads): keep the latest

    def take_errors(self) -> list[BaseException]:
        with self.lock:
            errors, self.errors = self.errors, []
        return errors

    def close(self) -> None:
        for op in self.ops.values():
            op.close()
        self.ops.clear()
        self.constants.clear()


NETS: dict[int, NetState] = {}
_orphan = NetState()  # errors from layers whose net id is unknown (malformed nodes)
STANDALONE = NetState()  # layers of models loaded by plain cv2.dnn.readNet (see the module docstring)


def layer_error(where: str, exc: BaseException) -> BaseException:
    """The error the user sees for ``exc`` raised in the layer described by ``where`` (its node,
    op type and input shapes).  A ValueError or VkconvError with a message is written for users:
    it keeps its type and message and gets ``where`` as a note.  Anything else (an internal error,
    or an exception without a message) becomes a VkconvError whose message says all of it."""
    if str(exc) and isinstance(exc, (ValueError, vkconv.VkconvError)):
        exc.add_note(f"in {where}")
        return exc
    error = vkconv.VkconvError(f"{where} failed: {type(exc).__name__}: {str(exc) or '(no message)'}")
    error.__cause__ = exc
    error.add_note("".join(traceback.format_exception(exc)))
    return error


def _ints(params: dict, key: str, n: int, default: int) -> tuple[int, ...]:
    """An int-list attribute; OpenCV hands a 1-element list over as a scalar."""
    value = params.get(key, default)
    if isinstance(value, (int, float)):
        return (int(value),) * n
    return tuple(int(v) for v in value)


def epilogue(params: dict) -> vkconv.Activation | None:
    """The fused epilogue the rewrite wrote into ``params``: ``vk_act`` (name) with ``vk_act_a`` /
    ``vk_act_b``, and ``vk_post``, an elementwise program as 5 numbers per instruction."""
    act = str(params.get("vk_act", ""))
    spec = (act, float(params.get("vk_act_a", 0.0)), float(params.get("vk_act_b", 0.0))) if act else None
    post = params.get("vk_post")
    if post is None:
        return vkconv.Activation.parse(spec) if spec else None
    values = [float(v) for v in (post if isinstance(post, (list, tuple)) else [post])]
    program = [Instruction(int(values[i]), int(values[i + 1]), int(values[i + 2]), values[i + 3], values[i + 4])
               for i in range(0, len(values) - 4, 5)]
    return vkconv.Activation.parse(spec).with_post(program)


class Op:
    """Base of the objects behind the layers: shapes without a device, forward on it."""

    # names of the node's inputs in ONNX order (for messages); the first ``required`` must be given
    input_names: tuple[str, ...] = ()
    required = 1

    def __init__(self, params: dict, constants: Sequence[np.ndarray | None]):
        """``params``: the node's attributes as OpenCV hands them over; ``constants``: the node's
        non-runtime inputs in ONNX order (taken out of the graph by the rewrite; None for an
        omitted one).  ``vk_runtime_order`` (set for plain ``cv2.dnn.readNet`` loads only): the
        slots runtime inputs fill, most likely first, when fewer arrive than there are slots."""
        self.name = str(params.get("vk_key", "?"))
        self.ninputs = int(params["vk_ninputs"])
        self.const_mask = int(params["vk_const"])
        self.constants = list(constants)
        self.const_slots = [i for i in range(self.ninputs) if self.const_mask >> i & 1]
        self.runtime_slots = tuple(params.get("vk_runtime_order") or
                                   (i for i in range(self.ninputs) if not self.const_mask >> i & 1))
        if len(self.constants) != len(self.const_slots):
            raise ValueError(f"{self.name}: {len(self.constants)} constant inputs for "
                             f"{len(self.const_slots)} constant slots (vk_const={self.const_mask})")

    def input_name(self, i: int) -> str:
        return self.input_names[i] if i < len(self.input_names) else f"input {i}"

    def merge(self, runtime: list, constants: list) -> list:
        """Node inputs in ONNX order, None where an optional input was omitted: ``constants``
        merged back between the ``runtime`` inputs; works on arrays and on shapes alike."""
        if len(runtime) > len(self.runtime_slots):
            raise ValueError(f"{self.name}: {len(runtime)} runtime inputs, the node takes at most "
                             f"{len(self.runtime_slots)}")
        merged: list = [None] * self.ninputs
        for i, value in zip(self.const_slots, constants):
            merged[i] = value
        for i, value in zip(sorted(self.runtime_slots[:len(runtime)]), runtime):
            merged[i] = value
        missing = [self.input_name(i) for i in range(min(self.required, self.ninputs)) if merged[i] is None]
        if missing or self.ninputs < self.required:
            raise ValueError(f"{self.name}: required input {', '.join(missing) or self.input_name(self.ninputs)} "
                             "is missing (omitted or an empty name)")
        return merged

    @property
    def runtime_weights(self) -> bool:
        """Whether any input after X arrives at forward time (W, B fed with net.setInput)."""
        return any(not self.const_mask >> i & 1 for i in range(1, self.ninputs))

    def output_shapes(self, in_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def forward(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def profile(self, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[StepTime]]:
        """``forward`` plus the device time of what it ran, per step (none known here: ops that can
        time their dispatches override this)."""
        return self.forward(arrays), []

    def close(self) -> None:
        pass


class ConvFamilyOp(Op):
    """An op with inputs X, W[, B] and attributes of the Conv family, run by a vkconv object that
    keeps W and B on the device; W and B may be constants or runtime inputs (re-uploaded only when
    they change)."""

    input_names: tuple[str, ...] = ("X", "W", "B")
    required = 2
    tune: bool | str | None = None  # read_net(tune=...), handed to the vkconv op it builds

    def __init__(self, params: dict, constants: list[np.ndarray]):
        super().__init__(params, constants)
        self.nd = int(params["vk_nd"])
        self.group = int(params.get("vk_group", 1))
        self.strides = _ints(params, "vk_strides", self.nd, 1)
        self.dilations = _ints(params, "vk_dilations", self.nd, 1)
        self.pads = _ints(params, "vk_pads", 2 * self.nd, 0)
        self.auto_pad = str(params.get("vk_auto_pad", "NOTSET"))
        self.activation = epilogue(params)
        self.device_op = None
        # the runtime W/B the device weights were made from
        self._w_src: np.ndarray | None = None
        self._b_src: np.ndarray | None = None

    def build(self, w: np.ndarray, b: np.ndarray | None):
        """The vkconv object (with ``set_weights``, ``__call__`` and ``close``) for these weights."""
        raise NotImplementedError

    def weights(self, w: np.ndarray, b: np.ndarray | None):
        """The device op holding ``w``/``b``: built on first use, re-uploaded when runtime W/B change,
        rebuilt on a new device after the old one was lost."""
        if self.device_op is not None and self.device_op.ctx.lost:
            self.close()
        if self.device_op is None:
            self.device_op = self.build(w, b)
        elif self.runtime_weights and not (_same(w, self._w_src) and _same(b, self._b_src)):
            self.device_op.set_weights(w, b)
        self._w_src, self._b_src = w, b
        return self.device_op

    def forward(self, arrays):
        x, w, *rest = arrays
        return [self.weights(w, rest[0].reshape(-1) if rest and rest[0] is not None else None)(x)]

    def profile(self, arrays):
        outs = self.forward(arrays)
        op, x_shape = self.device_op, tuple(arrays[0].shape)
        # the plan's buffers still hold this call's data: replay its dispatches between timestamps
        ms = min(device_times(op.ctx, op.plan(x_shape).body, warmup=1, repeat=3))
        kernel = choice_label(op, x_shape)
        return outs, [StepTime(self.name, type(self).__name__.removesuffix("Op"), kernel, x_shape,
                               tuple(outs[0].shape), ms)]

    def close(self):
        if self.device_op is not None:
            self.device_op.close()
            self.device_op = None


class ConvOp(ConvFamilyOp):
    """ONNX Conv (1-D/2-D/3-D) with fused BatchNorm/activation."""


    def output_shapes(self, in_shapes):
        out, _ = shapes.conv_output_shape(in_shapes[0], in_shapes[1], self.strides, self.pads,
                                          self.dilations, self.group, self.auto_pad)
        return [out]

    def build(self, w, b):
        return vkconv.Conv(w, b, strides=self.strides, pads=self.pads, dilations=self.dilations,
                           group=self.group, activation=self.activation, auto_pad=self.auto_pad, tune=self.tune)


class ConvTransposeOp(ConvFamilyOp):
    """ONNX ConvTranspose (1-D/2-D/3-D), output_padding and output_shape included."""


    def __init__(self, params: dict, constants: list[np.ndarray]):
        super().__init__(params, constants)
        self.output_padding = _ints(params, "vk_output_padding", self.nd, 0)
        self.target_shape = _ints(params, "vk_output_shape", self.nd, 0) \
            if "vk_output_shape" in params else None

    def output_shapes(self, in_shapes):
        out, _ = shapes.conv_transpose_output_shape(
            in_shapes[0], in_shapes[1], self.strides, self.pads, self.dilations, self.group,
            self.output_padding, self.target_shape, self.auto_pad)
        return [out]

    def build(self, w, b):
        return vkconv.ConvTranspose(w, b, strides=self.strides, pads=self.pads, dilations=self.dilations,
                                    group=self.group, output_padding=self.output_padding,
                                    output_shape=self.target_shape, auto_pad=self.auto_pad,
                                    activation=self.activation, tune=self.tune)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and np.array_equal(a, b))


def restore_blob(blob) -> np.ndarray | None:
    """A constant as OpenCV hands it to a layer (None for an omitted or empty input), copied out of
    OpenCV's memory.  OpenCV turned 1-D constants into ``(N, 1)`` and int64 into int32: the ops
    reshape what they read as vectors, and the int64 scalars (torchvision's) are exact in int32."""
    return None if blob is None else np.array(blob)


def _digest(type_name: str, params: dict, blobs: list) -> str:
    """A key for a layer's content: its type, attributes and constants."""
    h = hashlib.sha1(f"{type_name}|{sorted((k, repr(v)) for k, v in params.items())}".encode())
    for b in blobs:
        h.update(b"-" if b is None else f"{b.dtype}{b.shape}".encode() + np.ascontiguousarray(b).tobytes())
    return h.hexdigest()[:16]


class Layer:
    """The class registered with ``cv2.dnn_registerLayer``; subclasses set ``op_class``."""

    op_class: type[Op] = Op
    # Plain cv2.dnn.readNet of a vkconv node the rewrite did not mark (no vk_const): the node's input
    # slots that constants (blobs) fill first, and those runtime inputs fill first.
    slot_priority: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def __init__(self, params, blobs):
        self.last_shapes: list[list[int]] = [[1]]
        self.standalone = "vk_net" not in params
        self.net_id = int(params.get("vk_net", -1))
        self.key = str(params.get("vk_key", "?"))
        self.op_type = type(self).__name__.removesuffix("Layer")
        if self.standalone:
            self.state = STANDALONE
            try:
                constants = [restore_blob(b) for b in blobs]
                digest = _digest(self.op_type, dict(params), constants)
                params, constants = self.standalone_params(dict(params), constants)
                self.key = f"{params.get('vk_key', self.op_type)}@{digest}"
                if self.key not in self.state.ops:  # else: the same layer was loaded before, reuse it
                    self.state.ops[self.key] = self.op_class({**params, "vk_key": self.key}, constants)
            except BaseException as exc:  # noqa: BLE001 - raising here gives OpenCV's catchable error
                self._report(exc, [])
                raise
            return
        self.state = NETS.get(self.net_id, _orphan)
        try:
            op = self.op_class(params, self.state.constants.get(self.key, []))
            self.state.ops[self.key] = op
        except BaseException as exc:  # noqa: BLE001 - nothing may cross the bridge
            self._report(exc, [])

    @classmethod
    def standalone_params(cls, params: dict, constants: list) -> tuple[dict, list]:
        """``params`` with the bookkeeping attributes the rewrite would have written, and the node's
        constants, for a layer loaded by plain ``cv2.dnn.readNet``: a model saved by
        :func:`cv_plugin.convert` has them; otherwise :attr:`slot_priority` says which slots the
        constants fill (runtime inputs then fill the others, most likely first)."""
        if "vk_const" in params:
            return params, constants
        priority = cls.slot_priority_for(params)
        if priority is None:
            raise ValueError(f"vkconv.{cls.op_class.__name__.removesuffix('Op')}: no vk_const attribute; "
                             "load this model with cv_plugin.read_net or save it with cv_plugin.convert")
        const_first, runtime_first = priority
        if len(constants) > len(const_first):
            raise ValueError(f"{len(constants)} constant inputs, the node takes at most {len(const_first)}")
        const_slots = sorted(const_first[:len(constants)])
        return {**params, "vk_ninputs": len(const_first), "vk_const": sum(1 << i for i in const_slots),
                "vk_runtime_order": tuple(i for i in runtime_first if i not in const_slots)}, constants

    @classmethod
    def slot_priority_for(cls, params: dict) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """:attr:`slot_priority`, for layers whose input count depends on their attributes."""
        return cls.slot_priority

    def _report(self, exc: BaseException, shapes: list) -> None:
        """Record ``exc`` for the user (and log it, for a plain cv2.dnn load that cannot raise it)."""
        where = f"vkconv layer {self.key!r} ({self.op_type}) with input shapes {[tuple(s) for s in shapes]}"
        error = layer_error(where, exc)
        self.state.fail(error)
        if self.standalone:
            message = f"vkconv: {compat.one_line(error)}"
            compat.log.error("%s", message)
            try:  # a warning reaches the user without logging set up; never let it raise here
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            except BaseException:  # noqa: BLE001 - a warnings filter set to "error"
                pass

    def _op(self) -> Op:
        op = self.state.ops.get(self.key)
        if op is None:
            raise vkconv.VkconvError(f"vkconv layer {self.key}: its net was closed (cv_plugin.release) or "
                                     "failed to load; load the model again")
        return op

    def getMemoryShapes(self, inputs):  # noqa: N802 - OpenCV's name
        # While importing a model with dynamic input sizes OpenCV passes unknown dimensions as -1 or
        # 0, and it crashes on a declared shape holding them; it asks again with the real sizes
        # before the first forward, so unknown dimensions are declared as 1 meanwhile.
        # Unlike forward, getMemoryShapes may raise: OpenCV 4.10-4.14 turn that into a catchable
        # cv2.error that stops the import (or the forward) before any layer sees a wrong shape;
        # the wrapper then raises the error recorded here instead.
        in_shapes = [tuple(int(d) for d in s) for s in inputs]
        try:
            op = self._op()
            full = op.merge(in_shapes, [None if c is None else c.shape for c in op.constants])
            shapes = op.output_shapes(full)
        except BaseException as exc:  # noqa: BLE001
            self._report(exc, in_shapes)
            raise
        self.last_shapes = [[max(int(d), 1) for d in s] for s in shapes]
        return self.last_shapes

    def forward(self, inputs):
        try:
            op = self._op()
            start = time.perf_counter()
            arrays = op.merge(list(inputs), op.constants)
            profiles = self.state.profiles
            if profiles is None:
                outs = op.forward(arrays)
            else:
                outs, steps = op.profile(arrays)
                profiles[self.key] = LayerProfile(self.key, type(op).__name__.removesuffix("Op"),
                                                  sum(np.asarray(a).nbytes for a in inputs),
                                                  sum(o.nbytes for o in outs), steps)
            elapsed = time.perf_counter() - start
            with self.state.lock:
                self.state.forwards[self.key] = self.state.forwards.get(self.key, 0) + 1
                if self.state.timings is not None:
                    self.state.timings.setdefault(self.key, []).append(elapsed)
            return [compat.as_cv_output(o) for o in outs]
        except BaseException as exc:  # noqa: BLE001
            self._report(exc, [np.shape(a) for a in inputs])
            if self.standalone:  # a wrongly sized output: OpenCV raises a cv2.error from its forward
                return [np.zeros(int(np.prod(s)) + 1, np.float32) for s in self.last_shapes]
            return [compat.as_cv_output(np.zeros(s, np.float32)) for s in self.last_shapes]


class ConvLayer(Layer):
    op_class = ConvOp
    slot_priority = ((1, 2, 0), (0, 1, 2))


class ConvTransposeLayer(Layer):
    op_class = ConvTransposeOp
    slot_priority = ((1, 2, 0), (0, 1, 2))


# layer type (domain.op) -> class; register() registers each exactly once per process
LAYER_TYPES: dict[str, type[Layer]] = {"vkconv.Conv": ConvLayer,
                                       "vkconv.ConvTranspose": ConvTransposeLayer}
