#version 450
// Winograd F(4x4, 3x3) convolution transforms for 3x3 stride-1 undilated 2-D convolutions
// ("winograd" path). Host code: vkconv/ops/conv/kernels.py, which runs, in one command buffer:
//   conv_pack       input zero-padded, rows aligned so that tile columns start on vec4s (not
//                     when the input's width is a multiple of 4 and pad_w <= 4: MASKED reads it in
//                     place, rows and vec4s outside the image read as zeros);
//   WINOGRAD_IN       V[a][ci][t] = (B^T d B)[a] for every 6x6 input tile d (36 values a);
//   conv_rows       M[a] = U[a] x V[a], 36 GEMMs run as one grouped 1x1 convolution, with
//                     U[a] = (G g G^T)[a] transformed on the host (float64) at weight load;
//   WINOGRAD_OUT      y = A^T M A + bias, activation, for every 4x4 output tile.
// Tiles are numbered t = (n * tiles_h + ty) * tiles_w4 + tx with tiles_w4 = 4 * tiles_q. Each
// invocation handles one row of tiles, 4 horizontally adjacent tiles at a time, so transformed
// values move as vec4s over 4 tiles (lavapipe pays per load/store instruction, not per byte). F(4,3) does 4x fewer
// multiplications than direct convolution; its float32 error is about 1e-5 x max|y| at 512 input
// channels (vkconv/ops/conv/kernels.py states the test tolerance).
//
// variant: conv_winograd_in -DWINOGRAD_IN=1 -DTEXEL=1
// variant: conv_winograd_in_ssbo -DWINOGRAD_IN=1
// variant: conv_winograd_out -DWINOGRAD_OUT=1 -DTEXEL=1
// variant: conv_winograd_out_ssbo -DWINOGRAD_OUT=1
#extension GL_EXT_samplerless_texture_functions : require  // textureBuffer: SPIR-V 1.6 forbids sampled Buffer images
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize

#ifdef TEXEL
layout(binding = 0) uniform textureBuffer src;
#define LOAD(i) texelFetch(src, i)
#else
layout(std430, binding = 0) readonly buffer Source { vec4 src[]; };
#define LOAD(i) src[i]
#endif

#ifdef WINOGRAD_IN
layout(std430, binding = 1) writeonly buffer Transformed { vec4 v[]; };
// MASKED: the input itself (width a multiple of 4), its pads masked; PADW: zeros before each row.
layout(constant_id = 10) const bool MASKED = false;
layout(constant_id = 11) const int PADW = 0;  // 0..4
// A strip of 4 tiles (padded columns 16q .. 16q+19) in MASKED: the vec4s from input column
// 16q - 4 (16q when PADW == 0) on, element e of the strip at SKEW + e.
const int SKEW = MASKED && PADW > 0 ? 4 - PADW : 0;
const int STRIP = MASKED && PADW > 0 ? 6 : 5;

layout(push_constant) uniform Params {
    int channels, tiles_h, tiles_q;  // tiles_q: groups of 4 tiles along a row
    int ph, pw4;                     // padded input (conv_pack layout); MASKED: the input's
    int ntp;                         // tiles per transformed plane: n * tiles_h * 4 * tiles_q
    int pad_h;                       // MASKED: zero rows above the image
} p;

// B^T applied to 6 values (each a vec4 over 4 tiles).
void bt(inout vec4 d[6])
{
    const vec4 r0 = 4.0 * d[0] - 5.0 * d[2] + d[4];
    const vec4 r1 = -4.0 * (d[1] + d[2]) + d[3] + d[4];
    const vec4 r2 = 4.0 * (d[1] - d[2]) - d[3] + d[4];
    const vec4 r3 = 2.0 * (d[3] - d[1]) - d[2] + d[4];
    const vec4 r4 = 2.0 * (d[1] - d[3]) - d[2] + d[4];
    const vec4 r5 = 4.0 * d[1] - 5.0 * d[3] + d[5];
    d[0] = r0; d[1] = r1; d[2] = r2; d[3] = r3; d[4] = r4; d[5] = r5;
}

