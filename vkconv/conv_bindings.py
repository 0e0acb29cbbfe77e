"""Pipelines whose bindings may be uniform texel buffers, for the fast convolution kernels.

Why: on Mesa lavapipe every storage-buffer (and shared-memory) load is compiled into a per-invocation
loop with a branch per component, while a ``texelFetch`` from a uniform texel buffer is a plain
gather.  Measured on lavapipe (LLVM 15, 2 cores): 1.15 G floats/s through ``vec4`` SSBO loads,
2.5 G floats/s through RGBA32F ``texelFetch``, which is what lets a register-tiled GEMM reach half
of the FMA peak.  On GPUs texel buffers go through the texture cache, so they are a good default
there too.

:class:`vkconv.pipeline.Pipeline` binds storage buffers only, so this module adds the small
generalisation the conv kernels need: a binding is ``STORAGE``, ``TEXEL4`` (RGBA32F, one ``vec4``
per texel) or ``TEXEL1`` (R32F).  A texel binding needs a buffer created with the texel usage bit:
:class:`TexelBuffer`.  Everything else (handle tracking, finalizers, the dispatch in
:class:`vkconv.command.CommandBuffer`) is shared with the storage-only classes.
"""
from __future__ import annotations

import weakref

import numpy as np

from ._spirv import SPIRV
from .buffer import Buffer
from .context import Context, vk
from .errors import VkconvError
from .pipeline import Pipeline, _destroy_pipeline, _pack_spec

STORAGE = "storage"
TEXEL4 = "texel4"  # RGBA32F view: texelFetch(samplerBuffer, i) is vec4 number i
TEXEL1 = "texel1"  # R32F view: texelFetch(samplerBuffer, i).x is float number i
_TEXEL_BYTES = {TEXEL4: 16, TEXEL1: 4}


def _descriptor_type(kind: str) -> int:
    return (vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER if kind == STORAGE
            else vk.VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER)


def _view_format(kind: str) -> int:
    return vk.VK_FORMAT_R32G32B32A32_SFLOAT if kind == TEXEL4 else vk.VK_FORMAT_R32_SFLOAT


_texel_limits: "weakref.WeakKeyDictionary[Context, int]" = weakref.WeakKeyDictionary()


def max_texel_elements(ctx: Context) -> int:
    """``maxTexelBufferElements`` of the context's device (0 if RGBA32F/R32F texel buffers are
    not supported, which the Vulkan specification forbids but a broken driver could report)."""
    cached = _texel_limits.get(ctx)
    if cached is None:
        v = vk
        limit = v.vkGetPhysicalDeviceProperties(ctx.physical_device).limits.maxTexelBufferElements
        need = v.VK_FORMAT_FEATURE_UNIFORM_TEXEL_BUFFER_BIT
        for fmt in (v.VK_FORMAT_R32G32B32A32_SFLOAT, v.VK_FORMAT_R32_SFLOAT):
            if not v.vkGetPhysicalDeviceFormatProperties(ctx.physical_device, fmt).bufferFeatures & need:
                limit = 0
        cached = _texel_limits[ctx] = int(limit)
    return cached


