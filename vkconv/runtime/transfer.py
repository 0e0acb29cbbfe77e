"""Uploads outside any plan (weights, biases, lookup tables): write a buffer now, copy it to the
device with the next submit.

On unified memory the write is all there is.  A staged buffer (discrete GPUs) needs a copy from its
host-visible twin: instead of a submit of its own, the copy waits in ``Context.pending_uploads``
and :meth:`vkconv.runtime.command.CommandBuffer.submit` runs it, with a barrier, in front of the
next command buffer it submits.  So building an op costs no submit, and its first call stays one.
"""
from __future__ import annotations

import numpy as np

from vkconv.runtime.buffer import Buffer
from vkconv.runtime.context import Context


def upload(buf: Buffer, array: np.ndarray, *, drop_staging: bool = False) -> None:
    """Write ``array`` into ``buf``; every submit on its context from now on sees it.
    ``drop_staging``: free the staging twin once the copy ran (nothing will be written again)."""
    buf.write(array)
    if buf.staging is not None:
        with buf.ctx.lock:
            buf.ctx.pending_uploads.append((buf, drop_staging))


def upload_constant(ctx: Context, array: np.ndarray, name: str, *, texel: bool = False) -> Buffer:
    """A device-local buffer holding ``array`` (weights, bias), ready for the next submit."""
    buf = Buffer(ctx, array.nbytes, staged=True, texel=texel, name=name)
    upload(buf, array, drop_staging=True)
    return buf
