#version 450
// Elementwise Add / Sub / Mul / Div with ONNX (numpy) multidirectional broadcasting, rank <= 5,
// float32, and a fused activation. Host code: vkconv/eltwise.py.
//
// The host lifts both operands and the output to rank 5 and passes, per output axis, each operand's
// element stride (0 along an axis the operand broadcasts), so one pipeline serves every shape pair.
// A grid-stride loop keeps the workgroup count within the device limit for any tensor size.
#extension GL_GOOGLE_include_directive : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

#define OP_ADD 0
#define OP_SUB 1
#define OP_MUL 2
#define OP_DIV 3
layout(constant_id = 4) const int OP = OP_ADD;

layout(std430, binding = 0) readonly buffer A { float a[]; };
layout(std430, binding = 1) readonly buffer B { float b[]; };
layout(std430, binding = 2) writeonly buffer Y { float y[]; };

layout(push_constant) uniform Params {
    int dims[5];      // output extents, outermost first
    int stride_a[5];  // A's element stride per output axis (0: broadcast)
    int stride_b[5];
    int total;        // product of dims
    float act_a;
    float act_b;
} p;

void main()
{
    uint step = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
    for (uint i = gl_GlobalInvocationID.x; i < uint(p.total); i += step) {
        int rest = int(i);
        int ia = 0;
        int ib = 0;
        for (int d = 4; d >= 0; --d) {
            int c = rest % p.dims[d];
            rest /= p.dims[d];
            ia += c * p.stride_a[d];
            ib += c * p.stride_b[d];
        }
        float u = a[ia];
        float v = b[ib];
        float r;
        if (OP == OP_ADD) r = u + v;
        else if (OP == OP_SUB) r = u - v;
        else if (OP == OP_MUL) r = u * v;
        else r = u / v;
        y[i] = activate(r, p.act_a, p.act_b);
    }
}
