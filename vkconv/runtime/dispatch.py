"""Workgroup counts for the shaders' 1-D work, one way for every op.

Large problems exceed ``maxComputeWorkGroupCount[0]`` (65535 on many devices), so workgroups are
spread over x and y and the shaders read their flat index back with ``flat_invocation()`` from
``shaders/include/grid.glsl``.
"""
from __future__ import annotations

from vkconv.runtime.context import Context
from vkconv.runtime.errors import VkconvError

# Invocations per workgroup of the kernels that loop over elements (elementwise, pool, resize...).
LOOP_LOCAL = 128
# Workgroups of such a loop on a CPU device: 256 of 128 invocations took 0.6-0.9x the time of 1024
# on elementwise and pool layers of 0.8-3.2 M elements, on both Mesa 22.3 and 25.0 lavapipe; 4096 or
# no cap 1.0-1.2x (docs/PERFORMANCE.md, "Elementwise and pool launch shapes").  Transpose is the
# exception (its scattered reads took 1.14-1.18x the time with 256 on Mesa 25.0): it keeps 1024.
# These are the heuristic (vkconv.ops.launch.heuristic_launch); a tuned launch shape replaces it.
CPU_LOOP_GROUPS = 256
CPU_TRANSPOSE_GROUPS = 1024


def grid(ctx: Context, invocations: int, local: int, z: int = 1, what: str = "") -> tuple[int, int, int]:
    """Workgroups of ``local`` invocations covering ``invocations`` flat invocations (over x and y),
    times ``z``; none for no work.  ``what`` names the dispatch in the error raised when the
    device's limits cannot hold it."""
    if invocations <= 0:
        return (0, 0, z)
    limit = ctx.info.max_workgroup_count
    total = -(-invocations // local)
    gx = min(total, limit[0])
    gy = -(-total // gx)
    if gy > limit[1] or z > limit[2]:
        raise VkconvError(f"{what or f'{invocations} invocations x {z}'}: ({gx}, {gy}, {z}) workgroups exceed "
                          f"the device's maxComputeWorkGroupCount {limit}")
    return gx, gy, z


def looped_grid(ctx: Context, count: int, local: int, cap: int = 0) -> tuple[int, int, int]:
    """Workgroups of ``local`` invocations for a grid-stride loop over ``count`` items: enough to
    cover them, at most ``cap`` (0: the device's x limit), at least one; the shaders loop over
    the rest."""
    limit = ctx.info.max_workgroup_count[0]
    return (max(1, min(-(-count // local), min(cap, limit) if cap else limit)), 1, 1)
