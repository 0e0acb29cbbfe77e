// Flat invocation index over a 2-D dispatch grid, shared by the conv kernels (host side:
// vkconv/conv_kernels.py `dispatch_grid`). Large problems exceed maxComputeWorkGroupCount[0] (65535 on
// many devices), so the host spreads the workgroups over x and y: `row_groups` is the x count.
#ifndef VKCONV_CONV_GRID_GLSL
#define VKCONV_CONV_GRID_GLSL

int flat_invocation(int row_groups)
{
    return int(gl_GlobalInvocationID.x) + int(gl_GlobalInvocationID.y) * row_groups * int(gl_WorkGroupSize.x);
}

#endif
