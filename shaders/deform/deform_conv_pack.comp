#version 450
#extension GL_GOOGLE_include_directive : require
// Deformable convolution, stage 1 of 3 (host code: vkconv/ops/deform_conv.py): repack the NCHW input
// into blocks of 4 channels of one offset group inside a one-pixel zero border,
// x4[n][offset group][(h + 2) * (w + 2)][block] = vec4 of the block's channels at padded pixel
// (y + 1, x + 1), zero on the border and where the offset group's last block has fewer than 4
// channels.  The sampling stage then blends 4 channels with one set of bilinear weights and one
// vec4 fetch per corner, a point's successive blocks share cache lines (1.1x faster sampling on
// lavapipe than [block][h * w]), and a corner just outside the image reads the zero border instead
// of being tested and masked (bilinear.glsl).
//
// variant: deform_conv_pack -DTEXEL=1
// variant: deform_conv_pack_ssbo
#extension GL_EXT_samplerless_texture_functions : require  // textureBuffer: SPIR-V 1.6 forbids sampled Buffer images
layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"

#ifdef TEXEL
layout(binding = 0) uniform textureBuffer x;  // R32F view
#define LOAD_X(i) texelFetch(x, i).x
#else
layout(std430, binding = 0) readonly buffer Input { float x[]; };
#define LOAD_X(i) x[i]
#endif
layout(std430, binding = 1) writeonly buffer Packed { vec4 x4[]; };

layout(push_constant) uniform Params {
    int channels, h, w, offset_groups;  // input channels and size
    int cin_og, og_blocks;              // channels and 4-channel blocks per offset group
} p;

void main()
{
    // Workgroup y: offset group, z: image.  An invocation packs every block of one padded pixel,
    // so a SIMD group fills whole cache lines.
    const int og = int(gl_WorkGroupID.y);
    const int n = int(gl_WorkGroupID.z);
    const int hw = p.h * p.w, pw = p.w + 2, phw = (p.h + 2) * pw;
    const int src = (n * p.channels + og * p.cin_og) * hw;
    const int dst = (n * p.offset_groups + og) * p.og_blocks * phw;
    // Grid-stride loop: the host caps the x dimension at maxComputeWorkGroupCount.
    const int stride = int(loop_step());
    for (int q = int(loop_first()); q < phw; q += stride) {
        const int row = q / pw - 1, col = q - (row + 1) * pw - 1;
        const bool inside = row >= 0 && row < p.h && col >= 0 && col < p.w;
        // Border pixels read pixel 0 (always there) and store zeros: no out-of-bounds read.
        const int pixel = inside ? row * p.w + col : 0;
        for (int blk = 0; blk < p.og_blocks; ++blk) {
            const int len = min(4, p.cin_og - blk * 4);
            vec4 v;
            for (int j = 0; j < 4; ++j) {
                const float s = LOAD_X(src + (blk * 4 + min(j, len - 1)) * hw + pixel);
                v[j] = inside && j < len ? s : 0.0;
            }
            x4[dst + q * p.og_blocks + blk] = v;
        }
    }
}
