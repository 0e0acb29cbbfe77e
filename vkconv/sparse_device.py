"""Recording helper shared by the sparse modules: one command buffer, the scratch objects it uses.

Sparse work has data-dependent sizes (how many output sites, how many pairs per tap), so it is
recorded afresh per call rather than replayed from a :class:`vkconv.plan.Plan`.  A
:class:`Recording` keeps every descriptor set and scratch buffer alive until its submission is
done, reuses one descriptor set per (pipeline, buffers) so a 27-tap convolution binds one set, and
lays 1-D work over a 2-D grid of workgroups when it exceeds ``maxComputeWorkGroupCount[0]``.
"""
from __future__ import annotations

import numpy as np

from .buffer import Buffer
from .command import CommandBuffer
from .context import Context, vk
from .conv_kernels import dispatch_grid
from .pipeline import DescriptorSet, binding_kinds

INT32_MAX = 2**31 - 1


def texel_capable(ctx: Context) -> bool:
    """Whether this device reads RGBA32F uniform texel buffers (vkconv/pipeline.py says why the
    sparse GEMM prefers them for its float operands)."""
    return ctx.info.max_texel_buffer_elements > 0


def grid(ctx: Context, invocations: int, local: int, z: int = 1) -> tuple[int, int, int]:
    """Workgroups covering ``invocations`` 1-D invocations (``shaders/include/sparse_grid.glsl``
    reads the flat index back from ``gl_NumWorkGroups``); no workgroups for no work."""
    if invocations == 0:
        return (0, 0, z)
    return dispatch_grid(ctx, invocations, local, z, f"{invocations} invocations x {z}")[0]


class Recording:
    """A command buffer being recorded, with the objects it refers to.

    ``scratch`` buffers and descriptor sets are closed by :meth:`close`; buffers made with
    ``Buffer`` directly (results that outlive the recording) are the caller's.
    """

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cmd = CommandBuffer(ctx)
        self._keep: list = []
        self._sets: dict = {}
        self._downloads: list[Buffer] = []
        self.cmd.begin()

    # -- buffers -------------------------------------------------------------------------------
    def scratch(self, nbytes: int, name: str, *, staged: bool = False) -> Buffer:
        """A buffer that lives as long as the recording (``staged``: readable after submit)."""
        buf = Buffer(self.ctx, nbytes, staged=staged, name=name)
        self._keep.append(buf)
        return buf

    def upload(self, array: np.ndarray, name: str, *, keep: bool = True, texel: bool = False) -> Buffer:
        """A buffer holding ``array``, copied to the device at the start of the recording
        (``texel``: also bindable as a texel buffer)."""
        buf = Buffer(self.ctx, array.nbytes, staged=True, texel=texel, name=name)
        if keep:
            self._keep.append(buf)
        buf.write(array)
        buf.record_upload(self.cmd)
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
        local = self.ctx.local_size(local)
        kinds = binding_kinds(len(buffers) if kinds is None else kinds)
        pipe = self.ctx.pipeline(shader, kinds, len(push), (local, 1, 1, *spec))
        key = (id(pipe), tuple(id(b) for b in buffers))
        dset = self._sets.get(key)
        if dset is None:
            dset = self._sets[key] = DescriptorSet(pipe, buffers)
            self._keep.append(dset)
        self.cmd.dispatch(pipe, dset, push, grid(self.ctx, invocations, local, z))

    def barrier(self) -> None:
        self.cmd.barrier()

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
        self._keep.clear()
        self._sets.clear()

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
