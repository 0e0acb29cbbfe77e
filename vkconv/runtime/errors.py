"""Exceptions raised by vkconv."""
from __future__ import annotations


class VkconvError(RuntimeError):
    """A Vulkan-side failure: no loader or device, a limit exceeded, a driver error, a timeout."""


class NoDeviceError(VkconvError):
    """No usable Vulkan loader or compute-capable device on this machine."""


class ValidationError(VkconvError):
    """The Khronos validation layer reported a message (only with ``VKCONV_VALIDATION=1``)."""
