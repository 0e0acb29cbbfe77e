#version 450
// Sparse convolution rulebook stages (vkconv/ops/sparse/rulebook.py). A rulebook is output-stationary:
// for every output row o, masks[o] has bit t (word t / 32) set when kernel tap t pairs o with an
// input row, and table[o][t] holds that input row as a float (a whole number below 2^24, the host
// checks; float so that sparse_gemm.comp can read it through a texel buffer). An output row and a
// tap determine the input site, so every (o, t) entry has one writer and needs no atomics; only
// the mask bits of rows written by several invocations are set with atomicOr.
//
// SubM (output sites = input sites, odd kernel, pad = (kernel / 2) * dil):
//   subm_insert  one invocation per input row: hash its coordinates, value = row.
//   subm_pairs   one per row o, over the taps before the centre: the neighbour n found at tap t
//                gives table[o][t] = n and, by symmetry, table[n][kv - 1 - t] = o; the centre tap
//                pairs o with itself.
// Regular / strided convolution (output sites = every site an input reaches):
//   conv_candidates  one per input row i, over the taps that reach a site: the site is inserted in
//                    the hash table and the smallest input row reaching it owns it: the slot's
//                    value = atomicMax of OWNER(i) = INT_MAX - i, so the -1 the table is cleared to
//                    loses to every row; cand[i][j] keeps the slot of i's j-th reaching tap (-1:
//                    its site is outside the output grid).
//   conv_count       one per input row: how many sites it owns (then scanned into base[]); the
//                    value of each owned slot becomes CODE(i, rank among i's owned sites), which
//                    no row mistakes for its OWNER value.
//   conv_pairs       one per input row, after the scan: the site of each candidate is output row
//                    base[owner] + rank, so output rows are ordered by (owner row, tap):
//                    deterministic, whatever order the atomics ran in; emits the pair and, for
//                    the sites it owns, the output coordinates.
//   conv_invert      one per output row o of a finished rulebook: the same pairs keyed by input
//                    row (inv_table[i][t] = o), for the inverse convolution, which runs the
//                    rulebook backwards.
// lavapipe runs every buffer access and integer division lane by lane and a for loop's body once
// more (masked) when its condition ends it, so the stages touch memory in as few (and as wide)
// accesses as they can, enumerate only the taps that reach a site, and loop with do-while.
//
// variant: sparse_subm_insert -DSTAGE=0
// variant: sparse_subm_pairs -DSTAGE=1
// variant: sparse_conv_candidates -DSTAGE=2
// variant: sparse_conv_count -DSTAGE=3
// variant: sparse_conv_pairs -DSTAGE=4
// variant: sparse_conv_invert -DSTAGE=5
#extension GL_GOOGLE_include_directive : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize

layout(std430, binding = 0) readonly buffer InIdx { ivec4 in_idx[]; };   // (b, z, y, x) per row
layout(std430, binding = 1) buffer HashTable { ivec4 htab[]; };          // 2-slot buckets
layout(std430, binding = 2) buffer Cand { int cand[]; };                 // [n_in][reach] slot or -1
layout(std430, binding = 3) buffer Base { int base[]; };                 // [n_in + 1]
layout(std430, binding = 4) writeonly buffer OutIdx { ivec4 out_idx[]; };
layout(std430, binding = 5) buffer Table { float table[]; };             // [n_out][kv]
layout(std430, binding = 6) buffer Masks { uint masks[]; };              // [n_out][words]
layout(std430, binding = 7) writeonly buffer InvTable { float inv_table[]; };  // [n_in][kv]
layout(std430, binding = 8) buffer InvMasks { uint inv_masks[]; };       // [n_in][words]

// The geometry is specialized (vkconv/ops/sparse/rulebook.py: _spec()): lavapipe divides integers
// lane by lane, by a constant it multiplies instead, and loops over the taps unroll.
layout(constant_id = 4) const int KD = 1;
layout(constant_id = 5) const int KH = 1;
layout(constant_id = 6) const int KW = 1;
layout(constant_id = 7) const int SD = 1;   // stride
layout(constant_id = 8) const int SH = 1;
layout(constant_id = 9) const int SW = 1;
layout(constant_id = 10) const int PD = 0;  // padding
layout(constant_id = 11) const int PH = 0;
layout(constant_id = 12) const int PW = 0;
layout(constant_id = 13) const int DD = 1;  // dilation
layout(constant_id = 14) const int DH = 1;
layout(constant_id = 15) const int DW = 1;
layout(constant_id = 16) const int GD = 1;  // gcd(dilation, stride)
layout(constant_id = 17) const int GH = 1;
layout(constant_id = 18) const int GW = 1;
layout(constant_id = 19) const int ID = 0;  // inverse of dilation / gcd modulo stride / gcd
layout(constant_id = 20) const int IH = 0;
layout(constant_id = 21) const int IW = 0;
const int KV = KD * KH * KW;
const int WORDS = (KV + 31) / 32;   // mask words per row
const ivec3 KERNEL = ivec3(KD, KH, KW);
const ivec3 PAD = ivec3(PD, PH, PW);
const ivec3 DIL = ivec3(DD, DH, DW);

