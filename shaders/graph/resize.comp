#version 450
// 2-D Resize / Upsample over NCHW float32, nearest or (bi)linear. Host code: vkconv/ops/resize.py.
//
// The host computes, in float64 as ONNX's reference does, per output row and per output column
// the two source indices (already clamped to the input) and the weight of the second one, for the
// model's coordinate_transformation_mode and nearest_mode; the shader only gathers. Nearest
// tables have both indices equal and weight 0, and LINEAR = 0 skips the second taps.
#extension GL_GOOGLE_include_directive : require
#include "divide.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"

layout(constant_id = 4) const int LINEAR = 0;
// Nearest upsampling by whole factors (the host checked that its tables are o / FH and o / FW):
// indices come from the output position, with no table reads.  VEC4 (with FW > 0 and out_w a
// multiple of 4): each invocation writes 4 consecutive outputs of a row as one vec4.
layout(constant_id = 5) const int FH = 0;
layout(constant_id = 6) const int FW = 0;
layout(constant_id = 7) const bool VEC4 = false;

layout(std430, binding = 0) readonly buffer X { float x[]; };
// [out_h][2] row indices, then [out_w][2] column indices
layout(std430, binding = 1) readonly buffer Index { int index[]; };
// [out_h] row weights, then [out_w] column weights
layout(std430, binding = 2) readonly buffer Weight { float weight[]; };
layout(std430, binding = 3) writeonly buffer Y { float y[]; };
layout(std430, binding = 3) writeonly buffer Y4 { vec4 y4[]; };

layout(push_constant) uniform Params {
    uvec2 magic_w;    // divide_magic pairs of out_size.y and out_size.x
    uvec2 magic_h;
    ivec2 in_size;    // H, W
    ivec2 out_size;
    int total;        // N * C * out_h * out_w (VEC4: / 4)
} p;

void main()
{
    uint step = loop_step();
    if (FW > 0) {
        const int lanes = VEC4 ? 4 : 1;
        for (uint i = loop_first(); i < uint(p.total); i += step) {
            // magic_w divides by the row length in invocations (out_w / lanes)
            ivec3 prc = plane_row_col(i, p.magic_w, p.out_size.y / lanes, p.magic_h, p.out_size.x);
            const int src = (prc.x * p.in_size.x + prc.y / FH) * p.in_size.y;
            const int ox = prc.z * lanes;
            if (VEC4)
                y4[i] = vec4(x[src + ox / FW], x[src + (ox + 1) / FW], x[src + (ox + 2) / FW], x[src + (ox + 3) / FW]);
            else
                y[i] = x[src + ox / FW];
        }
        return;
    }
    for (uint i = loop_first(); i < uint(p.total); i += step) {
        ivec3 prc = plane_row_col(i, p.magic_w, p.out_size.y, p.magic_h, p.out_size.x);
        int plane = prc.x;
        int oy = prc.y;
        int ox = prc.z;
        int base = plane * p.in_size.x * p.in_size.y;
        int r0 = index[2 * oy] * p.in_size.y;
        int c0 = index[2 * (p.out_size.x + ox)];
        float v = x[base + r0 + c0];
        if (LINEAR != 0) {
            int r1 = index[2 * oy + 1] * p.in_size.y;
            int c1 = index[2 * (p.out_size.x + ox) + 1];
            float wy = weight[oy];
            float wx = weight[p.out_size.x + ox];
            float top = mix(v, x[base + r0 + c1], wx);
            float bottom = mix(x[base + r1 + c0], x[base + r1 + c1], wx);
            v = mix(top, bottom, wy);
        }
        y[i] = v;
    }
}
