"""Run ``cv2.dnn`` models' convolutions on Vulkan through vkconv.

    import cv_plugin
    net = cv_plugin.read_net("model.onnx")   # Conv nodes now run on the Vulkan device
    net.setInput(blob)
    out = net.forward()

``read_net`` rewrites the ONNX graph in memory so that Conv nodes (with a following BatchNorm and
activation fused) become ``vkconv.Conv`` custom layers, then loads it with ``cv2.dnn``.
"""
from __future__ import annotations

from cv_plugin.layers import NETS
from cv_plugin.net import Net, read_net
from cv_plugin.profile import Profile, profile
from cv_plugin.registry import register, registered, unregister
from cv_plugin.rewrite import RewriteReport, rewrite


def release() -> None:
    """Free the Vulkan resources of every net loaded through :func:`read_net`."""
    for state in list(NETS.values()):
        state.close()


__all__ = ["Net", "Profile", "RewriteReport", "profile", "read_net", "register", "registered", "release",
           "rewrite", "unregister"]
