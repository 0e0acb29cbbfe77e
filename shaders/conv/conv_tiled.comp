#version 450
// Tiled implicit-GEMM convolution for GPUs: NC[D][H]W float32, any rank 1..3 (1-D and 2-D arrive
// with unit depth/height), groups, stride, dilation, pads, bias and fused activation. Host code:
// vkconv/ops/conv/kernels.py (TiledKernel).
//
// The convolution is the GEMM Y[oc][pixel] = sum_k W[oc][k] * X[k][pixel] with
// K = C_in/g * kd * kh * kw and X the (never materialized) im2col matrix of the input. A workgroup
// owns a TM output channels x TN output pixels tile of Y and walks K in strips of TK: per strip the
// workgroup cooperatively copies a TM x TK weight tile and a TK x TN input tile into shared memory,
// then each invocation accumulates its RM x RN register tile from shared memory, so every global
// load is reused TN (weights) or TM (input) times. Weights are repacked at load as
// [group][oc tile][K padded to TK][TM] (zeros past cout_g and K): a strip's weight tile is one
// contiguous, coalesced block with no bounds checks. The input tile reads x in place with bounds
// checks (pads, partial pixel tiles, K past its end read as 0), which costs nothing in the inner
// loop and needs no padded copy. Unlike conv_rows.comp this is for GPUs: lavapipe runs barriers
// and shared memory slowly.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;  // (TM / RM) * (TN / RN)
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize
layout(constant_id = 4) const int TM = 64;  // output channels per workgroup tile
layout(constant_id = 5) const int TN = 64;  // output pixels per workgroup tile
layout(constant_id = 6) const int TK = 16;  // K strip
layout(constant_id = 7) const int RM = 8;   // output channels per invocation
layout(constant_id = 8) const int RN = 8;   // output pixels per invocation
const int WM = TM / RM;  // invocations along the channel axis of the tile
const int WN = TN / RN;  // invocations along the pixel axis
const int NI = WM * WN;

layout(std430, binding = 0) readonly buffer Input { float x[]; };
layout(std430, binding = 1) readonly buffer Weight { float wp[]; };
// k -> (input channel, kz * d_d, ky * d_h, kx * d_w), one entry per k < K: the divisions that
// split k are done once on the host.
layout(std430, binding = 2) readonly buffer Taps { ivec4 taps[]; };
layout(std430, binding = 3) readonly buffer Bias { float bias[]; };  // [C_out]
layout(std430, binding = 4) writeonly buffer Output { float y[]; };

layout(push_constant) uniform Params {
    int cin_g, cout_g, groups, k_total;
    int d, h, w;
    int out_d, out_h, out_w;
    int s_d, s_h, s_w;
    int pad_d, pad_h, pad_w;
    int oc_tiles, pix_tiles;
    float act_a, act_b;
} p;

shared float w_tile[TK * TM];   // [k][oc]
shared float x_tile[TK * TN];   // [k][pixel]
shared ivec4 origin[TN];        // input corner (z, y, x) of each tile pixel, w: pixel exists

void main()
{
    // The whole workgroup returns together (uniform), before any barrier.
    const int wg = flat_group();
    if (wg >= p.oc_tiles * p.pix_tiles) return;
    const int pix0 = (wg % p.pix_tiles) * TN;
    const int oct = wg / p.pix_tiles;
    const int ng = int(gl_WorkGroupID.z);  // n * groups + g
    const int g = ng % p.groups;
    const int lid = int(gl_LocalInvocationID.x);
    const int out_hw = p.out_h * p.out_w;
    const int pixels = p.out_d * out_hw;

    // Locate the tile's pixels once: the strip loop then needs no division by image sizes.
    for (int n = lid; n < TN; n += NI) {
        const int px = pix0 + n;
        const int oz = px / out_hw, rem = px % out_hw;
        origin[n] = ivec4(oz * p.s_d - p.pad_d, (rem / p.out_w) * p.s_h - p.pad_h,
                          (rem % p.out_w) * p.s_w - p.pad_w, int(px < pixels));
    }

    const int plane = p.d * p.h * p.w;
    const int x0 = ng * p.cin_g * plane;
    const int strips = (p.k_total + TK - 1) / TK;
    int wi = (g * p.oc_tiles + oct) * strips * TK * TM;
    // Strided register tile (channel tm + i * WM, pixel tn + j * WN): neighbouring invocations
    // read neighbouring shared words, free of bank conflicts.
    const int tm = lid / WN, tn = lid % WN;

    float acc[RM][RN];
    [[unroll]] for (int i = 0; i < RM; ++i)
        [[unroll]] for (int j = 0; j < RN; ++j) acc[i][j] = 0.0;

    barrier();  // origin[] is written
    for (int s = 0; s < strips; ++s, wi += TK * TM) {
        // Loops over whole rounds of NI elements, fixed in count: the compiler unrolls them.
        [[unroll]] for (int e0 = 0; e0 < TK * TM; e0 += NI) {
            if (e0 + lid < TK * TM) w_tile[e0 + lid] = wp[wi + e0 + lid];
        }
        [[unroll]] for (int e0 = 0; e0 < TK * TN; e0 += NI) {
            const int e = e0 + lid;
            if (e >= TK * TN) break;
            const int k = s * TK + e / TN;
            const ivec4 o = origin[e % TN];
            float v = 0.0;
            if (k < p.k_total && o.w != 0) {
                const ivec4 t = taps[k];
                const int iz = o.x + t.y, iy = o.y + t.z, ix = o.z + t.w;
                if (uint(iz) < uint(p.d) && uint(iy) < uint(p.h) && uint(ix) < uint(p.w))
                    v = x[x0 + t.x * plane + (iz * p.h + iy) * p.w + ix];
            }
            x_tile[e] = v;
        }
        barrier();
        [[unroll]] for (int kk = 0; kk < TK; ++kk) {
            float a[RM], b[RN];
            [[unroll]] for (int i = 0; i < RM; ++i) a[i] = w_tile[kk * TM + tm + i * WM];
            [[unroll]] for (int j = 0; j < RN; ++j) b[j] = x_tile[kk * TN + tn + j * WN];
            [[unroll]] for (int i = 0; i < RM; ++i)
                [[unroll]] for (int j = 0; j < RN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
        barrier();  // the tiles are overwritten by the next strip
    }

    [[unroll]] for (int i = 0; i < RM; ++i) {
        const int oc = oct * TM + tm + i * WM;
        if (oc >= p.cout_g) break;
        const float bv = bias[g * p.cout_g + oc];
        const int yc = (ng * p.cout_g + oc) * pixels + pix0;
        [[unroll]] for (int j = 0; j < RN; ++j) {
            const int n = tn + j * WN;
            if (pix0 + n < pixels) y[yc + n] = activate(acc[i][j] + bv, p.act_a, p.act_b);
        }
    }
}
