"""Storage buffers: device-local memory, with a host-visible staging twin where the device needs one.

On unified-memory devices (lavapipe, most mobile and integrated GPUs) every device-local memory type
is also host-visible, so a buffer is one persistently mapped allocation and uploads are memcpys.  On a
discrete GPU the buffer lives in VRAM and a ``staged`` buffer keeps a host-visible twin; the copies
between them are recorded into the same command buffer as the dispatches (one submit per call).
"""
from __future__ import annotations

import weakref

import numpy as np

from vkconv.runtime.context import Context, vk
from vkconv.runtime.errors import VkconvError

_ALIGN = 16


def _destroy(ctx: Context, handles: list) -> None:
    """Finalizer body: it must not reference the Buffer itself."""
    if ctx._closed:
        return
    for buf, mem, mapped in handles:
        if mapped:
            vk.vkUnmapMemory(ctx.device, mem)
        vk.vkDestroyBuffer(ctx.device, buf, None)
        vk.vkFreeMemory(ctx.device, mem, None)
        ctx.track("buffer", -1)
        ctx.track("memory", -1)
    handles.clear()


class Buffer:
    """``nbytes`` of storage-buffer memory (at least 16 bytes; Vulkan forbids empty buffers)."""

    def __init__(self, ctx: Context, nbytes: int, *, staged: bool = False, texel: bool = False,
                 name: str = "buffer"):
        ctx.check()
        self.ctx = ctx
        self.name = name
        self.nbytes = int(nbytes)
        self.size = max(_ALIGN, -(-self.nbytes // _ALIGN) * _ALIGN)
        limit = ctx.info.max_storage_buffer_range
        if self.size > limit:
            raise VkconvError(
                f"{name} needs {self.nbytes} bytes, more than this device's maxStorageBufferRange "
                f"({limit} bytes on {ctx.info.name})")
        self._handles: list = []
        self._finalizer = weakref.finalize(self, _destroy, ctx, self._handles)
        v = vk
        usage = (v.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | v.VK_BUFFER_USAGE_TRANSFER_SRC_BIT
                 | v.VK_BUFFER_USAGE_TRANSFER_DST_BIT)
        # texel: may also be bound as a uniform texel buffer (vkconv.runtime.pipeline says why)
        self.texel = texel
        if texel:
            usage |= v.VK_BUFFER_USAGE_UNIFORM_TEXEL_BUFFER_BIT
        host = v.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | v.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
        self.host_visible = ctx.info.unified_memory
        if self.host_visible:
            self.buffer, mem, self._map = self._allocate(usage, host | v.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT)
        else:
            self.buffer, mem, _ = self._allocate(usage, v.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT)
            self._map = None
        self.staging = None
        if staged and not self.host_visible:
            self.staging, _, self._map = self._allocate(
                v.VK_BUFFER_USAGE_TRANSFER_SRC_BIT | v.VK_BUFFER_USAGE_TRANSFER_DST_BIT, host,
                avoid=v.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT)
        ctx.adopt(self)

    def _allocate(self, usage: int, want: int, avoid: int = 0):
        v, ctx = vk, self.ctx
        info = v.VkBufferCreateInfo(size=self.size, usage=usage,
                                    sharingMode=v.VK_SHARING_MODE_EXCLUSIVE)
        buf = v.vkCreateBuffer(ctx.device, info, None)
        ctx.track("buffer", 1)
        req = v.vkGetBufferMemoryRequirements(ctx.device, buf)
        try:
            alloc = v.VkMemoryAllocateInfo(allocationSize=req.size,
                                           memoryTypeIndex=ctx.memory_type(req.memoryTypeBits, want, avoid))
            mem = v.vkAllocateMemory(ctx.device, alloc, None)
        except (v.VkError, VkconvError) as exc:
            v.vkDestroyBuffer(ctx.device, buf, None)
            ctx.track("buffer", -1)
            raise VkconvError(f"out of device memory allocating {self.size} bytes for {self.name} "
                              f"({type(exc).__name__})") from exc
        ctx.track("memory", 1)
        v.vkBindBufferMemory(ctx.device, buf, mem, 0)
        mapped = None
        if want & v.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT:
            raw = v.vkMapMemory(ctx.device, mem, 0, self.size, 0)
            mapped = np.frombuffer(raw, dtype=np.uint8, count=self.size)
        self._handles.append((buf, mem, mapped is not None))
        return buf, mem, mapped

    # -- host access ---------------------------------------------------------------------------
    def _host(self) -> np.ndarray:
        self.ctx.check()  # after Context.close() the mapping is gone: say so, not "no host memory"
        if self._map is None:
            raise VkconvError(f"{self.name} has no host-visible memory (create it with staged=True)")
        return self._map

    def write(self, array: np.ndarray, offset: int = 0) -> None:
        """Copy ``array``'s bytes into the host side (the buffer, or its staging twin)."""
        data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        if offset + data.size > self.size:
            raise VkconvError(f"{self.name}: writing {data.size} bytes at {offset} overflows {self.size}")
        self._host()[offset:offset + data.size] = data

    def read(self, dtype, shape, offset: int = 0) -> np.ndarray:
        """A fresh array copied out of the host side (never a view of mapped memory)."""
        count = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return self._host()[offset:offset + count].view(dtype).reshape(shape).copy()

    def fill_zero(self) -> None:
        self._host()[:] = 0

    # -- transfers recorded into a command buffer -----------------------------------------------
    def record_upload(self, cmd) -> None:
        if self.staging is not None:
            cmd.copy(self.staging, self.buffer, self.size)

    def record_download(self, cmd) -> None:
        if self.staging is not None:
            cmd.copy(self.buffer, self.staging, self.size)

    def drop_staging(self) -> None:
        """Free the host-visible twin of a device-local buffer once it is no longer needed."""
        if self.staging is None:
            return
        entry = next(h for h in self._handles if h[0] == self.staging)
        self._handles.remove(entry)
        _destroy(self.ctx, [entry])
        self.staging = None
        self._map = None

    def close(self) -> None:
        # Under the lock that submits take: an upload of this buffer still waiting for a submit
        # (runtime.transfer) then records nothing, as it has no staging twin any more.
        with self.ctx.lock:
            self._map = self.staging = None
            self._finalizer()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

