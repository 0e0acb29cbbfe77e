"""The embedded SPIR-V is valid for every Vulkan environment build_shaders.py claims.

Each embedded module is checked with ``spirv-val --target-env E`` for each E in
``build_shaders.VALIDATE_ENVS`` that takes its SPIR-V version (a module built for a newer
environment, e.g. with subgroup operations, is SPIR-V 1.3: Vulkan 1.1 and later).  Debian 12's
spirv-val (2023.1) does not flag a sampled image of dimension Buffer (GLSL ``samplerBuffer``),
which SPIR-V 1.6 (Vulkan 1.3+) forbids and Mesa 25's lavapipe reports through the validation
callback, so the sources and the words are checked for it directly.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vkconv.runtime import _spirv

ROOT = Path(__file__).resolve().parents[2]


def _build_shaders():
    spec = importlib.util.spec_from_file_location("build_shaders", ROOT / "build_shaders.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


VALIDATE_ENVS: tuple[str, ...] = _build_shaders().VALIDATE_ENVS
# the newest SPIR-V version (major, minor) each environment accepts
_SPIRV_MAX = {"vulkan1.0": (1, 0), "vulkan1.1": (1, 3), "vulkan1.2": (1, 5), "vulkan1.3": (1, 6)}


def _spirv_version(words: bytes) -> tuple[int, int]:
    """The version in a module's header (word 1: 0x00MMmm00)."""
    version = struct.unpack_from("<I", words, 4)[0]
    return version >> 16 & 0xFF, version >> 8 & 0xFF


def test_the_claimed_environments():
    assert {"vulkan1.1", "vulkan1.3"} <= set(VALIDATE_ENVS)


@pytest.mark.parametrize("env", VALIDATE_ENVS)
def test_embedded_spirv_is_valid(env, tmp_path):
    spirv_val = shutil.which("spirv-val")
    if spirv_val is None:
        pytest.skip("spirv-val not installed (Debian: spirv-tools)")
    failures = []
    assert set(VALIDATE_ENVS) <= set(_SPIRV_MAX)
    for name, words in sorted(_spirv.SPIRV.items()):
        if _spirv_version(words) > _SPIRV_MAX[env]:
            continue  # built for a newer environment (build_shaders: --target-env in its variant line)
        path = tmp_path / f"{name}.spv"
        path.write_bytes(words)
        res = subprocess.run([spirv_val, "--target-env", env, str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            failures.append(f"{name}: {res.stdout}{res.stderr}".strip())
    assert not failures, f"spirv-val --target-env {env} rejected:\n" + "\n".join(failures)


_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_SAMPLER_BUFFER = re.compile(r"\b[iu]?samplerBuffer\b")


def test_no_shader_reads_through_a_sampler_buffer():
    """Texel reads use ``textureBuffer`` + ``texelFetch`` (GL_EXT_samplerless_texture_functions)."""
    sources = [p for p in sorted((ROOT / "shaders").rglob("*")) if p.suffix in (".comp", ".glsl")]
    assert sources
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if _SAMPLER_BUFFER.search(_COMMENT.sub("", p.read_text()))]
    assert not offenders, f"samplerBuffer (a sampled image of Dim Buffer) in {offenders}"


_OP_TYPE_IMAGE, _OP_TYPE_SAMPLED_IMAGE, _DIM_BUFFER = 25, 27, 5


def _image_dims(words: bytes) -> tuple[list[int], list[int]]:
    """The Dim of every OpTypeImage, and of the image of every OpTypeSampledImage, in a module."""
    code = struct.unpack(f"<{len(words) // 4}I", words)
    assert code[0] == 0x07230203, "not little-endian SPIR-V"
    dims: dict[int, int] = {}
    sampled = []
    i = 5  # the header is 5 words
    while i < len(code):
        length, opcode = code[i] >> 16, code[i] & 0xFFFF
        assert length, f"zero-length instruction at word {i}"
        if opcode == _OP_TYPE_IMAGE:
            dims[code[i + 1]] = code[i + 3]  # result id, sampled type, Dim
        elif opcode == _OP_TYPE_SAMPLED_IMAGE:
            sampled.append(dims[code[i + 2]])  # result id, image type
        i += length
    return list(dims.values()), sampled


def test_no_embedded_module_has_a_sampled_buffer_image():
    offenders = sorted(n for n, w in _spirv.SPIRV.items() if _DIM_BUFFER in _image_dims(w)[1])
    assert not offenders, f"OpTypeSampledImage of Dim Buffer in {offenders}"
    # the texel variants still read through buffer images (uniform texel buffers), now samplerless
    assert _image_dims(_spirv.SPIRV["conv_rows"]) == ([_DIM_BUFFER], [])  # one type, both bindings
