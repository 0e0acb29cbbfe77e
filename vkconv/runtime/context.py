"""Vulkan instance, device choice, queue, and the bookkeeping every other module relies on.

One :class:`Context` owns a ``VkInstance``, one logical device with one compute queue, a command
pool, a ``VkPipelineCache`` and the pipelines built from embedded SPIR-V.  Objects made on it
(buffers, descriptor sets, command buffers) register their handles in :attr:`Context.live` so that
tests can prove nothing leaks, and are destroyed by ``close()`` or by a finalizer.

Environment:

``VKCONV_DEVICE``
    index (in :func:`list_devices` order) or case-insensitive substring of the device name.
``VKCONV_VALIDATION=1``
    enable ``VK_LAYER_KHRONOS_validation`` (core and synchronization validation) with a debug
    messenger; every warning or error it reports is kept in :func:`validation_messages` (tests fail
    on any).
``VKCONV_TIMEOUT``
    seconds to wait for a submission before raising instead of hanging (default 120).
``VKCONV_LIMITS=mobile``
    cap the reported limits at a small mobile GPU's (128 invocations per workgroup, 16 KiB of
    shared memory, 128 MiB storage buffer range, no 16-bit storage), so that the suite can check
    every kernel still runs there.
``VKCONV_MEMORY=discrete``
    treat the device as a discrete GPU's (``unified_memory`` false): buffers in device-local memory
    that the host does not map, host-visible staging twins, and the copies and barriers between
    them recorded into the command buffers, so that the path every discrete GPU takes runs (and is
    checked by synchronization validation) on any device, lavapipe included.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from vkconv.runtime.errors import NoDeviceError, VkconvError

try:
    import vulkan as vk
except (ImportError, OSError) as exc:  # cffi raises OSError when libvulkan.so.1 is missing
    vk = None
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

log = logging.getLogger(__name__)
VALIDATION_LAYER = "VK_LAYER_KHRONOS_validation"
_TYPE_NAMES = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}
# Lower rank is preferred: a real GPU first, lavapipe (CPU) last.
_TYPE_RANK = {2: 0, 1: 1, 3: 2, 4: 3, 0: 4}


def require_vulkan():
    """The ``vulkan`` module, or :class:`NoDeviceError` saying what to install."""
    if vk is None:
        raise NoDeviceError(
            f"no Vulkan loader: {_IMPORT_ERROR}. Install the loader and a driver, e.g. "
            "`apt-get install libvulkan1 mesa-vulkan-drivers` (lavapipe runs on the CPU)")
    return vk


# ---------------------------------------------------------------------------------------------
# Validation messages.  The `vulkan` binding routes every messenger through one module-level
# callback, so the messages live in one process-wide list.
_messages: list[str] = []
_messages_lock = threading.Lock()


def _on_validation_message(severity, types, data, user_data):
    text = vk.ffi.string(data.pMessage).decode(errors="replace")
    with _messages_lock:
        _messages.append(text)
    return 0  # VK_FALSE: never abort the call that triggered the message


def validation_messages(clear: bool = False) -> list[str]:
    """Warnings and errors the validation layer reported so far (optionally clearing them)."""
    with _messages_lock:
        out = list(_messages)
        if clear:
            _messages.clear()
    return out


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    """What `vkconv info` prints and what kernels size themselves from."""

    index: int
    name: str
    type: str
    api_version: str
    driver_version: int
    vendor_id: int
    max_workgroup_invocations: int
    max_workgroup_size: tuple[int, int, int]
    max_workgroup_count: tuple[int, int, int]
    max_shared_memory: int
    max_storage_buffer_range: int
    max_push_constants_size: int
    subgroup_size: int
    fp16_storage: bool
    fp16_arithmetic: bool
    unified_memory: bool
    has_compute_queue: bool
    rank: int = field(repr=False)
    max_texel_buffer_elements: int = 0  # 0 when RGBA32F / R32F uniform texel buffers are unsupported
    fp16_texel: bool = False  # RGBA16F uniform texel buffers (vkconv's fp16 weight storage)
    # subgroupShuffle in compute shaders (the modules built for SPIR-V 1.3 that use it, e.g. sparse_gemm_subgroup)
    subgroup_shuffle: bool = False
    # the driver's name and version, e.g. "llvmpipe, Mesa 25.0.7 (LLVM 15.0.6)": speed and shader
    # validity differ between drivers of the same device (shown by vkconv info)
    driver: str = ""


def _version_str(v: int) -> str:
    return f"{v >> 22}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


def _driver_version_str(vendor_id: int, version: int) -> str:
    """``VkPhysicalDeviceProperties.driverVersion`` decoded: its encoding is the vendor's own."""
    if vendor_id == 0x10DE:  # NVIDIA: 10.8.8.6 bits
        return f"{version >> 22}.{(version >> 14) & 0xFF}.{(version >> 6) & 0xFF}.{version & 0x3F}"
    if vendor_id == 0x8086 and sys.platform == "win32":  # Intel's Windows driver: 18.14 bits (Mesa's is below)
        return f"{version >> 14}.{version & 0x3FFF}"
    return _version_str(version)  # VK_MAKE_VERSION: Mesa, AMD, Arm, Qualcomm, ...


