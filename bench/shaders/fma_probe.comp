#version 450
// FMA-throughput probe for bench/conv.py: CHAINS independent vec4 fma chains per invocation, no
// memory traffic in the loop, so the device's FMA peak is 8 * CHAINS * iterations FLOPs per
// invocation divided by the time. The result is written so the work cannot be optimised away.
#extension GL_EXT_control_flow_attributes : require

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
layout(constant_id = 4) const int CHAINS = 16;

layout(std430, binding = 0) writeonly buffer Output { vec4 y[]; };

layout(push_constant) uniform Params {
    int iterations;
    float scale;
} p;

void main()
{
    const vec4 add = vec4(gl_GlobalInvocationID.x) * 1e-7;
    const vec4 mul = vec4(p.scale);
    vec4 acc[CHAINS];
    [[unroll]] for (int i = 0; i < CHAINS; ++i) acc[i] = add + float(i);
    for (int it = 0; it < p.iterations; ++it) {
        [[unroll]] for (int i = 0; i < CHAINS; ++i) acc[i] = fma(acc[i], mul, add);
    }
    vec4 s = vec4(0.0);
    [[unroll]] for (int i = 0; i < CHAINS; ++i) s += acc[i];
    y[gl_GlobalInvocationID.x] = s;
}
