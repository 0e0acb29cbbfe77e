"""One-off transfers outside any plan: write a buffer and make it visible to the device now."""
from __future__ import annotations

import numpy as np

from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context


def upload(buf: Buffer, array: np.ndarray) -> None:
    """Write ``array`` into ``buf`` and make it visible to the device now (one submit when the
    buffer is staged, none on unified memory)."""
    buf.write(array)
    if buf.staging is not None:
        with CommandBuffer(buf.ctx) as cmd:
            with cmd.recording():
                buf.record_upload(cmd)
            cmd.submit()


def upload_constant(ctx: Context, array: np.ndarray, name: str, *, texel: bool = False) -> Buffer:
    """A device-local buffer holding ``array`` (weights, bias): uploaded once, staging released."""
    buf = Buffer(ctx, array.nbytes, staged=True, texel=texel, name=name)
    upload(buf, array)
    buf.drop_staging()
    return buf
