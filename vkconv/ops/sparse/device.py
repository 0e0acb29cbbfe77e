"""Recording helper shared by the sparse modules: one command buffer, the scratch objects it uses,
and the buffer pool they come from.

Sparse work has data-dependent sizes (how many output sites, how many pairs), so it is recorded
afresh per call rather than replayed from a :class:`vkconv.runtime.plan.Plan`.  A :class:`Recording` keeps
every descriptor set and scratch buffer alive until its submission is done, reuses one descriptor
set per (binding kinds, buffers), and lays 1-D work over a 2-D grid of workgroups when it exceeds
``maxComputeWorkGroupCount[0]``.

Buffers come from a per-context pool (:func:`lease` / :func:`release`) instead of a fresh
allocation per call: a fresh allocation is fresh memory, and on lavapipe (and integrated GPUs) the
first touch of every page of it is a page fault -- measured at about 0.55 ms per MiB, more than the
convolution itself for 64-channel features.  Released buffers wait in the pool, by size class (at
most 1/8 larger than asked for), up to ``POOL_BYTES`` in all, the least recently released going
first.
"""
from __future__ import annotations

import collections
import threading

import numpy as np

from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, vk
from vkconv.runtime.dispatch import grid
from vkconv.runtime.pipeline import DescriptorSet, binding_kinds, get_pipeline, texel_fits

INT32_MAX = 2**31 - 1
POOL_BYTES = 256 << 20  # idle bytes a context's pool keeps at most


