#version 450
// Deformable convolution, stage 2 of 3 (host code: vkconv/ops/deform_conv.py): bilinear "im2col".
// One invocation handles one (offset group, kernel tap) and 4 consecutive output pixels of one
// image: it reads the 4 (dy, dx) pairs and DCNv2 mask values once and computes the 4 points'
// corners and weights once (bilinear.glsl, torchvision's boundary rule), then, per 4-channel block
// of the offset group, fetches 4 corners x 4 pixels from the zero-bordered packed input, blends
// them and writes each channel's 4 samples as one vec4.
//
// Columns layout, one chunk of `images` images x `pixels` pixels (from pixel q0 of each image), in
// tiles of PB = 4 * pb4 pixels (the GEMM's pixel tile; the last tile's padding samples 0):
// cols[image][group][tile][tap * C_in/g + channel in group][pb4] as vec4 over 4 consecutive
// pixels.  Tile-major, so the 8 invocations of a SIMD group fill whole cache lines of one small
// block (row-major columns, one long row per channel, made the stores 2x slower on lavapipe).  It
// is the operand of conv_rows.comp as set up by vkconv.ops.conv.kernels.RowsKernel.tiled_operand: a plain
// GEMM with the weights reordered to [C_out][tap][C_in/g].
//
// Where the cost goes on lavapipe (Mesa 22.3, 64 channels, 3x3, 56x56): the column stores are
// about half of it (every storage-buffer store is a per-lane, per-component loop there), the
// corner fetches a quarter, the offsets and bilinear weights the rest.
//
// NaN: a NaN dy or dx makes the sample NaN (it propagates to every output channel of the conv
// groups that read this offset group); +-Inf moves the point outside the image, so it samples 0.
//
// variant: deform_conv_sample -DTEXEL=1
// variant: deform_conv_sample_ssbo
#extension GL_EXT_samplerless_texture_functions : require  // textureBuffer: SPIR-V 1.6 forbids sampled Buffer images
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#include "bilinear.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize
// OG_BLOCKS > 0: the offset group's 4-channel blocks (CIN_OG channels) as constants, so the block
// loop unrolls (lavapipe then runs a short block loop without its per-iteration masking: 1.1x
// faster sampling with 4 blocks); 0: both from push constants.
layout(constant_id = 4) const int OG_BLOCKS = 0;
layout(constant_id = 5) const int CIN_OG = 0;
// The output size is a multiple of 4: the offsets and mask of 4 pixels are one vec4 (the host then
// binds them as RGBA32F views).
layout(constant_id = 6) const bool QUAD_OFFSETS = false;

#ifdef TEXEL
layout(binding = 0) uniform textureBuffer x4;      // RGBA32F view of [n][og][(h+2)*(w+2)][og_blocks]
layout(binding = 1) uniform textureBuffer offset;  // R32F views, RGBA32F with QUAD_OFFSETS
layout(binding = 2) uniform textureBuffer mask;
#define LOAD_X(i) texelFetch(x4, i)
#define LOAD_OFFSET(i) texelFetch(offset, i).x
#define LOAD_MASK(i) texelFetch(mask, i).x
#define LOAD_OFFSET4(i) texelFetch(offset, (i) >> 2)
#define LOAD_MASK4(i) texelFetch(mask, (i) >> 2)
#else
layout(std430, binding = 0) readonly buffer Packed { vec4 x4[]; };  // deform_conv_pack.comp
layout(std430, binding = 1) readonly buffer Offset { float offset[]; };
layout(std430, binding = 2) readonly buffer Mask { float mask[]; };
#define LOAD_X(i) x4[i]
#define LOAD_OFFSET(i) offset[i]
#define LOAD_MASK(i) mask[i]
#define LOAD_OFFSET4(i) vec4(offset[i], offset[(i) + 1], offset[(i) + 2], offset[(i) + 3])
#define LOAD_MASK4(i) vec4(mask[i], mask[(i) + 1], mask[(i) + 2], mask[(i) + 3])
#endif
layout(std430, binding = 3) writeonly buffer Columns { vec4 cols[]; };

layout(push_constant) uniform Params {
    int in_h, in_w, out_w, out_hw;
    int k_w, taps, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
    int offset_groups, cin_og, og_blocks;  // channels and packed blocks per offset group
    int cin_g, groups;
    int n0, q0, images, pixels;            // the chunk
    int tiles, pb4;                        // GEMM pixel tiles per image, vec4s per tile row
    int has_mask;
} p;

