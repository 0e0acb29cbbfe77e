#version 450
// Deformable convolution, sampling and GEMM in one stage (host code: vkconv/ops/deform_conv.py,
// the "fused" method; stage 1 is still deform_conv_pack.comp).  No column buffer: the lanes of a
// subgroup share a tile of PIXELS consecutive output pixels of one image and each holds its own
// CB vec4s of output channels (one chunk of SG * CB vec4s per subgroup); per (tap, offset group)
// lane l sets up the bilinear corners of pixels l, l + SG, ... only, per 4-channel block samples
// them (4 corner fetches each) and hands the samples to the other lanes by subgroup shuffles, which
// multiply them by their weights.  Each sample is thus computed once per chunk of output channels
// (once in all at 64 output channels) and never stored: on lavapipe every storage-buffer store is a
// per-lane loop, and the column stores were the largest part of the columns method's sampling
// stage; a shuffle by a constant lane is a register permute there (the sparse GEMM's trick,
// shaders/sparse/sparse_gemm.comp).
//
// Sums run tap by tap, then channel by channel (offset groups in order), as the columns method's
// GEMM rows (row = tap * C_in + channel); bias and activation are fused into the store.  Conv
// groups: 1 only (the host falls back to the columns method otherwise).
//
// Buffers: x4 packed input [n][og][(h+2)(w+2)][og_blocks] vec4 (deform_conv_pack.comp); offset
// [n][og][tap][2][oh*ow]; mask [n][og][tap][oh*ow]; weights [tap][og][og_blocks * 4][coutp] vec4
// (channel og * cin_og + 4 * block + j at row (og * og_blocks + block) * 4 + j, zero rows where a
// block has fewer than 4 channels, zero columns past C_out) followed by the bias row [coutp];
// y [n][C_out][oh*ow].
// NaN / Inf offsets as in deform_conv_sample.comp (a NaN point samples NaN, an infinite one 0).
//
// variant: deform_conv_fused -DTEXEL=1 --target-env=vulkan1.1
// variant: deform_conv_fused_ssbo --target-env=vulkan1.1
#extension GL_EXT_samplerless_texture_functions : require  // textureBuffer: SPIR-V 1.6 forbids sampled Buffer images
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#include "activation.glsl"
#include "bilinear.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize
layout(constant_id = 4) const int SG = 8;       // the subgroup size
layout(constant_id = 5) const int SLOTS = 2;    // pixels per lane: PIXELS = SLOTS * SG per subgroup
layout(constant_id = 6) const int CB = 2;       // vec4s of output channels per lane
layout(constant_id = 7) const int OG_BLOCKS = 0;  // > 0: the 4-channel blocks per offset group (the loop unrolls)

#ifdef TEXEL
layout(binding = 0) uniform textureBuffer x4;      // RGBA32F
layout(binding = 1) uniform textureBuffer offset;  // R32F
layout(binding = 2) uniform textureBuffer mask;    // R32F
layout(binding = 3) uniform textureBuffer w;       // RGBA32F
#define LOAD_X(i) texelFetch(x4, i)
#define LOAD_OFFSET(i) texelFetch(offset, i).x
#define LOAD_MASK(i) texelFetch(mask, i).x
#define W(i) texelFetch(w, i)
#else
layout(std430, binding = 0) readonly buffer Packed { vec4 x4[]; };
layout(std430, binding = 1) readonly buffer Offset { float offset[]; };
layout(std430, binding = 2) readonly buffer Mask { float mask[]; };
layout(std430, binding = 3) readonly buffer Weight { vec4 w[]; };
#define LOAD_X(i) x4[i]
#define LOAD_OFFSET(i) offset[i]
#define LOAD_MASK(i) mask[i]
#define W(i) w[i]
#endif
layout(std430, binding = 4) writeonly buffer Output { float y[]; };

layout(push_constant) uniform Params {
    int in_h, in_w, out_w, out_hw;
    int k_w, taps, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
    int offset_groups, og_blocks, cout, coutp;
    int chunks, tiles, images, has_mask;  // chunks of SG * CB vec4s of C_out; pixel tiles per image
    float act_a, act_b;
} p;

