#version 450
// 2-D pooling over NCHW float32: ONNX MaxPool, AveragePool (count_include_pad 0/1, ceil_mode,
// dilations) and GlobalAveragePool (a window of the whole plane). One invocation per output
// element. Host code: vkconv/ops/pool.py, which sizes the output (ceil_mode included).
// The global variant gives each plane a workgroup whose invocations sum (or max) a strided share of
// it and combine the partial results in shared memory, in a fixed order.
//
// Windows start at o * stride - pad_begin. Taps outside the input are skipped; the average divides
// by the taps inside the input (count_include_pad = 0) or by the taps inside the padded extent
// [-pad_begin, in + pad_end) (count_include_pad = 1), as ONNX's reference and PyTorch do.
// The vec4 variant covers windows that tile the rows exactly along W (kernel_w == stride_w == S,
// no W padding or dilation, widths multiples of 4: VGG's 2x2 stride-2 max pools): an invocation
// makes 4 outputs of a row from S aligned vec4 loads per window row, and stores one vec4.
// variant: pool
// variant: pool_global -DGLOBAL=1
// variant: pool_vec4 -DVEC4=1
#extension GL_GOOGLE_include_directive : require
#include "divide.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"

#define MODE_MAX 0
#define MODE_AVG 1
#define MODE_AVG_INCLUDE_PAD 2
layout(constant_id = 4) const int MODE = MODE_MAX;
layout(constant_id = 5) const int S = 1;  // vec4 variant: kernel_w == stride_w

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer Y { float y[]; };

layout(push_constant) uniform Params {
    uvec2 magic_w;     // divide_magic pairs of out_size.y and out_size.x
    uvec2 magic_h;
    ivec2 in_size;     // H, W
    ivec2 out_size;
    ivec2 kernel;
    ivec2 stride;
    ivec2 dilation;
    ivec2 pad_begin;
    ivec2 pad_end;
    int total;         // N * C * out_h * out_w
} p;

float combine(float acc, float v)
{
    if (MODE == MODE_MAX)
        return (v > acc || isnan(v)) ? v : acc;  // NaN propagates, as in numpy's max
    return acc + v;
}

#ifdef GLOBAL
// the same input as vec4s: planes whose size is a multiple of 4 are summed 4 floats per load
layout(std430, binding = 0) readonly buffer X4 { vec4 x4[]; };
shared float partial[gl_WorkGroupSize.x];

float combine4(float acc, vec4 v)
{
    return combine(combine(combine(combine(acc, v.x), v.y), v.z), v.w);
}

void main()
{
    int plane_size = p.in_size.x * p.in_size.y;
    for (int plane = int(gl_WorkGroupID.x); plane < p.total; plane += int(gl_NumWorkGroups.x)) {
        int base = plane * plane_size;
        float acc = MODE == MODE_MAX ? -1.0 / 0.0 : 0.0;
        if ((plane_size & 3) == 0) {
            for (int j = int(gl_LocalInvocationID.x); j < plane_size / 4; j += int(gl_WorkGroupSize.x))
                acc = combine4(acc, x4[base / 4 + j]);
        } else {
            for (int j = int(gl_LocalInvocationID.x); j < plane_size; j += int(gl_WorkGroupSize.x))
                acc = combine(acc, x[base + j]);
        }
        partial[gl_LocalInvocationID.x] = acc;
        barrier();
        for (uint half_ = gl_WorkGroupSize.x / 2; half_ > 0; half_ /= 2) {
            if (gl_LocalInvocationID.x < half_)
                partial[gl_LocalInvocationID.x] = combine(partial[gl_LocalInvocationID.x],
                                                          partial[gl_LocalInvocationID.x + half_]);
            barrier();
        }
        if (gl_LocalInvocationID.x == 0)
            y[plane] = MODE == MODE_MAX ? partial[0] : partial[0] / float(plane_size);
        barrier();
    }
}
#elif defined(VEC4)
layout(std430, binding = 0) readonly buffer X4 { vec4 x4[]; };
layout(std430, binding = 1) writeonly buffer Y4 { vec4 y4[]; };

void main()
{
    uint step = loop_step();
    for (uint i = loop_first(); i < uint(p.total); i += step) {
        // magic_w divides by out_w / 4
        ivec3 prc = plane_row_col(i, p.magic_w, p.out_size.y / 4, p.magic_h, p.out_size.x);
        const int y0 = prc.y * p.stride.x - p.pad_begin.x;
        const int col4 = prc.z * S;  // the first of the S vec4s of each window row
        vec4 acc = vec4(MODE == MODE_MAX ? -1.0 / 0.0 : 0.0);
        int inside = 0;
        int padded = 0;
        for (int ky = 0; ky < p.kernel.x; ++ky) {
            const int iy = y0 + ky * p.dilation.x;
            padded += iy < p.in_size.x + p.pad_end.x ? S : 0;
            if (uint(iy) >= uint(p.in_size.x))
                continue;
            inside += S;
            const int row4 = ((prc.x * p.in_size.x + iy) * p.in_size.y) / 4 + col4;
            vec4 seg[S];
            for (int v = 0; v < S; ++v)
                seg[v] = x4[row4 + v];
            for (int j = 0; j < 4; ++j)
                for (int t = 0; t < S; ++t)
                    acc[j] = combine(acc[j], seg[(j * S + t) >> 2][(j * S + t) & 3]);
        }
        if (MODE == MODE_AVG) acc /= float(max(inside, 1));
        if (MODE == MODE_AVG_INCLUDE_PAD) acc /= float(max(padded, 1));
        y4[i] = acc;
    }
}
#else
void main()
{
    uint step = loop_step();
    for (uint i = loop_first(); i < uint(p.total); i += step) {
        ivec3 prc = plane_row_col(i, p.magic_w, p.out_size.y, p.magic_h, p.out_size.x);
        int plane = prc.x;
        int oy = prc.y;
        int ox = prc.z;
        int y0 = oy * p.stride.x - p.pad_begin.x;
        int x0 = ox * p.stride.y - p.pad_begin.y;
        int base = plane * p.in_size.x * p.in_size.y;
        float acc = MODE == MODE_MAX ? -1.0 / 0.0 : 0.0;
        int inside = 0;
        int padded = 0;
        for (int ky = 0; ky < p.kernel.x; ++ky) {
            int iy = y0 + ky * p.dilation.x;
            bool row_in = iy >= 0 && iy < p.in_size.x;
            bool row_padded = iy < p.in_size.x + p.pad_end.x;
            for (int kx = 0; kx < p.kernel.y; ++kx) {
                int ix = x0 + kx * p.dilation.y;
                if (row_padded && ix < p.in_size.y + p.pad_end.y)
                    padded++;
                if (!row_in || ix < 0 || ix >= p.in_size.y)
                    continue;
                inside++;
                acc = combine(acc, x[base + iy * p.in_size.y + ix]);
            }
        }
        if (MODE == MODE_AVG) acc /= float(max(inside, 1));
        if (MODE == MODE_AVG_INCLUDE_PAD) acc /= float(max(padded, 1));
        y[i] = acc;
    }
}
#endif
