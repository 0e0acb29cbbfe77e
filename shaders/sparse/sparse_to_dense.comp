#version 450
// Device-side SparseTensor.to_dense() for the cv2.dnn sparse encoder (vkconv/ops/sparse/encoder.py):
// dense[b][ch][z][y][x] = features[row][ch] for every active row, into a zero-filled
// [batch, C, D, H, W] buffer, which is also the [batch, C * D, H, W] BEV layout SECOND reshapes to.
// Sites come from a rulebook, so each element is written at most once; coordinates are still
// range-checked because they are data.
#extension GL_GOOGLE_include_directive : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize

layout(std430, binding = 0) readonly buffer Feat { float feat[]; };     // [n][stride]
layout(std430, binding = 1) readonly buffer Idx { ivec4 idx[]; };       // (b, z, y, x)
layout(std430, binding = 2) writeonly buffer Dense { float dense[]; };  // [batch][c][D][H][W]

layout(push_constant) uniform Params {
    ivec4 grid;   // (batch, D, H, W)
    int n, c, stride;
} p;


void main()
{
    const int e = flat_invocation();
    if (e >= p.n * p.c) return;
    const int row = e / p.c;
    const int ch = e % p.c;
    ivec4 s = idx[row];
    if (any(lessThan(s, ivec4(0))) || any(greaterThanEqual(s, p.grid))) return;
    int at = (((s.x * p.c + ch) * p.grid.y + s.y) * p.grid.z + s.z) * p.grid.w + s.w;
    dense[at] = feat[row * p.stride + ch];
}