def _driver(pd, vendor_id: int, version: int) -> str:
    """Driver name and version from VkPhysicalDeviceDriverProperties where the device has
    VK_KHR_driver_properties (core in 1.2, but the instance asks for 1.1), else the decoded
    driverVersion (lavapipe's is a constant 1, so the name matters)."""
    v = vk
    decoded = f"version {_driver_version_str(vendor_id, version)}"
    if "VK_KHR_driver_properties" not in {e.extensionName for e in v.vkEnumerateDeviceExtensionProperties(pd, None)}:
        return decoded
    drv = v.VkPhysicalDeviceDriverProperties()
    props2 = v.VkPhysicalDeviceProperties2(pNext=drv)  # drv stays referenced until the call returns
    v.vkGetPhysicalDeviceProperties2(pd, props2)
    name = v.ffi.string(drv.driverName).decode(errors="replace").strip()
    info = v.ffi.string(drv.driverInfo).decode(errors="replace").strip()
    return ", ".join(s for s in (name, info or decoded) if s)


def _create_instance(validation: bool):
    v = require_vulkan()
    app = v.VkApplicationInfo(pApplicationName="vkconv", applicationVersion=1, pEngineName="vkconv",
                              engineVersion=1, apiVersion=v.VK_MAKE_VERSION(1, 1, 0))
    layers, extensions = [], []
    if validation:
        available = {p.layerName for p in v.vkEnumerateInstanceLayerProperties()}
        if VALIDATION_LAYER not in available:
            raise VkconvError(f"VKCONV_VALIDATION=1 but {VALIDATION_LAYER} is not installed "
                              "(Debian: apt-get install vulkan-validationlayers)")
        layers.append(VALIDATION_LAYER)
        extensions += [v.VK_EXT_DEBUG_UTILS_EXTENSION_NAME, v.VK_EXT_VALIDATION_FEATURES_EXTENSION_NAME]
    # Synchronization validation catches missing barriers, which core validation does not.
    features = v.VkValidationFeaturesEXT(
        enabledValidationFeatureCount=1,
        pEnabledValidationFeatures=[v.VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT]) \
        if validation else None
    info = v.VkInstanceCreateInfo(pNext=features, pApplicationInfo=app, enabledLayerCount=len(layers),
                                  ppEnabledLayerNames=layers or None,
                                  enabledExtensionCount=len(extensions),
                                  ppEnabledExtensionNames=extensions or None)
    try:
        return v.vkCreateInstance(info, None)
    except (v.VkError, v.VkException) as exc:
        raise NoDeviceError(f"vkCreateInstance failed ({type(exc).__name__}): no Vulkan driver? "
                            "Install one, e.g. `apt-get install mesa-vulkan-drivers`") from exc


