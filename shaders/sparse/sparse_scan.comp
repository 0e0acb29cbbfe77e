#version 450
// Exclusive prefix sum of int32 values (the sparse rulebook numbers output sites with it). Host:
// vkconv/ops/sparse/rulebook.py (record_scan()), which runs a tree of blocks of LOCAL x items values,
// items a push constant so that one block (one dispatch) covers the rulebooks of common clouds:
//   sparse_scan_reduce     block b's total -> sums[b]                    (one level up per pass)
//   sparse_scan_downsweep  dst[i] = parent[b] + sum of src[block start .. i-1]; the invocation
//                          holding element n - 1 also writes the grand total to dst[n].
// Each invocation sums its run of `items` values, the workgroup scans those sums in shared
// memory, and the downsweep walks the run again writing prefixes. It may run in place (src and
// dst the same buffer): an invocation reads each value before it writes that position.
//
// variant: sparse_scan_reduce -DDOWNSWEEP=0
// variant: sparse_scan_downsweep -DDOWNSWEEP=1
#extension GL_GOOGLE_include_directive : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"  // after the local size: it reads gl_WorkGroupSize

layout(std430, binding = 0) readonly buffer Src { int src[]; };
layout(std430, binding = 1) writeonly buffer Dst { int dst[]; };   // reduce: block sums
layout(std430, binding = 2) readonly buffer Parent { int parent[]; };

layout(push_constant) uniform Params {
    int n;           // elements in src
    int items;       // consecutive elements per invocation
    int has_parent;  // downsweep: add parent[block] (0 at the top of the tree)
} p;


shared int partial[gl_WorkGroupSize.x];

void main()
{
    const int lid = int(gl_LocalInvocationID.x);
    const int block = flat_group();
    const int first = flat_invocation() * p.items;
    const int last = min(first + p.items, p.n);   // runs past n are empty
    int total = 0;
    for (int i = first; i < last; ++i) total += src[i];
    // Hillis-Steele inclusive scan of the per-invocation totals (reduce needs only the last one).
    partial[lid] = total;
    barrier();
    for (int step = 1; step < int(gl_WorkGroupSize.x); step *= 2) {
        int add = lid >= step ? partial[lid - step] : 0;
        barrier();
        partial[lid] += add;
        barrier();
    }
#if DOWNSWEEP == 0
    if (lid == int(gl_WorkGroupSize.x) - 1) dst[block] = partial[lid];
#else
    int running = partial[lid] - total + (p.has_parent != 0 ? parent[block] : 0);
    for (int i = first; i < last; ++i) {
        const int v = src[i];
        dst[i] = running;
        running += v;
    }
    if (first < p.n && last == p.n) dst[p.n] = running;
#endif
}
