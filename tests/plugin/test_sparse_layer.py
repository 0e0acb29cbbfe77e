"""Sparse convolution through cv2.dnn: the ``vkconv.SparseEncoder`` and ``vkconv.SubMConv3d``
custom-domain ops loaded with cv_plugin.read_net.

Oracle: the same layer stack computed densely in float64 numpy (tests/ops/test_sparse.py's
``dense_conv3d``, checked there against onnx.reference), with the sparse semantics applied as masks:
SubM keeps the input sites, a strided layer's sites are those its kernel reaches from an active
site.  Tolerance: max abs diff <= 1e-4 x max|expected|.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close
from test_sparse import activate, dense_conv3d, occupancy, random_sites

import cv_plugin

REL = 1e-4
SPATIAL = (21, 40, 36)
BATCH = 2
# SECOND's middle encoder, scaled down: (SubM?, C_out, stride, padding, activation)
SECOND = [(True, 16, 1, 0, "Relu"), (True, 16, 1, 0, "Relu"), (False, 32, 2, 1, "Relu"),
          (True, 32, 1, 0, "Relu"), (True, 32, 1, 0, "Relu"), (False, 24, 2, 1, None)]


def encoder_model(weights, spatial, batch, layers):
    """An ONNX model with one ``vkconv.SparseEncoder`` node (the docs/SPARSE.md example)."""
    n_in = weights[0][0].shape[4]
    grid = spatial
    for (subm, _, stride, pad, _), (w, _) in zip(layers, weights):
        if not subm:
            grid = tuple((s + 2 * pad - (k - 1) - 1) // stride + 1 for s, k in zip(grid, w.shape[1:4]))
    out_shape = [batch, weights[-1][0].shape[0] * grid[0], grid[1], grid[2]]
    inits, names = [], ["voxels", "coords"]
    for i, (w, b) in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        names += [f"w{i}", f"b{i}"]
    acts = {None: 0, "Relu": 1}
    node = helper.make_node(
        "SparseEncoder", names, ["bev"], domain="vkconv", name="middle_encoder",
        vk_spatial_shape=list(spatial), vk_batch_size=batch,
        vk_subm=[int(layer[0]) for layer in layers],
        vk_strides=[layer[2] for layer in layers], vk_pads=[layer[3] for layer in layers],
        vk_acts=[acts[layer[4]] for layer in layers])
    graph = helper.make_graph(
        [node], "second_middle_encoder",
        [helper.make_tensor_value_info("voxels", TensorProto.FLOAT, ["N", n_in]),
         helper.make_tensor_value_info("coords", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("bev", TensorProto.FLOAT, out_shape)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("vkconv", 1)])


def dense_stack(features, indices, spatial, batch, layers, weights):
    """The encoder computed densely: masks carry the sparse site rules."""
    x = np.zeros((batch, features.shape[1], *spatial))
    x[indices[:, 0], :, indices[:, 1], indices[:, 2], indices[:, 3]] = features
    mask = occupancy(indices, batch, spatial)
    for (subm, _, stride, pad, act), (w, b) in zip(layers, weights):
        k = w.shape[1:4]
        if subm:
            y = dense_conv3d(x, w, b, pad=tuple(kk // 2 for kk in k))
        else:
            geom = dict(stride=(stride,) * 3, pad=(pad,) * 3)
            y = dense_conv3d(x, w, b, **geom)
            mask = dense_conv3d(mask[:, None].astype(np.float64), np.ones((1, *k, 1)), **geom)[:, 0] > 0.5
        x = activate(y, act) * mask[:, None]
    return x.reshape(batch, -1, *x.shape[3:])


def make_weights(rng, cin, layers):
    weights = []
    for _, cout, _, _, _ in layers:
        w = (rng.standard_normal((cout, 3, 3, 3, cin)) / math.sqrt(27 * cin)).astype(np.float32)
        weights.append((w, rng.standard_normal(cout).astype(np.float32) * 0.1))
        cin = cout
    return weights


@pytest.fixture(scope="module")
def cloud():
    rng = np.random.default_rng(21)
    idx = random_sites(rng, 400, SPATIAL, BATCH)
    return rng.standard_normal((len(idx), 4)).astype(np.float32), idx


def test_second_encoder_through_cv2_matches_dense(cloud):
    features, idx = cloud
    weights = make_weights(np.random.default_rng(22), 4, SECOND)
    model = encoder_model(weights, SPATIAL, BATCH, SECOND)
    expected = dense_stack(features, idx, SPATIAL, BATCH, SECOND, weights)
    with cv_plugin.read_net(model) as net:
        net.setInput(features, "voxels")
        net.setInput(idx.astype(np.float32), "coords")
        bev = net.forward()
        assert net.vulkan_forwards() == {"middle_encoder": 1}
        assert bev.shape == expected.shape == (BATCH, 24 * 6, 10, 9)
        assert 0.1 < np.mean(expected == 0) < 0.9, "the site masks must matter in this test"
        assert_close(bev, expected, REL, "SECOND middle encoder")
        # another cloud, same net: rulebooks are rebuilt for the new sites
        features2, idx2 = features[::2] * 2, idx[::2]
        net.setInput(features2, "voxels")
        net.setInput(idx2.astype(np.float32), "coords")
        assert_close(net.forward(), dense_stack(features2, idx2, SPATIAL, BATCH, SECOND, weights), REL)


def test_encoder_rejects_bad_coordinates_through_cv2(cloud):
    features, idx = cloud
    layers = SECOND[:1]
    model = encoder_model(make_weights(np.random.default_rng(23), 4, layers), SPATIAL, BATCH, layers)
    with cv_plugin.read_net(model) as net:
        bad = idx.astype(np.float32)
        bad[1] = bad[0]
        net.setInput(features, "voxels")
        net.setInput(bad, "coords")
        with pytest.raises(ValueError, match="same site"):
            net.forward()
        bad = idx.astype(np.float32)
        bad[3, 2] = 0.5
        net.setInput(bad, "coords")
        with pytest.raises(ValueError, match="whole numbers"):
            net.forward()


def test_encoder_model_errors_are_reported_at_load():
    layers = SECOND[:2]
    weights = make_weights(np.random.default_rng(26), 4, layers)
    weights[1] = (weights[1][0][..., :3].copy(), weights[1][1])  # layer 1 takes 3 channels, not 16
    with pytest.raises(ValueError, match="input channels"):
        cv_plugin.read_net(encoder_model(weights, SPATIAL, BATCH, layers))


def test_subm_layer_through_cv2(cloud):
    features, idx = cloud
    rng = np.random.default_rng(24)
    w = (rng.standard_normal((8, 3, 3, 3, 4)) / 10).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    node = helper.make_node("SubMConv3d", ["voxels", "coords", "w", "b"], ["out"], domain="vkconv",
                            name="subm", vk_spatial_shape=list(SPATIAL), vk_batch_size=BATCH,
                            vk_dilations=[2], vk_act=3, vk_act_alpha=0.1)
    graph = helper.make_graph(
        [node], "subm",
        [helper.make_tensor_value_info("voxels", TensorProto.FLOAT, [len(idx), 4]),
         helper.make_tensor_value_info("coords", TensorProto.FLOAT, [len(idx), 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [len(idx), 8])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("vkconv", 1)])
    dense = np.zeros((BATCH, 4, *SPATIAL))
    dense[idx[:, 0], :, idx[:, 1], idx[:, 2], idx[:, 3]] = features
    ref = activate(dense_conv3d(dense, w, b, pad=(2, 2, 2), dil=(2, 2, 2)), ("LeakyRelu", 0.1))
    expected = ref[idx[:, 0], :, idx[:, 1], idx[:, 2], idx[:, 3]]
    with cv_plugin.read_net(model) as net:
        net.setInput(features, "voxels")
        net.setInput(idx.astype(np.float32), "coords")
        assert_close(net.forward(), expected, REL, "SubMConv3d")


def test_encoder_without_opencv_matches_layer_by_layer_api(cloud):
    """vkconv.ops.sparse.encoder.SparseEncoder (device-resident chain) equals the same layers run one
    by one through the numpy API; an empty cloud gives an all-zero map."""
    import vkconv
    from vkconv.ops.sparse.encoder import EncoderLayer, SparseEncoder

    features, idx = cloud
    weights = make_weights(np.random.default_rng(25), 4, SECOND)
    layers = [EncoderLayer(w, b, subm, stride, pad, 1, act)
              for (subm, _, stride, pad, act), (w, b) in zip(SECOND, weights)]
    with SparseEncoder(layers, SPATIAL, BATCH) as encoder:
        bev = encoder(features, idx)
        assert bev.shape == encoder.output_shape
        st = vkconv.SparseTensor(features, idx, SPATIAL, BATCH)
        for layer in layers:
            if layer.subm:
                st = vkconv.subm_conv3d(st, layer.weight, layer.bias, activation=layer.activation)
            else:
                st = vkconv.sparse_conv3d(st, layer.weight, layer.bias, stride=layer.stride,
                                          padding=layer.padding, activation=layer.activation)
        assert_close(bev, st.to_dense().reshape(bev.shape), REL)
        empty = encoder(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.int32))
        assert empty.shape == encoder.output_shape and not empty.any()
        with pytest.raises(ValueError, match="channels"):
            encoder(np.zeros((3, 5), np.float32), idx[:3])