class _Pool:
    """Idle buffers of one context by (size class, staged, texel), least recently released first."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.idle: collections.OrderedDict[int, tuple[tuple, Buffer]] = collections.OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()


_pools: dict[int, _Pool] = {}
_pools_lock = threading.Lock()


def _pool(ctx: Context) -> _Pool:
    with _pools_lock:
        for key in [k for k, p in _pools.items() if p.ctx._closing]:
            del _pools[key]  # their buffers were closed with the context
        pool = _pools.get(id(ctx))
        if pool is None or pool.ctx is not ctx:
            pool = _pools[id(ctx)] = _Pool(ctx)
        return pool


def _size_class(ctx: Context, nbytes: int, texel: bool) -> int:
    """``nbytes`` rounded up to one of 8 sizes per power of two (at least 4 KiB), unless that
    passes a device limit the exact size respects."""
    step = max(4096, 1 << max(0, nbytes.bit_length() - 4))
    size = -(-max(nbytes, 1) // step) * step
    if size > ctx.info.max_storage_buffer_range or (texel and not texel_fits(ctx, size)):
        return max(16, -(-nbytes // 16) * 16)  # Buffer's own rounding
    return size


def lease(ctx: Context, nbytes: int, name: str, *, staged: bool = False, texel: bool = False) -> Buffer:
    """A buffer of at least ``nbytes`` (contents undefined), from the pool when it has one; give it
    back with :func:`release` (or close it)."""
    size = _size_class(ctx, int(nbytes), texel)
    key = (size, staged or ctx.info.unified_memory, texel)
    pool = _pool(ctx)
    with pool.lock:
        for ident, (k, buf) in pool.idle.items():
            if k == key:
                del pool.idle[ident]
                pool.bytes -= size
                buf.name = name
                return buf
    return Buffer(ctx, size, staged=staged, texel=texel, name=name)


def release(buf: Buffer) -> None:
    """Return a leased buffer to its context's pool (once; later calls and closed buffers are
    ignored), closing the least recently released ones past ``POOL_BYTES``."""
    ctx = buf.ctx
    if ctx._closing or not buf._handles:
        return
    pool = _pool(ctx)
    with pool.lock:
        if id(buf) in pool.idle:
            return
        pool.idle[id(buf)] = ((buf.size, buf.staging is not None or buf.host_visible, buf.texel), buf)
        pool.bytes += buf.size
        while pool.bytes > POOL_BYTES:
            _, (_, old) = pool.idle.popitem(last=False)
            pool.bytes -= old.size
            old.close()


def texel_capable(ctx: Context) -> bool:
    """Whether this device reads RGBA32F uniform texel buffers (vkconv/runtime/pipeline.py says why the
    sparse GEMM prefers them for its float operands)."""
    return ctx.info.max_texel_buffer_elements > 0


class Recording:
    """A command buffer being recorded, with the objects it refers to.

    ``scratch`` and kept ``upload`` buffers go back to the pool and descriptor sets are closed by
    :meth:`close`; buffers made with :func:`lease` directly (results that outlive the recording)
    are the caller's.
    """

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cmd = CommandBuffer(ctx)
        self._keep: list = []
        self._buffers: list[Buffer] = []
        self._sets: dict = {}
        self._downloads: list[Buffer] = []
        self._uploaded = False  # staging copies recorded since the last barrier
        self.cmd.begin()

    # -- buffers -------------------------------------------------------------------------------
    def scratch(self, nbytes: int, name: str, *, staged: bool = False) -> Buffer:
        """A buffer that lives as long as the recording (``staged``: readable after submit)."""
        buf = lease(self.ctx, nbytes, name, staged=staged)
        self._buffers.append(buf)
        return buf

    def upload(self, array: np.ndarray, name: str, *, keep: bool = True, texel: bool = False) -> Buffer:
        """A buffer holding ``array``, copied to the device at the start of the recording
        (``texel``: also bindable as a texel buffer); ``keep=False``: the caller releases it."""
        buf = lease(self.ctx, array.nbytes, name, staged=True, texel=texel)
        if keep:
            self._buffers.append(buf)
        buf.write(array)
        if buf.staging is not None:
            buf.record_upload(self.cmd)
            self._uploaded = True  # the next dispatch waits for the copy (dispatch() says where)
        return buf

    def download(self, buf: Buffer) -> None:
        """Make ``buf`` (made with ``staged=True``) readable by the host after :meth:`submit`."""
        self._downloads.append(buf)

    def fill(self, buf: Buffer, value: int, nbytes: int | None = None) -> None:
        """Set every 32-bit word of ``buf`` (or of its first ``nbytes``) to ``value``."""
        size = buf.size if nbytes is None else -(-nbytes // 4) * 4
        if size:
            vk.vkCmdFillBuffer(self.cmd.handle, buf.buffer, 0, size, value & 0xFFFFFFFF)

    def copy(self, src: Buffer, src_offset: int, dst: Buffer, dst_offset: int, size: int) -> None:
        region = vk.VkBufferCopy(srcOffset=src_offset, dstOffset=dst_offset, size=size)
        vk.vkCmdCopyBuffer(self.cmd.handle, src.buffer, dst.buffer, 1, [region])

    # -- work ----------------------------------------------------------------------------------
    def dispatch(self, shader: str, buffers: list[Buffer], push: bytes, invocations: int, *,
                 spec: tuple = (), local: int = 64, z: int = 1, kinds=None) -> None:
        """Run ``shader`` over ``invocations`` (x ``z`` slices); ``spec`` continues after the local
        size (constant_id 3 on); ``kinds``: binding kinds (default: all storage buffers)."""
        if invocations <= 0 or z <= 0:
            return
        if self._uploaded:
            # one barrier after the uploads recorded so far, before the first dispatch that may read them
            self.barrier()
        local = self.ctx.local_size(local)
        kinds = binding_kinds(len(buffers) if kinds is None else kinds)
        pipe = get_pipeline(self.ctx, shader, kinds, len(push), (local, 1, 1, *spec))
        # Pipelines with the same binding kinds have identically defined set layouts, which Vulkan
        # lets one descriptor set serve (a rulebook's stages bind one set).
        key = (kinds, tuple(id(b) for b in buffers))
        dset = self._sets.get(key)
        if dset is None:
            dset = self._sets[key] = DescriptorSet(pipe, buffers)
            self._keep.append(dset)
        self.cmd.dispatch(pipe, dset, push, grid(self.ctx, invocations, local, z))

    def barrier(self) -> None:
        self.cmd.barrier()
        self._uploaded = False

    def submit(self) -> None:
        """Submit, wait, and leave the command buffer ready to record more."""
        self.cmd.barrier()
        for buf in self._downloads:
            buf.record_download(self.cmd)
        self._downloads.clear()
        self.cmd.host_barrier()
        self.cmd.end()
        self.cmd.submit()
        self.cmd.begin()

    def close(self) -> None:
        self.cmd.end()
        for obj in [self.cmd, *self._keep]:
            obj.close()
        for buf in self._buffers:
            release(buf)
        self._keep.clear()
        self._buffers.clear()
        self._sets.clear()

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
