"""Vectorized numpy reference for ONNX DeformConv, written from the specification.

Independent of vkconv's shaders: float64 throughout, sampling by explicit corner gathers with
torchvision's boundary rule (a point with y <= -1, y >= H, x <= -1 or x >= W samples 0; a corner
outside the image contributes 0), then an einsum over (input channel, tap) per conv group.
NaN in dy or dx makes the sample NaN (the behaviour vkconv documents).
"""
from __future__ import annotations

import numpy as np


def _pads(pads) -> tuple[int, int, int, int]:
    if isinstance(pads, int):
        return (pads,) * 4
    pads = tuple(pads)
    return pads * 2 if len(pads) == 2 else pads


def deform_conv_ref(x, w, offset, b=None, mask=None, *, strides=1, pads=0, dilations=1,
                    group=1, offset_group=1) -> np.ndarray:
    """``[N, C_out, oH, oW]`` float64 from ONNX-ordered inputs (see vkconv.deform_conv)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    offset = np.asarray(offset, np.float64)
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    sh, sw = (strides, strides) if isinstance(strides, int) else strides
    dh, dw = (dilations, dilations) if isinstance(dilations, int) else dilations
    pt, pl, pb, pr = _pads(pads)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    taps, og = kh * kw, offset_group
    off = offset.reshape(n, og, kh, kw, 2, oh, ow)
    m = (np.ones((n, og, kh, kw, oh, ow)) if mask is None
         else np.asarray(mask, np.float64).reshape(n, og, kh, kw, oh, ow))

    # Sampling coordinates [n, og, kh, kw, oh, ow].
    base_y = (np.arange(oh) * sh - pt)[None, :] + (np.arange(kh) * dh)[:, None]   # [kh, oh]
    base_x = (np.arange(ow) * sw - pl)[None, :] + (np.arange(kw) * dw)[:, None]   # [kw, ow]
    y = base_y[None, None, :, None, :, None] + off[:, :, :, :, 0]
    xx = base_x[None, None, None, :, None, :] + off[:, :, :, :, 1]

    with np.errstate(invalid="ignore"):
        inside = (y > -1) & (y < h) & (xx > -1) & (xx < wd)
    ys = np.where(inside, y, 0.0)
    xs = np.where(inside, xx, 0.0)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    ly, lx = ys - y0, xs - x0

    # Channels of each offset group: xg [n, og, c_og, h, w].
    xg = x.reshape(n, og, cin // og, h, wd)
    nn = np.arange(n)[:, None, None, None, None, None]
    gg = np.arange(og)[None, :, None, None, None, None]
    sample = np.zeros((n, og, cin // og, kh, kw, oh, ow))
    for cy, cx, wgt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                        (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        ok = inside & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < wd)
        vals = xg[nn, gg, :, np.clip(cy, 0, h - 1), np.clip(cx, 0, wd - 1)]  # [n,og,kh,kw,oh,ow,c]
        vals = np.moveaxis(vals, -1, 2)
        sample += np.where(ok[:, :, None], vals * wgt[:, :, None], 0.0)
    nan_point = (np.isnan(y) | np.isnan(xx))[:, :, None]
    sample = np.where(nan_point, np.nan, sample) * m[:, :, None]

    cols = sample.reshape(n, group, cin_g, taps, oh, ow)
    wg = w.reshape(group, cout // group, cin_g, taps)
    out = np.einsum("ngctyx,goct->ngoyx", cols, wg).reshape(n, cout, oh, ow)
    if b is not None:
        out = out + np.asarray(b, np.float64)[None, :, None, None]
    return out
