#version 450
// Winograd F(4x4, 3x3) convolution transforms for 3x3 stride-1 undilated 2-D convolutions
// ("winograd" path). Host code: vkconv/ops/conv/kernels.py, which runs, in one command buffer:
//   conv_pack       input zero-padded, rows aligned so that tile columns start on vec4s (not
//                     when the input's width is a multiple of 4 and pad_w <= 4: MASKED reads it in
//                     place, rows and vec4s outside the image read as zeros);
//   WINOGRAD_IN       V[a][ci][t] = (B^T d B)[a] for every 6x6 input tile d (36 values a);
//   conv_rows       M[a] = U[a] x V[a], 36 GEMMs run as one grouped 1x1 convolution, with
//                     U[a] = (G g G^T)[a] transformed on the host (float64) at weight load;
//   WINOGRAD_OUT      y = A^T M A + bias, activation, for every 4x4 output tile (PH x PW > 1: the
//                     sub-pixel convolution of a transposed one, each channel's plane stored
//                     straight into its phase of the layer's output, see below).
// Tiles are numbered t = (n * tiles_h + ty) * pitch + tx, pitch = tiles_w rounded up to even
// (planes of ntp values, the count rounded up to 4), so the GEMMs do almost no work on padding
// tiles: rows padded to groups of 4 tiles made a 56-wide image's 14 tile columns 16, 1/8 more GEMM
// work. Each transform invocation handles one row of tiles, 4 at a time, so transformed values
// move as vec4s over 4 tiles (lavapipe pays per load/store instruction, not per byte): the input
// transform reads a row's strip of 4 horizontally adjacent tiles as aligned vec4s and stores them
// as a vec4, or two vec2s where rows start at even tile numbers (4 scalar stores took 1.8x as
// long as those); the output transform loads the aligned vec4s of 4 consecutive
// tile numbers that cover its row, those of neighbouring rows included, and stores only its own
// tiles, a pair at a time. F(4,3) does 4x fewer multiplications than direct convolution; its
// float32 error is about 1e-5 x max|y| at 512 input channels (vkconv/ops/conv/kernels.py states
// the test tolerance).
//
// TILE_M = 6 (the winograd63 variants): F(6x6, 3x3) over 8x8 input tiles, interpolation points
// 0, +-1, +-2, +-1/2 and infinity (as ncnn's winograd63); 64 GEMMs, 1.78 multiplications per
// output instead of 2.25. Everything below is written for an M x M output tile, N = M + 2.
//
// variant: conv_winograd_in -DWINOGRAD_IN=1 -DTEXEL=1
// variant: conv_winograd_in_ssbo -DWINOGRAD_IN=1
// variant: conv_winograd_out -DWINOGRAD_OUT=1 -DTEXEL=1
// variant: conv_winograd_out_ssbo -DWINOGRAD_OUT=1
// variant: conv_winograd63_in -DWINOGRAD_IN=1 -DTEXEL=1 -DTILE_M=6
// variant: conv_winograd63_in_ssbo -DWINOGRAD_IN=1 -DTILE_M=6
// variant: conv_winograd63_out -DWINOGRAD_OUT=1 -DTEXEL=1 -DTILE_M=6
// variant: conv_winograd63_out_ssbo -DWINOGRAD_OUT=1 -DTILE_M=6
#extension GL_EXT_samplerless_texture_functions : require  // textureBuffer: SPIR-V 1.6 forbids sampled Buffer images
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize

#ifndef TILE_M
#define TILE_M 4
#endif
const int M = TILE_M;      // output tile
const int N = TILE_M + 2;  // input tile
// vec4s holding a strip of 4 horizontally adjacent input tiles (3M + N values from a vec4 start)
const int S = (3 * TILE_M + TILE_M + 2 + 3) / 4;

#ifdef TEXEL
layout(binding = 0) uniform textureBuffer src;
#define LOAD(i) texelFetch(src, i)
#else
layout(std430, binding = 0) readonly buffer Source { vec4 src[]; };
#define LOAD(i) src[i]
#endif

