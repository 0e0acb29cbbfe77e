#version 450
// ONNX Transpose of a float32 tensor: y = x with its axes permuted. Host code: vkconv/ops/transpose.py.
//
// The host collapses the permutation first: size-1 axes are dropped and output axes that stay
// adjacent in the input merge, so at most 5 axes are left here (and a permutation that keeps the
// memory order never reaches this shader: it is a buffer copy).  Each output element's
// coordinates come from its flat index by multiply-shift divisions (divide.glsl) by the output
// extents, innermost first; its source is the dot product of those coordinates with the input
// strides of the output axes.  Writes are consecutive; reads gather.
#extension GL_GOOGLE_include_directive : require
#include "divide.glsl"

layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;
#include "grid.glsl"

// collapsed axes in use (2..5): the index arithmetic of the others folds away
layout(constant_id = 4) const int AXES = 5;

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer Y { float y[]; };

layout(push_constant) uniform Params {
    uvec2 magic[4];   // divide_magic pairs of extents[1], [2], [3], [4]
    int extents[5];   // output extents, outermost first, leading unused axes 1
    int strides[5];   // input element stride of each output axis
    int total;        // output elements
} p;

void main()
{
    uint step = loop_step();
    for (uint i = loop_first(); i < uint(p.total); i += step) {
        uint rest = i;
        int offset = 0;
        for (int d = 4; d > 5 - AXES; --d) {
            uint q = divide_magic(rest, p.magic[d - 1]);
            offset += int(rest - q * uint(p.extents[d])) * p.strides[d];
            rest = q;
        }
        y[i] = x[offset + int(rest) * p.strides[5 - AXES]];
    }
}
