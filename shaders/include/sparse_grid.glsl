// Flat invocation / workgroup numbers for the sparse shaders, which dispatch 1-D work as a 2-D grid
// of workgroups: the host splits a count past maxComputeWorkGroupCount[0] over y
// (vkconv/sparse_device.py: grid(), through vkconv/conv_kernels.py dispatch_grid()).
#ifndef VKCONV_SPARSE_GRID_GLSL
#define VKCONV_SPARSE_GRID_GLSL

int flat_group()
{
    return int(gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x);
}

int flat_invocation()
{
    return flat_group() * int(gl_WorkGroupSize.x) + int(gl_LocalInvocationID.x);
}

#endif