def _describe(index: int, pd) -> DeviceInfo:
    v = vk
    props = v.vkGetPhysicalDeviceProperties(pd)
    lim = props.limits
    f16 = v.VkPhysicalDevice16BitStorageFeatures()
    f16a = v.VkPhysicalDeviceShaderFloat16Int8Features(pNext=f16)
    feats = v.VkPhysicalDeviceFeatures2(pNext=f16a)
    v.vkGetPhysicalDeviceFeatures2(pd, feats)
    sub = v.VkPhysicalDeviceSubgroupProperties()
    props2 = v.VkPhysicalDeviceProperties2(pNext=sub)
    v.vkGetPhysicalDeviceProperties2(pd, props2)
    mem = v.vkGetPhysicalDeviceMemoryProperties(pd)
    need = (v.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT | v.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT
            | v.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT)
    unified = all(
        (mem.memoryTypes[i].propertyFlags & need) == need
        for i in range(mem.memoryTypeCount)
        if mem.memoryTypes[i].propertyFlags & v.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT)
    queues = v.vkGetPhysicalDeviceQueueFamilyProperties(pd)
    return DeviceInfo(
        index=index, name=props.deviceName, type=_TYPE_NAMES.get(props.deviceType, "other"),
        api_version=_version_str(props.apiVersion), driver_version=props.driverVersion,
        vendor_id=props.vendorID,
        max_workgroup_invocations=lim.maxComputeWorkGroupInvocations,
        max_workgroup_size=tuple(lim.maxComputeWorkGroupSize),
        max_workgroup_count=tuple(lim.maxComputeWorkGroupCount),
        max_shared_memory=lim.maxComputeSharedMemorySize,
        max_storage_buffer_range=lim.maxStorageBufferRange,
        max_push_constants_size=lim.maxPushConstantsSize,
        max_texel_buffer_elements=lim.maxTexelBufferElements if all(
            v.vkGetPhysicalDeviceFormatProperties(pd, fmt).bufferFeatures
            & v.VK_FORMAT_FEATURE_UNIFORM_TEXEL_BUFFER_BIT
            for fmt in (v.VK_FORMAT_R32G32B32A32_SFLOAT, v.VK_FORMAT_R32_SFLOAT)) else 0,
        fp16_texel=bool(v.vkGetPhysicalDeviceFormatProperties(pd, v.VK_FORMAT_R16G16B16A16_SFLOAT).bufferFeatures
                        & v.VK_FORMAT_FEATURE_UNIFORM_TEXEL_BUFFER_BIT),
        subgroup_size=sub.subgroupSize,
        subgroup_shuffle=bool(sub.supportedStages & v.VK_SHADER_STAGE_COMPUTE_BIT
                              and sub.supportedOperations & v.VK_SUBGROUP_FEATURE_SHUFFLE_BIT),
        fp16_storage=bool(f16.storageBuffer16BitAccess),
        fp16_arithmetic=bool(f16a.shaderFloat16),
        unified_memory=unified,
        has_compute_queue=any(q.queueFlags & v.VK_QUEUE_COMPUTE_BIT for q in queues),
        rank=_TYPE_RANK.get(props.deviceType, 4),
        driver=_driver(pd, props.vendorID, props.driverVersion),
    )


# VKCONV_LIMITS=mobile: the limits kernels size themselves from, as on a small mobile GPU.
_MOBILE_LIMITS = {"max_workgroup_invocations": 128, "max_workgroup_size": (128, 128, 64),
                  "max_shared_memory": 16384, "max_storage_buffer_range": 128 << 20,
                  "fp16_storage": False, "fp16_arithmetic": False, "fp16_texel": False}


def simulated_limits(info: DeviceInfo, profile: str | None) -> DeviceInfo:
    """``info`` with its limits capped by the ``VKCONV_LIMITS`` profile (``""``: unchanged)."""
    if not profile:
        return info
    if profile != "mobile":
        raise VkconvError(f"VKCONV_LIMITS={profile!r}: expected 'mobile' or nothing")
    capped: dict[str, Any] = {}  # DeviceInfo fields of several types
    for name, cap in _MOBILE_LIMITS.items():
        have = getattr(info, name)
        capped[name] = tuple(map(min, have, cap)) if isinstance(cap, tuple) else min(have, cap)
    return dataclasses.replace(info, **capped)


def simulated_memory(info: DeviceInfo, profile: str | None) -> DeviceInfo:
    """``info`` as the ``VKCONV_MEMORY`` profile describes it (``""``: unchanged)."""
    if not profile:
        return info
    if profile != "discrete":
        raise VkconvError(f"VKCONV_MEMORY={profile!r}: expected 'discrete' or nothing")
    return dataclasses.replace(info, unified_memory=False)


