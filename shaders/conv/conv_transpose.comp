#version 450
// Transposed convolution (ONNX ConvTranspose), NC(D)(H)W float32; 1-D and 2-D inputs arrive as 3-D
// with unit depth/height. Any groups / strides / dilations / pads (negative begin pads included,
// which output_shape can produce), bias and fused activation. Host code: vkconv/ops/conv_transpose.py.
//
// Gather formulation: output o receives x[i] * w[k] for every i*s + k*d - pad_begin == o, so each
// invocation sums its own taps and no two invocations write the same element (no atomics).
// Outputs are split into phases by o mod s: all outputs of one phase along W share the same set of
// taps, and consecutive outputs of a phase (o, o + s, o + 2s, o + 3s) read consecutive inputs
// (i, i+1, i+2, i+3). One invocation computes PIX such pixels x 4*OCV output channels; weights
// are repacked as OCV vec4s over output channels with the input channel innermost, so the hot loop
// walks input channels with OCV vec4 weight loads and PIX scalar input loads per 4*OCV*PIX FMAs.
//
// Tiles are PIXxOC (OC = 4 * OCV); vkconv/ops/conv_transpose.py picks one per device and layer width.
// variant: conv_transpose_4x4 -DPIX=4 -DOCV=1
// variant: conv_transpose_4x8 -DPIX=4 -DOCV=2
// variant: conv_transpose_8x4 -DPIX=8 -DOCV=1
// variant: conv_transpose_8x8 -DPIX=8 -DOCV=2
// variant: conv_transpose_8x16 -DPIX=8 -DOCV=4
// variant: conv_transpose_8x32 -DPIX=8 -DOCV=8
#extension GL_GOOGLE_include_directive : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer Input { float x[]; };
// [groups][oc_blocks][k_d][k_h][k_w][cin_g][OCV] vec4, output channels zero-padded to 4*OCV
layout(std430, binding = 1) readonly buffer Weight { vec4 w[]; };
// [groups][oc_blocks][OCV] vec4, zero-padded like the weights
layout(std430, binding = 2) readonly buffer Bias { vec4 bias[]; };
layout(std430, binding = 3) writeonly buffer Output { float y[]; };

// Per spatial axis (d, h, w): in/out sizes, kernel size, stride, dilation, tap_step = s / gcd(s, d)
// (the kernel-index distance between two taps that hit the same output), and off = pad_begin +
// lift * s, lifted by the host so that o + off - k * d >= 0 for every tap: GLSL leaves % of
// negative ints undefined. 124 bytes: within the 128 every device offers.
layout(push_constant) uniform Params {
    ivec3 in_size;
    int cin_g;
    ivec3 out_size;
    int cout_g;
    ivec3 kernel;
    int groups;
    ivec3 stride;
    int oc_blocks;
    ivec3 dil;
    int w_blocks;      // ceil(ceil(out_w / stride_w) / PIX): pixel blocks per W phase
    ivec3 tap_step;
    float act_a;
    ivec3 off;
    float act_b;
    ivec3 lift;
} p;

// First kernel index k with (o + off - k * d) divisible by s, and its input index; k >= K if none.
int first_tap(int o, int axis, out int i)
{
    const int s = p.stride[axis];
    const int last = min(p.tap_step[axis], p.kernel[axis]);
    for (int k = 0; k < last; ++k) {
        int t = o + p.off[axis] - k * p.dil[axis];
        if (t % s == 0) {
            i = t / s - p.lift[axis];
            return k;
        }
    }
    i = 0;
    return p.kernel[axis];
}

