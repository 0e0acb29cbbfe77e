#version 450
// ConvLSTM2D (Keras 3 semantics), NCHW float32 frames. Host code: vkconv/ops/conv_lstm.py.
//
// Two modules from this file share one convolution loop:
//   conv_lstm_input_*  the input convolution of every frame at once (N*T frames in one dispatch):
//                      gx[frame][f][pixel] = vec4(i, f, c, o) pre-activations of filter f, bias added.
//   conv_lstm_step_*   one time step: the recurrent convolution of h_{t-1} ("same" padded, stride 1)
//                      fused with the gate epilogue, so the recurrent pre-activations never reach
//                      memory:  c_t = f*c_{t-1} + i*act(g_c),  h_t = o*act(c_t),  i/f/o = rec_act(g).
// Weights are repacked by the host so that one vec4 holds the four gates (i, f, c, o) of a filter:
// a tap costs PIX scalar input loads and FB vec4 weight loads for 4*FB*PIX FMAs, with no shared
// memory (lavapipe runs barriers slowly). PIX pixels x FB filters per invocation; the host picks.
//
// variant: conv_lstm_input_4x1 -DSTEP=0 -DPIX=4 -DFB=1
// variant: conv_lstm_input_8x2 -DSTEP=0 -DPIX=8 -DFB=2
// variant: conv_lstm_input_8x4 -DSTEP=0 -DPIX=8 -DFB=4
// variant: conv_lstm_input_16x8 -DSTEP=0 -DPIX=16 -DFB=8
// variant: conv_lstm_step_4x1 -DSTEP=1 -DPIX=4 -DFB=1
// variant: conv_lstm_step_8x2 -DSTEP=1 -DPIX=8 -DFB=2
// variant: conv_lstm_step_8x4 -DSTEP=1 -DPIX=8 -DFB=4
// variant: conv_lstm_step_16x8 -DSTEP=1 -DPIX=16 -DFB=8
#extension GL_GOOGLE_include_directive : require
// ACT (constant 3) is the cell activation ("activation" in Keras): tanh unless the model says so.
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

// The recurrent activation: ACT_SIGMOID, or ACT_HARD_SIGMOID with (rec_a, rec_b).
layout(constant_id = 4) const int REC_ACT = ACT_SIGMOID;

// Input frames [frames][cin][in_h][in_w] (input variant) or hidden states (step variant, at
// src_offset + n * src_stride, [F][hw] each).
layout(std430, binding = 0) readonly buffer Source { float src[]; };
// [f_blocks][cin * k_h * k_w][FB] vec4 (i, f, c, o), filters zero-padded to FB
layout(std430, binding = 1) readonly buffer Weight { vec4 w[]; };
#if STEP == 0
// [f_blocks * FB] vec4, zero-padded like the weights
layout(std430, binding = 2) readonly buffer Bias { vec4 bias[]; };
// [frames][f_blocks * FB][out_hw] vec4
layout(std430, binding = 3) writeonly buffer Gates { vec4 gx[]; };
#else
layout(std430, binding = 2) readonly buffer Gates { vec4 gx[]; };
// [N][F][hw]: read and written by the same invocation only, so it is updated in place
layout(std430, binding = 3) buffer Cell { float cell[]; };
// h_t at dst_offset + n * dst_stride, [F][hw] each; may be the same buffer as Source (other region)
layout(std430, binding = 4) writeonly buffer Hidden { float h[]; };
#endif

layout(push_constant) uniform Params {
    int cin, in_h, in_w, out_h, out_w;
    int k_h, k_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
    int filters, f_blocks;
    int steps, t;                    // step: gx frame of batch item n is n * steps + t
    int src_offset, src_stride, dst_offset, dst_stride;
    int has_state;                   // step: 0 when h_{t-1} = c_{t-1} = 0 (first step, no state)
    float act_a, act_b, rec_a, rec_b;
} p;

float recurrent_activate(float v)
{
    return activate_kind(REC_ACT, v, p.rec_a, p.rec_b);
}

