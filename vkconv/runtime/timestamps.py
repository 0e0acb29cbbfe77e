"""GPU timestamp queries: marks written into a recorded command buffer, read back as the device
time between consecutive marks (for profiles and benchmarks, never for timed tests)."""
from __future__ import annotations

from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, vk
from vkconv.runtime.errors import VkconvError


class Timestamps:
    """A query pool of ``capacity`` timestamps.  Record ``reset(cmd)`` once, then ``mark(cmd, label)``
    at each boundary; after the submit, :meth:`intervals` gives ``(label, ms)`` for every mark after
    the first: the device time since the previous mark."""

    def __init__(self, ctx: Context, capacity: int):
        families = vk.vkGetPhysicalDeviceQueueFamilyProperties(ctx.physical_device)
        if families[ctx.queue_family].timestampValidBits == 0:
            raise VkconvError(f"{ctx.info.name}: its queue does not support timestamp queries")
        self.ctx, self.capacity = ctx, max(2, int(capacity))
        self.period_ns = vk.vkGetPhysicalDeviceProperties(ctx.physical_device).limits.timestampPeriod
        self.pool = vk.vkCreateQueryPool(ctx.device, vk.VkQueryPoolCreateInfo(
            queryType=vk.VK_QUERY_TYPE_TIMESTAMP, queryCount=self.capacity), None)
        ctx.track("query_pool", 1)
        self.labels: list[str] = []

    def reset(self, cmd) -> None:
        self.labels = []
        vk.vkCmdResetQueryPool(cmd.handle, self.pool, 0, self.capacity)

    def mark(self, cmd, label: str = "") -> None:
        if len(self.labels) >= self.capacity:
            raise VkconvError(f"timestamps: more than {self.capacity} marks recorded")
        # BOTTOM_OF_PIPE: the mark is written once every earlier command has finished.
        vk.vkCmdWriteTimestamp(cmd.handle, vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, self.pool, len(self.labels))
        self.labels.append(label)

    def intervals(self) -> list[tuple[str, float]]:
        """``(label, ms since the previous mark)`` for the marks of the last submitted recording."""
        n = len(self.labels)
        if n < 2:
            return []
        data = vk.ffi.new("uint64_t[]", n)
        vk.vkGetQueryPoolResults(self.ctx.device, self.pool, 0, n, 8 * n, data, 8,
                                 vk.VK_QUERY_RESULT_64_BIT | vk.VK_QUERY_RESULT_WAIT_BIT)
        return [(self.labels[i], (data[i] - data[i - 1]) * self.period_ns * 1e-6) for i in range(1, n)]

    def close(self) -> None:
        if self.pool is not None:
            if not self.ctx._closed:
                vk.vkDestroyQueryPool(self.ctx.device, self.pool, None)
            self.ctx.track("query_pool", -1)
        self.pool = None


class Stopwatch:
    """Whatever ``record(cmd)`` puts in one command buffer (commands that are safe to replay: a
    plan's ``body`` is), recorded once between two timestamps; :meth:`time` submits it once and
    returns its device time in ms."""

    def __init__(self, ctx: Context, record):
        self.stamps = Timestamps(ctx, 2)
        self.cmd = CommandBuffer(ctx)
        try:
            with self.cmd.recording():
                self.stamps.reset(self.cmd)
                self.stamps.mark(self.cmd)
                record(self.cmd)
                self.stamps.mark(self.cmd)
        except BaseException:
            self.close()
            raise

    def time(self) -> float:
        self.cmd.submit()
        return self.stamps.intervals()[0][1]

    def close(self) -> None:
        self.cmd.close()
        self.stamps.close()


def device_times(ctx: Context, record, warmup: int = 1, repeat: int = 3) -> list[float]:
    """Device time, in ms, of each of ``repeat`` submits (after ``warmup`` more) of whatever
    ``record(cmd)`` puts in one command buffer (see :class:`Stopwatch`)."""
    watch = Stopwatch(ctx, record)
    try:
        times = [watch.time() for _ in range(warmup + max(1, repeat))]
        return times[warmup:]
    finally:
        watch.close()
