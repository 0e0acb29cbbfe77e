"""Compute pipelines built from embedded SPIR-V, and the descriptor sets that bind buffers to them.

Conventions shared by every shader in ``shaders/``: bindings 0..n-1 are buffers in argument order,
specialization constants 0, 1, 2 are the local size x, y, z, and constants from 3 on are the
shader's own (``ACT`` is 3 wherever an activation epilogue is included).

A binding is a storage buffer (``STORAGE``) or a uniform texel buffer viewed as RGBA32F
(``TEXEL4``: ``texelFetch(textureBuffer, i)`` is vec4 number i), RGBA16F (``TEXEL4H``: the same
vec4, stored as half floats: half the memory and bandwidth, arithmetic still fp32) or R32F
(``TEXEL1``).  Why texel
buffers: on Mesa lavapipe every storage-buffer load compiles into a per-lane loop with a branch per
component, while ``texelFetch`` is a plain gather (measured on LLVM 15, 2 cores: 1.15 G floats/s
through vec4 SSBO loads, 2.5 G floats/s through RGBA32F texelFetch); on GPUs texel buffers go
through the texture cache.  A texel binding needs a buffer made with ``Buffer(..., texel=True)``.
"""
from __future__ import annotations

import logging
import struct
import weakref
from collections.abc import Mapping

from vkconv.runtime._spirv import SPIRV
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.context import Context, vk
from vkconv.runtime.errors import VkconvError

log = logging.getLogger(__name__)

STORAGE = "storage"
TEXEL4 = "texel4"
TEXEL4H = "texel4h"  # RGBA16F view: texelFetch still gives vec4 number i, stored as 4 halves
TEXEL1 = "texel1"
_TEXEL_BYTES = {TEXEL4: 16, TEXEL4H: 8, TEXEL1: 4}
# format names, looked up when a view is made (the module imports without a Vulkan loader)
_TEXEL_FORMATS = {TEXEL4: "VK_FORMAT_R32G32B32A32_SFLOAT", TEXEL4H: "VK_FORMAT_R16G16B16A16_SFLOAT",
                  TEXEL1: "VK_FORMAT_R32_SFLOAT"}


def binding_kinds(bindings) -> tuple[str, ...]:
    """One kind per binding from an int (that many storage buffers) or a sequence of kinds."""
    kinds = (STORAGE,) * bindings if isinstance(bindings, int) else tuple(bindings)
    if any(k not in (STORAGE, TEXEL4, TEXEL4H, TEXEL1) for k in kinds):
        raise VkconvError(f"unknown binding kind in {kinds}")
    return kinds


def _descriptor_type(kind: str) -> int:
    return (vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER if kind == STORAGE
            else vk.VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER)


