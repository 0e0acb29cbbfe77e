#version 450
// Direct convolution, NCHW float32 (1-D convs arrive as H = 1), any groups / stride / dilation /
// asymmetric pads, bias and fused activation. Host code: vkconv/conv.py.
//
// One invocation computes a 4 output channels x 4 output pixels register tile: weights are
// repacked by the host as vec4 over output channels, so each kernel tap costs one vec4 weight load
// and four scalar input loads for 16 FMAs, with no shared memory (lavapipe runs barriers slowly).
#extension GL_GOOGLE_include_directive : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer Input { float x[]; };
// [groups][oc_blocks_per_group][cin_g * k_h * k_w] vec4, output channels zero-padded to 4
layout(std430, binding = 1) readonly buffer Weight { vec4 w[]; };
// [groups][oc_blocks_per_group] vec4, zero-padded like the weights
layout(std430, binding = 2) readonly buffer Bias { vec4 bias[]; };
layout(std430, binding = 3) writeonly buffer Output { float y[]; };

layout(push_constant) uniform Params {
    int cin_g, in_h, in_w;
    int cout_g, out_h, out_w;
    int k_h, k_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
    int groups, oc_blocks;
    float act_a, act_b;
} p;

void main()
{
    const int out_hw = p.out_h * p.out_w;
    const int p0 = int(gl_GlobalInvocationID.x) * 4;
    if (p0 >= out_hw) return;
    const int n = int(gl_GlobalInvocationID.z);
    const int g = int(gl_GlobalInvocationID.y) / p.oc_blocks;
    const int ocb = int(gl_GlobalInvocationID.y) % p.oc_blocks;

    ivec4 iy0, ix0;
    for (int j = 0; j < 4; ++j) {
        // Pixels past the end repeat the last one so every load stays in bounds.
        int q = min(p0 + j, out_hw - 1);
        iy0[j] = (q / p.out_w) * p.stride_h - p.pad_h;
        ix0[j] = (q % p.out_w) * p.stride_w - p.pad_w;
    }

    const int in_hw = p.in_h * p.in_w;
    int x_base = (n * p.groups + g) * p.cin_g * in_hw;
    int wi = (g * p.oc_blocks + ocb) * p.cin_g * p.k_h * p.k_w;
    vec4 acc[4] = vec4[4](vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));

    for (int ci = 0; ci < p.cin_g; ++ci) {
        for (int ky = 0; ky < p.k_h; ++ky) {
            ivec4 iy = iy0 + ky * p.dil_h;
            bvec4 row_ok = lessThan(uvec4(iy), uvec4(p.in_h));
            ivec4 row = x_base + iy * p.in_w;
            for (int kx = 0; kx < p.k_w; ++kx) {
                ivec4 ix = ix0 + kx * p.dil_w;
                vec4 wv = w[wi++];
                for (int j = 0; j < 4; ++j) {
                    bool ok = row_ok[j] && uint(ix[j]) < uint(p.in_w);
                    // Load from a clamped address, then select: no speculative out-of-bounds read,
                    // and a padded tap is an exact 0 even when x[x_base] is Inf or NaN.
                    float v = x[ok ? row[j] + ix[j] : x_base];
                    acc[j] += (ok ? v : 0.0) * wv;
                }
            }
        }
        x_base += in_hw;
    }

    const vec4 b = bias[g * p.oc_blocks + ocb];
    const int oc0 = ocb * 4;
    const int y_base = ((n * p.groups + g) * p.cout_g + oc0) * out_hw;
    for (int j = 0; j < 4; ++j) {
        if (p0 + j >= out_hw) break;
        vec4 r = activate4(acc[j] + b, p.act_a, p.act_b);
        for (int c = 0; c < 4; ++c) {
            if (oc0 + c < p.cout_g) y[y_base + c * out_hw + p0 + j] = r[c];
        }
    }
}
