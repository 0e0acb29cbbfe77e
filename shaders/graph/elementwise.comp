#version 450
// A fused chain of elementwise ops: up to 4 input tensors with ONNX (numpy) broadcasting, up to
// 8 instructions (activation.glsl's program_step: Add / Sub / Mul / Div, an activation), one output.
// Host code: vkconv/ops/elementwise.py.
//
// The program is specialization constants, so the driver unrolls it and keeps every register in
// SSA form: a chain such as PP-LCNet's decomposed HardSwish (Add, Clip, Mul, Div, Mul, Add) reads
// its input once and writes once, where one dispatch per op would read and write the tensor six
// times.  Registers 0..3 hold the inputs at the output element, register 4 + k instruction k's
// result; an operand index < 0 reads the instruction's immediate FA instead.
//
// The host collapses the broadcast to at most 5 axes and passes, per input and axis, the element
// stride (0 along a broadcast axis).  The outermost axis is the workgroup z index, so an element's
// coordinates take three divisions (divide.glsl) by the inner extents.  VEC4 variant: each invocation makes 4 consecutive outputs;
// the host picks it when the innermost axis is a multiple of 4 and every input is either
// contiguous or broadcast along it, so loads are vec4 or one scalar splat.
//
// variant: elementwise
// variant: elementwise_vec4 -DVEC4=1
#extension GL_GOOGLE_include_directive : require
#include "activation.glsl"
#include "divide.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"

layout(constant_id = 4) const int N_IN = 1;
layout(constant_id = 5) const int N_INSTR = 1;
// collapsed axes in use (1..5): the index arithmetic of the others folds away
layout(constant_id = 6) const int AXES = 5;

#define INSTRUCTION(K, ID) \
    layout(constant_id = ID) const int OP##K = OP_ADD; \
    layout(constant_id = ID + 1) const int A##K = 0; \
    layout(constant_id = ID + 2) const int B##K = 0; \
    layout(constant_id = ID + 3) const float FA##K = 0.0; \
    layout(constant_id = ID + 4) const float FB##K = 0.0;
INSTRUCTION(0, 8)
INSTRUCTION(1, 13)
INSTRUCTION(2, 18)
INSTRUCTION(3, 23)
INSTRUCTION(4, 28)
INSTRUCTION(5, 33)
INSTRUCTION(6, 38)
INSTRUCTION(7, 43)

#ifdef VEC4
#define T vec4
#else
#define T float
#endif

// Each input is declared as floats and, for the VEC4 loads, as vec4s over the same binding.
#define INPUT(I) \
    layout(std430, binding = I) readonly buffer X##I { float x##I[]; }; \
    layout(std430, binding = I) readonly buffer X4##I { vec4 x4##I[]; };
INPUT(0)
INPUT(1)
INPUT(2)
INPUT(3)
layout(std430, binding = 4) writeonly buffer Y { T y[]; };

// 128 bytes, the smallest maxPushConstantsSize Vulkan allows.
layout(push_constant) uniform Params {
    uvec2 magic[3];   // divide_magic pairs for extents[2], [3], [4]
    int extents[5];   // collapsed output axes, outermost first; [4] in vec4 units for VEC4
    int strides[20];  // [input][axis]: element stride (0: broadcast)
    int inner;        // extents[1] * ... * extents[4]
} p;

T apply(int op, T u, T v, float a, float b)
{
#ifdef VEC4
    return vec4(program_step(op, u.x, v.x, a, b), program_step(op, u.y, v.y, a, b),
                program_step(op, u.z, v.z, a, b), program_step(op, u.w, v.w, a, b));
#else
    return program_step(op, u, v, a, b);
#endif
}

T load(int i, int offset, int inner_stride)
{
#ifdef VEC4
    // offset is a multiple of 4 when the input is contiguous along the innermost axis
    if (inner_stride != 0) {
        if (i == 0) return x40[offset >> 2];
        if (i == 1) return x41[offset >> 2];
        if (i == 2) return x42[offset >> 2];
        return x43[offset >> 2];
    }
    if (i == 0) return T(x0[offset]);
    if (i == 1) return T(x1[offset]);
    if (i == 2) return T(x2[offset]);
    return T(x3[offset]);
#else
    if (i == 0) return x0[offset];
    if (i == 1) return x1[offset];
    if (i == 2) return x2[offset];
    return x3[offset];
#endif
}

#define STEP(K) \
    if (K < N_INSTR) \
        r[4 + K] = apply(OP##K, A##K >= 0 ? r[max(A##K, 0)] : T(FA##K), B##K >= 0 ? r[max(B##K, 0)] : T(FA##K), \
                         FA##K, FB##K);

void main()
{
#ifdef VEC4
    const int lanes = 4;
#else
    const int lanes = 1;
#endif
    uint step = loop_step();
    for (uint outer = gl_WorkGroupID.z; outer < uint(AXES == 5 ? p.extents[0] : 1); outer += gl_NumWorkGroups.z)
    for (uint n = loop_first(); n < uint(p.inner); n += step) {
        // coordinates along the collapsed axes, innermost (in vec4 units for VEC4) first
        int c[5] = int[5](int(n), 0, 0, 0, int(outer));
        uint rest = n;
        for (int d = 1; d < min(AXES, 4); ++d) {
            uint q = divide_magic(rest, p.magic[3 - d]);
            c[d - 1] = int(rest - q * uint(p.extents[5 - d]));
            c[d] = int(q);
            rest = q;
        }
        c[0] *= lanes;
        T r[12];
        for (int i = 0; i < N_IN; ++i) {
            int offset = 0;
            for (int d = 0; d < AXES; ++d)
                offset += c[d] * p.strides[5 * i + 4 - d];
            r[i] = load(i, offset, p.strides[5 * i + 4]);
        }
        STEP(0)
        STEP(1)
        STEP(2)
        STEP(3)
        STEP(4)
        STEP(5)
        STEP(6)
        STEP(7)
        y[outer * uint(p.inner) + n] = r[3 + N_INSTR];
    }
}