#ifdef WINOGRAD_IN
// Rows of tiles start at multiples of 4 (pitch % 4 == 0): one vec4 store per value; else at even
// tile numbers (PAIRS): two vec2 stores, which measured 1.1-1.2x the vec4 stores' time at 28^2 and
// 14^2 (Mesa 22.3). The same binding seen both ways (Vulkan lets variables alias a binding).
layout(std430, binding = 1) writeonly buffer Transformed { vec4 v[]; };
layout(std430, binding = 1) writeonly buffer TransformedPairs { vec2 v2[]; };
layout(constant_id = 12) const bool PAIRS = false;
// MASKED: the input itself (width a multiple of 4), its pads masked; PADW: zeros before each row.
layout(constant_id = 10) const bool MASKED = false;
layout(constant_id = 11) const int PADW = 0;  // 0..4
// A strip of 4 tiles (padded columns 4Mq .. 4Mq + 4S - 1) in MASKED: the vec4s from input column
// 4Mq - 4 (4Mq when PADW == 0) on, element e of the strip at SKEW + e.
const int SKEW = MASKED && PADW > 0 ? 4 - PADW : 0;
const int STRIP = MASKED && PADW > 0 ? S + 1 : S;

layout(push_constant) uniform Params {
    int channels, tiles_h, pitch;
    int tile_rows;                   // n * tiles_h
    int ph, pw4;                     // padded input (conv_pack layout); MASKED: the input's
    int ntp;                         // values per transformed plane: tile_rows * tiles_w rounded up to 4
    int pad_h;                       // MASKED: zero rows above the image
} p;

#if TILE_M == 6
// B^T applied to 8 values (each a vec4 over 4 tiles).
void bt(inout vec4 d[N])
{
    const vec4 r0 = d[0] - d[6] + 5.25 * (d[4] - d[2]);
    const vec4 r7 = d[7] - d[1] + 5.25 * (d[3] - d[5]);
    vec4 t1 = d[2] + d[6] - 4.25 * d[4], t2 = d[1] + d[5] - 4.25 * d[3];
    const vec4 r1 = t1 + t2, r2 = t1 - t2;
    t1 = 0.25 * d[2] - 1.25 * d[4] + d[6];
    t2 = 0.5 * d[1] - 2.5 * d[3] + 2.0 * d[5];
    const vec4 r3 = t1 + t2, r4 = t1 - t2;
    t1 = 4.0 * d[2] - 5.0 * d[4] + d[6];
    t2 = 2.0 * d[1] - 2.5 * d[3] + 0.5 * d[5];
    const vec4 r5 = t1 + t2, r6 = t1 - t2;
    d[0] = r0; d[1] = r1; d[2] = r2; d[3] = r3; d[4] = r4; d[5] = r5; d[6] = r6; d[7] = r7;
}
#else
// B^T applied to 6 values (each a vec4 over 4 tiles).
void bt(inout vec4 d[N])
{
    const vec4 r0 = 4.0 * d[0] - 5.0 * d[2] + d[4];
    const vec4 r1 = -4.0 * (d[1] + d[2]) + d[3] + d[4];
    const vec4 r2 = 4.0 * (d[1] - d[2]) - d[3] + d[4];
    const vec4 r3 = 2.0 * (d[3] - d[1]) - d[2] + d[4];
    const vec4 r4 = 2.0 * (d[1] - d[3]) - d[2] + d[4];
    const vec4 r5 = 4.0 * d[1] - 5.0 * d[3] + d[5];
    d[0] = r0; d[1] = r1; d[2] = r2; d[3] = r3; d[4] = r4; d[5] = r5;
}
#endif

