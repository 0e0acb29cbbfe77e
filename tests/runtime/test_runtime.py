"""The Vulkan runtime under the ops: buffers, pipeline cache, object lifetimes, device choice,
the embedded SPIR-V, the validation layer, and the no-device path."""
from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vkconv
from vkconv.runtime import _spirv
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.command import CommandBuffer
from vkconv.runtime.context import Context, DeviceInfo, choose_device
from vkconv.runtime.errors import NoDeviceError, VkconvError
from vkconv.runtime.pipeline import DescriptorSet, get_pipeline
from vkconv.runtime.transfer import upload_constant

ROOT = Path(__file__).resolve().parents[2]
# Raw pipelines below bind more buffers and push-constant bytes than the conv shader uses (legal
# in Vulkan), so that they stay valid whatever the conv kernel's exact interface is.
SHADER, N_BUFFERS, PUSH = "conv_direct", 8, 128


@pytest.fixture(scope="module")
def ctx():
    """A private context, so that its live-handle counts see only this module's objects."""
    c = Context()
    yield c
    c.close()


def _weights(rng, cout=8, cin=4, k=3):
    return rng.standard_normal((cout, cin, k, k)).astype(np.float32)


# -- buffers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 13, 4096 + 3])
def test_buffer_round_trip_through_the_device(ctx, count):
    """Host -> buffer A -> device copy -> buffer B -> host, for sizes that are not multiples of 16."""
    data = np.random.default_rng(count).standard_normal(count).astype(np.float32)
    with Buffer(ctx, data.nbytes, staged=True, name="a") as a, \
            Buffer(ctx, data.nbytes, staged=True, name="b") as b, CommandBuffer(ctx) as cmd:
        a.write(data)
        cmd.begin()
        a.record_upload(cmd)
        cmd.barrier()
        cmd.copy(a.buffer, b.buffer, a.size)
        cmd.barrier()
        b.record_download(cmd)
        cmd.host_barrier()
        cmd.end()
        cmd.submit()
        out = b.read(np.float32, data.shape)
    np.testing.assert_array_equal(out, data)


def test_upload_constant_reaches_the_device(ctx):
    """A resident (possibly device-local, unmapped) constant, read back through a device copy."""
    data = np.arange(37, dtype=np.float32) * 0.5 - 3
    with upload_constant(ctx, data, "weights") as w, Buffer(ctx, w.size, staged=True, name="out") as out, \
            CommandBuffer(ctx) as cmd:
        cmd.begin()
        cmd.copy(w.buffer, out.buffer, w.size)
        cmd.barrier()
        out.record_download(cmd)
        cmd.host_barrier()
        cmd.end()
        cmd.submit()
        np.testing.assert_array_equal(out.read(np.float32, data.shape), data)


def test_buffer_reads_are_copies_and_overflow_is_refused(ctx):
    with Buffer(ctx, 32, staged=True, name="small") as buf:
        buf.write(np.ones(8, np.float32))
        first = buf.read(np.float32, (8,))
        buf.write(np.zeros(8, np.float32))
        np.testing.assert_array_equal(first, 1)  # not a view of the mapping
        with pytest.raises(VkconvError, match="small"):
            buf.write(np.ones(9, np.float32), offset=0)


def test_buffer_past_the_device_limit_names_the_buffer(ctx):
    live = dict(ctx.live)
    with pytest.raises(VkconvError, match="huge input.*maxStorageBufferRange"):
        Buffer(ctx, ctx.info.max_storage_buffer_range + 1, name="huge input")
    assert dict(ctx.live) == live


# -- pipelines and lifetimes ---------------------------------------------------------------------
def test_pipeline_cache_reuse(ctx):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 9, 9)).astype(np.float32)
    with vkconv.Conv(_weights(rng), ctx=ctx, activation="Relu") as op:
        op(x)
    created = ctx.stats["pipelines_created"]
    with vkconv.Conv(_weights(rng), ctx=ctx, activation="Relu") as op:
        op(x)
    assert ctx.stats["pipelines_created"] == created, "same shader + spec built a second pipeline"
    # The lookup itself returns the very same object for the same key ...
    p = get_pipeline(ctx, SHADER, N_BUFFERS, PUSH, (64, 1, 1, 1))
    assert get_pipeline(ctx, SHADER, N_BUFFERS, PUSH, (64, 1, 1, 1)) is p
    # ... and a different specialization is a different pipeline.
    assert get_pipeline(ctx, SHADER, N_BUFFERS, PUSH, (64, 1, 1, 6)) is not p


