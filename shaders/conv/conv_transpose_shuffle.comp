#version 450
// The second half of a transposed convolution whose kernel equals its stride (no overlap, no
// padding: PP-OCR's and U-Net's 2x2 stride-2 upsamplers): the first half, a 1x1 GEMM, wrote
// c[n][co * K + tap][z][y][x] (K = SD * SH * SW taps); this pass puts each tap's plane in place:
// y[n][co][z * SD + tz][y * SH + ty][x * SW + tx] = c[n][co * K + (tz * SH + ty) * SW + tx][z][y][x].
// Host code: vkconv/ops/conv_transpose.py.  VEC4 (input width a multiple of 4): an invocation reads 4
// consecutive columns of each of the SW column-tap planes as vec4s and writes the 4 * SW outputs
// they make as SW vec4s (lavapipe runs loads and stores lane by lane, so fewer, wider is faster).
#extension GL_GOOGLE_include_directive : require
#include "divide.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"
layout(constant_id = 4) const int SD = 1;
layout(constant_id = 5) const int SH = 1;
layout(constant_id = 6) const int SW = 1;
layout(constant_id = 7) const bool VEC4 = false;

layout(std430, binding = 0) readonly buffer Columns { float c[]; };
layout(std430, binding = 0) readonly buffer Columns4 { vec4 c4[]; };
layout(std430, binding = 1) writeonly buffer Y { float y[]; };
layout(std430, binding = 1) writeonly buffer Y4 { vec4 y4[]; };

layout(push_constant) uniform Params {
    uvec2 magic_w;    // divide_magic pairs of out_w / (VEC4 ? 4 * SW : 1), out_h and out_d
    uvec2 magic_h;
    uvec2 magic_d;
    int in_d, in_h, in_w;
    int out_d, out_h, out_w;
    int total;        // N * C_out * out_d * out_h * out_w / (VEC4 ? 4 * SW : 1)
} p;

float source(int plane, int oz, int oy, int ox)
{
    const int tap = ((oz % SD) * SH + oy % SH) * SW + ox % SW;
    const int k = SD * SH * SW;
    return c[((plane * k + tap) * p.in_d + oz / SD) * p.in_h * p.in_w + (oy / SH) * p.in_w + ox / SW];
}

void main()
{
    const int lanes = VEC4 ? 4 * SW : 1;
    uint step = loop_step();
    for (uint i = loop_first(); i < uint(p.total); i += step) {
        const uint row = divide_magic(i, p.magic_w);
        const int ox = int(i - row * uint(p.out_w / lanes)) * lanes;
        const uint slice = divide_magic(row, p.magic_h);
        const int oy = int(row - slice * uint(p.out_h));
        const uint plane = divide_magic(slice, p.magic_d);
        const int oz = int(slice - plane * uint(p.out_d));
        if (VEC4) {
            // tap plane tx holds output columns ox + 4 * j * SW + tx... as its columns ox / SW + j
            vec4 v[SW];
            const int tap0 = ((oz % SD) * SH + oy % SH) * SW;
            const int at = (oz / SD) * p.in_h * p.in_w + (oy / SH) * p.in_w + ox / SW;
            for (int tx = 0; tx < SW; ++tx)
                v[tx] = c4[((int(plane) * SD * SH * SW + tap0 + tx) * p.in_d * p.in_h * p.in_w + at) >> 2];
            for (int m = 0; m < SW; ++m) {
                vec4 out4;
                for (int e = 0; e < 4; ++e)
                    out4[e] = v[(4 * m + e) % SW][(4 * m + e) / SW];
                y4[(i * uint(lanes) >> 2) + m] = out4;
            }
        } else {
            y[i] = source(int(plane), oz, oy, ox);
        }
    }
}
