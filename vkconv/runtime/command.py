"""Command buffers: record transfers and dispatches once, submit many times, wait on a fence."""
from __future__ import annotations

import contextlib
import functools
import logging
import weakref

from vkconv.runtime.context import Context, vk
from vkconv.runtime.errors import VkconvError
from vkconv.runtime.pipeline import DescriptorSet, Pipeline

log = logging.getLogger(__name__)


def _destroy(ctx: Context, handles: list) -> None:
    if ctx._closed or not handles:
        return
    cb, fence = handles
    handles.clear()
    with ctx.lock:  # the pool is externally synchronized
        vk.vkFreeCommandBuffers(ctx.device, ctx.command_pool, 1, [cb])
    vk.vkDestroyFence(ctx.device, fence, None)
    ctx.track("command_buffer", -1)
    ctx.track("fence", -1)


@functools.cache
def _memory_barrier(host: bool):
    """The ``VkMemoryBarrier*`` of :meth:`CommandBuffer.barrier` (``host``: of ``host_barrier``),
    made once and passed as is: the ``vulkan`` module's keyword constructors cost about 9 us a
    struct, paid on every barrier of every recording otherwise."""
    v = vk
    if host:
        src, dst = v.VK_ACCESS_SHADER_WRITE_BIT | v.VK_ACCESS_TRANSFER_WRITE_BIT, v.VK_ACCESS_HOST_READ_BIT
    else:
        src = dst = (v.VK_ACCESS_SHADER_WRITE_BIT | v.VK_ACCESS_SHADER_READ_BIT
                     | v.VK_ACCESS_TRANSFER_WRITE_BIT | v.VK_ACCESS_TRANSFER_READ_BIT)
    return v.ffi.new("VkMemoryBarrier*", {"sType": v.VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                                          "srcAccessMask": src, "dstAccessMask": dst})


