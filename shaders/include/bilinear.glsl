// Bilinear sampling with the boundary rule of torchvision's deform_conv2d (and mmcv's DCN):
//   * a point with y <= -1, y >= H, x <= -1 or x >= W samples 0;
//   * otherwise the four neighbours floor(y|x) and floor(y|x) + 1 are blended, and a neighbour
//     outside the image contributes 0 (as if the image were zero-padded by one pixel).
// This equals ONNX GridSample(align_corners=1, padding_mode="zeros") on pixel coordinates, which is
// how the ONNX reference evaluates DeformConv.
//
// Corner order: (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).  A corner outside the
// image gets weight 0, index 0 and ok = false: callers load from the (always valid) index and then
// select 0 where !ok, so an Inf or NaN stored at index 0 cannot leak into the sample through
// 0 * Inf.
#ifndef VKCONV_BILINEAR_GLSL
#define VKCONV_BILINEAR_GLSL

struct Bilinear {
    ivec4 idx;   // row-major pixel index y * w + x of each corner (0 where !ok)
    vec4 wt;     // interpolation weight of each corner (0 where !ok)
    bvec4 ok;    // corner lies inside the image
};

Bilinear bilinear_corners(float y, float x, int h, int w)
{
    Bilinear s;
    s.idx = ivec4(0);
    s.wt = vec4(0.0);
    s.ok = bvec4(false);
    // Written so that NaN fails the test: a NaN coordinate never reaches int().
    if (y > -1.0 && y < float(h) && x > -1.0 && x < float(w)) {
        float fy = floor(y), fx = floor(x);
        int y0 = int(fy), x0 = int(fx);   // in [-1, h - 1] x [-1, w - 1]
        float ly = y - fy, lx = x - fx;
        float hy = 1.0 - ly, hx = 1.0 - lx;
        bool top = y0 >= 0, bottom = y0 + 1 < h, left = x0 >= 0, right = x0 + 1 < w;
        s.ok = bvec4(top && left, top && right, bottom && left, bottom && right);
        ivec4 idx = ivec4(y0 * w + x0, y0 * w + x0 + 1, (y0 + 1) * w + x0, (y0 + 1) * w + x0 + 1);
        vec4 wt = vec4(hy * hx, hy * lx, ly * hx, ly * lx);
        s.idx = ivec4(s.ok.x ? idx.x : 0, s.ok.y ? idx.y : 0, s.ok.z ? idx.z : 0, s.ok.w ? idx.w : 0);
        s.wt = vec4(s.ok.x ? wt.x : 0.0, s.ok.y ? wt.y : 0.0, s.ok.z ? wt.z : 0.0, s.ok.w ? wt.w : 0.0);
    }
    return s;
}

#endif
