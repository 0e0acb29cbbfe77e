// Bilinear sampling with the boundary rule of torchvision's deform_conv2d (and mmcv's DCN):
//   * a point with y <= -1, y >= H, x <= -1 or x >= W samples 0;
//   * otherwise the four neighbours floor(y|x) and floor(y|x) + 1 are blended, and a neighbour
//     outside the image contributes 0 (as if the image were zero-padded by one pixel).
// This equals ONNX GridSample(align_corners=1, padding_mode="zeros") on pixel coordinates, which is
// how the ONNX reference evaluates DeformConv.
//
// The image is read from a copy with a one-pixel zero border ((h + 2) x (w + 2) pixels, image pixel
// (y, x) at (y + 1) * (w + 2) + x + 1): the neighbours of any point inside the rule's range lie in
// that copy, and one outside the image reads a border zero, so callers blend the four fetched
// corners with no per-corner test.  A point that samples 0 gets weights 0 and all four indices 0
// (a border pixel): an Inf or NaN in the image cannot leak into it through 0 * Inf.
//
// Corner order: (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).  Branch-free: lavapipe runs
// both sides of a divergent branch with masked writes.
#ifndef VKCONV_BILINEAR_GLSL
#define VKCONV_BILINEAR_GLSL

struct Bilinear {
    ivec4 idx;   // padded pixel index of each corner, all 0 where the point samples 0
    vec4 wt;     // interpolation weight of each corner, all 0 where the point samples 0
};

Bilinear bilinear_corners(float y, float x, int h, int w)
{
    // Written so that NaN fails the test: a NaN coordinate never reaches int().
    const bool inside = y > -1.0 && y < float(h) && x > -1.0 && x < float(w);
    const float yc = inside ? y : 0.0, xc = inside ? x : 0.0;
    const float fy = floor(yc), fx = floor(xc);
    const float ly = yc - fy, lx = xc - fx;
    const float hy = 1.0 - ly, hx = 1.0 - lx;
    // floor(y) + 1 is in [0, h] and floor(x) + 1 in [0, w]: padded rows and columns that exist.
    const int i00 = (int(fy) + 1) * (w + 2) + int(fx) + 1;
    Bilinear s;
    s.idx = inside ? ivec4(i00, i00 + 1, i00 + w + 2, i00 + w + 3) : ivec4(0);
    s.wt = inside ? vec4(hy * hx, hy * lx, ly * hx, ly * lx) : vec4(0.0);
    return s;
}

#endif
