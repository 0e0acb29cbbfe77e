"""A sparse 3-D backbone whose intermediate tensors never leave the device, ending in a dense map:
the middle encoder of SECOND-style point-cloud detectors, as one call.

Voxel features + coordinates go in; a chain of SubM and strided sparse convolutions runs on the
device (rulebooks built there, features passed from layer to layer in device buffers); the last
sparse tensor is scattered into a dense ``[batch, C, D', H', W']`` buffer on the device, which is
also the ``[batch, C * D', H', W']`` bird's-eye-view map SECOND reshapes it to.  Only the rulebook
sizes (one int per strided layer) and the final map come back to the host.  cv_plugin's
``vkconv.SparseEncoder`` layer is a thin wrapper around :class:`SparseEncoder`.
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

import numpy as np

from vkconv.kernels import shapes
from vkconv.kernels.activation import Activation
from vkconv.ops.sparse.conv import PackedWeights, pack_weights, record_conv
from vkconv.ops.sparse.device import Recording, release, texel_capable
from vkconv.ops.sparse.rulebook import Rulebook, SparseGeometry, build_rulebook, make_geometry
from vkconv.ops.sparse.tensor import SparseTensor
from vkconv.ops.tune import tune_mode
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.context import Context, get_context

_DENSE_PUSH = struct.Struct("<7i")


@dataclass(frozen=True)
class EncoderLayer:
    """One layer: ``subm=True`` for SubMConv3d (stride / padding ignored), else SparseConv3d.

    ``weight [C_out, kD, kH, kW, C_in]`` and ``bias [C_out]`` (or None) in spconv 2.x layout.
    """

    weight: np.ndarray
    bias: np.ndarray | None = None
    subm: bool = True
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    activation: object = None


@dataclass(frozen=True)
class EncoderPlan:
    """What an encoder's layers resolve to without a device: per-layer geometry and activation,
    channel counts and the output grid."""

    geoms: tuple[SparseGeometry, ...]
    acts: tuple[Activation, ...]
    in_channels: int
    out_channels: int
    out_grid: tuple[int, int, int]
    batch_size: int

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        d, h, w = self.out_grid
        return (self.batch_size, self.out_channels * d, h, w)


def plan_layers(layers: list[EncoderLayer], spatial_shape, batch_size: int) -> EncoderPlan:
    """Validate ``layers`` on a ``batch_size x spatial_shape`` grid (ValueError naming the layer)."""
    if not layers:
        raise ValueError("layers: expected at least one layer")
    geoms: list[SparseGeometry] = []
    acts: list[Activation] = []
    d, h, w_ = (int(s) for s in spatial_shape)
    grid: tuple[int, int, int] = (d, h, w_)
    channels: int | None = None
    for i, layer in enumerate(layers):
        w = shapes.as_float32(f"layers[{i}].weight", layer.weight, 5)
        if channels is not None and w.shape[4] != channels:
            raise ValueError(f"layers[{i}].weight: {w.shape[4]} input channels, but layer {i - 1} "
                             f"has {channels} output channels")
        if layer.bias is not None:
            b = shapes.as_float32(f"layers[{i}].bias", layer.bias, 1)
            if b.shape[0] != w.shape[0]:
                raise ValueError(f"layers[{i}].bias: expected {w.shape[0]} values, got {b.shape[0]}")
        geom = make_geometry(grid, int(batch_size), w.shape[1:4], subm=layer.subm, stride=layer.stride,
                             padding=layer.padding, dilation=layer.dilation)
        geoms.append(geom)
        acts.append(Activation.parse(layer.activation))
        grid, channels = geom.out_shape, w.shape[0]
    assert channels is not None  # set by the first layer; `layers` is not empty
    return EncoderPlan(tuple(geoms), tuple(acts), layers[0].weight.shape[4], channels, grid,
                       int(batch_size))


class SparseEncoder:
    """Layers with resident weights on a fixed grid; call with ``(features [N, C], indices [N, 4])``.

    Consecutive SubM layers of one geometry share a rulebook (spconv's indice_key sharing); a
    strided layer builds its own.  ``output_shape`` is ``(batch_size, C_last * D', H', W')``.
    """

    def __init__(self, layers: list[EncoderLayer], spatial_shape, batch_size: int, *,
                 ctx: Context | None = None):
        self.plan = plan_layers(layers, spatial_shape, batch_size)
        self.ctx = ctx or get_context()
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()
        self._weights: list[PackedWeights] = [pack_weights(self.ctx, layer.weight, layer.bias)
                                               for layer in layers]

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return self.plan.output_shape

    def __call__(self, features: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """The dense map ``[batch, C_last * D', H', W']`` float32 (zero where no site is active)."""
        st = SparseTensor(features, indices, self.spatial_shape, self.batch_size)
        if st.num_channels != self.plan.in_channels:
            raise ValueError(f"features: {st.num_channels} channels, the first layer takes "
                             f"{self.plan.in_channels}")
        with self._lock:
            if not self._weights:
                raise ValueError("this SparseEncoder was closed")
            return self._forward(st)

    def _forward(self, st: SparseTensor) -> np.ndarray:
        out = np.zeros(self.output_shape, np.float32)
        rulebooks: list[Rulebook] = []
        owned: list[Rulebook | Buffer] = []
        try:
            indices, idx_buf = st.indices, None
            for geom in self.plan.geoms:
                prev = rulebooks[-1] if rulebooks else None
                if prev is not None and geom.subm and prev.geom == geom:
                    rb = prev
                else:
                    rb = build_rulebook(self.ctx, indices, geom, in_idx=idx_buf)
                    owned.append(rb)
                if rb.n_out == 0:
                    return out  # every site vanished (or N = 0): the map is all zeros
                rulebooks.append(rb)
                indices, idx_buf = rb.out_indices, rb.out_idx
            use_cache = tune_mode() != "0"  # tiles tuned by single-layer calls (VKCONV_TUNE=0: heuristics)
            with Recording(self.ctx) as rec:
                w0 = self._weights[0]
                x = st.features
                if w0.cin % 4:
                    x = np.zeros((len(x), 4 * w0.cin4), np.float32)
                    x[:, :w0.cin] = st.features
                feats = rec.upload(x, "encoder input", texel=texel_capable(self.ctx))
                for rb, w, act in zip(rulebooks, self._weights, self.plan.acts):
                    feats = record_conv(rec, rb, feats, w, act, use_cache=use_cache)
                    owned.append(feats)
                dense = rec.scratch(4 * out.size, "encoder dense output", staged=True)
                rec.fill(dense, 0)
                rec.barrier()
                last = self._weights[-1]
                n = rulebooks[-1].n_out
                assert idx_buf is not None  # the last rulebook's output indices, on the device
                rec.dispatch("sparse_to_dense", [feats, idx_buf, dense],
                             _DENSE_PUSH.pack(self.batch_size, *self.plan.out_grid, n, last.cout,
                                              4 * last.cout4),
                             n * last.cout)
                rec.download(dense)
                rec.submit()
                return dense.read(np.float32, out.shape)
        finally:
            for obj in owned:
                if isinstance(obj, Buffer):
                    release(obj)
                else:
                    obj.close()

    def close(self) -> None:
        """Free the device weights (the encoder cannot be called afterwards)."""
        with self._lock:
            for w in self._weights:
                w.close()
            self._weights = []

    def __enter__(self) -> SparseEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