void main()
{
    // One invocation per row of tiles, looping over its groups of 4 tiles: the divisions that
    // locate the row (scalarized on lavapipe) are paid once per row.
    const int id = flat_invocation();
    if (id >= p.ntp / (4 * p.tiles_q) * p.channels) return;
    const int ty = id % p.tiles_h;
    const int ci = (id / p.tiles_h) % p.channels;
    const int n = id / (p.tiles_h * p.channels);
    const int plane4 = p.ntp / 4;
    const int iy0 = MASKED ? 4 * ty - p.pad_h : 4 * ty;
    const int src_row = ((n * p.channels + ci) * p.ph + iy0) * p.pw4 - (STRIP - 5);
    const int dst_row = (ci * p.ntp + (n * p.tiles_h + ty) * 4 * p.tiles_q) / 4;
    // MASKED: which of the 6 rows lie in the image (the others read as zeros)
    bool row_in[6];
    [[unroll]] for (int i = 0; i < 6; ++i) row_in[i] = !MASKED || uint(iy0 + i) < uint(p.ph);

    for (int q = 0; q < p.tiles_q; ++q) {
        // Rows 4ty .. 4ty+5, columns 16q .. 16q+19 of the padded plane: 6 x 5 aligned vec4s
        // (MASKED: 6 x STRIP vec4s of the input, those outside it zeros).
        vec4 d[6][6];  // d[row][col], each a vec4 over the 4 tiles
        [[unroll]] for (int i = 0; i < 6; ++i) {
            vec4 s[STRIP];
            [[unroll]] for (int k = 0; k < STRIP; ++k) {
                const int col = 4 * q + k - (STRIP - 5);  // vec4 column in the (MASKED: input) row
                const bool inside = row_in[i] && (!MASKED || uint(col) < uint(p.pw4));
                const int at = src_row + i * p.pw4 + 4 * q + k;
                s[k] = inside ? LOAD(MASKED ? (inside ? at : 0) : at) : vec4(0.0);  // never out of range
            }
            [[unroll]] for (int c = 0; c < 6; ++c) {
                // Tile j starts at column 4j: element 4j + c of the strip.
                d[i][c] = vec4(s[(SKEW + c) >> 2][(SKEW + c) & 3], s[(SKEW + 4 + c) >> 2][(SKEW + c) & 3],
                               s[(SKEW + 8 + c) >> 2][(SKEW + c) & 3], s[(SKEW + 12 + c) >> 2][(SKEW + c) & 3]);
            }
        }
        [[unroll]] for (int c = 0; c < 6; ++c) {
            vec4 col[6];
            [[unroll]] for (int i = 0; i < 6; ++i) col[i] = d[i][c];
            bt(col);
            [[unroll]] for (int i = 0; i < 6; ++i) d[i][c] = col[i];
        }
        [[unroll]] for (int i = 0; i < 6; ++i) {
            bt(d[i]);
            [[unroll]] for (int k = 0; k < 6; ++k) v[dst_row + q + (i * 6 + k) * p.channels * plane4] = d[i][k];
        }
    }
}
#endif

#ifdef WINOGRAD_OUT
layout(std430, binding = 1) readonly buffer Bias { float bias[]; };
layout(std430, binding = 2) writeonly buffer Output { vec4 y[]; };
layout(constant_id = 9) const bool VEC_OUT = false;  // out_w % 4 == 0: whole tile rows as vec4s

layout(push_constant) uniform Params {
    int channels, tiles_h, tiles_q;
    int out_h, out_w;
    int ntp;
    float act_a, act_b;
} p;

// A^T applied to 6 values (each a vec4 over 4 tiles).
void at(vec4 m[6], out vec4 o[4])
{
    const vec4 s12 = m[1] + m[2], d12 = m[1] - m[2];
    const vec4 s34 = m[3] + m[4], d34 = m[3] - m[4];
    o[0] = m[0] + s12 + s34;
    o[1] = d12 + 2.0 * d34;
    o[2] = s12 + 4.0 * s34;
    o[3] = d12 + 8.0 * d34 + m[5];
}

void main()
{
    // One invocation per row of tiles, looping over its groups of 4 tiles (see WINOGRAD_IN).
    const int id = flat_invocation();
    if (id >= p.ntp / (4 * p.tiles_q) * p.channels) return;
    const int ty = id % p.tiles_h;
    const int co = (id / p.tiles_h) % p.channels;
    const int n = id / (p.tiles_h * p.channels);
    const int plane4 = p.ntp / 4;
    const int src_row = (co * p.ntp + (n * p.tiles_h + ty) * 4 * p.tiles_q) / 4;
    const float b = bias[co];
    const int rows = min(4, p.out_h - 4 * ty);
    const int y_row = ((n * p.channels + co) * p.out_h + 4 * ty) * p.out_w;

    for (int q = 0; q < p.tiles_q; ++q) {
        vec4 t[4][6];  // (A^T M)[i][col]
        [[unroll]] for (int c = 0; c < 6; ++c) {
            vec4 m[6];
            [[unroll]] for (int i = 0; i < 6; ++i) m[i] = LOAD(src_row + q + (i * 6 + c) * p.channels * plane4);
            vec4 o[4];
            at(m, o);
            [[unroll]] for (int i = 0; i < 4; ++i) t[i][c] = o[i];
        }
        [[unroll]] for (int i = 0; i < 4; ++i) {
            if (i >= rows) break;
            vec4 o[4];  // o[k][j]: column k of tile j
            at(t[i], o);
            const int yrow = y_row + i * p.out_w;
            [[unroll]] for (int j = 0; j < 4; ++j) {
                const int ox = 16 * q + 4 * j;
                const vec4 r = activate4(vec4(o[0][j], o[1][j], o[2][j], o[3][j]) + b, p.act_a, p.act_b);
                if (VEC_OUT) {
                    if (ox < p.out_w) y[(yrow + ox) >> 2] = r;
                } else {
                    [[unroll]] for (int k = 0; k < 4; ++k) {
                        if (ox + k < p.out_w) y[(yrow + ox + k) >> 2][(yrow + ox + k) & 3] = r[k];
                    }
                }
            }
        }
    }
}
#endif