def texel_fits(ctx: Context, nbytes: int, kind: str = TEXEL4) -> bool:
    """Whether a buffer of ``nbytes`` can be viewed whole as a ``kind`` texel buffer."""
    return -(-nbytes // _TEXEL_BYTES[kind]) <= ctx.info.max_texel_buffer_elements


def _pack_spec(values) -> bytes:
    out = bytearray()
    for v in values:
        out += struct.pack("<f", v) if isinstance(v, float) else struct.pack("<I", int(v) & 0xFFFFFFFF)
    return bytes(out)


def _spec_constants(spec) -> list[tuple[int, int | float]]:
    """``(constant id, value)`` for ``spec``: value i has id i; a value with a ``spec_constants(i)``
    method (an activation epilogue) gives its own entries, at id i and at ids of its own."""
    out: list[tuple[int, int | float]] = []
    for i, value in enumerate(spec):
        if hasattr(value, "spec_constants"):
            out += value.spec_constants(i)
        else:
            out.append((i, value))
    return out


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
    """Shader ``name`` with ``bindings`` (a count of storage buffers or one kind per binding),
    ``push_size`` bytes of push constants and specialization constants ``spec``."""

    def __init__(self, ctx: Context, name: str, bindings, push_size: int, spec: tuple = (),
                 modules: Mapping[str, bytes] = SPIRV):
        if name not in modules:
            raise VkconvError(f"no embedded shader {name!r}; run build_shaders.py")
        if push_size > ctx.info.max_push_constants_size:
            raise VkconvError(f"{name}: {push_size} bytes of push constants exceed the device's "
                              f"{ctx.info.max_push_constants_size}")
        v = vk
        self.kinds = binding_kinds(bindings)
        self.ctx, self.name, self.n_buffers, self.push_size = ctx, name, len(self.kinds), push_size
        self.local_size = tuple(spec[:3]) + (1,) * (3 - len(spec[:3]))
        self._h: dict = {}
        self._finalizer = weakref.finalize(self, _destroy_pipeline, ctx, self._h)
        code = modules[name]
        module_info = v.VkShaderModuleCreateInfo(codeSize=len(code), pCode=code)
        self._h["module"] = v.vkCreateShaderModule(ctx.device, module_info, None)
        layout_bindings = [v.VkDescriptorSetLayoutBinding(
            binding=i, descriptorType=_descriptor_type(kind), descriptorCount=1,
            stageFlags=v.VK_SHADER_STAGE_COMPUTE_BIT) for i, kind in enumerate(self.kinds)]
        set_info = v.VkDescriptorSetLayoutCreateInfo(bindingCount=self.n_buffers, pBindings=layout_bindings)
        self._h["set_layout"] = v.vkCreateDescriptorSetLayout(ctx.device, set_info, None)
        ranges = [v.VkPushConstantRange(stageFlags=v.VK_SHADER_STAGE_COMPUTE_BIT, offset=0,
                                        size=push_size)] if push_size else None
        layout_info = v.VkPipelineLayoutCreateInfo(setLayoutCount=1, pSetLayouts=[self._h["set_layout"]],
                                                   pushConstantRangeCount=1 if push_size else 0,
                                                   pPushConstantRanges=ranges)
        self._h["layout"] = v.vkCreatePipelineLayout(ctx.device, layout_info, None)
        # Every nested struct stays in a local until the create call returns: the binding frees
        # inline temporaries early (see shared/notes/vulkan-on-this-machine.md).
        constants = _spec_constants(spec)
        spec_data = v.ffi.new("char[]", _pack_spec([value for _, value in constants])) if constants else None
        entries = [v.VkSpecializationMapEntry(constantID=cid, offset=4 * i, size=4)
                   for i, (cid, _) in enumerate(constants)]
        spec_info = v.VkSpecializationInfo(mapEntryCount=len(constants), pMapEntries=entries or None,
                                           dataSize=4 * len(constants), pData=spec_data) if constants else None
        stage = v.VkPipelineShaderStageCreateInfo(stage=v.VK_SHADER_STAGE_COMPUTE_BIT,
                                                  module=self._h["module"], pName="main",
                                                  pSpecializationInfo=spec_info)
        pipe_info = v.VkComputePipelineCreateInfo(stage=stage, layout=self._h["layout"])
        self._h["pipeline"] = v.vkCreateComputePipelines(ctx.device, ctx.pipeline_cache, 1,
                                                         [pipe_info], None)[0]
        ctx.track("pipeline", 1)
        ctx.stats["pipelines_created"] += 1
        log.debug("pipeline %s created: spec constants %s, %d buffers, %d push-constant bytes", name,
                  tuple(spec), self.n_buffers, push_size)

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


def _destroy_set(ctx: Context, handles: dict) -> None:
    if ctx._closed or not handles:
        return
    for view in handles.pop("views"):
        vk.vkDestroyBufferView(ctx.device, view, None)
        ctx.track("buffer_view", -1)
    vk.vkDestroyDescriptorPool(ctx.device, handles.pop("pool"), None)  # frees the set with it
    ctx.track("descriptor_pool", -1)


class DescriptorSet:
    """``buffers`` bound, in order, to the bindings of ``pipeline``; owns its own small pool and the
    buffer views of its texel bindings.

    The Vulkan structs are filled as raw cffi arrays: the ``vulkan`` module's keyword constructors
    cost about 9 us a struct, which made a set 0.14-0.25 ms of host time (measured), most of a
    sparse convolution's per-call overhead (it binds four sets per call)."""

    def __init__(self, pipeline: Pipeline, buffers: list[Buffer]):
        if len(buffers) != pipeline.n_buffers:
            raise VkconvError(f"{pipeline.name} takes {pipeline.n_buffers} buffers, got {len(buffers)}")
        v, ctx = vk, pipeline.ctx
        ffi = v.ffi
        self.ctx, self.buffers = ctx, list(buffers)
        self._h: dict = {"views": []}
        self._finalizer = weakref.finalize(self, _destroy_set, ctx, self._h)
        kinds = pipeline.kinds
        n = len(kinds)
        for i, (kind, buf) in enumerate(zip(kinds, buffers)):
            if kind == STORAGE:
                continue
            if not buf.texel:
                raise VkconvError(f"{pipeline.name}: binding {i} is a texel buffer, but {buf.name} was "
                                  "not created with texel=True")
            if not texel_fits(ctx, buf.size, kind):
                raise VkconvError(f"{buf.name}: {buf.size // _TEXEL_BYTES[kind]} texels exceed the device's "
                                  f"maxTexelBufferElements ({ctx.info.max_texel_buffer_elements})")
        types = sorted({_descriptor_type(k) for k in kinds})
        sizes = ffi.new("VkDescriptorPoolSize[]", len(types))
        for size, t in zip(sizes, types):
            size.type, size.descriptorCount = t, sum(_descriptor_type(k) == t for k in kinds)
        pool_info = ffi.new("VkDescriptorPoolCreateInfo*", {
            "sType": v.VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO, "maxSets": 1,
            "poolSizeCount": len(types), "pPoolSizes": sizes})
        self._h["pool"] = v.vkCreateDescriptorPool(ctx.device, pool_info, None)
        ctx.track("descriptor_pool", 1)
        layouts = ffi.new("VkDescriptorSetLayout[]", [pipeline.set_layout])
        alloc = ffi.new("VkDescriptorSetAllocateInfo*", {
            "sType": v.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO, "descriptorPool": self._h["pool"],
            "descriptorSetCount": 1, "pSetLayouts": layouts})
        self.handle = v.vkAllocateDescriptorSets(ctx.device, alloc)[0]
        self.handles = ffi.new("VkDescriptorSet[]", [self.handle])  # what vkCmdBindDescriptorSets takes
        infos = ffi.new("VkDescriptorBufferInfo[]", n)
        views = ffi.new("VkBufferView[]", n)
        writes = ffi.new("VkWriteDescriptorSet[]", n)
        view_info = ffi.new("VkBufferViewCreateInfo*", {"sType": v.VK_STRUCTURE_TYPE_BUFFER_VIEW_CREATE_INFO})
        for i, (kind, buf) in enumerate(zip(kinds, buffers)):
            write = writes[i]
            write.sType = v.VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET
            write.dstSet, write.dstBinding, write.descriptorCount = self.handle, i, 1
            write.descriptorType = _descriptor_type(kind)
            if kind == STORAGE:
                infos[i].buffer, infos[i].offset, infos[i].range = buf.buffer, 0, buf.size
                write.pBufferInfo = infos + i
                continue
            texel = _TEXEL_BYTES[kind]
            view_info.buffer, view_info.format = buf.buffer, getattr(v, _TEXEL_FORMATS[kind])
            view_info.offset, view_info.range = 0, buf.size // texel * texel
            views[i] = v.vkCreateBufferView(ctx.device, view_info, None)
            self._h["views"].append(views[i])
            ctx.track("buffer_view", 1)
            write.pTexelBufferView = views + i
        v.vkUpdateDescriptorSets(ctx.device, n, writes, 0, None)
        ctx.adopt(self)

    def close(self) -> None:
        self._finalizer()


def get_pipeline(ctx: Context, name: str, bindings, push_size: int, spec: tuple = (),
                 modules: Mapping[str, bytes] = SPIRV) -> Pipeline:
    """The compute pipeline for shader ``name`` with specialization ``spec``, cached on ``ctx`` for
    its lifetime.  ``bindings``: the number of storage buffers, or one kind per binding (see
    :func:`binding_kinds`).  ``modules``: where the SPIR-V comes from (default: the runtime's
    embedded shaders; the benchmarks pass their own)."""
    key = (name, binding_kinds(bindings), push_size, tuple(spec))
    with ctx.lock:
        ctx.check()
        pipe = ctx.pipelines.get(key)
        if pipe is None:
            pipe = ctx.pipelines[key] = Pipeline(ctx, name, key[1], push_size, spec, modules)
    return pipe
