"""vkconv.graph.Graph: small ONNX graphs run on the device in one submit, against onnxruntime on
the unmodified model (max abs diff <= 1e-4 x max|expected|)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import assert_close

import vkconv
from vkconv.graph import Graph
from vkconv.onnx import unsupported_reason


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _chain_model(rng):
    """conv -> relu -> add (skip) -> maxpool -> concat (with a BN branch) -> resize, two outputs."""
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"w1": f(6, 3, 3, 3), "b1": f(6), "w2": f(6, 6, 1, 1), "s": f(6), "beta": f(6), "mean": f(6),
             "var": rng.uniform(0.5, 2, 6).astype(np.float32), "three": np.array(3.0, np.float32),
             "scales": np.array([1, 1, 2, 2], np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("Add", ["c2", "r1"], ["s1"]),                      # skip connection
        helper.make_node("MaxPool", ["s1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        helper.make_node("BatchNormalization", ["p1", "s", "beta", "mean", "var"], ["n1"]),  # not after a conv
        helper.make_node("Add", ["n1", "three"], ["h1"]),                   # HardSwish, decomposed
        helper.make_node("Clip", ["h1", "", ""], ["h2"]),
        helper.make_node("Mul", ["n1", "h2"], ["h3"]),
        helper.make_node("Div", ["h3", "three"], ["h4"]),
        helper.make_node("Concat", ["p1", "h4"], ["cat"], axis=1),
        helper.make_node("Resize", ["cat", "", "scales"], ["y"], mode="linear"),
    ]
    return _model(nodes, [("x", ["n", 3, "h", "w"])], ["y", "r1"], inits)


def test_chain_matches_onnxruntime():
    rng = np.random.default_rng(0)
    model = _chain_model(rng)
    ctx = vkconv.get_context()
    with Graph(model.graph) as g:
        assert g.inputs == ["x"] and g.outputs == ["y", "r1"]
        for shape in ((1, 3, 9, 11), (2, 3, 6, 5), (1, 3, 9, 11)):  # a new shape, then a replay
            x = rng.standard_normal(shape).astype(np.float32)
            submits = ctx.stats["submits"]
            got = g({"x": x})
            assert ctx.stats["submits"] == submits + 1
            y, r1 = _ort(model, {"x": x})
            assert_close(got["y"], y, 1e-4, "y")
            assert_close(got["r1"], r1, 1e-4, "r1")
        assert g.transfers == {"uploads": 3, "downloads": 6}


def test_fusion_folds_batchnorm_and_activations():
    rng = np.random.default_rng(1)
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"w": f(4, 2, 3, 3), "s": f(4), "beta": f(4), "mean": f(4), "var": rng.uniform(0.5, 2, 4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "beta", "mean", "var"], ["n"]),
             helper.make_node("LeakyRelu", ["n"], ["y"], alpha=0.2)]
    model = _model(nodes, [("x", [1, 2, 7, 7])], ["y"], inits)
    with Graph(model.graph) as g:
        assert [n.op_type for n, _, _ in g.steps] == ["Conv"]
        x = rng.standard_normal((1, 2, 7, 7)).astype(np.float32)
        assert_close(g({"x": x})["y"], _ort(model, {"x": x})[0], 1e-4)


def test_se_block_and_conv_transpose():
    rng = np.random.default_rng(2)
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = {"w1": f(2, 8, 1, 1), "b1": f(2), "w2": f(8, 2, 1, 1), "b2": f(8), "wt": f(8, 3, 2, 2)}
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]),
             helper.make_node("Conv", ["g", "w1", "b1"], ["c1"]),
             helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c2"]),
             helper.make_node("HardSigmoid", ["c2"], ["a"], alpha=0.2, beta=0.5),
             helper.make_node("Mul", ["x", "a"], ["se"]),
             helper.make_node("ConvTranspose", ["se", "wt"], ["y"], strides=[2, 2])]
    model = _model(nodes, [("x", [1, 8, 5, 6])], ["y"], inits)
    with Graph(model.graph) as g:
        x = rng.standard_normal((1, 8, 5, 6)).astype(np.float32)
        assert_close(g({"x": x})["y"], _ort(model, {"x": x})[0], 1e-4)


def test_conv_transpose_sub_pixel_winograd_in_a_graph():
    """A k4 s2 p1 upsampler wide enough for the sub-pixel Winograd path (its output transform writes
    the phases into the layer's output) between device tensors: one submit, against onnxruntime."""
    rng = np.random.default_rng(4)
    f = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)  # noqa: E731
    inits = {"w": f(128, 64, 3, 3), "wt": f(128, 32, 4, 4), "bt": f(32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["t"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["t"], ["y"])]
    model = _model(nodes, [("x", [1, 64, "h", "w"])], ["y"], inits)
    ctx = vkconv.get_context()
    with Graph(model.graph) as g:
        for shape in ((1, 64, 12, 16), (1, 64, 13, 11)):  # vec4-wide input, odd sizes
            x = rng.standard_normal(shape).astype(np.float32)
            submits = ctx.stats["submits"]
            got = g({"x": x})["y"]
            assert ctx.stats["submits"] == submits + 1
            assert_close(got, _ort(model, {"x": x})[0], 1e-4)
            op = next(step.op for _, step, _ in g.steps if getattr(step, "op", None) is not None
                      and isinstance(step.op, vkconv.ConvTranspose))
            if ctx.info.type == "cpu":
                assert op.method_for((1, 128, *shape[2:])) == "subpixel"


def test_buffers_are_reused_by_liveness():
    # 12 same-shape steps (activations between 1x1 max pools, so that no two fuse) need 2
    # intermediate buffers, not 11
    nodes = [helper.make_node("Sigmoid", [f"t{i}"], [f"t{i + 1}"]) if i % 2 else
             helper.make_node("MaxPool", [f"t{i}"], [f"t{i + 1}"], kernel_shape=[1, 1]) for i in range(12)]
    ctx = vkconv.get_context()
    with Graph(nodes, inputs=["t0"], outputs=["t12"]) as g:
        assert len(g.steps) == 12
        before = ctx.live["buffer"]
        x = np.linspace(-3, 3, 4 * 1000, dtype=np.float32).reshape(1, 4, 10, 100)
        y = g({"t0": x})["t12"]
        # 2 staged buffers (input, output) + 2 pooled intermediates; staging twins only off unified memory
        assert ctx.live["buffer"] - before <= 4 * (1 if ctx.info.unified_memory else 2)
        ref = x.astype(np.float64)
        for i in range(1, 12, 2):
            ref = 1 / (1 + np.exp(-ref))
        assert_close(y, ref, 1e-5)


def _lcnet_block(rng, transpose: bool = False):
    """PP-LCNet's learnable affine blocks: conv -> Mul / Add by scalars -> HardSwish written out as
    Add, Clip, Mul, Div -> Mul / Add by scalars, as PaddleOCR's exporter writes them."""
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    sc = lambda v: np.array([v], np.float32)  # noqa: E731
    inits = {"w": f(3, 5, 2, 2) if transpose else f(5, 3, 3, 3), "b": f(5), "a1": sc(1.3), "b1": sc(-0.2),
             "three": sc(3.0), "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32),
             "a2": sc(0.7), "b2": sc(0.1)}
    conv = helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], strides=[2, 2]) if transpose else \
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1])
    nodes = [conv,
             helper.make_node("Mul", ["a1", "c"], ["m1"]),
             helper.make_node("Add", ["m1", "b1"], ["u"]),
             helper.make_node("Add", ["u", "three"], ["h1"]),
             helper.make_node("Clip", ["h1", "zero", "six"], ["h2"]),
             helper.make_node("Mul", ["u", "h2"], ["h3"]),
             helper.make_node("Div", ["h3", "six"], ["h4"]),
             helper.make_node("Mul", ["a2", "h4"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    return _model(nodes, [("x", [1, 3, 9, 10])], ["y"], inits)


@pytest.mark.parametrize("transpose", [False, True])
def test_affine_after_conv_is_folded_and_elementwise_chain_is_its_epilogue(transpose):
    rng = np.random.default_rng(5)
    model = _lcnet_block(rng, transpose)
    ctx = vkconv.get_context()
    with Graph(model.graph) as g:
        # Mul / Add by scalars fold into the conv's weights, the other six ops run in its epilogue
        assert [n.op_type for n, _, _ in g.steps] == ["ConvTranspose" if transpose else "Conv"]
        assert len(g.steps[0][0].attrs["_post"]) == 6
        x = rng.standard_normal((1, 3, 9, 10)).astype(np.float32)
        g({"x": x})
        dispatches = ctx.stats["dispatches"]
        got = g({"x": x})["y"]
        assert ctx.stats["dispatches"] - dispatches == g.steps[0][1].plan([x.shape]).cmd.dispatches
        assert_close(got, _ort(model, {"x": x})[0], 1e-4)


def test_elementwise_groups_keep_tensors_read_outside_them():
    # d is read by a Conv outside the chain: it must stay a tensor, so two groups
    rng = np.random.default_rng(6)
    inits = {"w": (rng.standard_normal((2, 2, 1, 1)) * 0.5).astype(np.float32),
             "s": rng.standard_normal(2).astype(np.float32), "beta": rng.standard_normal(2).astype(np.float32),
             "mean": rng.standard_normal(2).astype(np.float32), "var": rng.uniform(0.5, 2, 2).astype(np.float32),
             "bias": rng.standard_normal((2, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "beta", "mean", "var"], ["n"]),  # on the input
             helper.make_node("Sigmoid", ["n"], ["a"]),
             helper.make_node("Mul", ["n", "a"], ["d"]),              # a diamond: n read twice inside
             helper.make_node("Conv", ["d", "w"], ["c"]),
             helper.make_node("Sub", ["d", "bias"], ["e"]),           # per-channel constant operand
             helper.make_node("Div", ["e", "z"], ["q"]),              # a second runtime input
             helper.make_node("Add", ["q", "c"], ["y"])]
    model = _model(nodes, [("x", [2, 2, 5, 8]), ("z", [1, 2, 5, 1])], ["y", "n"], inits)
    with Graph(model.graph) as g:
        kinds = [n.op_type for n, _, _ in g.steps]
        assert kinds.count("Elementwise") == 3, kinds  # n (a graph output) | a, d | e, q, y
        x = rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
        z = rng.uniform(0.5, 2, (1, 2, 5, 1)).astype(np.float32)
        got = g({"x": x, "z": z})
        y, n = _ort(model, {"x": x, "z": z})
        assert_close(got["y"], y, 1e-4, "y")
        assert_close(got["n"], n, 1e-4, "n")


def test_graph_input_that_is_also_an_output():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    with Graph(nodes, inputs=["x"], outputs=["y", "x"]) as g:
        x = np.array([[-1.0, 2.0]], np.float32)
        out = g({"x": x})
        np.testing.assert_array_equal(out["x"], x)
        np.testing.assert_array_equal(out["y"], [[0.0, 2.0]])


def test_unsupported_nodes_and_bad_inputs_are_refused():
    consts = {"w": np.ones((2, 2, 1, 1), np.float32), "sizes": np.array([1, 1, 4, 4], np.int64)}
    assert unsupported_reason(helper.make_node("Gemm", ["x", "w"], ["y"]), consts) is not None
    assert unsupported_reason(helper.make_node("Conv", ["x", "wx"], ["y"]), consts) is not None  # runtime W
    assert unsupported_reason(helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2]), consts)
    assert unsupported_reason(helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2]), consts, {"x": 3})
    assert unsupported_reason(helper.make_node("Resize", ["x", "", "", "sizes"], ["y"]), consts, {"x": 4}) is None
    with pytest.raises(ValueError, match="Gemm"):
        Graph([helper.make_node("Gemm", ["x", "w"], ["y"])], consts)
    with Graph([helper.make_node("Add", ["a", "b"], ["y"])]) as g:
        with pytest.raises(ValueError, match="B: shape"):
            g({"a": np.ones((2, 3), np.float32), "b": np.ones((4,), np.float32)})
        with pytest.raises(ValueError, match="missing"):
            g({"a": np.ones((2, 3), np.float32)})
        with pytest.raises(ValueError, match="dtype"):
            g({"a": np.ones(3), "b": np.ones(3)})
