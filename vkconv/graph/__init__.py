"""The device-resident executor: a list of ONNX nodes (decoded and fused by :mod:`vkconv.onnx`) run
from one command buffer, with buffers assigned by liveness."""
from vkconv.graph.executor import Graph, StepTime

__all__ = ["Graph", "StepTime"]