def test_functional_conv_reuses_pipelines():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 9, 9)).astype(np.float32)
    vkconv.conv(x, _weights(rng), activation="Sigmoid")
    created = vkconv.get_context().stats["pipelines_created"]
    vkconv.conv(x, _weights(rng), activation="Sigmoid")
    assert vkconv.get_context().stats["pipelines_created"] == created


def _warm(ctx, rng, x):
    """Run once so that the cached pipelines exist before a baseline is taken."""
    with vkconv.Conv(_weights(rng), ctx=ctx) as op:
        op(x)


def test_closed_conv_objects_release_every_handle(ctx):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 11, 7)).astype(np.float32)
    _warm(ctx, rng, x)
    baseline = dict(ctx.live)
    ops = [vkconv.Conv(_weights(rng), rng.standard_normal(8).astype(np.float32), ctx=ctx) for _ in range(3)]
    for op in ops:
        op(x)
        op(x[:1, :, :5])  # a second plan
    assert any(ctx.live[k] > baseline.get(k, 0) for k in ctx.live)
    for op in ops:
        op.close()
        op.close()  # idempotent
    assert dict(ctx.live) == baseline


def test_garbage_collected_conv_objects_release_every_handle(ctx):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    _warm(ctx, rng, x)
    baseline = dict(ctx.live)
    for _ in range(3):
        op = vkconv.Conv(_weights(rng), ctx=ctx)
        op(x)
    del op
    gc.collect()
    assert dict(ctx.live) == baseline


def test_closing_a_context_destroys_its_objects_and_refuses_reuse():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    c = Context()
    op = vkconv.Conv(_weights(rng), ctx=c)
    op(x)
    loose = Buffer(c, 64, staged=True)
    c.close()
    # Everything made on it is gone (the validation layer would also report leaks at vkDestroyDevice).
    assert all(n == 0 for n in c.live.values()), c.live
    c.close()  # idempotent
    with pytest.raises(VkconvError, match="closed"):
        op(x)  # a plan recorded before the close
    with pytest.raises(VkconvError, match="closed"):
        loose.write(np.zeros(4, np.float32))
    with pytest.raises(VkconvError, match="closed"):
        Buffer(c, 64)
    with pytest.raises(VkconvError, match="closed"):
        get_pipeline(c, SHADER, N_BUFFERS, PUSH, (64, 1, 1, 0))
    with pytest.raises(VkconvError, match="closed"):
        vkconv.Conv(_weights(rng), ctx=c)
    op.close()
    loose.close()


def test_closed_default_context_is_replaced():
    first = vkconv.get_context()
    vkconv.close_context()
    second = vkconv.get_context()
    assert second is not first
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    assert vkconv.conv(x, _weights(rng)).shape == (1, 8, 4, 4)


# -- device selection ----------------------------------------------------------------------------
_VK_TYPES = {"other": 0, "integrated": 1, "discrete": 2, "virtual": 3, "cpu": 4}


def _fake(index: int, name: str, kind: str, compute: bool = True) -> DeviceInfo:
    """A DeviceInfo as _describe would build it for a device of Vulkan type ``kind``."""
    from vkconv.runtime.context import _TYPE_RANK

    return DeviceInfo(
        index=index, name=name, type=kind, api_version="1.3.0", driver_version=1, vendor_id=0,
        max_workgroup_invocations=1024, max_workgroup_size=(1024, 1024, 64),
        max_workgroup_count=(65535, 65535, 65535), max_shared_memory=49152,
        max_storage_buffer_range=1 << 27, max_push_constants_size=128, subgroup_size=32,
        fp16_storage=True, fp16_arithmetic=False, unified_memory=kind in ("integrated", "cpu"),
        has_compute_queue=compute, rank=_TYPE_RANK[_VK_TYPES[kind]])