layout(push_constant) uniform Params {
    ivec4 in_shape;   // (D, H, W, n_in)
    ivec4 out_shape;  // (D', H', W', n_out)
    int mask;         // hash buckets - 1
} p;

#include "sparse_hash.glsl"

#define OWNER(row) (0x7fffffff - (row))

// Records input row `src` as output row `dst`'s tap t.
void add_pair(int dst, int t, int src)
{
    table[dst * KV + t] = float(src);
    atomicOr(masks[dst * WORDS + (t >> 5)], 1u << (t & 31));
}

#if STAGE >= 2 && STAGE <= 4
// Along one axis (kernel k, stride st, padding pad, dilation d, g = gcd(d, st), inv), input
// coordinate c reaches output (c + pad - tap * d) / st through tap `tap` when the division is
// exact: tap = k0, k0 + s', k0 + 2 s'... with s' = st / g, and k0 solving tap * (d / g) =
// (c + pad) / g modulo s' (no solution unless g divides c + pad). Each step lowers the output
// coordinate by d / g. Returns (k0, output at k0), or k0 = k when no tap reaches.
ivec2 axis_first(int c, int k, int st, int pad, int d, int g, int inv)
{
    const int a = c + pad;
    const int sp = st / g;
    if (a % g != 0) return ivec2(k, 0);
    const int k0 = ((a / g) % sp) * inv % sp;
    return ivec2(k0, (a - k0 * d) / st);
}

const ivec3 SP = ivec3(SD / GD, SH / GH, SW / GW);   // tap step between reaching taps
const ivec3 DP = ivec3(DD / GD, DH / GH, DW / GW);   // output step between them
const ivec3 REACH = (KERNEL + SP - 1) / SP;          // reaching taps per axis, at most
const int REACH_ALL = REACH.x * REACH.y * REACH.z;

// The taps of input coordinates c that reach an output coordinate (inside the grid or not):
// per axis, count (0 when none) and the first tap and its output coordinate.
struct Reach {
    ivec3 count;
    ivec3 k0;
    ivec3 o0;
};

Reach reach_of(ivec4 c)
{
    const ivec2 f0 = axis_first(c.y, KD, SD, PD, DD, GD, ID);
    const ivec2 f1 = axis_first(c.z, KH, SH, PH, DH, GH, IH);
    const ivec2 f2 = axis_first(c.w, KW, SW, PW, DW, GW, IW);
    const ivec3 k0 = ivec3(f0.x, f1.x, f2.x);
    return Reach((KERNEL - k0 + SP - 1) / SP, k0, ivec3(f0.y, f1.y, f2.y));
}

// Runs BODY for j = 0, 1... over the taps of input coordinates c that reach an output coordinate,
// with `ok` (the site is inside the output grid), t (the tap) and site (output coordinates).
#define FOR_EACH_REACH(c, BODY)                                                              \
    {                                                                                        \
        const Reach rc = reach_of(c);                                                        \
        const int total = rc.count.x * rc.count.y * rc.count.z;                              \
        ivec3 jj = ivec3(0);                                                                 \
        int j = 0;                                                                           \
        if (total > 0) do {                                                                  \
            const ivec3 k = rc.k0 + jj * SP;                                                 \
            const ivec3 site = rc.o0 - jj * DP;                                              \
            const bool ok = all(greaterThanEqual(site, ivec3(0)))                            \
                            && all(lessThan(site, p.out_shape.xyz));                         \
            const int t = (k.x * KH + k.y) * KW + k.z;                                       \
            BODY                                                                             \
            if (++jj.z == rc.count.z) {                                                      \
                jj.z = 0;                                                                    \
                if (++jj.y == rc.count.y) { jj.y = 0; ++jj.x; }                              \
            }                                                                                \
        } while (++j < total);                                                               \
    }

