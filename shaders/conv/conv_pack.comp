#version 450
// Zero-padded, row-aligned copy of a convolution input: x [planes][d][h][w] float ->
// xp [planes][pd][ph][pw4] vec4, with the input placed at (pad_d, pad_h, pad_w) and zeros around.
// The implicit-GEMM and depthwise kernels then read whole aligned vec4 row segments with no
// bounds checks in their inner loops. Host code: vkconv/ops/conv/kernels.py.
//
// variant: conv_pack -DTEXEL=1
// variant: conv_pack_ssbo
#extension GL_EXT_samplerless_texture_functions : require  // textureBuffer: SPIR-V 1.6 forbids sampled Buffer images
#extension GL_GOOGLE_include_directive : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize

#ifdef TEXEL
// R32F view: one float per texel (a gather on lavapipe, 3x faster than scalar SSBO loads there).
layout(binding = 0) uniform textureBuffer x;
#define LOAD_X(i) texelFetch(x, i).x
#else
layout(std430, binding = 0) readonly buffer Input { float x[]; };
#define LOAD_X(i) x[i]
#endif
layout(std430, binding = 1) writeonly buffer Padded { vec4 xp[]; };

layout(push_constant) uniform Params {
    int planes, d, h, w;
    int pd, ph, pw4;
    int pad_d, pad_h, pad_w;
} p;

void main()
{
    // One invocation per padded row: the divisions that locate the row (slow on lavapipe, which
    // scalarizes integer division) are paid once per row, not once per vec4.
    const int r = flat_invocation();
    if (r >= p.planes * p.pd * p.ph) return;
    const int iy = r % p.ph - p.pad_h;
    const int iz = (r / p.ph) % p.pd - p.pad_d;
    const int plane = r / (p.ph * p.pd);
    const bool row_ok = uint(iz) < uint(p.d) && uint(iy) < uint(p.h);
    const int base = ((plane * p.d + iz) * p.h + iy) * p.w;
    int dst = r * p.pw4;
    for (int x4 = 0; x4 < p.pw4; ++x4, ++dst) {
        vec4 v;
        for (int c = 0; c < 4; ++c) {
            const int ix = x4 * 4 + c - p.pad_w;
            const bool ok = row_ok && uint(ix) < uint(p.w);
            // Clamped address, then select: never an out-of-bounds read, and padding is an exact 0.
            const float value = LOAD_X(ok ? base + ix : 0);
            v[c] = ok ? value : 0.0;
        }
        xp[dst] = v;
    }
}