void main()
{
    const int PIXELS = SLOTS * SG;
    const int lane = int(gl_SubgroupInvocationID);
    const int task = flat_group() * int(gl_NumSubgroups) + int(gl_SubgroupID);
    // (image, pixel tile, chunk), the chunk fastest: the chunks of one tile read the same input
    const int tile_chunk = task / p.chunks;
    if (tile_chunk >= p.images * p.tiles) return;  // the whole subgroup
    const int chunk = task - tile_chunk * p.chunks;
    const int n = tile_chunk / p.tiles;
    const int q_first = (tile_chunk - n * p.tiles) * PIXELS;
    const int cb = (chunk * SG + lane) * CB;

    // This lane's pixels q_first + k * SG + lane: the top-left of their sampling windows, or
    // outside the chunk's image (q past the output: they sample 0 and read the last pixel's offsets)
    int own_q[SLOTS];
    vec2 origin[SLOTS];
    [[unroll]] for (int k = 0; k < SLOTS; ++k) {
        const int q = q_first + k * SG + lane;
        own_q[k] = min(q, p.out_hw - 1);
        const int oy = own_q[k] / p.out_w;
        const int ox = own_q[k] - oy * p.out_w;
        origin[k] = q < p.out_hw ? vec2(oy * p.stride_h - p.pad_h, ox * p.stride_w - p.pad_w) : vec2(-1.0e9);
    }

    const int blocks = OG_BLOCKS > 0 ? OG_BLOCKS : p.og_blocks;
    const int in_phw = (p.in_h + 2) * (p.in_w + 2);
    vec4 acc[PIXELS * CB];
    [[unroll]] for (int i = 0; i < PIXELS * CB; ++i) acc[i] = vec4(0.0);
    int wrow = cb;  // weights row (tap, og, block, j) * coutp + this lane's columns
    int tap = 0;
    do {
        const int ky = tap / p.k_w, kx = tap - ky * p.k_w;
        const vec2 at = vec2(ky * p.dil_h, kx * p.dil_w);
        int og = 0;
        do {
            // the bilinear corners and mask of this lane's pixels, for this tap and offset group
            const int om = (n * p.offset_groups + og) * p.taps + tap;
            Bilinear s[SLOTS];
            float m[SLOTS];
            bool nan_point[SLOTS];
            [[unroll]] for (int k = 0; k < SLOTS; ++k) {
                const float y = origin[k].x + at.x + LOAD_OFFSET(2 * om * p.out_hw + own_q[k]);
                const float x = origin[k].y + at.y + LOAD_OFFSET((2 * om + 1) * p.out_hw + own_q[k]);
                s[k] = bilinear_corners(y, x, p.in_h, p.in_w);
                nan_point[k] = isnan(y) || isnan(x);
                m[k] = p.has_mask != 0 ? LOAD_MASK(om * p.out_hw + own_q[k]) : 1.0;
            }
            int xb = (n * p.offset_groups + og) * blocks * in_phw;
            int blk = 0;
            do {
                // this lane's samples of 4 channels, then every pixel's from the lane that owns it
                vec4 xo[SLOTS];
                [[unroll]] for (int k = 0; k < SLOTS; ++k) {
                    const ivec4 idx = s[k].idx * blocks + xb;
                    const vec4 blend = LOAD_X(idx.x) * s[k].wt.x + LOAD_X(idx.y) * s[k].wt.y
                                       + LOAD_X(idx.z) * s[k].wt.z + LOAD_X(idx.w) * s[k].wt.w;
                    // the mask scales the finished sample (torchvision's order: Inf * 0 = NaN)
                    xo[k] = (nan_point[k] ? vec4(uintBitsToFloat(0x7fc00000u)) : blend) * m[k];
                }
                vec4 xv[PIXELS];
                [[unroll]] for (int i = 0; i < PIXELS; ++i) xv[i] = subgroupShuffle(xo[i / SG], i % SG);
                vec4 wv[4 * CB];
                [[unroll]] for (int j = 0; j < 4; ++j)
                    [[unroll]] for (int c = 0; c < CB; ++c) wv[j * CB + c] = W(wrow + j * p.coutp + c);
                wrow += 4 * p.coutp;
                [[unroll]] for (int i = 0; i < PIXELS; ++i) {
                    [[unroll]] for (int c = 0; c < CB; ++c) {
                        vec4 a = acc[i * CB + c];
                        [[unroll]] for (int j = 0; j < 4; ++j) a += xv[i][j] * wv[j * CB + c];
                        acc[i * CB + c] = a;
                    }
                }
                ++xb;
            } while (++blk < blocks);
        } while (++og < p.offset_groups);
    } while (++tap < p.taps);

    const int bias = p.taps * p.offset_groups * blocks * 4 * p.coutp + cb;
    const int out0 = n * p.cout * p.out_hw + q_first;
    [[unroll]] for (int c = 0; c < CB; ++c) {
        const vec4 b = W(bias + c);
        [[unroll]] for (int i = 0; i < PIXELS; ++i) {
            if (q_first + i >= p.out_hw) break;
            const vec4 v = activate4(acc[i * CB + c] + b, p.act_a, p.act_b);
            [[unroll]] for (int k = 0; k < 4; ++k) {
                const int co = 4 * (cb + c) + k;
                if (co < p.cout) y[out0 + co * p.out_hw + i] = v[k];
            }
        }
    }
}