void main()
{
    // Items run phase-major (phase_d, phase_h, phase_w, then positions within the phase), so
    // neighbouring invocations mostly share their taps: little divergence in the tap loops.
    const ivec3 per_phase = (p.out_size + p.stride - 1) / p.stride;
    const int items = p.stride.x * p.stride.y * p.stride.z * per_phase.x * per_phase.y * p.w_blocks;
    int item = int(gl_GlobalInvocationID.x);
    if (item >= items) return;
    const int n = int(gl_GlobalInvocationID.z);
    const int g = int(gl_GlobalInvocationID.y) / p.oc_blocks;
    const int ocb = int(gl_GlobalInvocationID.y) % p.oc_blocks;

    const int jw = item % p.w_blocks;
    item /= p.w_blocks;
    const int jh = item % per_phase.y;
    item /= per_phase.y;
    const int jd = item % per_phase.x;
    item /= per_phase.x;
    const int ow0 = item % p.stride.z + jw * PIX * p.stride.z;  // pixel t is ow0 + t * stride_w
    item /= p.stride.z;
    const int oh = item % p.stride.y + jh * p.stride.y;
    const int od = item / p.stride.y + jd * p.stride.x;
    if (od >= p.out_size.x || oh >= p.out_size.y || ow0 >= p.out_size.z) return;

    int id0, ih0, iw0;
    const int kd0 = first_tap(od, 0, id0);
    const int kh0 = first_tap(oh, 1, ih0);
    const int kw0 = first_tap(ow0, 2, iw0);

    const int in_hw = p.in_size.y * p.in_size.z;
    const int in_dhw = p.in_size.x * in_hw;
    const int k_hw = p.kernel.y * p.kernel.z;
    // Stepping the kernel index by tap_step moves the input index back by tap_step * d / s.
    const ivec3 in_step = p.tap_step * p.dil / p.stride;
    const int x_base = (n * p.groups + g) * p.cin_g * in_dhw;
    const int w_base = (g * p.oc_blocks + ocb) * p.kernel.x * k_hw;
    vec4 acc[PIX][OCV];
    for (int t = 0; t < PIX; ++t)
        for (int v = 0; v < OCV; ++v) acc[t][v] = vec4(0.0);

    int id = id0;
    for (int kd = kd0; kd < p.kernel.x; kd += p.tap_step.x, id -= in_step.x) {
        if (uint(id) >= uint(p.in_size.x)) continue;
        int ih = ih0;
        for (int kh = kh0; kh < p.kernel.y; kh += p.tap_step.y, ih -= in_step.y) {
            if (uint(ih) >= uint(p.in_size.y)) continue;
            const int row = x_base + id * in_hw + ih * p.in_size.z;
            int iw = iw0;
            for (int kw = kw0; kw < p.kernel.z; kw += p.tap_step.z, iw -= in_step.z) {
                // Out-of-range pixels load from a clamped, in-bounds address and are then replaced
                // by an exact 0, so a padded tap never reads past the buffer and Inf/NaN there
                // cannot leak in.
                int addr[PIX];
                bool ok[PIX];
                bool any_ok = false;
                for (int t = 0; t < PIX; ++t) {
                    ok[t] = uint(iw + t) < uint(p.in_size.z);
                    any_ok = any_ok || ok[t];
                    addr[t] = row + clamp(iw + t, 0, p.in_size.z - 1);
                }
                if (!any_ok) continue;
                int wi = ((w_base + (kd * p.kernel.y + kh) * p.kernel.z + kw) * p.cin_g) * OCV;
                for (int c = 0; c < p.cin_g * in_dhw; c += in_dhw) {
                    vec4 wv[OCV];
                    for (int v = 0; v < OCV; ++v) wv[v] = w[wi++];
                    for (int t = 0; t < PIX; ++t) {
                        const float xv = ok[t] ? x[addr[t] + c] : 0.0;
                        for (int v = 0; v < OCV; ++v) acc[t][v] += xv * wv[v];
                    }
                }
            }
        }
    }

    const int oc0 = ocb * 4 * OCV;
    const int out_dhw = p.out_size.x * p.out_size.y * p.out_size.z;
    const int y_row = ((n * p.groups + g) * p.cout_g + oc0) * out_dhw
                      + (od * p.out_size.y + oh) * p.out_size.z;
    for (int v = 0; v < OCV; ++v) {
        const vec4 b = bias[(g * p.oc_blocks + ocb) * OCV + v];
        for (int t = 0; t < PIX; ++t) {
            const int ow = ow0 + t * p.stride.z;
            if (ow >= p.out_size.z) break;
            const vec4 r = activate4(acc[t][v] + b, p.act_a, p.act_b);
            for (int c = 0; c < 4; ++c) {
                if (oc0 + 4 * v + c < p.cout_g) y[y_row + (4 * v + c) * out_dhw + ow] = r[c];
            }
        }
    }
}
