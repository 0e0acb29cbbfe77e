// Division of a non-negative index by a run-time divisor without an integer divide: CPU Vulkan
// drivers (lavapipe) have no SIMD integer division and run it lane by lane, which made index
// arithmetic dominate the elementwise kernels.  The host (vkconv.indexing.magic) gives, for a
// divisor d, the pair (m, l) with l = ceil(log2 d), m = ceil(2^(31+l) / d); then
// floor(n / d) = (n * m) >> (31 + l) exactly for every 0 <= n < 2^31 (Granlund and Montgomery,
// 1994), and the 64-bit product comes from umulExtended.
#ifndef VKCONV_DIVIDE_GLSL
#define VKCONV_DIVIDE_GLSL

uint divide_magic(uint n, uvec2 magic)
{
    uint hi, lo;
    umulExtended(n, magic.x, hi, lo);
    return ((hi << 1) | (lo >> 31)) >> magic.y;
}

// (plane, row, column) of element i of a stack of planes of `width` columns and `height` rows;
// magic_w / magic_h are the divide_magic pairs of width and height.
ivec3 plane_row_col(uint i, uvec2 magic_w, int width, uvec2 magic_h, int height)
{
    uint rows = divide_magic(i, magic_w);
    uint plane = divide_magic(rows, magic_h);
    return ivec3(plane, rows - plane * uint(height), i - rows * uint(width));
}

#endif
