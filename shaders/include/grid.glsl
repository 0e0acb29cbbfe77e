// Flat workgroup / invocation numbers over a 2-D grid of workgroups, shared by every shader that
// dispatches 1-D work: large problems exceed maxComputeWorkGroupCount[0] (65535 on many devices),
// so the host (vkconv/runtime/dispatch.py `grid`) spreads the workgroups over x and y.
// Include it after the shader's `layout(local_size_x_id = ...) in;`: before that declaration
// glslang folds gl_WorkGroupSize to its default (1, 1, 1).
#ifndef VKCONV_GRID_GLSL
#define VKCONV_GRID_GLSL

int flat_group()
{
    return int(gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x);
}

int flat_invocation()
{
    return flat_group() * int(gl_WorkGroupSize.x) + int(gl_LocalInvocationID.x);
}

#endif