void main()
{
    // Workgroups run over (pixel group, offset group, tap) with the tap fastest: neighbouring
    // workgroups read the same neighbourhood of the input and fill the same column tiles (on
    // lavapipe 1.2x faster than all pixels of one tap, then the next tap, and with 4 offset
    // groups another 1.15x faster than one offset group after the other).
    const int wg = flat_group();
    const int og_tap = wg / p.taps;
    const int tap = wg - og_tap * p.taps;
    const int pixel_group = og_tap / p.offset_groups;
    const int og = og_tap - pixel_group * p.offset_groups;
    const int id = pixel_group * int(gl_WorkGroupSize.x) + int(gl_LocalInvocationID.x);
    const int quads = p.tiles * p.pb4;
    if (id >= p.images * quads) return;
    const int image = id / quads;
    const int quad = id - image * quads;
    const int tile = quad / p.pb4;
    const int ky = tap / p.k_w, kx = tap - ky * p.k_w;
    const int n = p.n0 + image;

    // The 4 points.  Pixels past the chunk (row padding) are placed outside the image: they
    // sample 0 and read offsets from the chunk's last pixel (or its quad), which always exists.
    const int q_first = p.q0 + quad * 4;
    const int q_last = p.q0 + p.pixels - 1;
    const int om = (n * p.offset_groups + og) * p.taps + tap;  // offset[n][og][tap][2], mask[n][og][tap]
    vec4 dy4, dx4, m4;
    if (QUAD_OFFSETS) {
        // q0 and the output size are multiples of 4, so this quad lies inside one offset plane.
        const int qa = min(q_first, q_last & ~3);
        dy4 = LOAD_OFFSET4(2 * om * p.out_hw + qa);
        dx4 = LOAD_OFFSET4((2 * om + 1) * p.out_hw + qa);
        m4 = p.has_mask != 0 ? LOAD_MASK4(om * p.out_hw + qa) : vec4(1.0);
    } else {
        [[unroll]] for (int j = 0; j < 4; ++j) {
            const int q = min(q_first + j, q_last);
            dy4[j] = LOAD_OFFSET(2 * om * p.out_hw + q);
            dx4[j] = LOAD_OFFSET((2 * om + 1) * p.out_hw + q);
            m4[j] = p.has_mask != 0 ? LOAD_MASK(om * p.out_hw + q) : 1.0;
        }
    }
    int oy = q_first / p.out_w;
    int ox = q_first - oy * p.out_w;
    Bilinear s[4];
    bool nan_point[4];
    [[unroll]] for (int j = 0; j < 4; ++j) {
        const bool inside = q_first + j <= q_last;
        float y = float(oy * p.stride_h - p.pad_h + ky * p.dil_h) + dy4[j];
        float x = float(ox * p.stride_w - p.pad_w + kx * p.dil_w) + dx4[j];
        y = inside ? y : -2.0;
        x = inside ? x : -2.0;
        s[j] = bilinear_corners(y, x, p.in_h, p.in_w);
        nan_point[j] = isnan(y) || isnan(x);
        // Next pixel: one step along the row, wrapping to the next row (no division).
        ++ox;
        const bool wrap = ox == p.out_w;
        ox = wrap ? 0 : ox;
        oy += wrap ? 1 : 0;
    }

    // Channel og * cin_og is channel ci of conv group g; the block loop advances (g, ci) one
    // channel at a time, so blocks may straddle conv groups.
    const int blocks = OG_BLOCKS > 0 ? OG_BLOCKS : p.og_blocks;
    const int cin_og = OG_BLOCKS > 0 ? CIN_OG : p.cin_og;
    const int c0 = og * cin_og;
    int g = c0 / p.cin_g;
    int ci = c0 - g * p.cin_g;
    const int k_rows = p.taps * p.cin_g;
    const int in_phw = (p.in_h + 2) * (p.in_w + 2);
    int xb = (n * p.offset_groups + og) * blocks * in_phw;
    [[unroll]] for (int blk = 0; blk < blocks; ++blk) {
        vec4 v[4];
        [[unroll]] for (int j = 0; j < 4; ++j) {
            const ivec4 idx = s[j].idx * blocks + xb;
            const vec4 blend = LOAD_X(idx.x) * s[j].wt.x + LOAD_X(idx.y) * s[j].wt.y
                               + LOAD_X(idx.z) * s[j].wt.z + LOAD_X(idx.w) * s[j].wt.w;
            // The mask scales the finished sample (as torchvision does), so an Inf mask on an
            // outside point gives 0 * Inf = NaN there and nowhere else.
            v[j] = (nan_point[j] ? vec4(uintBitsToFloat(0x7fc00000u)) : blend) * m4[j];
        }
        [[unroll]] for (int c = 0; c < 4; ++c) {
            if (blk * 4 + c >= cin_og) break;  // the same for the whole workgroup
            const int block = (image * p.groups + g) * p.tiles + tile;
            cols[(block * k_rows + tap * p.cin_g + ci) * p.pb4 + quad - tile * p.pb4] =
                vec4(v[0][c], v[1][c], v[2][c], v[3][c]);
            ++ci;
            const bool next_group = ci == p.cin_g;
            ci = next_group ? 0 : ci;
            g += next_group ? 1 : 0;
        }
        ++xb;
    }
}