// acc[b][j] += sum over taps of src * w for filter block member b and pixel j.
void convolve(int src_base, int wi, ivec2 q[PIX], inout vec4 acc[FB][PIX])
{
    const int in_hw = p.in_h * p.in_w;
    int iy0[PIX], ix0[PIX];
    for (int j = 0; j < PIX; ++j) {
        iy0[j] = q[j].y * p.stride_h - p.pad_h;
        ix0[j] = q[j].x * p.stride_w - p.pad_w;
    }
    for (int ci = 0; ci < p.cin; ++ci) {
        for (int ky = 0; ky < p.k_h; ++ky) {
            for (int kx = 0; kx < p.k_w; ++kx) {
                float v[PIX];
                for (int j = 0; j < PIX; ++j) {
                    int iy = iy0[j] + ky * p.dil_h, ix = ix0[j] + kx * p.dil_w;
                    bool ok = uint(iy) < uint(p.in_h) && uint(ix) < uint(p.in_w);
                    // Load from a clamped address, then select: no out-of-bounds read, and a
                    // padded tap is an exact 0 even when src[src_base] is Inf or NaN.
                    float s = src[ok ? src_base + iy * p.in_w + ix : src_base];
                    v[j] = ok ? s : 0.0;
                }
                for (int b = 0; b < FB; ++b) {
                    vec4 wv = w[wi * FB + b];
                    for (int j = 0; j < PIX; ++j) acc[b][j] += v[j] * wv;
                }
                ++wi;
            }
        }
        src_base += in_hw;
    }
}

void main()
{
    const int hw = p.out_h * p.out_w;
    const int p0 = int(gl_GlobalInvocationID.x) * PIX;
    if (p0 >= hw) return;
    const int fb = int(gl_GlobalInvocationID.y);
    const int z = int(gl_GlobalInvocationID.z);  // frame (input) or batch item (step)

    ivec2 q[PIX];
    for (int j = 0; j < PIX; ++j) {
        // Pixels past the end repeat the last one so every load stays in bounds.
        int r = min(p0 + j, hw - 1);
        q[j] = ivec2(r % p.out_w, r / p.out_w);
    }
    vec4 acc[FB][PIX];
    for (int b = 0; b < FB; ++b)
        for (int j = 0; j < PIX; ++j) acc[b][j] = vec4(0.0);

    const int taps = p.cin * p.k_h * p.k_w;
#if STEP == 0
    convolve(z * p.cin * p.in_h * p.in_w, fb * taps, q, acc);
    for (int b = 0; b < FB; ++b) {
        const int f = fb * FB + b;
        const vec4 bv = bias[f];
        const int base = (z * p.f_blocks * FB + f) * hw;
        for (int j = 0; j < PIX; ++j) {
            if (p0 + j < hw) gx[base + p0 + j] = acc[b][j] + bv;
        }
    }
#else
    if (p.has_state != 0) convolve(p.src_offset + z * p.src_stride, fb * taps, q, acc);
    const int frame = z * p.steps + p.t;
    for (int b = 0; b < FB; ++b) {
        const int f = fb * FB + b;
        if (f >= p.filters) break;
        const int g_base = (frame * p.f_blocks * FB + f) * hw;
        const int c_base = (z * p.filters + f) * hw;
        const int h_base = p.dst_offset + z * p.dst_stride + f * hw;
        for (int j = 0; j < PIX; ++j) {
            const int r = p0 + j;
            if (r >= hw) break;
            const vec4 g = acc[b][j] + gx[g_base + r];
            const float c_prev = p.has_state != 0 ? cell[c_base + r] : 0.0;
            const float c = recurrent_activate(g.y) * c_prev
                          + recurrent_activate(g.x) * activate(g.z, p.act_a, p.act_b);
            cell[c_base + r] = c;
            h[h_base + r] = recurrent_activate(g.w) * activate(c, p.act_a, p.act_b);
        }
    }
#endif
}
