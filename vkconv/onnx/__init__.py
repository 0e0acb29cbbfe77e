"""vkconv's one ONNX front end, shared by layer mode (``cv_plugin.rewrite``) and subgraph mode
(:class:`vkconv.graph.Graph`): the node model and attribute decoding (:mod:`.model`), the support
matrix and activation mapping (:mod:`.support`), BatchNorm / affine folding (:mod:`.fold`) and
the fusion passes (:mod:`.fusion`)."""
from vkconv.onnx.fold import batchnorm_affine, fold_affine, fold_batchnorm
from vkconv.onnx.fusion import fuse
from vkconv.onnx.model import ModelView, Node, attributes, tensor_info, toposort
from vkconv.onnx.support import OP_TYPES, activation_spec, unsupported_reason

__all__ = ["OP_TYPES", "ModelView", "Node", "activation_spec", "attributes", "batchnorm_affine", "fold_affine",
           "fold_batchnorm", "fuse", "tensor_info", "toposort", "unsupported_reason"]
