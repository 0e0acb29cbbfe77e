#version 450
// Output-stationary sparse convolution (vkconv/ops/sparse/conv.py): one dispatch (per range of taps,
// PARTS below) computes every output row o of a rulebook (vkconv/ops/sparse/rulebook.py) as
//     y[o] = act(bias + sum over the taps t set in mask[o], in increasing t: W[t]^T x[table[o][t]])
// Each output row is summed in registers by one invocation (per range) and stored once (per
// range): no atomics, no separate bias / activation pass, and the additions happen in tap order,
// so the results are bitwise reproducible whatever the schedule.
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
// PARTS: the taps can be split into consecutive ranges [tap_lo, tap_hi), one dispatch each, every
// range with its own schedule (rows sorted by their taps in that range): a tile then walks the
// union of its rows' taps in one range only, which wastes far less on real clouds (30 k voxels of
// a scan, 8-row tiles: 1.31x the useful work with one range, 1.02x with three, docs/PERFORMANCE.md).
// A range other than the last takes only the rows that have taps in it (its schedule lists only
// those, n_rows of them); a row starts from the partial sum an earlier range stored in y if it has
// taps before tap_lo, else from 0, and only the last range, over every row, adds the bias and
// applies the activation.  So every row still sums its taps in increasing order: the results are
// bitwise those of one range.
//
// Buffers: features x [n_in][cin4] vec4; packed weights [kv][cin4 * 4][coutp] vec4 followed by the
// bias row [coutp]; table [n_out][kv] float (the input row, a whole number below 2^24, written only
// where the mask has the tap); masks [n_out][words] uint (bit t % 32 of word t / 32);
// y [n_out][cout4]; schedule [n_rows] float (output rows, whole numbers; bound but unread
// without SCHEDULE, where n_rows = n_out).
// The TEXEL variant reads features, weights, table and schedule through texel buffers
// (vkconv/runtime/pipeline.py says why: on lavapipe a texel fetch is a gather, a storage-buffer load a
// loop over the lanes). The loops over words, taps and input channels are do-while: lavapipe runs
// a for loop's body once more, masked, when its condition ends it.
//
// SUBGROUP = 1 (SHARE, and coutp / CB == SG, the subgroup size): the lanes of a subgroup take the
// same ROWS rows (ROWS a multiple of SG) and one channel block each; lane l reads the masks, table
// entries and features of rows l, l + SG, ... only and hands them to the other lanes by subgroup
// shuffles (on lavapipe a shuffle by a constant lane is a register permute, a texel fetch a gather:
// this cuts the gathers of feature rows SG-fold).
//
// Every loop over the register tile is unrolled ([[unroll]]), so every accumulator has a
// compile-time place (a register or a stack slot); left as loops, lavapipe indexed them in per-lane
// scratch memory at run time (1.5x slower at 16 channels, docs/PERFORMANCE.md).
//
// variant: sparse_gemm -DTEXEL=0
// variant: sparse_gemm_texel -DTEXEL=1
// variant: sparse_gemm_subgroup -DTEXEL=0 -DSUBGROUP=1 --target-env=vulkan1.1
// variant: sparse_gemm_subgroup_texel -DTEXEL=1 -DSUBGROUP=1 --target-env=vulkan1.1
#extension GL_EXT_samplerless_texture_functions : require  // textureBuffer: SPIR-V 1.6 forbids sampled Buffer images
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#if SUBGROUP
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#endif
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize
layout(constant_id = 4) const int ROWS = 2;
layout(constant_id = 5) const int CB = 4;
layout(constant_id = 6) const int SHARE = 0;
layout(constant_id = 7) const int SCHEDULE = 0;
layout(constant_id = 8) const int SG = 8;  // SUBGROUP: the subgroup size

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
layout(std430, binding = 4) buffer Output { vec4 y[]; };  // read back for rows an earlier range started

