"""Independent references: one-node ONNX models run by onnx.reference and onnxruntime."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper


def single_node_model(op: str, inputs: dict[str, np.ndarray | None], attrs: dict, opset: int = 22):
    """A model with one ``op`` node whose inputs are graph inputs named as in ``inputs``
    (a ``None`` value leaves that optional input empty) and one output ``y``."""
    names = [n if v is not None else "" for n, v in inputs.items()]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(op, names, ["y"], **attrs)
    graph = helper.make_graph(
        [node], op.lower(),
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape))
         for n, v in inputs.items() if v is not None],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def onnx_reference(op: str, inputs: dict[str, np.ndarray | None], attrs: dict, opset: int = 22) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    model = single_node_model(op, inputs, attrs, opset)
    feeds = {n: v for n, v in inputs.items() if v is not None}
    return ReferenceEvaluator(model).run(None, feeds)[0]


def onnxruntime_reference(op: str, inputs: dict[str, np.ndarray | None], attrs: dict,
                          opset: int = 22) -> np.ndarray:
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # refusals are expected results here, not log noise
    model = single_node_model(op, inputs, attrs, opset)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {n: v for n, v in inputs.items() if v is not None}
    return sess.run(None, feeds)[0]


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4, what: str = "") -> None:
    """Max abs difference <= ``rel`` x max|expected|: the suite's stated tolerance."""
    assert actual.shape == expected.shape, f"{what} shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-6)
    err = float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0))
    assert err <= rel * scale, f"{what} max abs diff {err:.3g} > {rel:g} x {scale:.3g}"
