"""Fixing a model's symbolic input dimensions before OpenCV imports it.

Exported models often declare symbolic input dims (``[1, 3, 48, "W"]`` for a text recognizer).
OpenCV 4.10-4.14 import them, but a shape computation that depends on such a dim (``Shape`` ->
``Gather`` -> ``Concat`` -> ``Reshape``) is frozen at import with the wrong size, and the forward
fails (``srcTotal == dstTotal in function 'computeShapeByReshapeMask'``).  The same model with its
inputs fixed to the real shape, and ONNX shape inference run over it, imports and runs right.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from vkconv.onnx.model import value_dims


def runtime_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs fed at run time (not initializers), in graph order."""
    constant = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in constant]


# ops whose result OpenCV computes once at import from the input shapes it was given
SHAPE_READERS = {"Shape", "Size"}


def reads_shapes(model: onnx.ModelProto) -> bool:
    """Whether the graph computes with tensor shapes (a ``Shape`` or ``Size`` node): only then does
    OpenCV's import freeze a value that depends on the input dims."""
    return any(n.op_type in SHAPE_READERS and n.domain in ("", "ai.onnx") for n in model.graph.node)


def symbolic_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the runtime inputs with a dimension that is not a fixed positive size."""
    return [vi.name for vi in runtime_inputs(model) if None in (value_dims(vi) or [])]


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"NAME=1,3,48,320"`` -> ``("NAME", (1, 3, 48, 320))`` (the command line's --input-shape)."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise ValueError(f"--input-shape {text!r}: expected NAME=D1,D2,... with positive sizes, "
                         "e.g. x=1,3,48,320")
    return name, shape


def fix_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose runtime inputs named in ``shapes`` have those fixed dims, with the
    shapes of the tensors inside inferred again (stale symbolic ``value_info`` dropped).

    Raises ValueError naming the input when it is not a runtime input of the model, or when the
    shape contradicts a fixed dim or the rank the model declares.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inputs = {vi.name: vi for vi in runtime_inputs(model)}
    for name, shape in shapes.items():
        if name not in inputs:
            raise ValueError(f"input_shapes: {name!r} is not an input of the model (inputs: "
                             f"{', '.join(map(repr, inputs)) or 'none'})")
        dims_wanted = [int(d) for d in shape]
        if any(d < 1 for d in dims_wanted):
            raise ValueError(f"input_shapes: {name!r} {tuple(dims_wanted)}: sizes must be positive")
        tensor = inputs[name].type.tensor_type
        if tensor.HasField("shape"):
            dims = tensor.shape.dim
            if len(dims) != len(dims_wanted):
                raise ValueError(f"input_shapes: {name!r} has rank {len(dims)} in the model, got "
                                 f"{tuple(dims_wanted)}")
            for i, (d, want) in enumerate(zip(dims, dims_wanted)):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != want:
                    raise ValueError(f"input_shapes: {name!r} dim {i} is fixed to {d.dim_value} in the "
                                     f"model, got {want}")
        tensor.ClearField("shape")
        for d in dims_wanted:
            tensor.shape.dim.add().dim_value = d
    del model.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - a model inference rejects still imports with fixed inputs
        return model
