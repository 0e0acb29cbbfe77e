#version 450
// Deformable convolution, stage 1 of 3 (host code: vkconv/deform_conv.py): repack the NCHW input
// into channel blocks of 4, x4[n][block][h][w] = vec4 of the block's channels, zero where a block
// has fewer than 4 channels.  Blocks never straddle a conv group or an offset group, so the
// sampling stage blends 4 channels with one set of bilinear weights and one vec4 load per corner.
layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer Input { float x[]; };
// int tables; this stage reads block_src[block] (first input channel) and block_len[block] (0..4)
layout(std430, binding = 1) readonly buffer Tables { int tables[]; };
layout(std430, binding = 2) writeonly buffer Packed { vec4 x4[]; };

layout(push_constant) uniform Params {
    int channels, hw, blocks;       // input channels, H * W, blocks per image
    int block_src, block_len;       // offsets of the two tables inside `tables`
} p;

void main()
{
    const int blk = int(gl_WorkGroupID.y);
    const int n = int(gl_WorkGroupID.z);
    const int c0 = tables[p.block_src + blk];
    const int len = tables[p.block_len + blk];
    // Grid-stride loop: the host caps the x dimension at maxComputeWorkGroupCount.
    const int stride = int(gl_NumWorkGroups.x * gl_WorkGroupSize.x);
    for (int pix = int(gl_GlobalInvocationID.x); pix < p.hw; pix += stride) {
        const int base = (n * p.channels + c0) * p.hw + pix;
        vec4 v = vec4(0.0);
        for (int j = 0; j < 4; ++j) {
            // len comes from a host-built table; the clamp keeps the load inside x even so.
            float s = x[base + min(j, max(len - 1, 0)) * p.hw];
            v[j] = j < len ? s : 0.0;
        }
        x4[(n * p.blocks + blk) * p.hw + pix] = v;
    }
}
