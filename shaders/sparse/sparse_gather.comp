#version 450
// Row gather, dst[r] = src[idx[r]] for float32 rows of c channels (vkconv.gather_rows).
// An index outside [0, n_src) (the host refuses those) yields a zero row instead of a stray read.
#extension GL_GOOGLE_include_directive : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize

layout(std430, binding = 0) readonly buffer Src { float src[]; };   // [n_src][c]
layout(std430, binding = 1) readonly buffer Idx { int idx[]; };     // [m]
layout(std430, binding = 2) writeonly buffer Dst { float dst[]; };  // [m][c]

layout(push_constant) uniform Params {
    int m, c, n_src;
} p;


void main()
{
    const int e = flat_invocation();
    if (e >= p.m * p.c) return;
    int s = idx[e / p.c];
    dst[e] = uint(s) < uint(p.n_src) ? src[s * p.c + e % p.c] : 0.0;
}
