#version 450
// Output-stationary sparse convolution (vkconv/ops/sparse/conv.py): one dispatch computes every output
// row o of a rulebook (vkconv/ops/sparse/rulebook.py) as
//     y[o] = act(bias + sum over the taps t set in mask[o], in increasing t: W[t]^T x[table[o][t]])
// Each output row is summed in registers by one invocation and stored once: no read-modify-write,
// no atomics, no separate bias / activation pass, and the additions happen in tap order, so the
// results are bitwise reproducible whatever the schedule.
//
// An invocation holds ROWS output rows x CB vec4s of output channels and walks the union of its
// rows' taps, so the weights W[t] it reads serve every row of the tile; a row without tap t
// multiplies a zero vector (wasted work the host trades against the weight reuse when it picks
// ROWS, see choose_tile()). The rows of a tile are consecutive, or (SCHEDULE = 1) consecutive in a
// schedule that lists the rows sorted by tap mask, so that tiles share their taps. SHARE = 1
// gives the vec4 blocks of the same ROWS rows to neighbouring invocations (the lanes of one SIMD
// group then share the rows, hence the taps, and only their weight columns differ); SHARE = 0
// gives each invocation its own rows, the channel block being the workgroup's z.
//
// Buffers: features x [n_in][cin4] vec4; packed weights [kv][cin4 * 4][coutp] vec4 followed by the
// bias row [coutp]; table [n_out][kv] float (the input row, a whole number below 2^24, written only
// where the mask has the tap); masks [n_out][words] uint (bit t % 32 of word t / 32);
// y [n_out][cout4]; schedule [n_out] float (output rows, whole numbers; bound but unread
// without SCHEDULE).
// The TEXEL variant reads features, weights, table and schedule through texel buffers
// (vkconv/runtime/pipeline.py says why: on lavapipe a texel fetch is a gather, a storage-buffer load a
// loop over the lanes). Every loop is a do-while: lavapipe runs a for loop's body once more,
// masked, when its condition ends it.
//
// variant: sparse_gemm -DTEXEL=0
// variant: sparse_gemm_texel -DTEXEL=1
#extension GL_EXT_samplerless_texture_functions : require  // textureBuffer: SPIR-V 1.6 forbids sampled Buffer images
#extension GL_GOOGLE_include_directive : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize
layout(constant_id = 4) const int ROWS = 2;
layout(constant_id = 5) const int CB = 4;
layout(constant_id = 6) const int SHARE = 0;
layout(constant_id = 7) const int SCHEDULE = 0;

#if TEXEL
layout(binding = 0) uniform textureBuffer x_tex;
layout(binding = 1) uniform textureBuffer w_tex;
layout(binding = 2) uniform textureBuffer t_tex;
layout(binding = 5) uniform textureBuffer s_tex;
#define X(i) texelFetch(x_tex, i)
#define W(i) texelFetch(w_tex, i)
#define T(i) texelFetch(t_tex, i).x
#define S(i) texelFetch(s_tex, i).x
#else
layout(std430, binding = 0) readonly buffer Input { vec4 x[]; };
layout(std430, binding = 1) readonly buffer Weight { vec4 w[]; };
layout(std430, binding = 2) readonly buffer Table { float table[]; };
layout(std430, binding = 5) readonly buffer Schedule { float schedule[]; };
#define X(i) x[i]
#define W(i) w[i]
#define T(i) table[i]
#define S(i) schedule[i]
#endif
layout(std430, binding = 3) readonly buffer Masks { uint masks[]; };
layout(std430, binding = 4) writeonly buffer Output { vec4 y[]; };

layout(push_constant) uniform Params {
    int n_in, n_out, kv, words;
    int cin4, cout4, coutp;   // vec4s per input row, per output row, per packed weight row
    float act_a, act_b;
} p;


void main()
{
    const int blocks = p.coutp / CB;
    const int inv = flat_invocation();
    const int first = (SHARE != 0 ? inv / blocks : inv) * ROWS;
    if (first >= p.n_out) return;
    const int cb = (SHARE != 0 ? inv % blocks : int(gl_WorkGroupID.z)) * CB;
    const int tap_size = p.cin4 * 4 * p.coutp;
    // -1 past the last row (or for a schedule entry out of range); indices below use max(row, 0),
    // in range even where the row is unused
    int row[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        const int i = min(first + r, p.n_out - 1);
        row[r] = SCHEDULE != 0 ? int(S(i)) : i;
        row[r] = uint(row[r]) < uint(p.n_out) && first + r < p.n_out ? row[r] : -1;
    }

    vec4 acc[ROWS * CB];
    for (int i = 0; i < ROWS * CB; ++i) acc[i] = vec4(0.0);
    int word = 0;
    do {
        uint m[ROWS];
        uint taps = 0u;
        for (int r = 0; r < ROWS; ++r) {
            m[r] = row[r] >= 0 ? masks[max(row[r], 0) * p.words + word] : 0u;
            taps |= m[r];
        }
        // Bits past the kernel volume would index past the tables (never set by the rulebook).
        if (p.kv - 32 * word < 32) taps &= (1u << (p.kv - 32 * word)) - 1u;
        if (taps != 0u) do {
            // Lanes whose tile ran out of taps are masked here (SIMD execution); their indices
            // are still kept in range.
            const int bit = max(findLSB(taps), 0);
            taps &= taps - 1u;
            const int t = 32 * word + bit;
            int src[ROWS];
            bool on[ROWS];
            for (int r = 0; r < ROWS; ++r) {
                on[r] = ((m[r] >> bit) & 1u) != 0u;
                src[r] = on[r] ? int(T(max(row[r], 0) * p.kv + t)) : 0;
                on[r] = on[r] && uint(src[r]) < uint(p.n_in);
                src[r] = on[r] ? src[r] * p.cin4 : 0;
            }
            int wrow = t * tap_size + cb;
            int ci = 0;
            do {
                vec4 xv[ROWS];
                for (int r = 0; r < ROWS; ++r) xv[r] = on[r] ? X(src[r] + ci) : vec4(0.0);
                for (int j = 0; j < 4; ++j) {
                    for (int c = 0; c < CB; ++c) {
                        vec4 wv = W(wrow + c);
                        for (int r = 0; r < ROWS; ++r) acc[r * CB + c] += xv[r][j] * wv;
                    }
                    wrow += p.coutp;
                }
            } while (++ci < p.cin4);
        } while (taps != 0u);
    } while (++word < p.words);

    const int bias = p.kv * tap_size + cb;
    for (int r = 0; r < ROWS; ++r) {
        if (row[r] < 0) continue;
        for (int c = 0; c < CB; ++c) {
            if (cb + c >= p.cout4) break;
            y[row[r] * p.cout4 + cb + c] =
                activate4(acc[r * CB + c] + W(bias + c), p.act_a, p.act_b);
        }
    }
}
