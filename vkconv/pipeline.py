"""Compute pipelines built from embedded SPIR-V, and the descriptor sets that bind buffers to them.

Conventions shared by every shader in ``shaders/``: bindings 0..n-1 are storage buffers in argument
order, specialization constants 0, 1, 2 are the local size x, y, z, and constants from 3 on are the
shader's own (``ACT`` is 3 wherever an activation epilogue is included).
"""
from __future__ import annotations

import struct
import weakref

from ._spirv import SPIRV
from .buffer import Buffer
from .context import Context, vk
from .errors import VkconvError


def _pack_spec(values) -> bytes:
    out = bytearray()
    for v in values:
        out += struct.pack("<f", v) if isinstance(v, float) else struct.pack("<I", int(v) & 0xFFFFFFFF)
    return bytes(out)


def _destroy_pipeline(ctx: Context, handles: dict) -> None:
    if ctx._closed or not handles:
        return
    d = ctx.device
    vk.vkDestroyPipeline(d, handles.pop("pipeline"), None)
    vk.vkDestroyPipelineLayout(d, handles.pop("layout"), None)
    vk.vkDestroyDescriptorSetLayout(d, handles.pop("set_layout"), None)
    vk.vkDestroyShaderModule(d, handles.pop("module"), None)
    ctx.track("pipeline", -1)


class Pipeline:
    """Shader ``name`` with ``n_buffers`` storage buffers, ``push_size`` bytes of push constants."""

    def __init__(self, ctx: Context, name: str, n_buffers: int, push_size: int, spec: tuple = ()):
        if name not in SPIRV:
            raise VkconvError(f"no embedded shader {name!r}; run build_shaders.py")
        if push_size > ctx.info.max_push_constants_size:
            raise VkconvError(f"{name}: {push_size} bytes of push constants exceed the device's "
                              f"{ctx.info.max_push_constants_size}")
        v = vk
        self.ctx, self.name, self.n_buffers, self.push_size = ctx, name, n_buffers, push_size
        self.local_size = tuple(spec[:3]) + (1,) * (3 - len(spec[:3]))
        self._h: dict = {}
        self._finalizer = weakref.finalize(self, _destroy_pipeline, ctx, self._h)
        code = SPIRV[name]
        module_info = v.VkShaderModuleCreateInfo(codeSize=len(code), pCode=code)
        self._h["module"] = v.vkCreateShaderModule(ctx.device, module_info, None)
        bindings = [v.VkDescriptorSetLayoutBinding(
            binding=i, descriptorType=v.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, descriptorCount=1,
            stageFlags=v.VK_SHADER_STAGE_COMPUTE_BIT) for i in range(n_buffers)]
        set_info = v.VkDescriptorSetLayoutCreateInfo(bindingCount=n_buffers, pBindings=bindings)
        self._h["set_layout"] = v.vkCreateDescriptorSetLayout(ctx.device, set_info, None)
        ranges = [v.VkPushConstantRange(stageFlags=v.VK_SHADER_STAGE_COMPUTE_BIT, offset=0,
                                        size=push_size)] if push_size else None
        layout_info = v.VkPipelineLayoutCreateInfo(setLayoutCount=1, pSetLayouts=[self._h["set_layout"]],
                                                   pushConstantRangeCount=1 if push_size else 0,
                                                   pPushConstantRanges=ranges)
        self._h["layout"] = v.vkCreatePipelineLayout(ctx.device, layout_info, None)
        # Every nested struct stays in a local until the create call returns: the binding frees
        # inline temporaries early (see shared/notes/vulkan-on-this-machine.md).
        spec_data = v.ffi.new("char[]", _pack_spec(spec)) if spec else None
        entries = [v.VkSpecializationMapEntry(constantID=i, offset=4 * i, size=4) for i in range(len(spec))]
        spec_info = v.VkSpecializationInfo(mapEntryCount=len(spec), pMapEntries=entries or None,
                                           dataSize=4 * len(spec), pData=spec_data) if spec else None
        stage = v.VkPipelineShaderStageCreateInfo(stage=v.VK_SHADER_STAGE_COMPUTE_BIT,
                                                  module=self._h["module"], pName="main",
                                                  pSpecializationInfo=spec_info)
        pipe_info = v.VkComputePipelineCreateInfo(stage=stage, layout=self._h["layout"])
        self._h["pipeline"] = v.vkCreateComputePipelines(ctx.device, ctx.pipeline_cache, 1,
                                                         [pipe_info], None)[0]
        ctx.track("pipeline", 1)
        ctx.stats["pipelines_created"] += 1

    @property
    def handle(self):
        return self._h["pipeline"]

    @property
    def layout(self):
        return self._h["layout"]

    @property
    def set_layout(self):
        return self._h["set_layout"]

    def close(self) -> None:
        self._finalizer()


def _destroy_set(ctx: Context, handles: list) -> None:
    if ctx._closed or not handles:
        return
    vk.vkDestroyDescriptorPool(ctx.device, handles.pop(), None)  # frees the set with it
    ctx.track("descriptor_pool", -1)


class DescriptorSet:
    """``buffers`` bound, in order, to bindings 0..n-1 of ``pipeline``; owns its own small pool."""

    def __init__(self, pipeline: Pipeline, buffers: list[Buffer]):
        if len(buffers) != pipeline.n_buffers:
            raise VkconvError(f"{pipeline.name} takes {pipeline.n_buffers} buffers, got {len(buffers)}")
        v, ctx = vk, pipeline.ctx
        self.ctx, self.buffers = ctx, list(buffers)
        self._h: list = []
        self._finalizer = weakref.finalize(self, _destroy_set, ctx, self._h)
        sizes = [v.VkDescriptorPoolSize(type=v.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                        descriptorCount=len(buffers))]
        pool_info = v.VkDescriptorPoolCreateInfo(maxSets=1, poolSizeCount=1, pPoolSizes=sizes)
        pool = v.vkCreateDescriptorPool(ctx.device, pool_info, None)
        self._h.append(pool)
        ctx.track("descriptor_pool", 1)
        alloc = v.VkDescriptorSetAllocateInfo(descriptorPool=pool, descriptorSetCount=1,
                                              pSetLayouts=[pipeline.set_layout])
        self.handle = v.vkAllocateDescriptorSets(ctx.device, alloc)[0]
        infos = [v.VkDescriptorBufferInfo(buffer=b.buffer, offset=0, range=b.size) for b in buffers]
        writes = [v.VkWriteDescriptorSet(dstSet=self.handle, dstBinding=i, descriptorCount=1,
                                         descriptorType=v.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                         pBufferInfo=[infos[i]]) for i in range(len(buffers))]
        v.vkUpdateDescriptorSets(ctx.device, len(writes), writes, 0, None)
        ctx.adopt(self)

    def close(self) -> None:
        self._finalizer()