def list_devices() -> list[DeviceInfo]:
    """Every Vulkan physical device, in the loader's order (the index ``VKCONV_DEVICE`` takes)."""
    v = require_vulkan()
    instance = _create_instance(validation=False)
    try:
        return [_describe(i, pd) for i, pd in enumerate(v.vkEnumeratePhysicalDevices(instance))]
    finally:
        v.vkDestroyInstance(instance, None)


def choose_device(devices: list[DeviceInfo], selector: str | None = None) -> DeviceInfo:
    """Discrete > integrated > virtual > CPU, or what ``selector`` (index or name part) names."""
    usable = [d for d in devices if d.has_compute_queue]
    if not usable:
        raise NoDeviceError("no Vulkan device with a compute queue; install a driver, e.g. "
                            "`apt-get install mesa-vulkan-drivers` for lavapipe")
    if selector:
        if selector.strip().isdigit():
            idx = int(selector)
            match = [d for d in usable if d.index == idx]
        else:
            match = [d for d in usable if selector.lower() in d.name.lower()]
        if not match:
            names = ", ".join(f"{d.index}: {d.name}" for d in usable)
            raise NoDeviceError(f"VKCONV_DEVICE={selector!r} matches no device (have {names})")
        return match[0]
    return min(usable, key=lambda d: (d.rank, d.index))


