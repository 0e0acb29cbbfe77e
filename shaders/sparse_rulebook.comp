#version 450
// Sparse convolution rulebook (spconv's get_indice_pairs) on the device, one stage per variant.
// Host code and the order of stages: vkconv/sparse_rulebook.py. Every stage shares one binding
// layout so a rulebook build needs few descriptor sets.
//
// Result: per kernel tap t, pairs (input row, output row) at [t * cap, t * cap + counts[t]),
// appended with an atomic counter per tap. Within one tap each output row and each input row
// occurs at most once, so the order inside a tap changes nothing downstream (sparse_gemm.comp).
//
// SubM (output sites = input sites, odd kernel, pad = (kernel / 2) * dil):
//   subm_insert  one invocation per input row: hash its coordinates, value = row.
//   subm_pairs   one per output row o, over the taps before the centre: the neighbour n found at
//                tap t gives (n -> o) at t and, by symmetry, (o -> n) at the mirrored tap
//                kv - 1 - t, in the same slot; the centre tap (o -> o) is implicit.
// Regular / strided convolution (output sites = every site an input reaches):
//   conv_candidates  one per input row i, over the taps that reach a site: the site is inserted
//                    in the hash table and the smallest input row reaching it owns it:
//                    owner[slot] = atomicMax of OWNER(i) = INT_MAX - i, so the -1 the array is
//                    cleared to loses to every row; cand[i][j] keeps the slot of i's j-th reaching
//                    tap.
//   conv_count       one per input row: how many sites it owns (then scanned into base[]); marks
//                    its owned candidates as OWNED(slot) so later stages need not look owner[] up.
//   conv_assign      one per input row: numbers its owned sites base[i], base[i] + 1... in tap
//                    order, so output rows are ordered by (owner row, tap): deterministic, whatever
//                    order the atomics ran in; emits the pairs (i -> its own sites).
//   conv_pairs       one per input row: (i -> row of the site) for the sites other rows own.
// lavapipe runs every buffer access and integer division lane by lane, so the stages touch memory
// in as few (and as wide) accesses as they can and enumerate only the taps that reach a site.
//
// variant: sparse_subm_insert -DSTAGE=0
// variant: sparse_subm_pairs -DSTAGE=1
// variant: sparse_conv_candidates -DSTAGE=2
// variant: sparse_conv_count -DSTAGE=3
// variant: sparse_conv_assign -DSTAGE=4
// variant: sparse_conv_pairs -DSTAGE=5
#extension GL_GOOGLE_include_directive : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer InIdx { ivec4 in_idx[]; };   // (b, z, y, x) per row
layout(std430, binding = 1) buffer HashTable { ivec4 htab[]; };          // 2-slot buckets
layout(std430, binding = 2) buffer Cand { int cand[]; };   // [n_in][reach] slot, OWNED(slot), -1
layout(std430, binding = 3) buffer Base { int base[]; };                 // [n_in + 1]
layout(std430, binding = 4) writeonly buffer OutIdx { ivec4 out_idx[]; };
layout(std430, binding = 5) buffer Owner { int owner[]; };               // per slot: OWNER(row)
layout(std430, binding = 6) buffer Counts { int counts[]; };             // [kv]
layout(std430, binding = 7) writeonly buffer Pairs { ivec2 pairs[]; };   // [kv][cap] (in, out)
layout(std430, binding = 8) buffer SlotRow { int slot_row[]; };          // per slot: output row

layout(push_constant) uniform Params {
    ivec4 in_shape;   // (D, H, W, n_in)
    ivec4 out_shape;  // (D', H', W', n_out)
    ivec4 kernel;     // (kD, kH, kW, kernel volume)
    ivec4 pad;        // (pD, pH, pW, hash buckets - 1)
    ivec4 dil;        // (dD, dH, dW, pair slots per tap)
    ivec4 stride;     // (sD, sH, sW, reach = most taps of one input that reach a site)
    ivec4 gcd;        // gcd(dilation, stride) per axis
    ivec4 inv;        // inverse of dil / gcd modulo stride / gcd, per axis
} p;

#include "sparse_hash.glsl"
#include "sparse_grid.glsl"

#define OWNER(row) (0x7fffffff - (row))
// A candidate entry for a site its own row owns (<= -2; -1 is "no site", >= 0 a slot owned by
// another row). The map is its own inverse.
#define OWNED(slot) (-2 - (slot))

#if STAGE >= 2
// Appends (src -> dst) to tap t's pair list.
void append_pair(int t, int src, int dst)
{
    int at = atomicAdd(counts[t], 1);
    if (at < p.dil.w) pairs[t * p.dil.w + at] = ivec2(src, dst);
}

