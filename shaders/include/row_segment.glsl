// Row segments of a convolution input read in place (MASKED), shared by conv_rows.comp and
// conv_depthwise.comp: where the input's width is a multiple of 4 its rows are whole vec4s, so
// the kernels skip the padded copy (conv_pack.comp), skip kernel rows outside the input, and
// read vec4s outside a row as zeros.  Include after the shader defines LOAD_X(i) (a vec4 load).
#ifndef VKCONV_ROW_SEGMENT_GLSL
#define VKCONV_ROW_SEGMENT_GLSL

layout(constant_id = 10) const bool MASKED = false;
// MASKED: a tile's first tap column sits SHIFT floats into its first aligned vec4, the same for
// every tile (tiles start at multiples of 4 * SW columns): (-pad_w) mod 4.
layout(constant_id = 11) const int SHIFT = 0;

// Vec4 v of the segment starting at vec4 xr of its row; col4 is that start's vec4 column and
// width4 the row's length in vec4s (MASKED only).
vec4 segment_vec4(int xr, int v, int col4, int width4)
{
    if (!MASKED)
        return LOAD_X(xr + v);
    // clamped address, then select: padding columns are exact zeros
    const bool inside = uint(col4 + v) < uint(width4);
    const vec4 value = LOAD_X(inside ? xr + v : xr - col4);
    return inside ? value : vec4(0.0);
}

#endif
