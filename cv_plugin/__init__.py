"""Run ``cv2.dnn`` models' convolutions on Vulkan through vkconv.

    import cv_plugin
    net = cv_plugin.read_net("model.onnx")   # Conv nodes now run on the Vulkan device
    net.setInput(blob)
    out = net.forward()

``read_net`` rewrites the ONNX graph in memory so that Conv nodes (with a following BatchNorm and
activation fused) become ``vkconv.Conv`` custom layers, then loads it with ``cv2.dnn``.
``register()`` + plain ``cv2.dnn.readNet`` runs ops OpenCV lacks (DeformConv...), and
``convert(model, path)`` saves the rewritten model for plain ``cv2.dnn.readNet`` in later processes.
"""
from __future__ import annotations

from cv_plugin.convert import convert
from cv_plugin.layers import NETS, STANDALONE
from cv_plugin.net import Net, read_net
from cv_plugin.profile import Profile, profile
from cv_plugin.registry import register, registered, unregister
from cv_plugin.rewrite import RewriteReport, rewrite


def release() -> None:
    """Free the Vulkan resources of every net loaded through :func:`read_net`, and of every vkconv
    layer loaded by plain ``cv2.dnn.readNet`` (such nets must be loaded again to run)."""
    for state in [*NETS.values(), STANDALONE]:
        state.close()


def take_errors() -> list[BaseException]:
    """The errors of vkconv layers in nets loaded by plain ``cv2.dnn.readNet`` (which cannot raise
    them: their forward fails with a ``cv2.error`` and the error is logged), oldest first; clears
    them.  Nets from :func:`read_net` raise theirs from ``forward`` instead."""
    return STANDALONE.take_errors()


__all__ = ["Net", "Profile", "RewriteReport", "convert", "profile", "read_net", "register", "registered",
           "release", "rewrite", "take_errors", "unregister"]