// The value word of hash slot q (the site's OWNER, then CODE).
#define SLOT_VALUE(q) htab[(q) >> 1][2 * ((q) & 1) + 1]
// An owned site: owner row and rank among the owner's sites (n_in * REACH_ALL, the size of cand[],
// stays far below OWNER(n_in): a storage buffer holds at most 2^30 ints).
#define CODE(row, rank) ((row) * REACH_ALL + (rank))
#endif

void main()
{
    const int n_in = p.in_shape.w;
    const int n_out = p.out_shape.w;
    const uint mask = uint(p.mask);
    const int e = flat_invocation();
#if STAGE == 5
    if (e >= n_out) return;
    int word = 0;
    do {
        uint m = masks[e * WORDS + word];
        if (KV - 32 * word < 32) m &= (1u << (KV - 32 * word)) - 1u;
        if (m != 0u) do {
            const int t = 32 * word + max(findLSB(m), 0);
            m &= m - 1u;
            const int i = int(table[e * KV + t]);
            if (uint(i) < uint(n_in)) {
                inv_table[i * KV + t] = float(e);
                atomicOr(inv_masks[i * WORDS + word], 1u << (t & 31));
            }
        } while (m != 0u);
    } while (++word < WORDS);
#else
    if (e >= n_in) return;
    const ivec4 c = in_idx[e];
#if STAGE == 0
    int slot = hash_insert(sparse_linear(c.x, c.yzw, p.in_shape.xyz), mask);
    if (slot >= 0) htab[slot / 2][2 * (slot % 2) + 1] = e;
#elif STAGE == 1
    // Taps before the centre, t < KV / 2, in (kz, ky, kx) order; the own mask bits are gathered
    // per 32-tap word and set with one atomicOr (neighbours set the mirrored bits concurrently).
    const int centre = KV / 2;
    const ivec3 q0 = c.yzw - PAD;
    uint own = 0u;
    int own_word = 0;
    if (centre > 0) {
        ivec3 k = ivec3(0);
        int t = 0;
        do {
            const ivec3 q = q0 + k * DIL;
            if (all(greaterThanEqual(q, ivec3(0))) && all(lessThan(q, p.in_shape.xyz))) {
                const int n = hash_find(sparse_linear(c.x, q, p.in_shape.xyz), mask);
                if (uint(n) < uint(n_in)) {
                    if ((t >> 5) != own_word) {
                        atomicOr(masks[e * WORDS + own_word], own);
                        own = 0u;
                        own_word = t >> 5;
                    }
                    own |= 1u << (t & 31);
                    table[e * KV + t] = float(n);
                    add_pair(n, KV - 1 - t, e);
                }
            }
            if (++k.z == KW) {
                k.z = 0;
                if (++k.y == KH) { k.y = 0; ++k.x; }
            }
        } while (++t < centre);
    }
    if ((centre >> 5) != own_word) {
        atomicOr(masks[e * WORDS + own_word], own);
        own = 0u;
        own_word = centre >> 5;
    }
    table[e * KV + centre] = float(e);
    atomicOr(masks[e * WORDS + own_word], own | (1u << (centre & 31)));
#elif STAGE == 2
    FOR_EACH_REACH(c, {
        int slot = -1;
        if (ok) {
            slot = hash_insert(sparse_linear(c.x, site, p.out_shape.xyz), mask);
            if (slot >= 0) atomicMax(SLOT_VALUE(slot), OWNER(e));
        }
        cand[e * REACH_ALL + j] = slot;
    })
#elif STAGE == 3
    const ivec3 count = reach_of(c).count;
    const int total = count.x * count.y * count.z;
    int owned = 0;
    int j = 0;
    if (total > 0) do {
        const int slot = cand[e * REACH_ALL + j];
        if (slot >= 0 && SLOT_VALUE(slot) == OWNER(e)) SLOT_VALUE(slot) = CODE(e, owned++);
    } while (++j < total);
    base[e] = owned;
#else
    FOR_EACH_REACH(c, {
        const int slot = cand[e * REACH_ALL + j];
        const int code = slot >= 0 ? SLOT_VALUE(slot) : -1;
        const int owner = code >= 0 ? code / REACH_ALL : n_in;
        if (owner < n_in) {
            const int row = base[owner] + code % REACH_ALL;
            if (uint(row) < uint(n_out)) {
                if (owner == e) out_idx[row] = ivec4(c.x, site);
                add_pair(row, t, e);
            }
        }
    })
#endif
#endif
}
