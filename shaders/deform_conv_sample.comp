#version 450
// Deformable convolution, stage 2 of 3 (host code: vkconv/deform_conv.py): bilinear "im2col".
// One invocation handles one (offset group, kernel tap, output pixel): it reads (dy, dx) and the
// DCNv2 mask once, computes the four corners once (bilinear.glsl, torchvision's boundary rule),
// then writes the masked sample of every 4-channel block of that offset group.
//
// Columns layout, per chunk of pixel tiles: cols[group][tile][block_in_group * taps + tap][tile_px]
// as vec4 over the block's 4 channels: the GEMM stage streams one tile's rows contiguously.
//
// NaN: a NaN dy or dx makes the sample NaN (it propagates to every output channel of the conv
// groups that read this offset group); +-Inf moves the point outside the image, so it samples 0.
#extension GL_GOOGLE_include_directive : require
#include "bilinear.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer Packed { vec4 x4[]; };  // [n][block][h][w]
layout(std430, binding = 1) readonly buffer Offset { float offset[]; };
layout(std430, binding = 2) readonly buffer Mask { float mask[]; };
// int tables; this stage reads og_start[offset_groups + 1]: offset group og samples blocks
// og_start[og] .. og_start[og + 1] - 1
layout(std430, binding = 3) readonly buffer Tables { int tables[]; };
layout(std430, binding = 4) writeonly buffer Columns { vec4 cols[]; };

layout(push_constant) uniform Params {
    int in_h, in_w, out_h, out_w;
    int k_w, taps, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
    int offset_groups, blocks, group_blocks;  // blocks per image, blocks per conv group
    int pixel0, chunk_pixels;                 // first pixel of this chunk, pixels in it
    int tile_px, tiles;                       // pixels per GEMM tile, tiles in this chunk
    int has_mask;
} p;

void main()
{
    const int local = int(gl_GlobalInvocationID.x);
    const int pix = p.pixel0 + local;
    if (local >= p.chunk_pixels) return;  // the host clips the last chunk at N * oH * oW
    const int tap = int(gl_WorkGroupID.y);
    const int og = int(gl_WorkGroupID.z);

    const int out_hw = p.out_h * p.out_w;
    const int n = pix / out_hw;
    const int q = pix - n * out_hw;
    const int oy = q / p.out_w, ox = q - oy * p.out_w;
    const int ky = tap / p.k_w, kx = tap - ky * p.k_w;

    // offset[n][og][tap][2][oH][oW], mask[n][og][tap][oH][oW]
    const int om = (n * p.offset_groups + og) * p.taps + tap;
    const float dy = offset[(2 * om) * out_hw + q];
    const float dx = offset[(2 * om + 1) * out_hw + q];
    const float m = p.has_mask != 0 ? mask[om * out_hw + q] : 1.0;
    const float y = float(oy * p.stride_h - p.pad_h + ky * p.dil_h) + dy;
    const float x = float(ox * p.stride_w - p.pad_w + kx * p.dil_w) + dx;
    const Bilinear s = bilinear_corners(y, x, p.in_h, p.in_w);
    const bool nan_point = isnan(y) || isnan(x);

    const int tile = local / p.tile_px;
    const int tile_px = local - tile * p.tile_px;
    const int in_hw = p.in_h * p.in_w;
    const int rows = p.group_blocks * p.taps;
    const int end = tables[og + 1];
    for (int blk = tables[og]; blk < end; ++blk) {
        const int g = blk / p.group_blocks;
        const int base = (n * p.blocks + blk) * in_hw;
        vec4 c0 = x4[base + s.idx.x], c1 = x4[base + s.idx.y];
        vec4 c2 = x4[base + s.idx.z], c3 = x4[base + s.idx.w];
        vec4 v = (s.ok.x ? c0 : vec4(0.0)) * s.wt.x + (s.ok.y ? c1 : vec4(0.0)) * s.wt.y
               + (s.ok.z ? c2 : vec4(0.0)) * s.wt.z + (s.ok.w ? c3 : vec4(0.0)) * s.wt.w;
        // The mask scales the finished sample (as torchvision does), so an Inf mask on an
        // outside point gives 0 * Inf = NaN there and nowhere else.
        v = (nan_point ? vec4(uintBitsToFloat(0x7fc00000u)) : v) * m;
        const int row = (blk - g * p.group_blocks) * p.taps + tap;
        cols[((g * p.tiles + tile) * rows + row) * p.tile_px + tile_px] = v;
    }
}
