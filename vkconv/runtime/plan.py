"""Per-shape execution plans: buffers, descriptor sets and one recorded command buffer.

An op with resident weights builds one :class:`Plan` per input shape and replays it: after the
first call at a shape, a call is a memcpy in, one queue submit, and a memcpy out, with no Vulkan
object created.  :class:`PlanCache` keeps the few most recent shapes.
"""
from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context

log = logging.getLogger(__name__)


class Plan:
    """Staged input/output buffers plus whatever the recorded body needs (``keep``)."""

    def __init__(self, ctx: Context, inputs: Sequence[tuple[str, tuple[int, ...]]],
                 outputs: Sequence[tuple[str, tuple[int, ...]]]):
        self.ctx = ctx
        self.input_shapes = [tuple(s) for _, s in inputs]
        self.output_shapes = [tuple(s) for _, s in outputs]
        self.inputs = [Buffer(ctx, 4 * int(np.prod(s)), staged=True, name=n) for n, s in inputs]
        self.outputs = [Buffer(ctx, 4 * int(np.prod(s)), staged=True, name=n) for n, s in outputs]
        self.keep: list = []  # descriptor sets and scratch buffers the commands refer to
        self.cmd = CommandBuffer(ctx)
        # The recorded dispatches alone, so that they can be replayed inside another command
        # buffer (benchmarks time them with GPU timestamps; a device-resident graph chains them).
        self.body: Callable[[CommandBuffer], None] | None = None
        log.debug("plan created: inputs %s -> outputs %s", list(inputs), list(outputs))

    def record(self, body: Callable[[CommandBuffer], None]) -> None:
        self.body = body
        with self.cmd.recording() as cmd:
            for b in self.inputs:
                b.record_upload(cmd)
            cmd.barrier()
            body(cmd)
            cmd.barrier()
            for b in self.outputs:
                b.record_download(cmd)
            cmd.host_barrier()

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        for buf, arr in zip(self.inputs, arrays):
            buf.write(arr)
        self.cmd.submit()
        return [b.read(np.float32, s) for b, s in zip(self.outputs, self.output_shapes)]

    def close(self) -> None:
        for obj in [self.cmd, *self.keep, *self.inputs, *self.outputs]:
            obj.close()
        self.keep.clear()


@contextlib.contextmanager
def closed_on_error(obj):
    """Close ``obj`` (a plan or op being built) if building it raises, then let the error through,
    so that a shape past the device's limits leaves no half-built Vulkan objects behind."""
    try:
        yield obj
    except BaseException:
        obj.close()
        raise


class PlanCache:
    """The ``capacity`` most recently used plans, keyed by input shape."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._plans: collections.OrderedDict[Hashable, Plan] = collections.OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Plan]) -> Plan:
        plan = self._plans.pop(key, None)
        if plan is None:
            plan = build()
        self._plans[key] = plan
        while len(self._plans) > self.capacity:
            self._plans.popitem(last=False)[1].close()
        return plan

    def drop(self, key: Hashable) -> None:
        """Close and forget the plan for ``key`` (if any): the next ``get`` builds it anew."""
        plan = self._plans.pop(key, None)
        if plan is not None:
            plan.close()

    def clear(self) -> None:
        for plan in self._plans.values():
            plan.close()
        self._plans.clear()