class CommandBuffer:
    """A primary command buffer and its fence.  ``submit()`` blocks until the device is done."""

    def __init__(self, ctx: Context):
        ctx.check()
        v = vk
        self.ctx = ctx
        alloc = v.VkCommandBufferAllocateInfo(commandPool=ctx.command_pool,
                                              level=v.VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                              commandBufferCount=1)
        with ctx.lock:  # command pools are externally synchronized
            self.handle = v.vkAllocateCommandBuffers(ctx.device, alloc)[0]
        self.fence = v.vkCreateFence(ctx.device, v.VkFenceCreateInfo(), None)
        ctx.track("command_buffer", 1)
        ctx.track("fence", 1)
        self._h = [self.handle, self.fence]
        self._finalizer = weakref.finalize(self, _destroy, ctx, self._h)
        self.dispatches = 0
        ctx.adopt(self)

    def begin(self) -> None:
        self.dispatches = 0
        vk.vkBeginCommandBuffer(self.handle, vk.VkCommandBufferBeginInfo())

    def end(self) -> None:
        vk.vkEndCommandBuffer(self.handle)

    @contextlib.contextmanager
    def recording(self):
        """``begin()`` ... ``end()`` holding the context lock: every command buffer comes from one
        pool, and Vulkan requires a pool's buffers to be recorded from one thread at a time."""
        with self.ctx.lock:
            self.begin()
            yield self
            self.end()

    def dispatch(self, pipeline: Pipeline, dset: DescriptorSet, push: bytes,
                 groups: tuple[int, int, int]) -> None:
        v = vk
        limit = self.ctx.info.max_workgroup_count
        if any(g > m for g, m in zip(groups, limit)):
            raise VkconvError(f"{pipeline.name}: {groups} workgroups exceed the device's "
                              f"maxComputeWorkGroupCount {limit}")
        if any(g == 0 for g in groups):
            return
        v.vkCmdBindPipeline(self.handle, v.VK_PIPELINE_BIND_POINT_COMPUTE, pipeline.handle)
        v.vkCmdBindDescriptorSets(self.handle, v.VK_PIPELINE_BIND_POINT_COMPUTE, pipeline.layout,
                                  0, 1, dset.handles, 0, None)
        if pipeline.push_size:
            if len(push) != pipeline.push_size:
                raise VkconvError(f"{pipeline.name}: {len(push)} push-constant bytes, "
                                  f"expected {pipeline.push_size}")
            data = v.ffi.new("char[]", push)
            v.vkCmdPushConstants(self.handle, pipeline.layout, v.VK_SHADER_STAGE_COMPUTE_BIT, 0,
                                 len(push), data)
        log.debug("dispatch %s: %s workgroups of %s", pipeline.name, groups, pipeline.local_size)
        v.vkCmdDispatch(self.handle, *groups)
        self.dispatches += 1

    def barrier(self) -> None:
        """Make every earlier shader or transfer write visible to later shaders and transfers."""
        stages = vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | vk.VK_PIPELINE_STAGE_TRANSFER_BIT
        vk.vkCmdPipelineBarrier(self.handle, stages, stages, 0, 1, _memory_barrier(False), 0, None, 0, None)

    def host_barrier(self) -> None:
        """Make device writes visible to the host after the fence (needed before mapped reads)."""
        stages = vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | vk.VK_PIPELINE_STAGE_TRANSFER_BIT
        vk.vkCmdPipelineBarrier(self.handle, stages, vk.VK_PIPELINE_STAGE_HOST_BIT, 0, 1, _memory_barrier(True),
                                0, None, 0, None)

    def copy(self, src, dst, size: int) -> None:
        region = vk.VkBufferCopy(srcOffset=0, dstOffset=0, size=size)
        vk.vkCmdCopyBuffer(self.handle, src, dst, 1, [region])

    def submit(self) -> None:
        """Submit and wait; raises instead of hanging when the device does not finish in time.

        Uploads waiting in ``ctx.pending_uploads`` (vkconv.runtime.transfer) go first, in a
        command buffer of their own within the same ``vkQueueSubmit``."""
        v, ctx = vk, self.ctx
        uploads, pending = None, []
        try:
            with ctx.lock:
                ctx.check()
                if ctx.pending_uploads:
                    pending, ctx.pending_uploads = ctx.pending_uploads, []
                    uploads = _record_uploads(ctx, pending)
                handles = [self.handle] if uploads is None else [uploads.handle, self.handle]
                info = v.VkSubmitInfo(commandBufferCount=len(handles), pCommandBuffers=handles)
                try:
                    v.vkQueueSubmit(ctx.queue, 1, [info], self.fence)
                except v.VkError:
                    ctx.pending_uploads[:0] = pending  # not submitted: they wait for the next one
                    pending = []
                    raise
                ctx.stats["submits"] += 1
                ctx.stats["dispatches"] += self.dispatches
            v.vkWaitForFences(ctx.device, 1, [self.fence], v.VK_TRUE, ctx.timeout_ns)
        except v.VkTimeout as exc:
            # A device that misses the deadline is treated as lost (drivers reset a hung GPU and then
            # report VK_ERROR_DEVICE_LOST); the next vkconv.get_context() opens it anew.
            ctx.mark_lost()
            raise VkconvError(f"the device did not finish within VKCONV_TIMEOUT="
                              f"{ctx.timeout_ns / 1e9:g} s; it is treated as lost") from exc
        except (v.VkErrorDeviceLost, v.VkErrorOutOfDeviceMemory, v.VkErrorOutOfHostMemory) as exc:
            lost = isinstance(exc, v.VkErrorDeviceLost)
            if lost:
                ctx.mark_lost()
            raise VkconvError(f"Vulkan {'device lost' if lost else 'ran out of memory'} while running a "
                              f"submission ({type(exc).__name__})") from exc
        finally:
            if uploads is not None:
                uploads.close()
        v.vkResetFences(ctx.device, 1, [self.fence])
        for buf, drop in pending:
            if drop:
                buf.drop_staging()

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> CommandBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _record_uploads(ctx: Context, pending: list) -> CommandBuffer:
    """A command buffer with the staging copies of ``pending`` ((buffer, drop) pairs) and a barrier
    that makes them visible to the shaders and transfers submitted after it."""
    cmd = CommandBuffer(ctx)
    with cmd.recording():
        for buf in {id(b): b for b, _ in pending}.values():
            buf.record_upload(cmd)
        cmd.barrier()
    return cmd
