"""The Vulkan runtime: one context per device, buffers, pipelines, command buffers and plans.

Knows nothing of convolution.  Imports flow one way through the package::

    runtime  <-  kernels  <-  ops  <-  onnx / graph  <-  cv_plugin
"""
