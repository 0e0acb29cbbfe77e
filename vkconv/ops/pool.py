"""2-D pooling kernels for device-resident graphs: ONNX MaxPool, AveragePool, GlobalAveragePool and
GlobalMaxPool over NCHW float32.

Like :mod:`vkconv.ops.elementwise`, a :class:`Pool` records into a command buffer and buffers the caller
owns (``record``) and sizes its output without a device (``output_shapes``).  Shader:
``shaders/graph/pool.comp``.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

from vkconv.kernels import shapes
from vkconv.kernels.divide import magic
from vkconv.ops.elementwise import Shape, checked_sizes
from vkconv.ops.launch import LoopLaunch
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, get_context
from vkconv.runtime.dispatch import LOOP_LOCAL
from vkconv.runtime.pipeline import DescriptorSet, get_pipeline

_KINDS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
_CPU_GLOBAL_LOCAL = 32  # invocations per plane of a global pool on a CPU device
_PUSH = struct.Struct("<4I15i")


class Pool(LoopLaunch):
    """ONNX pooling ``kind`` with its attributes (ONNX names and defaults) for 4-D NCHW input.

    ``pads`` are ONNX ``(top, left, bottom, right)`` (or one int / two ints, symmetric);
    ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID override them per input shape.  ``ceil_mode`` sizes
    the output with ceil, dropping a last window that would start in the end padding, as ONNX
    says.  ``count_include_pad`` (AveragePool) divides by the taps inside the padded extent instead
    of the taps inside the input.  The Global kinds take no attributes.
    """

    def __init__(self, kind: str, kernel_shape=None, *, strides=1, pads=0, dilations=1,
                 ceil_mode: int = 0, count_include_pad: int = 0, auto_pad: str = "NOTSET",
                 ctx: Context | None = None):
        if kind not in _KINDS:
            raise ValueError(f"kind: expected one of {', '.join(_KINDS)}, got {kind!r}")
        self.kind = kind
        self.is_global = kind.startswith("Global")
        if not self.is_global:
            if kernel_shape is None:
                raise ValueError(f"kernel_shape: {kind} needs it")
            self.kernel = shapes.spatial("kernel_shape", tuple(kernel_shape), 2, minimum=1)
            self.strides = shapes.spatial("strides", strides, 2, minimum=1)
            self.dilations = shapes.spatial("dilations", dilations, 2, minimum=1)
            self.pads = shapes.pads(pads, 2)
            shapes.resolve_auto_pad(auto_pad, (1, 1), (1, 1), (1, 1), (1, 1))  # validates the name
        self.auto_pad = auto_pad
        self.ceil_mode = bool(ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        self.ctx = ctx or get_context()

    def _geometry(self, x_shape: Shape):
        """(kernel, strides, dilations, pads, output HW) for an input of ``x_shape``."""
        if self.is_global:
            return tuple(x_shape[2:]), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)
        auto = shapes.resolve_auto_pad(self.auto_pad, x_shape[2:], self.kernel, self.strides, self.dilations)
        pads = self.pads if auto is None else auto
        out = []
        for axis in range(2):
            size, k, s, d = x_shape[2 + axis], self.kernel[axis], self.strides[axis], self.dilations[axis]
            if size <= 0:
                out.append(-1)  # unknown while importing
                continue
            span = size + pads[axis] + pads[axis + 2] - d * (k - 1) - 1
            if span < 0:
                raise ValueError(f"x: spatial size {tuple(x_shape[2:])} with pads {pads} is smaller than "
                                 f"the {self.kind} window {self.kernel} (dilations {self.dilations})")
            n = -(-span // s) + 1 if self.ceil_mode and auto is None else span // s + 1
            if self.ceil_mode and (n - 1) * s >= size + pads[axis]:
                n -= 1  # the last window must start inside the input or the begin padding
            out.append(n)
        return self.kernel, self.strides, self.dilations, pads, tuple(out)

    def output_shapes(self, in_shapes: Sequence[Shape]) -> list[Shape]:
        x_shape = shapes.single_nchw(self.kind, in_shapes)
        return [(*x_shape[:2], *self._geometry(x_shape)[4])]

    def record(self, cmd: CommandBuffer, inputs: Sequence[Buffer], outputs: Sequence[Buffer],
               in_shapes: Sequence[Shape]) -> list:
        out = self.output_shapes(in_shapes)[0]
        x_shape, total = checked_sizes(self.kind, in_shapes[0], out)
        kernel, strides, dilations, pads, out_hw = self._geometry(x_shape)
        mode = 0 if "Max" in self.kind else (2 if self.count_include_pad else 1)
        # windows that tile each row exactly along W: 4 outputs per invocation from aligned vec4s
        vec4 = (not self.is_global and kernel[1] == strides[1] and dilations[1] == 1 and pads[1] == 0
                and x_shape[3] % 4 == 0 and out_hw[1] % 4 == 0 and out_hw[1] * strides[1] <= x_shape[3])
        name = "pool_global" if self.is_global else "pool_vec4" if vec4 else "pool"
        lanes = 4 if vec4 else 1
        launch = None if self.is_global else self.loop_launch(name, total // lanes, in_shapes)
        local = self.ctx.local_size(LOOP_LOCAL) if launch is None else launch.local
        if self.is_global:  # the shared-memory reduction halves the workgroup: a power of two
            if self.ctx.info.type == "cpu":
                # barriers dominate there: 32 invocations per plane took 0.13-0.24x the time of 128
                # on GlobalAveragePool 512x14x14 (Mesa 22.3 and 25.0; docs/PERFORMANCE.md)
                local = min(local, _CPU_GLOBAL_LOCAL)
            local = 1 << (local.bit_length() - 1)
        spec: tuple[int, ...] = (local, 1, 1, 0, mode) + ((strides[1],) if vec4 else ())  # S: pool_vec4 only
        pipe = get_pipeline(self.ctx, name, 2, _PUSH.size, spec)
        dset = DescriptorSet(pipe, [inputs[0], outputs[0]])
        push = _PUSH.pack(*magic(out_hw[1] // lanes), *magic(out_hw[0]), *x_shape[2:], *out_hw, *kernel, *strides,
                          *dilations, *pads[:2], *pads[2:], total // lanes)
        # global pools: one workgroup per plane (the output has one element per plane)
        groups = (min(total, self.ctx.info.max_workgroup_count[0]), 1, 1) if launch is None \
            else launch.groups(self.ctx, total // lanes)
        cmd.dispatch(pipe, dset, push, groups)
        return [dset]