def texel_fits(ctx: Context, nbytes: int, kind: str = TEXEL4) -> bool:
    """Whether a buffer of ``nbytes`` can be viewed whole as a ``kind`` texel buffer."""
    return -(-nbytes // _TEXEL_BYTES[kind]) <= max_texel_elements(ctx)


class TexelBuffer(Buffer):
    """A :class:`Buffer` that can also be bound as a uniform texel buffer (``TEXEL4``/``TEXEL1``)."""

    def _allocate(self, usage: int, want: int, avoid: int = 0):
        if usage & vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT:
            usage |= vk.VK_BUFFER_USAGE_UNIFORM_TEXEL_BUFFER_BIT
        return super()._allocate(usage, want, avoid)


def upload_texel_constant(ctx: Context, array: np.ndarray, name: str) -> TexelBuffer:
    """A device-local :class:`TexelBuffer` holding ``array`` (packed weights), staging released."""
    buf = TexelBuffer(ctx, array.nbytes, staged=True, name=name)
    buf.upload(array)
    buf.drop_staging()
    return buf


class BindingPipeline(Pipeline):
    """Like :class:`Pipeline`, with one binding kind per buffer (``STORAGE``, ``TEXEL4``, ``TEXEL1``)."""

    def __init__(self, ctx: Context, name: str, kinds: tuple[str, ...], push_size: int,
                 spec: tuple = ()):
        if name not in SPIRV:
            raise VkconvError(f"no embedded shader {name!r}; run build_shaders.py")
        if push_size > ctx.info.max_push_constants_size:
            raise VkconvError(f"{name}: {push_size} bytes of push constants exceed the device's "
                              f"{ctx.info.max_push_constants_size}")
        v = vk
        self.ctx, self.name, self.n_buffers, self.push_size = ctx, name, len(kinds), push_size
        self.kinds = tuple(kinds)
        self.local_size = tuple(spec[:3]) + (1,) * (3 - len(spec[:3]))
        self._h: dict = {}
        self._finalizer = weakref.finalize(self, _destroy_pipeline, ctx, self._h)
        code = SPIRV[name]
        module_info = v.VkShaderModuleCreateInfo(codeSize=len(code), pCode=code)
        self._h["module"] = v.vkCreateShaderModule(ctx.device, module_info, None)
        bindings = [v.VkDescriptorSetLayoutBinding(
            binding=i, descriptorType=_descriptor_type(k), descriptorCount=1,
            stageFlags=v.VK_SHADER_STAGE_COMPUTE_BIT) for i, k in enumerate(kinds)]
        set_info = v.VkDescriptorSetLayoutCreateInfo(bindingCount=len(bindings), pBindings=bindings)
        self._h["set_layout"] = v.vkCreateDescriptorSetLayout(ctx.device, set_info, None)
        ranges = [v.VkPushConstantRange(stageFlags=v.VK_SHADER_STAGE_COMPUTE_BIT, offset=0,
                                        size=push_size)] if push_size else None
        layout_info = v.VkPipelineLayoutCreateInfo(setLayoutCount=1, pSetLayouts=[self._h["set_layout"]],
                                                   pushConstantRangeCount=1 if push_size else 0,
                                                   pPushConstantRanges=ranges)
        self._h["layout"] = v.vkCreatePipelineLayout(ctx.device, layout_info, None)
        # Nested create-info structs stay in locals until the call returns (see
        # shared/notes/vulkan-on-this-machine.md: inline temporaries are freed early).
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


_pipelines: "weakref.WeakKeyDictionary[Context, dict]" = weakref.WeakKeyDictionary()


def binding_pipeline(ctx: Context, name: str, kinds: tuple[str, ...], push_size: int,
                     spec: tuple = ()) -> BindingPipeline:
    """The cached :class:`BindingPipeline` for ``name`` with these binding kinds and constants;
    closed with the context."""
    key = (name, tuple(kinds), push_size, tuple(spec))
    with ctx.lock:
        ctx.check()
        cache = _pipelines.setdefault(ctx, {})
        pipe = cache.get(key)
        if pipe is None:
            pipe = cache[key] = BindingPipeline(ctx, name, kinds, push_size, spec)
            ctx.adopt(pipe)
    return pipe


def _destroy_set(ctx: Context, handles: dict) -> None:
    if ctx._closed or not handles:
        return
    for view in handles.pop("views"):
        vk.vkDestroyBufferView(ctx.device, view, None)
        ctx.track("buffer_view", -1)
    vk.vkDestroyDescriptorPool(ctx.device, handles.pop("pool"), None)  # frees the set with it
    ctx.track("descriptor_pool", -1)


class BindingSet:
    """``buffers`` bound, in order, to the bindings of a :class:`BindingPipeline`; owns its pool and
    the buffer views of its texel bindings."""

    def __init__(self, pipeline: BindingPipeline, buffers: list[Buffer]):
        if len(buffers) != pipeline.n_buffers:
            raise VkconvError(f"{pipeline.name} takes {pipeline.n_buffers} buffers, got {len(buffers)}")
        v, ctx = vk, pipeline.ctx
        self.ctx, self.buffers = ctx, list(buffers)
        self._h: dict = {"views": []}
        self._finalizer = weakref.finalize(self, _destroy_set, ctx, self._h)
        kinds = pipeline.kinds
        types = sorted({_descriptor_type(k) for k in kinds})
        sizes = [v.VkDescriptorPoolSize(type=t, descriptorCount=sum(_descriptor_type(k) == t for k in kinds))
                 for t in types]
        pool_info = v.VkDescriptorPoolCreateInfo(maxSets=1, poolSizeCount=len(sizes), pPoolSizes=sizes)
        self._h["pool"] = v.vkCreateDescriptorPool(ctx.device, pool_info, None)
        ctx.track("descriptor_pool", 1)
        alloc = v.VkDescriptorSetAllocateInfo(descriptorPool=self._h["pool"], descriptorSetCount=1,
                                              pSetLayouts=[pipeline.set_layout])
        self.handle = v.vkAllocateDescriptorSets(ctx.device, alloc)[0]
        infos, writes = [], []
        for i, (kind, buf) in enumerate(zip(kinds, buffers)):
            if kind == STORAGE:
                info = v.VkDescriptorBufferInfo(buffer=buf.buffer, offset=0, range=buf.size)
                infos.append(info)
                writes.append(v.VkWriteDescriptorSet(dstSet=self.handle, dstBinding=i, descriptorCount=1,
                                                     descriptorType=_descriptor_type(kind),
                                                     pBufferInfo=[info]))
                continue
            if not isinstance(buf, TexelBuffer):
                raise VkconvError(f"{pipeline.name}: binding {i} is a texel buffer, but {buf.name} "
                                  "was not created as a TexelBuffer")
            texel = _TEXEL_BYTES[kind]
            if not texel_fits(ctx, buf.size, kind):
                raise VkconvError(f"{buf.name}: {buf.size // texel} texels exceed the device's "
                                  f"maxTexelBufferElements ({max_texel_elements(ctx)})")
            view_info = v.VkBufferViewCreateInfo(buffer=buf.buffer, format=_view_format(kind), offset=0,
                                                 range=buf.size // texel * texel)
            view = v.vkCreateBufferView(ctx.device, view_info, None)
            self._h["views"].append(view)
            ctx.track("buffer_view", 1)
            writes.append(v.VkWriteDescriptorSet(dstSet=self.handle, dstBinding=i, descriptorCount=1,
                                                 descriptorType=_descriptor_type(kind),
                                                 pTexelBufferView=[view]))
        v.vkUpdateDescriptorSets(ctx.device, len(writes), writes, 0, None)
        ctx.adopt(self)

    def close(self) -> None:
        self._finalizer()
