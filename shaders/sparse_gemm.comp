#version 450
// Fused gather -> GEMM -> scatter-add for one kernel tap of a sparse convolution
// (vkconv/sparse_conv.py). For the pairs [start, start + count) of the rulebook:
//     y[pair_out[j]] (+)= W[tap]^T x[pair_in[j]]
// Within one tap every output row appears at most once, so the read-modify-write needs no
// atomics; the host runs the taps one after another with a barrier between them, which fixes the
// order of the float additions: results are bitwise reproducible.
//
// MODE 0 accumulates. MODE 1 is the last pass over a tap that covers every output row (SubM's
// centre tap, or the epilogue with PAIRS = 0 and no input channels): y = act(y + acc + bias).
// PAIRS: 1 reads pair j as (input row, output row); 2 swaps them (inverse convolution, which runs
// a forward convolution's rulebook backwards); 0 takes (row j, row j) and reads no pair list.
//
// Features are rows of vec4 (channels zero-padded to 4). One invocation computes ROWS pairs x CB
// vec4s of output channels; the channel block is the workgroup's z, so every invocation of a
// workgroup reads the same weights and only the feature loads differ. Weights are packed
// [tap][input channel][output channels padded to 4 * CB] as vec4. The TEXEL variant reads
// features and weights through RGBA32F texel buffers (vkconv/pipeline.py says why: a gather on
// lavapipe instead of a lane-by-lane loop).
//
// variant: sparse_gemm -DTEXEL=0
// variant: sparse_gemm_texel -DTEXEL=1
#extension GL_GOOGLE_include_directive : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
layout(constant_id = 4) const int MODE = 0;
layout(constant_id = 5) const int PAIRS = 1;
layout(constant_id = 6) const int ROWS = 4;
layout(constant_id = 7) const int CB = 4;

#if TEXEL
layout(binding = 0) uniform samplerBuffer x_tex;                      // [n_in][cin4]
layout(binding = 1) uniform samplerBuffer w_tex;                      // [kv][cin4 * 4][coutp]
#define X(i) texelFetch(x_tex, i)
#define W(i) texelFetch(w_tex, i)
#else
layout(std430, binding = 0) readonly buffer Input { vec4 x[]; };
layout(std430, binding = 1) readonly buffer Weight { vec4 w[]; };
#define X(i) x[i]
#define W(i) w[i]
#endif
layout(std430, binding = 2) readonly buffer Bias { vec4 bias[]; };    // [coutp]
layout(std430, binding = 3) readonly buffer Pairs { ivec2 pairs[]; };  // (input row, output row)
layout(std430, binding = 4) buffer Output { vec4 y[]; };              // [n_out][cout4]

layout(push_constant) uniform Params {
    int start, count, tap;
    int cin4, cout4, coutp;   // vec4s per input row, per output row, per packed weight row
    int n_in, n_out;
    float act_a, act_b;
} p;

#include "sparse_grid.glsl"

void main()
{
    const int first = flat_invocation() * ROWS;
    if (first >= p.count) return;
    const int cb = int(gl_WorkGroupID.z) * CB;

    int src[ROWS], dst[ROWS];
    bool ok[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        // Pairs past the end repeat the last one, so every load stays in bounds; they store nothing.
        int j = p.start + min(first + r, p.count - 1);
        ivec2 pr = PAIRS == 0 ? ivec2(j) : pairs[j];
        src[r] = PAIRS == 2 ? pr.y : pr.x;
        dst[r] = PAIRS == 2 ? pr.x : pr.y;
        ok[r] = first + r < p.count && uint(src[r]) < uint(p.n_in) && uint(dst[r]) < uint(p.n_out);
        src[r] = ok[r] ? src[r] : 0;
    }

    vec4 acc[ROWS * CB];
    for (int i = 0; i < ROWS * CB; ++i) acc[i] = vec4(0.0);
    int wrow = p.tap * p.cin4 * 4 * p.coutp + cb;
    for (int ci = 0; ci < p.cin4; ++ci) {
        vec4 xv[ROWS];
        for (int r = 0; r < ROWS; ++r) xv[r] = X(src[r] * p.cin4 + ci);
        for (int j = 0; j < 4; ++j) {
            for (int c = 0; c < CB; ++c) {
                vec4 wv = W(wrow + c);
                for (int r = 0; r < ROWS; ++r) acc[r * CB + c] += xv[r][j] * wv;
            }
            wrow += p.coutp;
        }
    }

    for (int r = 0; r < ROWS; ++r) {
        if (!ok[r]) continue;
        for (int c = 0; c < CB; ++c) {
            int col = cb + c;
            if (col >= p.cout4) break;
            int at = dst[r] * p.cout4 + col;
            if (MODE == 0) y[at] += acc[r * CB + c];
            else y[at] = activate4(y[at] + acc[r * CB + c] + bias[col], p.act_a, p.act_b);
        }
    }
}