def _fleet(*kinds: str) -> list[DeviceInfo]:
    return [_fake(i, f"{kind} device {i}", kind) for i, kind in enumerate(kinds)]


@pytest.mark.parametrize("kinds, expected", [
    (("cpu", "virtual", "integrated", "discrete"), 3),
    (("discrete", "cpu"), 0),
    (("cpu", "integrated", "virtual"), 1),
    (("cpu", "virtual"), 1),
    (("cpu",), 0),
    (("other", "cpu"), 1),
    (("cpu", "discrete", "discrete"), 1),  # ties: the loader's first
])
def test_choose_device_preference(kinds, expected):
    assert choose_device(_fleet(*kinds)).index == expected


def test_choose_device_skips_devices_without_compute():
    devices = [_fake(0, "Big GPU", "discrete", compute=False), _fake(1, "llvmpipe", "cpu")]
    assert choose_device(devices).index == 1
    with pytest.raises(NoDeviceError, match="compute"):
        choose_device([_fake(0, "Big GPU", "discrete", compute=False)])
    with pytest.raises(NoDeviceError, match="install"):
        choose_device([])


def test_choose_device_selector():
    devices = [_fake(0, "NVIDIA GeForce RTX 4090", "discrete"), _fake(1, "Intel(R) UHD 770", "integrated"),
               _fake(2, "llvmpipe (LLVM 15)", "cpu")]
    assert choose_device(devices, "2").index == 2
    assert choose_device(devices, " 1 ").index == 1
    assert choose_device(devices, "intel").index == 1
    assert choose_device(devices, "LLVMPIPE").index == 2
    assert choose_device(devices, "").index == 0  # empty means unset
    for bad in ("7", "radeon"):
        with pytest.raises(NoDeviceError) as info:
            choose_device(devices, bad)
        message = str(info.value)
        assert bad in message and all(d.name in message for d in devices)


def test_vkconv_device_environment_selects_the_context_device(monkeypatch):
    real = vkconv.list_devices()
    target = real[-1]  # the last one, so that the default preference is not what picks it
    for selector in (str(target.index), target.name.swapcase()):
        monkeypatch.setenv("VKCONV_DEVICE", selector)
        with Context() as c:
            assert (c.info.index, c.info.name) == (target.index, target.name)
    monkeypatch.setenv("VKCONV_DEVICE", "no-such-gpu-xyz")
    with pytest.raises(NoDeviceError, match=r"no-such-gpu-xyz.*" + re.escape(real[0].name)):
        Context()


@pytest.mark.parametrize("vendor, platform, version, expected", [
    (0x10005, "linux", (25 << 22) | (0 << 12) | 7, "25.0.7"),            # Mesa: VK_MAKE_VERSION
    (0x10DE, "linux", (535 << 22) | (104 << 14) | (5 << 6), "535.104.5.0"),  # NVIDIA
    (0x8086, "win32", (101 << 14) | 5333, "101.5333"),                   # Intel on Windows
    (0x8086, "linux", (24 << 22) | (2 << 12) | 8, "24.2.8"),             # Intel on Linux is Mesa
])
def test_driver_version_decoding(vendor, platform, version, expected, monkeypatch):
    from vkconv.runtime import context

    monkeypatch.setattr(context.sys, "platform", platform)
    assert context._driver_version_str(vendor, version) == expected


def test_device_info_names_the_driver():
    info = vkconv.list_devices()[0]
    assert info.driver and not info.driver.startswith("version ")  # lavapipe has VK_KHR_driver_properties
    if "llvmpipe" in info.name:
        assert info.driver.startswith("llvmpipe, Mesa ")


# -- embedded SPIR-V and its build (validity per Vulkan version: tests/runtime/test_spirv.py) ------------
def test_every_embedded_module_has_a_digest():
    assert _spirv.SPIRV and set(_spirv.SPIRV) == set(_spirv.DIGESTS)


