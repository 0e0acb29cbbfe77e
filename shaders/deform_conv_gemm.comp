#version 450
// Deformable convolution, stage 3 of 3 (host code: vkconv/deform_conv.py): GEMM of the packed
// weights with one chunk of sampled columns, plus bias and the fused activation.
//
// A workgroup computes OC_TILE output channels x (local size * PX) pixels of one conv group.
// Invocation i owns pixels i, i + local size, ... of the tile, so neighbouring invocations read
// neighbouring columns; the weight address is the same for the whole workgroup.  Each step reads
// one vec4 row (4 input channels of one tap) per pixel and one vec4 per output channel.
// No shared memory and no barriers: lavapipe executes a barrier by switching invocation groups,
// and the measured best kernels there keep long independent FMA chains in registers instead.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
layout(constant_id = 4) const int OC_TILE = 16;  // output channels per workgroup
layout(constant_id = 5) const int PX = 8;        // pixels per invocation

layout(std430, binding = 0) readonly buffer Columns { vec4 cols[]; };  // [group][tile][rows][tile_px]
// [group][oc_tiles][rows][OC_TILE] vec4 over the 4 channels of a block, zero-padded
layout(std430, binding = 1) readonly buffer Weight { vec4 w[]; };
layout(std430, binding = 2) readonly buffer Bias { float bias[]; };      // [group][oc_tiles * OC_TILE]
layout(std430, binding = 3) writeonly buffer Output { float y[]; };     // [n][C_out][oH][oW]

layout(push_constant) uniform Params {
    int rows, tile_px, tiles, tile0;  // rows = blocks per group * taps; tiles of this chunk
    int total_pixels, out_hw, cout_g, groups, oc_tiles;
    float act_a, act_b;
} p;

void main()
{
    const int ls = int(gl_WorkGroupSize.x);
    const int lid = int(gl_LocalInvocationID.x);
    const int tile = int(gl_WorkGroupID.x);
    const int oct = int(gl_WorkGroupID.y);
    const int g = int(gl_WorkGroupID.z);

    float acc[OC_TILE * PX];
    [[unroll]] for (int i = 0; i < OC_TILE * PX; ++i) acc[i] = 0.0;

    int ci = (g * p.tiles + tile) * p.rows * p.tile_px + lid;
    int wi = (g * p.oc_tiles + oct) * p.rows * OC_TILE;
    for (int r = 0; r < p.rows; ++r) {
        vec4 b[PX];
        [[unroll]] for (int j = 0; j < PX; ++j) b[j] = cols[ci + j * ls];
        [[unroll]] for (int c = 0; c < OC_TILE; ++c) {
            const vec4 wv = w[wi + c];
            [[unroll]] for (int j = 0; j < PX; ++j) acc[c * PX + j] += dot(wv, b[j]);
        }
        ci += p.tile_px;
        wi += OC_TILE;
    }

    const int oc0 = oct * OC_TILE;
    [[unroll]] for (int j = 0; j < PX; ++j) {
        const int pix = (p.tile0 + tile) * p.tile_px + lid + j * ls;
        if (pix >= p.total_pixels) break;
        const int n = pix / p.out_hw;
        const int q = pix - n * p.out_hw;
        const int y_base = ((n * p.groups + g) * p.cout_g + oc0) * p.out_hw + q;
        [[unroll]] for (int c = 0; c < OC_TILE; ++c) {
            if (oc0 + c >= p.cout_g) break;
            const float v = acc[c * PX + j] + bias[(g * p.oc_tiles + oct) * OC_TILE + c];
            y[y_base + c * p.out_hw] = activate(v, p.act_a, p.act_b);
        }
    }
}