void main()
{
    // One invocation per row of tiles, looping over its groups of 4 tiles: the divisions that
    // locate the row (scalarized on lavapipe) are paid once per row.
    const int id = flat_invocation();
    if (id >= p.tile_rows * p.channels) return;
    const int ty = id % p.tiles_h;
    const int ci = (id / p.tiles_h) % p.channels;
    const int n = id / (p.tiles_h * p.channels);
    const int iy0 = MASKED ? M * ty - p.pad_h : M * ty;
    const int src_row = ((n * p.channels + ci) * p.ph + iy0) * p.pw4 - (STRIP - S);
    const int dst_row = ci * p.ntp + (n * p.tiles_h + ty) * p.pitch;  // in floats
    // MASKED: which of the N rows lie in the image (the others read as zeros)
    bool row_in[N];
    [[unroll]] for (int i = 0; i < N; ++i) row_in[i] = !MASKED || uint(iy0 + i) < uint(p.ph);

    // Groups of 4 tiles along a row: ceil(pitch / 4) = ceil(tiles_w / 4), the pitch being even.
    for (int q = 0; q < (p.pitch + 3) / 4; ++q) {
        // Rows M ty .. M ty + N - 1, columns 4Mq .. 4Mq + 4S - 1 of the padded plane: N x S
        // aligned vec4s (MASKED: N x STRIP vec4s of the input, those outside it zeros).
        vec4 d[N][N];  // d[row][col], each a vec4 over the 4 tiles
        [[unroll]] for (int i = 0; i < N; ++i) {
            vec4 s[STRIP];
            [[unroll]] for (int k = 0; k < STRIP; ++k) {
                const int col = M * q + k - (STRIP - S);  // vec4 column in the (MASKED: input) row
                const bool inside = row_in[i] && (!MASKED || uint(col) < uint(p.pw4));
                const int at = src_row + i * p.pw4 + M * q + k;
                s[k] = inside ? LOAD(MASKED ? (inside ? at : 0) : at) : vec4(0.0);  // never out of range
            }
            [[unroll]] for (int c = 0; c < N; ++c) {
                // Tile j starts at column Mj: element Mj + c of the strip.
                d[i][c] = vec4(s[(SKEW + c) >> 2][(SKEW + c) & 3],
                               s[(SKEW + M + c) >> 2][(SKEW + M + c) & 3],
                               s[(SKEW + 2 * M + c) >> 2][(SKEW + 2 * M + c) & 3],
                               s[(SKEW + 3 * M + c) >> 2][(SKEW + 3 * M + c) & 3]);
            }
        }
        [[unroll]] for (int c = 0; c < N; ++c) {
            vec4 col[N];
            [[unroll]] for (int i = 0; i < N; ++i) col[i] = d[i][c];
            bt(col);
            [[unroll]] for (int i = 0; i < N; ++i) d[i][c] = col[i];
        }
        [[unroll]] for (int i = 0; i < N; ++i) {
            bt(d[i]);
            [[unroll]] for (int k = 0; k < N; ++k) {
                const int at = dst_row + 4 * q + (i * N + k) * p.channels * p.ntp;
                if (PAIRS) {
                    v2[at / 2] = d[i][k].xy;
                    if (4 * q + 2 < p.pitch) v2[at / 2 + 1] = d[i][k].zw;
                } else {
                    v[at / 4] = d[i][k];
                }
            }
        }
    }
}
#endif

#ifdef WINOGRAD_OUT
layout(std430, binding = 1) readonly buffer Bias { float bias[]; };
layout(std430, binding = 2) writeonly buffer Output { vec4 y[]; };
layout(constant_id = 9) const bool VEC_OUT = false;  // out_w % 4 == 0: F(4,3) stores a tile row as a vec4
// The strides of a transposed convolution run as its sub-pixel convolution
// (vkconv/ops/conv_transpose.py): channel c = co * PH * PW + rh * PW + rw holds phase (rh, rw) of
// output channel co, and its pixel (oy, ox) goes to pixel (oy * PH + rh, ox * PW + rw) of the
// layer's y_h x y_w output (none past its edge), so no shuffle pass follows.  1 x 1: a plain store.
layout(constant_id = 10) const int PH = 1;
layout(constant_id = 11) const int PW = 1;

layout(push_constant) uniform Params {
    int channels, tiles_h, tiles_w, pitch;
    int tile_rows;  // n * tiles_h
    int out_h, out_w;
    int ntp;
    float act_a, act_b;
    int y_h, y_w;  // the stored output's size: out_h x out_w, or the transposed convolution's
} p;

#if TILE_M == 6
// A^T applied to 8 values (each a vec4 over 4 tiles).
void at(vec4 m[N], out vec4 o[M])
{
    const vec4 s12 = m[1] + m[2], d12 = m[1] - m[2];
    const vec4 s34 = m[3] + m[4], d34 = m[3] - m[4];
    const vec4 s56 = m[5] + m[6], d56 = m[5] - m[6];
    o[0] = m[0] + s12 + s34 + s56;
    o[1] = d12 + 2.0 * d34 + 0.5 * d56;
    o[2] = s12 + 4.0 * s34 + 0.25 * s56;
    o[3] = d12 + 8.0 * d34 + 0.125 * d56;
    o[4] = s12 + 16.0 * s34 + 0.0625 * s56;
    o[5] = d12 + 32.0 * d34 + 0.03125 * d56 + m[7];
}
#else
// A^T applied to 6 values (each a vec4 over 4 tiles).
void at(vec4 m[N], out vec4 o[M])
{
    const vec4 s12 = m[1] + m[2], d12 = m[1] - m[2];
    const vec4 s34 = m[3] + m[4], d34 = m[3] - m[4];
    o[0] = m[0] + s12 + s34;
    o[1] = d12 + 2.0 * d34;
    o[2] = s12 + 4.0 * s34;
    o[3] = d12 + 8.0 * d34 + m[5];
}
#endif

