"""The discrete-GPU memory path (``VKCONV_MEMORY=discrete``) on any device: device-local buffers
the host does not map, host-visible staging twins, and the copies between them recorded with the
dispatches -- still one queue submit per call, building an op included.

Oracles: onnx.reference (Conv, ConvTranspose), the float64 references of tests/deform_reference.py,
tests/conv_lstm_reference.py and tests/ops/test_sparse.py, onnxruntime (the device graph), OpenCV's own
CPU layers (the cv2 net), numpy indexing (gather / scatter-add).  Tolerance: max abs diff <= rel x
max|expected| (tests/oracles.assert_close), 1e-4 (fp32 weights) but 1e-3 for the cv2 net (OpenCV's
own CPU convolutions round differently over 13 layers).  With ``VKCONV_VALIDATION=1``
synchronization validation checks the barriers around the copies within each command buffer
(tests/runtime/test_validation_harness.py proves it reports a missing one).
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_opencv_layers
from conv_lstm_reference import conv_lstm2d
from deform_reference import deform_conv_ref
from oracles import assert_close, onnx_reference
from test_device_errors import _fail_once
from test_graph import _chain_model, _ort
from test_sparse import check_against_dense, dense_conv3d, dense_conv_transpose3d, occupancy, random_tensor

import cv_plugin
import vkconv
from cv_plugin import compat
from cv_plugin.bench import zoo
from vkconv.graph import Graph
from vkconv.runtime.buffer import Buffer
from vkconv.runtime.context import Context, vk
from vkconv.runtime.transfer import upload_constant


@pytest.fixture
def discrete(monkeypatch):
    """The process-wide context opened anew as a discrete GPU's; the next test gets the device as
    it reports itself (unless the whole run is under the profile)."""
    vkconv.close_context()
    monkeypatch.setenv("VKCONV_MEMORY", "discrete")
    ctx = vkconv.get_context()
    yield ctx
    vkconv.close_context()


def test_profile_makes_buffers_device_local_with_staging(discrete):
    assert not discrete.info.unified_memory
    with Buffer(discrete, 64, name="plain") as plain, Buffer(discrete, 64, staged=True) as staged:
        assert not plain.host_visible and plain.staging is None
        with pytest.raises(vkconv.VkconvError, match="plain has no host-visible memory"):
            plain.write(np.zeros(4, np.float32))
        assert staged.staging is not None
        staged.write(np.arange(4, dtype=np.float32))  # lands in the staging twin
        np.testing.assert_array_equal(staged.read(np.float32, (4,)), np.arange(4))


def test_unknown_profile_is_refused(monkeypatch):
    monkeypatch.setenv("VKCONV_MEMORY", "vram")
    with pytest.raises(vkconv.VkconvError, match="VKCONV_MEMORY='vram': expected 'discrete'"):
        Context()


@pytest.mark.parametrize("kernel", ["implicit_gemm", "winograd", "winograd63", "direct", "gemm1x1", "depthwise"])
def test_conv_build_and_calls_one_submit_each(discrete, kernel):
    """Building uploads nothing on its own: the weights ride in the first call's submit."""
    rng = np.random.default_rng(4)
    group = 8 if kernel == "depthwise" else 1
    k = 1 if kernel == "gemm1x1" else 3
    x = rng.standard_normal((1, 8, 10, 9)).astype(np.float32)
    w = rng.standard_normal((8, 8 // group, k, k)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    geometry = dict(strides=1, pads=k // 2, dilations=1, group=group)
    expected = onnx_reference("Conv", {"x": x, "w": w, "b": b},
                              dict(kernel_shape=[k, k], pads=[k // 2] * 4, group=group))
    before = discrete.stats["submits"]
    with vkconv.Conv(w, b, kernel=kernel, **geometry) as op:
        assert discrete.stats["submits"] == before
        for i in range(3):
            y = op(x)
            assert discrete.stats["submits"] == before + i + 1
            assert_close(y, expected, 1e-4, kernel)


def _resident_op_case(name: str, rng):
    """(op, call arguments, expected output) for one of the other ops with resident weights."""
    x = rng.standard_normal((1, 6, 9, 8)).astype(np.float32)
    if name == "ConvTranspose":
        w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
        expected = onnx_reference("ConvTranspose", {"x": x, "w": w}, dict(kernel_shape=[3, 3], strides=[2, 2]))
        return vkconv.ConvTranspose(w, strides=2), (x,), expected
    if name == "DeformConv":
        w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
        offset = rng.standard_normal((1, 18, 9, 8)).astype(np.float32)
        return vkconv.DeformConv(w, pads=1), (x, offset), deform_conv_ref(x, w, offset, pads=1)
    seq = rng.standard_normal((1, 3, 5, 6, 6)).astype(np.float32)  # [N, T, C, H, W]
    k, u = (rng.standard_normal((3, 3, c, 16)).astype(np.float32) * 0.3 for c in (5, 4))
    b = rng.standard_normal(16).astype(np.float32)
    return vkconv.ConvLSTM2D(k, u, b), (seq,), conv_lstm2d(seq, k, u, b)


@pytest.mark.parametrize("name", ["ConvTranspose", "DeformConv", "ConvLSTM2D"])
def test_other_resident_ops_build_and_calls_one_submit_each(discrete, name):
    """Building and the first call: one submit; every later call: one."""
    before = discrete.stats["submits"]
    op, args, expected = _resident_op_case(name, np.random.default_rng(10))
    with op:
        for i in range(2):
            assert_close(op(*args), expected, 1e-4, name)
            assert discrete.stats["submits"] == before + 1, f"call {i}"
            before = discrete.stats["submits"]


def test_pending_uploads_outlive_a_failed_submit_and_skip_closed_buffers(discrete, monkeypatch):
    """Weights whose submit fails wait for the next one (else that call would read whatever the
    fresh memory held); a buffer closed before any submit is left out of it (else the copy would
    write freed memory)."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 4, 7, 6)).astype(np.float32)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    expected = onnx_reference("Conv", {"x": x, "w": w}, dict(kernel_shape=[3, 3], pads=[1] * 4))
    upload_constant(discrete, np.ones(1 << 16, np.float32), "closed before any submit").close()
    with vkconv.Conv(w, pads=1) as op:
        _fail_once(monkeypatch, "vkQueueSubmit", vk.VkErrorOutOfDeviceMemory)
        with pytest.raises(vkconv.VkconvError, match="ran out of memory"):
            op(x)
        assert discrete.pending_uploads, "the weights' copies were lost with the failed submit"
        assert_close(op(x), expected)
    assert not discrete.pending_uploads


@needs_opencv_layers()
@pytest.mark.parametrize("mode, per_forward", [("layer", 13), ("subgraph", 1)])
def test_vgg16_through_cv2_submits_as_on_unified_memory(discrete, mode, per_forward):
    """VGG-16's 13 convolutions: one submit per conv layer (layer mode) or one in all (subgraph
    mode), the first forward -- which builds every op and uploads its weights -- included."""
    model = zoo.vgg16(seed=5, size=32, classes=10)
    blob = np.random.default_rng(5).random((1, 3, 32, 32), dtype=np.float32)
    cpu = compat.read_onnx(model.SerializeToString())
    cpu.setInput(blob)
    expected = cpu.forward()
    with cv_plugin.read_net(model, mode=mode) as net:
        for _ in range(2):
            net.setInput(blob)
            before = discrete.stats["submits"]
            out = net.forward()
            assert discrete.stats["submits"] - before == per_forward
            assert_close(out, expected, 1e-3, f"vgg16 {mode}")


def test_device_graph_forward_is_one_submit(discrete):
    rng = np.random.default_rng(6)
    model = _chain_model(rng)
    before = discrete.stats["submits"]
    with Graph(model.graph) as g:
        assert discrete.stats["submits"] == before  # the constants wait for the first forward
        for shape in ((1, 3, 9, 11), (2, 3, 6, 5), (1, 3, 9, 11)):  # new shape, new shape, replay
            x = rng.standard_normal(shape).astype(np.float32)
            before = discrete.stats["submits"]
            got = g({"x": x})
            assert discrete.stats["submits"] == before + 1
            y, r1 = _ort(model, {"x": x})
            assert_close(got["y"], y, 1e-4, "y")
            assert_close(got["r1"], r1, 1e-4, "r1")


def test_sparse_uploads_reach_the_dispatch(discrete):
    """Row gather and scatter-add upload their operands in the command buffer that uses them."""
    rng = np.random.default_rng(7)
    src = rng.standard_normal((50, 6)).astype(np.float32)
    idx = rng.integers(0, 50, 200)
    np.testing.assert_array_equal(vkconv.gather_rows(src, idx), src[idx])
    dst = rng.standard_normal((9, 6)).astype(np.float32)
    rows = rng.integers(0, 9, 50)
    expected = dst.copy()
    np.add.at(expected, rows, src)
    assert_close(vkconv.scatter_add_rows(dst, src, rows), expected, 1e-6)


def test_sparse_convolutions_submit_as_on_unified_memory(discrete):
    """SubM: the rulebook, then the convolution (2 submits); strided: the rulebook reads its output
    count back between its two submissions (3); inverse: the inverse table, then the convolution
    (2).  Wide layers sort the rulebook rows by tap mask on the host, which reads the masks without
    a submit of its own."""
    rng = np.random.default_rng(8)
    st = random_tensor(rng, 500, (12, 11, 10), 1, 32)
    w = (rng.standard_normal((32, 3, 3, 3, 32)) / np.sqrt(32 * 27)).astype(np.float32)
    sites = occupancy(st.indices, 1, st.spatial_shape)
    steps = [
        ("subm", 2, lambda: vkconv.subm_conv3d(st, w),
         lambda out: (dense_conv3d(st.to_dense(), w, pad=(1, 1, 1)), sites)),
        ("strided", 3, lambda: vkconv.sparse_conv3d(st, w, stride=2, padding=1, indice_key="down"),
         lambda out: (dense_conv3d(st.to_dense(), w, stride=(2, 2, 2), pad=(1, 1, 1)),
                      occupancy(out.indices, 1, out.spatial_shape))),
    ]
    outs = {}
    for name, submits, run, expect in steps:
        before = discrete.stats["submits"]
        outs[name] = out = run()
        assert discrete.stats["submits"] - before == submits, name
        dense, active = expect(out)
        check_against_dense(out, dense, active, name)
    down = outs["strided"]
    before = discrete.stats["submits"]
    up = vkconv.sparse_inverse_conv3d(down, w, indice_key="down")
    assert discrete.stats["submits"] - before == 2
    check_against_dense(up, dense_conv_transpose3d(down.to_dense(), w, st.spatial_shape, (2, 2, 2),
                                                   (1, 1, 1), (1, 1, 1)), sites, "inverse")
