#version 450
// y = activation(x) elementwise: ONNX Relu, Clip, LeakyRelu, HardSwish, HardSigmoid, Sigmoid, Tanh
// (ACT, from activation.glsl, picks which; a/b are its parameters). Host code: vkconv/eltwise.py.
#extension GL_GOOGLE_include_directive : require
#include "activation.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer Y { float y[]; };

layout(push_constant) uniform Params {
    int total;
    float act_a;
    float act_b;
} p;

void main()
{
    // Grid-stride loop: the host caps the workgroup count at the device limit.
    uint step = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
    for (uint i = gl_GlobalInvocationID.x; i < uint(p.total); i += step)
        y[i] = activate(x[i], p.act_a, p.act_b);
}