void main()
{
    // One invocation per row of tiles (see WINOGRAD_IN), looping over the aligned groups of 4
    // tile numbers that hold its tiles: lane j of group g is tile 4g + j, column tx = 4g + j - first
    // of this row when 0 <= tx < tiles_w; lanes of the rows before and after are computed and dropped.
    const int id = flat_invocation();
    if (id >= p.tile_rows * p.channels) return;
    const int ty = id % p.tiles_h;
    const int co = (id / p.tiles_h) % p.channels;
    const int n = id / (p.tiles_h * p.channels);
    const int plane4 = p.ntp / 4;
    const int first = (n * p.tiles_h + ty) * p.pitch;
    const int m0 = co * plane4;
    const float b = bias[co];
    const int rows = min(M, p.out_h - M * ty);
    const int y_row = ((n * p.channels + co) * p.out_h + M * ty) * p.out_w;
    // PH x PW > 1: this channel is phase (rh, rw) of the stored plane y_plane
    const int phase = co % (PH * PW);
    const int rh = phase / PW, rw = phase - rh * PW;
    const int y_plane = ((n * p.channels + co - phase) / (PH * PW)) * p.y_h * p.y_w;

    for (int g = first >> 2; g <= (first + p.tiles_w - 1) >> 2; ++g) {
        vec4 t[M][N];  // (A^T M)[i][col]
        [[unroll]] for (int c = 0; c < N; ++c) {
            vec4 m[N];
            [[unroll]] for (int i = 0; i < N; ++i) m[i] = LOAD(m0 + g + (i * N + c) * p.channels * plane4);
            vec4 o[M];
            at(m, o);
            [[unroll]] for (int i = 0; i < M; ++i) t[i][c] = o[i];
        }
        const int tx0 = 4 * g - first;  // column of lane 0's tile (negative: the row before)
        [[unroll]] for (int i = 0; i < M; ++i) {
            if (i >= rows) break;
            vec4 o[M];  // o[k][j]: column k of tile j
            at(t[i], o);
            const int yrow = y_row + i * p.out_w;
            const int sy = (M * ty + i) * PH + rh;  // PH x PW > 1: the stored row
            [[unroll]] for (int k = 0; k < M; ++k) o[k] = activate4(o[k] + b, p.act_a, p.act_b);
            // Two pairs of tiles: rows start at even tile numbers, so a pair is all this row's or
            // not at all (past an odd tiles_w only its columns past out_w, which are not stored),
            // and every lane runs the same stores (rows before, in and after the loop alike).
            [[unroll]] for (int h = 0; h < 2; ++h) {
                const int ox = M * (tx0 + 2 * h);  // the pair's first column
                if (uint(tx0 + 2 * h) >= uint(p.tiles_w)) continue;
                float raw[2 * M];  // the pair's 2M consecutive values of this output row
                [[unroll]] for (int j = 0; j < 2; ++j) {
                    [[unroll]] for (int k = 0; k < M; ++k) raw[M * j + k] = o[k][2 * h + j];
                }
                if (PH * PW == 1 && VEC_OUT) {
                    // ox is a multiple of 4 (M even, the pair's tile even): M / 2 aligned vec4s
                    [[unroll]] for (int k = 0; k < M / 2; ++k) {
                        if (ox + 4 * k < p.out_w)
                            y[(yrow + ox) / 4 + k] = vec4(raw[4 * k], raw[4 * k + 1], raw[4 * k + 2], raw[4 * k + 3]);
                    }
                    continue;
                }
                [[unroll]] for (int e = 0; e < 2 * M; ++e) {
                    if (ox + e >= p.out_w) break;
                    if (PH * PW > 1) {
                        const int sx = (ox + e) * PW + rw;
                        if (sy < p.y_h && sx < p.y_w) {
                            const int at = y_plane + sy * p.y_w + sx;
                            y[at >> 2][at & 3] = raw[e];
                        }
                    } else {
                        y[(yrow + ox + e) >> 2][(yrow + ox + e) & 3] = raw[e];
                    }
                }
            }
        }
    }
}
#endif
