#version 450
// Direct convolution ("direct" path), NC[D][H]W float32 of any rank 1..3 (1-D and 2-D convs
// arrive with unit depth/height), any groups / stride / dilation / asymmetric pads, bias and fused
// activation. It reads the input in place (no padded copy), so it is the fallback when the padded
// copy the faster kernels need would not fit the device's buffer limits. Host code:
// vkconv/ops/conv/kernels.py.
//
// One invocation computes a 4 output channels x 4 output pixels register tile: weights are
// repacked by the host as vec4 over output channels, so each kernel tap costs one vec4 weight load
// and four scalar input loads for 16 FMAs, with no shared memory (lavapipe runs barriers slowly).
#extension GL_GOOGLE_include_directive : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize

layout(std430, binding = 0) readonly buffer Input { float x[]; };
// [groups][oc_blocks][cin_g * k_d * k_h * k_w] vec4, output channels zero-padded to 4
layout(std430, binding = 1) readonly buffer Weight { vec4 w[]; };
// [groups][oc_blocks] vec4, zero-padded like the weights
layout(std430, binding = 2) readonly buffer Bias { vec4 bias[]; };
layout(std430, binding = 3) writeonly buffer Output { float y[]; };

layout(push_constant) uniform Params {
    int cin_g, in_d, in_h, in_w;
    int cout_g, out_d, out_h, out_w;
    int k_d, k_h, k_w, s_d, s_h, s_w, p_d, p_h, p_w, d_d, d_h, d_w;
    int groups, oc_blocks;
    float act_a, act_b;
} p;

void main()
{
    const int out_hw = p.out_h * p.out_w;
    const int out_size = p.out_d * out_hw;
    const int p0 = flat_invocation() * 4;
    if (p0 >= out_size) return;
    const int ocb = int(gl_WorkGroupID.z) % p.oc_blocks;
    const int ng = int(gl_WorkGroupID.z) / p.oc_blocks;  // n * groups + g
    const int g = ng % p.groups;

    ivec4 iz0, iy0, ix0;
    for (int j = 0; j < 4; ++j) {
        // Pixels past the end repeat the last one so every load stays in bounds.
        const int q = min(p0 + j, out_size - 1);
        iz0[j] = (q / out_hw) * p.s_d - p.p_d;
        iy0[j] = ((q / p.out_w) % p.out_h) * p.s_h - p.p_h;
        ix0[j] = (q % p.out_w) * p.s_w - p.p_w;
    }

    const int in_hw = p.in_h * p.in_w;
    const int in_size = p.in_d * in_hw;
    int x_base = ng * p.cin_g * in_size;
    int wi = (g * p.oc_blocks + ocb) * p.cin_g * p.k_d * p.k_h * p.k_w;
    vec4 acc[4] = vec4[4](vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));

    // One flat loop over every (input channel, kz, ky, kx) tap with wrapping counters: lavapipe
    // masks every value written inside nested runtime loops, which made the nest 2x slower.
    const int taps = p.cin_g * p.k_d * p.k_h * p.k_w;
    int kx = 0, ky = 0, kz = 0;
    for (int t = 0; t < taps; ++t) {
        const ivec4 iz = iz0 + kz * p.d_d;
        const ivec4 iy = iy0 + ky * p.d_h;
        const ivec4 ix = ix0 + kx * p.d_w;
        const bvec4 ok = bvec4(uvec4(lessThan(uvec4(iz), uvec4(p.in_d))) & uvec4(lessThan(uvec4(iy), uvec4(p.in_h)))
                               & uvec4(lessThan(uvec4(ix), uvec4(p.in_w))));
        const ivec4 at = x_base + iz * in_hw + iy * p.in_w + ix;
        const vec4 wv = w[wi++];
        for (int j = 0; j < 4; ++j) {
            // Load from a clamped address, then select: no out-of-bounds read, and a padded tap
            // is an exact 0 even when x[x_base] is Inf or NaN.
            const float v = x[ok[j] ? at[j] : x_base];
            acc[j] += (ok[j] ? v : 0.0) * wv;
        }
        ++kx;
        const bool wrap_x = kx == p.k_w;
        kx = wrap_x ? 0 : kx;
        ky += wrap_x ? 1 : 0;
        const bool wrap_y = ky == p.k_h;
        ky = wrap_y ? 0 : ky;
        kz += wrap_y ? 1 : 0;
        const bool wrap_z = kz == p.k_d;
        kz = wrap_z ? 0 : kz;
        x_base += wrap_z ? in_size : 0;
    }

    const vec4 b = bias[g * p.oc_blocks + ocb];
    const int oc0 = ocb * 4;
    const int y_base = (ng * p.cout_g + oc0) * out_size;
    for (int j = 0; j < 4; ++j) {
        if (p0 + j >= out_size) break;
        const vec4 r = activate4(acc[j] + b, p.act_a, p.act_b);
        for (int c = 0; c < 4; ++c) {
            if (oc0 + c < p.cout_g) y[y_base + c * out_size + p0 + j] = r[c];
        }
    }
}
