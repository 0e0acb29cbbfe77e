#version 450
// Deterministic row scatter-add, dst[idx[r]] += src[r] (vkconv.scatter_add_rows), without float
// atomics: the host sorts the source rows by destination (stably), so destination row d sums
// src[order[start[d]]], src[order[start[d] + 1]]... in increasing source-row order. One invocation
// per destination element; the result does not depend on scheduling.
#extension GL_GOOGLE_include_directive : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize

layout(std430, binding = 0) readonly buffer Src { float src[]; };     // [m][c]
layout(std430, binding = 1) readonly buffer Order { int order[]; };   // [m]
layout(std430, binding = 2) readonly buffer Start { int start[]; };   // [n_dst + 1]
layout(std430, binding = 3) buffer Dst { float dst[]; };              // [n_dst][c]

layout(push_constant) uniform Params {
    int n_dst, c, m;
} p;


void main()
{
    const int e = flat_invocation();
    if (e >= p.n_dst * p.c) return;
    const int d = e / p.c;
    const int col = e % p.c;
    float acc = dst[e];
    int end = min(start[d + 1], p.m);
    for (int j = max(start[d], 0); j < end; ++j) {
        int s = order[j];
        if (uint(s) < uint(p.m)) acc += src[s * p.c + col];
    }
    dst[e] = acc;
}