layout(push_constant) uniform Params {
    int n_in, n_out, kv, words;
    int cin4, cout4, coutp;   // vec4s per input row, per output row, per packed weight row
    int tap_lo, tap_hi;       // the taps this dispatch sums (PARTS above)
    int n_rows;               // the rows it computes: schedule entries, or n_out
    float act_a, act_b;
} p;


// Whether output row o (-1: none) has taps before tap_lo, whose partial sum an earlier range stored.
bool started(int o)
{
    if (o < 0 || p.tap_lo == 0) return false;
    uint before = 0u;
    for (int wd = 0; wd <= (p.tap_lo - 1) / 32; ++wd) {
        const int below = p.tap_lo - 32 * wd;
        before |= masks[o * p.words + wd] & (below >= 32 ? ~0u : (1u << below) - 1u);
    }
    return before != 0u;
}

void main()
{
    const int tap_size = p.cin4 * 4 * p.coutp;
#if SUBGROUP
    const int SLOTS = ROWS / SG;
    const int lane = int(gl_SubgroupInvocationID);
    const int first = (flat_group() * int(gl_NumSubgroups) + int(gl_SubgroupID)) * ROWS;
    if (first >= p.n_rows) return;  // the whole subgroup: its lanes share first
    const int cb = lane * CB;
    // This lane's rows first + k * SG + lane (-1 past the last row or for a schedule entry out of
    // range), and every row of the tile, from the lanes that own them.
    int own[SLOTS];
    [[unroll]] for (int k = 0; k < SLOTS; ++k) {
        const int i = first + k * SG + lane;
        own[k] = SCHEDULE != 0 ? int(S(min(i, p.n_rows - 1))) : i;
        own[k] = uint(own[k]) < uint(p.n_out) && i < p.n_rows ? own[k] : -1;
    }
    int row[ROWS];
    [[unroll]] for (int r = 0; r < ROWS; ++r) row[r] = subgroupShuffle(own[r / SG], r % SG);
#else
    const int blocks = p.coutp / CB;
    const int inv = flat_invocation();
    const int first = (SHARE != 0 ? inv / blocks : inv) * ROWS;
    if (first >= p.n_rows) return;
    const int cb = (SHARE != 0 ? inv % blocks : int(gl_WorkGroupID.z)) * CB;
    // -1 past the last row (or for a schedule entry out of range); indices below use max(row, 0),
    // in range even where the row is unused
    int row[ROWS];
    [[unroll]] for (int r = 0; r < ROWS; ++r) {
        const int i = min(first + r, p.n_rows - 1);
        row[r] = SCHEDULE != 0 ? int(S(i)) : i;
        row[r] = uint(row[r]) < uint(p.n_out) && first + r < p.n_rows ? row[r] : -1;
    }
#endif

    // Rows with taps before tap_lo start from the partial sum an earlier range stored in y.
#if SUBGROUP
    bool own_started[SLOTS];
    [[unroll]] for (int k = 0; k < SLOTS; ++k) own_started[k] = started(own[k]);
    bool begun[ROWS];
    [[unroll]] for (int r = 0; r < ROWS; ++r) begun[r] = subgroupShuffle(own_started[r / SG], r % SG);
#else
    bool begun[ROWS];
    [[unroll]] for (int r = 0; r < ROWS; ++r) begun[r] = started(row[r]);
#endif
    vec4 acc[ROWS * CB];
    [[unroll]] for (int r = 0; r < ROWS; ++r)
        [[unroll]] for (int c = 0; c < CB; ++c)
            acc[r * CB + c] = begun[r] && cb + c < p.cout4 ? y[max(row[r], 0) * p.cout4 + cb + c] : vec4(0.0);
    int word = p.tap_lo / 32;
    const int end_word = (p.tap_hi + 31) / 32;
    do {
        uint taps = 0u;
#if SUBGROUP
        uint m[SLOTS];  // this lane's rows' masks; the tile's union is the same in every lane
        [[unroll]] for (int k = 0; k < SLOTS; ++k) m[k] = own[k] >= 0 ? masks[max(own[k], 0) * p.words + word] : 0u;
        [[unroll]] for (int r = 0; r < ROWS; ++r) taps |= subgroupShuffle(m[r / SG], r % SG);
#else
        uint m[ROWS];
        [[unroll]] for (int r = 0; r < ROWS; ++r) {
            m[r] = row[r] >= 0 ? masks[max(row[r], 0) * p.words + word] : 0u;
            taps |= m[r];
        }
#endif
        // only this dispatch's taps (bits past the kernel volume, never set by the rulebook, would
        // index past the tables)
        const int lo = p.tap_lo - 32 * word, hi = p.tap_hi - 32 * word;
        if (hi < 32) taps &= (1u << hi) - 1u;  // hi > 0 and lo < 32 in the words this loop visits
        if (lo > 0) taps &= ~((1u << lo) - 1u);
        if (taps != 0u) do {
            // Lanes whose tile ran out of taps are masked here (SIMD execution); their indices
            // are still kept in range.  (SUBGROUP: taps is the same in every lane of a subgroup.)
            const int bit = max(findLSB(taps), 0);
            taps &= taps - 1u;
            const int t = 32 * word + bit;
            // the rows this lane reads: its own (SUBGROUP), else every row of the tile
#if SUBGROUP
#define NSRC SLOTS
#define AT(k) own[k]
#else
#define NSRC ROWS
#define AT(k) row[k]
#endif
            int src[NSRC];
            bool on[NSRC];
            [[unroll]] for (int k = 0; k < NSRC; ++k) {
                on[k] = ((m[k] >> bit) & 1u) != 0u;
                src[k] = on[k] ? int(T(max(AT(k), 0) * p.kv + t)) : 0;
                on[k] = on[k] && uint(src[k]) < uint(p.n_in);
                src[k] = on[k] ? src[k] * p.cin4 : 0;
            }
            int wrow = t * tap_size + cb;
            int ci = 0;
            do {
                vec4 xv[ROWS];
#if SUBGROUP
                vec4 xo[SLOTS];
                [[unroll]] for (int k = 0; k < SLOTS; ++k) xo[k] = on[k] ? X(src[k] + ci) : vec4(0.0);
                [[unroll]] for (int r = 0; r < ROWS; ++r) xv[r] = subgroupShuffle(xo[r / SG], r % SG);
#else
                [[unroll]] for (int r = 0; r < ROWS; ++r) xv[r] = on[r] ? X(src[r] + ci) : vec4(0.0);
#endif
                // the 4 x CB weight vec4s of these 4 input channels, then each accumulator takes its
                // 4 products in a row (loaded and stored once per input vec4 where it lives in memory)
                vec4 wv[4 * CB];
                [[unroll]] for (int j = 0; j < 4; ++j)
                    [[unroll]] for (int c = 0; c < CB; ++c) wv[j * CB + c] = W(wrow + j * p.coutp + c);
                wrow += 4 * p.coutp;
                [[unroll]] for (int r = 0; r < ROWS; ++r) {
                    [[unroll]] for (int c = 0; c < CB; ++c) {
                        vec4 a = acc[r * CB + c];
                        [[unroll]] for (int j = 0; j < 4; ++j) a += xv[r][j] * wv[j * CB + c];
                        acc[r * CB + c] = a;
                    }
                }
            } while (++ci < p.cin4);
        } while (taps != 0u);
    } while (++word < end_word);

    const int bias = p.kv * tap_size + cb;
    const bool last = p.tap_hi >= p.kv;
    [[unroll]] for (int r = 0; r < ROWS; ++r) {
        if (row[r] < 0) continue;
        [[unroll]] for (int c = 0; c < CB; ++c) {
            if (cb + c >= p.cout4) break;
            y[row[r] * p.cout4 + cb + c] =
                last ? activate4(acc[r * CB + c] + W(bias + c), p.act_a, p.act_b) : acc[r * CB + c];
        }
    }
}