def _need_glslang():
    if shutil.which("glslangValidator") is None or shutil.which("spirv-val") is None:
        pytest.skip("glslangValidator / spirv-val not installed (Debian: glslang-tools spirv-tools)")


def test_build_shaders_check_is_clean():
    _need_glslang()
    res = subprocess.run([sys.executable, "build_shaders.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_build_shaders_is_deterministic_and_check_detects_staleness(tmp_path):
    """Built twice in a private copy (never touching the real vkconv/runtime/_spirv.py): identical bytes."""
    _need_glslang()
    shutil.copytree(ROOT / "shaders", tmp_path / "shaders")
    shutil.copytree(ROOT / "bench" / "shaders", tmp_path / "bench" / "shaders")
    shutil.copy2(ROOT / "build_shaders.py", tmp_path / "build_shaders.py")
    (tmp_path / "vkconv" / "runtime").mkdir(parents=True)
    (tmp_path / "cv_plugin" / "bench").mkdir(parents=True)
    out = tmp_path / "vkconv" / "runtime" / "_spirv.py"

    def run(*args):
        return subprocess.run([sys.executable, "build_shaders.py", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    missing = run("--check")
    assert missing.returncode != 0 and "missing" in missing.stderr
    assert run().returncode == 0
    first = out.read_bytes()
    out.unlink()
    assert run().returncode == 0
    assert out.read_bytes() == first
    assert "do not edit" in first.decode().splitlines()[0]
    assert run("--check").returncode == 0
    # Touching any shader makes --check fail and name that module.
    source = sorted((tmp_path / "shaders").rglob("*.comp"))[0]
    source.write_text(source.read_text() + "\n// edited\n")
    stale = run("--check")
    assert stale.returncode != 0 and "stale" in stale.stderr


# -- the validation layer ------------------------------------------------------------------------
def test_validation_layer_catches_an_incompatible_descriptor_set():
    """Bind a set allocated for a layout with one more binding than the pipeline's layout."""
    try:
        c = Context(validation=True)
    except VkconvError as exc:
        pytest.skip(str(exc))
    try:
        vkconv.validation_messages(clear=True)
        spec = (64, 1, 1, 0)
        pipeline = get_pipeline(c, SHADER, N_BUFFERS, PUSH, spec)
        other = get_pipeline(c, SHADER, N_BUFFERS + 1, PUSH, spec)  # an unused extra binding is legal
        assert vkconv.validation_messages() == []  # the setup itself is clean
        dset = DescriptorSet(other, [Buffer(c, 64) for _ in range(N_BUFFERS + 1)])
        with CommandBuffer(c) as cmd:
            cmd.begin()
            cmd.dispatch(pipeline, dset, bytes(PUSH), (1, 1, 1))  # recorded, never submitted
            cmd.end()
        messages = vkconv.validation_messages(clear=True)
        assert messages, "the validation layer did not report the incompatible descriptor set"
        assert any("vkCmdBindDescriptorSets" in m for m in messages), messages
    finally:
        c.close()
        vkconv.validation_messages(clear=True)


# -- no device -----------------------------------------------------------------------------------
def _no_driver_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VKCONV_DEVICE"}
    env["VK_ICD_FILENAMES"] = env["VK_DRIVER_FILES"] = "/nonexistent/vkconv_no_icd.json"
    return env


def test_no_driver_info_is_one_line_and_nonzero():
    res = subprocess.run([sys.executable, "-m", "vkconv", "info"], env=_no_driver_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "install" in lines[0].lower() and "Traceback" not in res.stderr


def test_no_driver_conv_raises_no_device_error():
    code = ("import numpy as np, vkconv\n"
            "x = np.ones((1, 2, 5, 5), np.float32); w = np.ones((3, 2, 3, 3), np.float32)\n"
            "try:\n"
            "    vkconv.conv(x, w)\n"
            "except vkconv.NoDeviceError as exc:\n"
            "    print('NoDeviceError:', exc)\n")
    res = subprocess.run([sys.executable, "-c", code], env=_no_driver_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("NoDeviceError:") and "install" in res.stdout.lower()
