#version 450
// Deformable convolution, stage 1 of 3 (host code: vkconv/deform_conv.py): repack the NCHW input
// into blocks of 4 channels of one offset group, x4 = vec4 of the block's channels, zero where the
// offset group's last block has fewer than 4: x4[n][offset group][h * w][block].  The sampling
// stage then blends 4 channels with one set of bilinear weights and one vec4 fetch per corner, and
// a point's successive blocks share cache lines (1.1x faster sampling on lavapipe than
// [block][h * w]).
//
// variant: deform_conv_pack -DTEXEL=1
// variant: deform_conv_pack_ssbo
layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

#ifdef TEXEL
layout(binding = 0) uniform samplerBuffer x;  // R32F view
#define LOAD_X(i) texelFetch(x, i).x
#else
layout(std430, binding = 0) readonly buffer Input { float x[]; };
#define LOAD_X(i) x[i]
#endif
layout(std430, binding = 1) writeonly buffer Packed { vec4 x4[]; };

layout(push_constant) uniform Params {
    int channels, hw, offset_groups;  // input channels, H * W
    int cin_og, og_blocks;            // channels and 4-channel blocks per offset group
} p;

void main()
{
    // Workgroup y: offset group, z: image.  An invocation packs every block of one pixel, so a
    // SIMD group fills whole cache lines.
    const int og = int(gl_WorkGroupID.y);
    const int n = int(gl_WorkGroupID.z);
    const int src = (n * p.channels + og * p.cin_og) * p.hw;
    const int dst = (n * p.offset_groups + og) * p.og_blocks * p.hw;
    // Grid-stride loop: the host caps the x dimension at maxComputeWorkGroupCount.
    const int stride = int(gl_NumWorkGroups.x * gl_WorkGroupSize.x);
    for (int q = int(gl_GlobalInvocationID.x); q < p.hw; q += stride) {
        for (int blk = 0; blk < p.og_blocks; ++blk) {
            const int len = min(4, p.cin_og - blk * 4);
            vec4 v;
            for (int j = 0; j < 4; ++j) {
                // Clamped address, then select: never an out-of-bounds read.
                const float s = LOAD_X(src + (blk * 4 + min(j, len - 1)) * p.hw + q);
                v[j] = j < len ? s : 0.0;
            }
            x4[dst + q * p.og_blocks + blk] = v;
        }
    }
}
