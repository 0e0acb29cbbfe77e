#version 450
// Depthwise convolution (group == input channels, any channel multiplier), NC[D][H]W float32,
// any rank 1..3, stride, dilation, bias and fused activation. Input: the zero-padded, row-aligned
// copy written by conv_pack.comp or, MASKED (input width a multiple of 4), the input itself:
// then rows outside the input are skipped and vec4s outside a row read as zeros, which saves the
// pack pass (on lavapipe it took half the time of a 3x3 depthwise layer). Host code:
// vkconv/ops/conv/kernels.py.
//
// One invocation owns PB consecutive output pixels of one row of one output channel. Per kernel row it loads the input
// row segment once (SEGV aligned vec4s) and the KW weights of that row (KWV vec4s, the row
// zero-padded to 4 at load), then the column taps are compile-time register selections.
//
// variant: conv_depthwise -DTEXEL=1
// variant: conv_depthwise_ssbo
#extension GL_EXT_samplerless_texture_functions : require  // textureBuffer: SPIR-V 1.6 forbids sampled Buffer images
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize
layout(constant_id = 5) const int PB = 16;       // output pixels per invocation, multiple of 4
layout(constant_id = 6) const int KW = 3;
layout(constant_id = 7) const int SW = 1;
layout(constant_id = 8) const int DW = 1;
layout(constant_id = 9) const bool VEC_OUT = false;  // out_w % 4 == 0: store vec4s of pixels
const int KWV = (KW + 3) / 4;

#ifdef TEXEL
layout(binding = 0) uniform textureBuffer xp;
layout(binding = 1) uniform textureBuffer wp;
#define LOAD_X(i) texelFetch(xp, i)
#define LOAD_W(i) texelFetch(wp, i)
#else
layout(std430, binding = 0) readonly buffer Padded { vec4 xp[]; };
layout(std430, binding = 1) readonly buffer Weight { vec4 wp[]; };
#define LOAD_X(i) xp[i]
#define LOAD_W(i) wp[i]
#endif
#include "row_segment.glsl"
const int SEGV = (SHIFT + (PB - 1) * SW + (KW - 1) * DW + 4) / 4;
layout(std430, binding = 2) readonly buffer Bias { float bias[]; };
layout(std430, binding = 3) writeonly buffer Output { vec4 y[]; };

layout(push_constant) uniform Params {
    int channels, mult;            // input channels, output channels per input channel
    int pd, ph, pw4;               // padded copy's dims; MASKED: the input's (width in vec4s)
    int pad_d, pad_h, pad_w;       // MASKED only: zeros before the input along each axis
    int k_d, k_h, s_d, s_h, d_d, d_h;
    int out_d, out_h, out_w, tiles_w;
    float act_a, act_b;
} p;

void main()
{
    // Invocations run over (output channel, tile) with the tile fastest, so that a small image
    // still fills whole SIMD groups.
    const int tiles = p.tiles_w * p.out_h * p.out_d;
    const int cout = p.channels * p.mult;
    const int id = flat_invocation();
    if (id >= tiles * cout) return;
    const int tile = id % tiles;
    const int oc = id / tiles;
    const int n = int(gl_WorkGroupID.z);
    const int ox0 = (tile % p.tiles_w) * PB;
    const int oy = (tile / p.tiles_w) % p.out_h;
    const int oz = tile / (p.tiles_w * p.out_h);

    const int row = p.pw4, slice = p.ph * p.pw4;
    // MASKED: the segment starts at column ox0 * SW - pad_w = 4 * col4 + SHIFT
    const int col4 = (ox0 * SW - p.pad_w - SHIFT) / 4;  // exact: a multiple of 4
    const int iz0 = MASKED ? oz * p.s_d - p.pad_d : oz * p.s_d;
    const int iy0 = MASKED ? oy * p.s_h - p.pad_h : oy * p.s_h;
    const int xr0 = (n * p.channels + oc / p.mult) * p.pd * slice + iz0 * slice + iy0 * row
              + (MASKED ? col4 : (ox0 * SW) / 4);
    int wi = oc * p.k_d * p.k_h * KWV;

    vec4 acc[PB / 4];
    [[unroll]] for (int j = 0; j < PB / 4; ++j) acc[j] = vec4(0.0);
    // One flat loop over (kz, ky) rows (lavapipe masks every value written in nested loops).
    const int rows = p.k_d * p.k_h;
    const int step_y = p.d_h * row;
    const int jump_z = p.d_d * slice - p.k_h * step_y;  // last ky -> next kz
    int xr = xr0, ky = 0, iy = iy0, iz = iz0;
    for (int r = 0; r < rows; ++r) {
        // MASKED: a row outside the input is padding (all zeros): nothing to add
        if (!MASKED || (uint(iy) < uint(p.ph) && uint(iz) < uint(p.pd))) {
            vec4 seg[SEGV];
            [[unroll]] for (int v = 0; v < SEGV; ++v) seg[v] = segment_vec4(xr, v, col4, p.pw4);
            vec4 wrow[KWV];
            [[unroll]] for (int v = 0; v < KWV; ++v) wrow[v] = LOAD_W(wi + v);
            [[unroll]] for (int kx = 0; kx < KW; ++kx) {
                const float wk = wrow[kx >> 2][kx & 3];
                [[unroll]] for (int j = 0; j < PB; ++j) {
                    const int e = SHIFT + j * SW + kx * DW;
                    acc[j >> 2][j & 3] = fma(seg[e >> 2][e & 3], wk, acc[j >> 2][j & 3]);
                }
            }
        }
        wi += KWV;
        ++ky;
        xr += step_y;
        iy += p.d_h;
        const bool wrap_y = ky == p.k_h;
        ky = wrap_y ? 0 : ky;
        xr += wrap_y ? jump_z : 0;
        iy = wrap_y ? iy0 : iy;
        iz += wrap_y ? p.d_d : 0;
    }

    const int out_hw = p.out_h * p.out_w * p.out_d;
    const int y0 = (n * cout + oc) * out_hw + (oz * p.out_h + oy) * p.out_w + ox0;
    const float b = bias[oc];
    [[unroll]] for (int j = 0; j < PB; j += 4) {
        if (ox0 + j >= p.out_w) break;
        const vec4 r = activate4(acc[j >> 2] + b, p.act_a, p.act_b);
        if (VEC_OUT) {
            y[(y0 + j) >> 2] = r;
        } else {
            [[unroll]] for (int c = 0; c < 4; ++c) {
                if (ox0 + j + c < p.out_w) y[(y0 + j + c) >> 2][(y0 + j + c) & 3] = r[c];
            }
        }
    }
}
