// Flat workgroup / invocation numbers over a 2-D grid of workgroups, and grid-stride loops, shared
// by every shader that dispatches 1-D work: large problems exceed maxComputeWorkGroupCount[0] (65535 on many devices),
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

// Grid-stride loops over x (the host sizes them with vkconv/runtime/dispatch.py `looped_grid`,
// which caps the workgroup count): an invocation takes items loop_first(), + loop_step(), ...
uint loop_first()
{
    return gl_GlobalInvocationID.x;
}

uint loop_step()
{
    return gl_NumWorkGroups.x * gl_WorkGroupSize.x;
}

#endif