# ---------------------------------------------------------------------------------------------
class Context:
    """A logical device with one compute queue; thread-safe for submission."""

    def __init__(self, device: str | None = None, validation: bool | None = None):
        v = require_vulkan()
        if validation is None:
            validation = os.environ.get("VKCONV_VALIDATION", "") not in ("", "0")
        self.validation = validation
        self.timeout_ns = int(float(os.environ.get("VKCONV_TIMEOUT", "120")) * 1e9)
        self.lock = threading.RLock()
        self.live: collections.Counter[str] = collections.Counter()
        self.stats: collections.Counter[str] = collections.Counter()
        self._children: weakref.WeakSet = weakref.WeakSet()
        # (shader, binding kinds, push size, spec) -> Pipeline; filled by runtime.pipeline.get_pipeline
        self.pipelines: dict = {}
        # (buffer, free its staging twin afterwards): staged buffers written by
        # runtime.transfer.upload whose copies ride in front of the next submit's commands
        self.pending_uploads: list = []
        # _closing refuses new work from the start of close(); _closed (device destroyed) is set
        # only after the children are closed, because their finalizers skip destruction once it is.
        self._closing = False
        self.lost = False  # set when the driver reports VK_ERROR_DEVICE_LOST
        self._closed = False
        self.instance = _create_instance(validation)
        self._messenger = None
        try:
            if validation:
                self._create_messenger()
            physical = v.vkEnumeratePhysicalDevices(self.instance)
            infos = [_describe(i, pd) for i, pd in enumerate(physical)]
            self.info = choose_device(infos, device if device is not None
                                      else os.environ.get("VKCONV_DEVICE"))
            self.physical_device = physical[self.info.index]
            self.info = simulated_limits(self.info, os.environ.get("VKCONV_LIMITS"))
            self.info = simulated_memory(self.info, os.environ.get("VKCONV_MEMORY"))
            log.debug("device [%d] %s (%s, Vulkan %s) chosen of %d; validation %s", self.info.index,
                      self.info.name, self.info.type, self.info.api_version, len(infos),
                      "on" if validation else "off")
            self._create_device()
        except BaseException:
            self._destroy_instance()
            raise

    # -- creation ------------------------------------------------------------------------------
    def _create_messenger(self):
        v = vk
        sev = (v.VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT
               | v.VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT)
        kinds = (v.VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT
                 | v.VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT
                 | v.VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT)
        info = v.VkDebugUtilsMessengerCreateInfoEXT(messageSeverity=sev, messageType=kinds,
                                                    pfnUserCallback=_on_validation_message)
        create = v.vkGetInstanceProcAddr(self.instance, "vkCreateDebugUtilsMessengerEXT")
        self._destroy_messenger = v.vkGetInstanceProcAddr(self.instance,
                                                          "vkDestroyDebugUtilsMessengerEXT")
        self._messenger = create(self.instance, info, None)

    def _create_device(self):
        v = vk
        families = v.vkGetPhysicalDeviceQueueFamilyProperties(self.physical_device)
        compute = [i for i, q in enumerate(families) if q.queueFlags & v.VK_QUEUE_COMPUTE_BIT]
        # A compute-only family is the dedicated async-compute queue on discrete GPUs.
        compute.sort(key=lambda i: bool(families[i].queueFlags & v.VK_QUEUE_GRAPHICS_BIT))
        self.queue_family = compute[0]
        priorities = v.ffi.new("float[]", [1.0])
        queue_info = v.VkDeviceQueueCreateInfo(queueFamilyIndex=self.queue_family, queueCount=1,
                                               pQueuePriorities=priorities)
        device_info = v.VkDeviceCreateInfo(queueCreateInfoCount=1, pQueueCreateInfos=[queue_info])
        self.device = v.vkCreateDevice(self.physical_device, device_info, None)
        self.queue = v.vkGetDeviceQueue(self.device, self.queue_family, 0)
        pool_info = v.VkCommandPoolCreateInfo(
            flags=v.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
            queueFamilyIndex=self.queue_family)
        self.command_pool = v.vkCreateCommandPool(self.device, pool_info, None)
        self.pipeline_cache = v.vkCreatePipelineCache(self.device, v.VkPipelineCacheCreateInfo(), None)
        self.memory_properties = v.vkGetPhysicalDeviceMemoryProperties(self.physical_device)

    # -- bookkeeping ---------------------------------------------------------------------------
    def track(self, kind: str, delta: int) -> None:
        with self.lock:
            self.live[kind] += delta

    def adopt(self, obj) -> None:
        """Register an object with a ``close()`` so that closing the context closes it first."""
        self._children.add(obj)

    def mark_lost(self) -> None:
        """Refuse further work on this device, after waiting for what it still runs (a lost device
        answers at once) so that its objects can be destroyed."""
        self.lost = True
        try:
            vk.vkDeviceWaitIdle(self.device)
        except (vk.VkError, vk.VkException):
            pass

    def check(self) -> None:
        if self.lost:
            raise VkconvError("the Vulkan device was lost; objects made on it cannot be used again "
                              "(vkconv.get_context() opens the device anew)")
        if self._closing:
            raise VkconvError("the vkconv context was closed")

    def local_size(self, want: int = 64) -> int:
        """A 1-D workgroup size of at most ``want`` that this device accepts."""
        return max(1, min(want, self.info.max_workgroup_invocations, self.info.max_workgroup_size[0]))

    def memory_type(self, type_bits: int, want: int, avoid: int = 0) -> int:
        props = self.memory_properties
        for i in range(props.memoryTypeCount):
            flags = props.memoryTypes[i].propertyFlags
            if type_bits & (1 << i) and (flags & want) == want and not flags & avoid:
                return i
        if avoid:
            return self.memory_type(type_bits, want)
        raise VkconvError(f"no Vulkan memory type with flags {want:#x} on {self.info.name}")

    # -- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        """Destroy every object made on this context, then the device and the instance."""
        with self.lock:
            if self._closing:
                return
            self._closing = True
            try:
                vk.vkDeviceWaitIdle(self.device)
            except vk.VkErrorDeviceLost:
                self.lost = True  # destroying objects of a lost device is still valid

            for child in list(self._children):
                child.close()
            for pipe in self.pipelines.values():
                pipe.close()
            self.pipelines.clear()
            self._closed = True
            vk.vkDestroyPipelineCache(self.device, self.pipeline_cache, None)
            vk.vkDestroyCommandPool(self.device, self.command_pool, None)
            vk.vkDestroyDevice(self.device, None)
            self._destroy_instance()

    def _destroy_instance(self):
        if self._messenger is not None:
            self._destroy_messenger(self.instance, self._messenger, None)
            self._messenger = None
        vk.vkDestroyInstance(self.instance, None)

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default: Context | None = None
_default_lock = threading.Lock()


def get_context() -> Context:
    """The process-wide context, created on first use."""
    global _default
    with _default_lock:
        if _default is not None and _default.lost:
            _default.close()
        if _default is None or _default._closing:
            _default = Context()
        return _default


def close_context() -> None:
    """Destroy the process-wide context (the next op creates a new one)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
            _default = None