// Along one axis, input coordinate c reaches output (c + pad - k * dil) / stride through tap k when
// the division is exact: k = k0, k0 + s', k0 + 2 s'... with s' = stride / g, g = gcd(dil, stride),
// and k0 solving k * (dil / g) = (c + pad) / g modulo s' (no solution unless g divides c + pad).
// Each step lowers the output coordinate by dil / g. `first` is (k0, output at k0), or k0 = kernel
// when no tap reaches.
ivec2 axis_first(int c, int axis)
{
    int a = c + p.pad[axis];
    int g = p.gcd[axis];
    int sp = p.stride[axis] / g;
    if (a % g != 0) return ivec2(p.kernel[axis], 0);
    int k0 = ((a / g) % sp) * p.inv[axis] % sp;
    return ivec2(k0, (a - k0 * p.dil[axis]) / p.stride[axis]);
}

// Calls BODY with t (tap), j (index among the row's reaching taps, < reach) and site (output
// coordinates) for every tap of input coordinates c that reaches an output site.
#define FOR_EACH_SITE(c, BODY)                                                               \
    {                                                                                        \
        ivec2 f0 = axis_first(c.y, 0), f1 = axis_first(c.z, 1), f2 = axis_first(c.w, 2);     \
        ivec3 sp = p.stride.xyz / p.gcd.xyz;                                                 \
        ivec3 dp = p.dil.xyz / p.gcd.xyz;                                                    \
        ivec3 reach = (p.kernel.xyz + sp - 1) / sp;                                          \
        int j = 0;                                                                           \
        for (int jz = 0; jz < reach.x; ++jz) {                                               \
            int kz = f0.x + jz * sp.x, oz = f0.y - jz * dp.x;                                \
            bool okz = kz < p.kernel.x && oz >= 0 && oz < p.out_shape.x;                     \
            for (int jy = 0; jy < reach.y; ++jy) {                                           \
                int ky = f1.x + jy * sp.y, oy = f1.y - jy * dp.y;                            \
                bool oky = okz && ky < p.kernel.y && oy >= 0 && oy < p.out_shape.y;          \
                for (int jx = 0; jx < reach.z; ++jx, ++j) {                                  \
                    int kx = f2.x + jx * sp.z, ox = f2.y - jx * dp.z;                        \
                    if (oky && kx < p.kernel.z && ox >= 0 && ox < p.out_shape.z) {           \
                        int t = (kz * p.kernel.y + ky) * p.kernel.z + kx;                    \
                        ivec3 site = ivec3(oz, oy, ox);                                      \
                        BODY                                                                 \
                    }                                                                        \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }
#endif

void main()
{
    const int kv = p.kernel.w;
    const int n_in = p.in_shape.w;
    const int n_out = p.out_shape.w;
    const uint mask = uint(p.pad.w);
    const int cap = p.dil.w;
    const int reach_all = p.stride.w;
    const int e = flat_invocation();
    if (e >= n_in) return;
    const ivec4 c = in_idx[e];
#if STAGE == 0
    int slot = hash_insert(sparse_linear(c.x, c.yzw, p.in_shape.xyz), mask);
    if (slot >= 0) htab[slot / 2][2 * (slot % 2) + 1] = e;
#elif STAGE == 1
    // Taps before the centre: t < kv / 2 in (kz, ky, kx) order.
    const int centre = kv / 2;
    ivec3 q0 = c.yzw - p.pad.xyz;
    int t = 0;
    for (int kz = 0; kz < p.kernel.x && t < centre; ++kz) {
        for (int ky = 0; ky < p.kernel.y && t < centre; ++ky) {
            for (int kx = 0; kx < p.kernel.z && t < centre; ++kx, ++t) {
                ivec3 q = q0 + ivec3(kz, ky, kx) * p.dil.xyz;
                if (any(lessThan(q, ivec3(0))) || any(greaterThanEqual(q, p.in_shape.xyz))) continue;
                int n = hash_find(sparse_linear(c.x, q, p.in_shape.xyz), mask);
                if (uint(n) >= uint(n_in)) continue;
                int at = atomicAdd(counts[t], 1);
                if (at < cap) {
                    pairs[t * cap + at] = ivec2(n, e);
                    pairs[(kv - 1 - t) * cap + at] = ivec2(e, n);
                }
            }
        }
    }
#elif STAGE == 2
    FOR_EACH_SITE(c, {
        int slot = hash_insert(sparse_linear(c.x, site, p.out_shape.xyz), mask);
        if (slot >= 0) atomicMax(owner[slot], OWNER(e));
        cand[e * reach_all + j] = slot;
    })
#elif STAGE == 3
    int owned = 0;
    FOR_EACH_SITE(c, {
        int slot = cand[e * reach_all + j];
        if (slot >= 0 && owner[slot] == OWNER(e)) {
            cand[e * reach_all + j] = OWNED(slot);
            ++owned;
        }
    })
    base[e] = owned;
#elif STAGE == 4
    int row = base[e];
    FOR_EACH_SITE(c, {
        int slot = OWNED(cand[e * reach_all + j]);
        if (slot >= 0 && row < n_out) {
            out_idx[row] = ivec4(c.x, site);
            slot_row[slot] = row;
            append_pair(t, e, row);
            ++row;
        }
    })
#else
    FOR_EACH_SITE(c, {
        int slot = cand[e * reach_all + j];
        int row = slot >= 0 ? slot_row[slot] : -1;
        if (row >= 0 && row < n_out) append_pair(t, e, row);
    })
#endif
}
