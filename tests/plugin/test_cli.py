"""The ``vkconv`` command line (python -m vkconv / the console script): ``info`` (text, JSON, device
choice, errors), ``run`` and ``profile`` (outputs, timing, comparison with OpenCV, inputs, errors),
``bench`` (JSON lines, PNG chart, help, errors)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import vkconv
from cv_plugin import bench as benchmarks
from cv_plugin import cli
from cv_plugin.bench import report, soak, zoo
from cv_plugin.bench import sparse as sparse_bench
from cv_plugin.cli import main
from vkconv.runtime.context import choose_device

try:
    import cv2
except ImportError:  # the info tests still run
    cv2 = None

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def devices(monkeypatch):
    monkeypatch.delenv("VKCONV_DEVICE", raising=False)
    return vkconv.list_devices()


def test_info_lists_every_device_and_marks_the_chosen_one(devices, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    chosen = choose_device(devices)
    for d in devices:
        assert f"[{d.index}] {d.name}" in out
    marked = [line for line in out.splitlines() if line.startswith("* ")]
    assert marked == [next(line for line in out.splitlines() if f"[{chosen.index}] {chosen.name}" in line)]
    for label in ("invocations", "shared", "max storage buffer range", "push constants", "subgroup size",
                  "fp16 storage", "fp16 arithmetic", "unified"):
        assert label in out
    for d in devices:  # lavapipe: "llvmpipe, Mesa 22.3.6 (LLVM 15.0.6)"
        assert d.driver and f"driver:    {d.driver}" in out


def test_info_json_matches_list_devices(devices, capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["vkconv"] == vkconv.__version__
    assert data["selector"] is None
    assert data["chosen"] == choose_device(devices).index
    assert [d["name"] for d in data["devices"]] == [d.name for d in devices]
    assert [d["chosen"] for d in data["devices"]] == [d.index == data["chosen"] for d in devices]
    first, info = data["devices"][0], devices[0]
    assert first["max_workgroup_invocations"] == info.max_workgroup_invocations
    assert first["max_workgroup_size"] == list(info.max_workgroup_size)
    assert first["max_storage_buffer_range"] == info.max_storage_buffer_range
    assert first["fp16_storage"] == info.fp16_storage
    assert first["driver"] == info.driver
    assert "rank" not in first


@pytest.mark.parametrize("by", ["index", "name"])
def test_info_honours_vkconv_device(devices, monkeypatch, capsys, by):
    target = devices[-1]
    selector = str(target.index) if by == "index" else target.name.split()[0].upper()
    monkeypatch.setenv("VKCONV_DEVICE", selector)
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["selector"] == selector
    assert data["devices"][data["chosen"]]["name"].lower().startswith(target.name.split()[0].lower())


def test_unmatched_selector_is_one_line_naming_the_devices(devices, monkeypatch, capsys):
    monkeypatch.setenv("VKCONV_DEVICE", "no-such-gpu-xyz")
    assert main(["info"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "VKCONV_DEVICE" in lines[0] and devices[0].name in lines[0]
    assert "Traceback" not in captured.err


def test_debug_shows_the_traceback(devices, monkeypatch, capsys):
    monkeypatch.setenv("VKCONV_DEVICE", "no-such-gpu-xyz")
    assert main(["--debug", "info"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["info", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["info", "--bogus"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "info" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert vkconv.__version__ in capsys.readouterr().out


def _env_without(*names: str) -> dict:
    return {k: v for k, v in os.environ.items() if k not in names}


def test_python_dash_m_and_console_script():
    env = _env_without("VKCONV_DEVICE")
    res = subprocess.run([sys.executable, "-m", "vkconv", "info"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "<- chosen" in res.stdout
    script = Path(sys.executable).parent / "vkconv"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter (pip install -e .)")
    res = subprocess.run([str(script), "info", "--json"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["devices"]


def test_no_loader_is_one_line_saying_what_to_install():
    # None in sys.modules makes `import vulkan` fail exactly as a missing libvulkan.so.1 would.
    code = "import sys; sys.modules['vulkan'] = None; from cv_plugin.cli import main; sys.exit(main(['info']))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 1
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "no Vulkan loader" in lines[0] and "apt-get install" in lines[0]


def test_unexpected_errors_are_one_line_with_a_hint(monkeypatch, capsys):
    def broken():
        raise KeyError("driver returned nonsense")

    monkeypatch.setattr("cv_plugin.cli.list_devices", broken)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (KeyError)" in err and "--debug" in err


# -- run / profile ------------------------------------------------------------------------------
# Oracles: output shapes computed by hand from the models below; values compared against OpenCV's
# own CPU run (--compare-cpu) and onnxruntime; image blobs against cv2.imread + numpy.

needs_cv2 = pytest.mark.skipif(cv2 is None, reason="OpenCV is not installed (pip install 'vkconv[cv]')")


@pytest.fixture
def small_model(tmp_path) -> Path:
    """cv_plugin.bench.soak.small_net: x [1, 8, 19, 23] -> y [1, 4, 10, 12], 3 Conv nodes."""
    path = tmp_path / "small.onnx"
    onnx.save(soak.small_net(), str(path))
    return path


def _rgb_conv_model(dims, channels: int = 3) -> onnx.ModelProto:
    """Conv 3x3 pad 1, ``channels`` -> 2, on input ``dims`` (strings are dynamic): same H and W out."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((2, channels, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    out = [dims[0], 2, dims[2], dims[3]]
    graph = helper.make_graph([node], "rgb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _image(tmp_path, h: int = 29, w: int = 37) -> tuple[Path, np.ndarray]:
    img = np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    assert cv2.imwrite(str(path), img)
    return path, img


def _line(out: str, prefix: str) -> str:
    found = [line for line in out.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, out
    return found[0]


@pytest.mark.parametrize("command", ["info", "run", "profile"])
def test_subcommand_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vkconv {command}")
    if command != "info":
        assert "MODEL.onnx" in out and "--input" in out and "--runs" in out and ".npy" in out
    if command == "run":
        assert "--compare-cpu" in out and "subgraph" in " ".join(out.split())


@needs_cv2
def test_run_subgraph_mode(small_model, capsys):
    assert main(["run", str(small_model), "--mode", "subgraph", "--compare-cpu", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert _line(out, "output y:") == "output y: (1, 4, 10, 12) float32"
    diff = float(re.search(r"max \|vkconv - OpenCV CPU\| y: ([\d.e+-]+)", out).group(1))
    assert diff < 1e-4, out


def test_unknown_mode_is_a_usage_error(small_model, capsys):
    assert main(["run", str(small_model), "--mode", "graph"]) == 2
    assert "invalid choice: 'graph'" in capsys.readouterr().err


@needs_cv2
def test_run_compare_cpu(small_model, capsys):
    assert main(["run", str(small_model), "--compare-cpu", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert _line(out, "input  x:").startswith("input  x: (1, 8, 19, 23) float32, random")
    assert _line(out, "output y:") == "output y: (1, 4, 10, 12) float32"
    assert "3 routed to vkconv layers (1 BatchNorm folded, 2 activations fused)" in out
    timing = _line(out, "cv2.dnn + vkconv:")
    assert re.search(r"first forward [\d.]+ ms, median [\d.]+ ms over 2 more; 3 of 3 vkconv layers ran on "
                     r"Vulkan", timing), timing
    diff = re.search(r"max \|vkconv - OpenCV CPU\| y: (\S+) \(max \|CPU\| (\S+), relative (\S+)\)", out)
    assert diff, out
    assert float(diff[2]) > 0.1 and float(diff[3]) <= 1e-4


@needs_cv2
def test_run_npy_input_is_the_one_fed(small_model, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(8).standard_normal((1, 8, 19, 23)).astype(np.float32) * 3
    np.save(tmp_path / "x.npy", x.astype(np.float64))  # any numeric dtype is taken as float32
    assert main(["run", str(small_model), "--input", str(tmp_path / "x.npy"), "--compare-cpu",
                 "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert f"input  x: (1, 8, 19, 23) float32, {tmp_path / 'x.npy'}" in out
    expected = ort.InferenceSession(str(small_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    printed = float(re.search(r"max \|CPU\| (\S+),", out)[1])
    assert printed == pytest.approx(float(np.abs(expected).max()), rel=5e-3)  # printed to 3 digits
    assert float(re.search(r"relative (\S+)\)", out)[1]) <= 1e-4


@needs_cv2
@pytest.mark.parametrize("dims, out_hw", [([1, 3, "h", "w"], (29, 37)), ([1, 3, 16, 20], (16, 20)),
                                          (["n", 3, "h", "w"], (29, 37))])
def test_run_png_input(tmp_path, capsys, dims, out_hw):
    model = tmp_path / "rgb.onnx"
    onnx.save(_rgb_conv_model(dims), str(model))
    image, _ = _image(tmp_path)
    assert main(["run", str(model), "--input", str(image), "--compare-cpu", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    h, w = out_hw
    assert _line(out, "input  x:") == f"input  x: (1, 3, {h}, {w}) float32, {image} (BGR, scaled by 1/255)"
    assert _line(out, "output y:") == f"output y: (1, 2, {h}, {w}) float32"
    assert float(re.search(r"relative (\S+)\)", out)[1]) <= 1e-4


@needs_cv2
def test_image_blob_layout(tmp_path):
    image, img = _image(tmp_path)
    dynamic = onnx.ModelProto.FromString(_rgb_conv_model([1, 3, "h", "w"]).SerializeToString())
    feeds, _ = cli.make_feeds(dynamic, str(image), 0)
    np.testing.assert_allclose(feeds["x"], img.transpose(2, 0, 1)[None].astype(np.float32) / 255, rtol=1e-6)
    fixed = _rgb_conv_model([1, 3, 16, 20])
    resized = cv2.resize(img, (20, 16), interpolation=cv2.INTER_LINEAR)
    feeds, _ = cli.make_feeds(fixed, str(image), 0)
    np.testing.assert_allclose(feeds["x"], resized.transpose(2, 0, 1)[None].astype(np.float32) / 255,
                               rtol=1e-6)
    gray = _rgb_conv_model([1, 1, "h", "w"], channels=1)
    feeds, _ = cli.make_feeds(gray, str(image), 0)
    expected = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)[None, None].astype(np.float32) / 255
    np.testing.assert_allclose(feeds["x"], expected, rtol=1e-6)


def test_random_input_sizes_dynamic_dims():
    inp = cli.ModelInput("x", [None, 3, None, 7])
    x = cli.random_input(inp, np.random.default_rng(0))
    assert x.shape == (1, 3, cli.DEFAULT_DIM, 7) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() < 1.0


@needs_cv2
def test_run_vgg16(tmp_path, capsys):
    path = tmp_path / "vgg16.onnx"
    onnx.save(zoo.vgg16(seed=0, size=32, classes=10), str(path))
    assert main(["run", str(path), "--compare-cpu", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert _line(out, "output logits:") == "output logits: (1, 10) float32"
    assert "13 of 13 vkconv layers ran on Vulkan" in out
    assert float(re.search(r"relative (\S+)\)", out)[1]) <= 1e-4


@needs_cv2
def test_profile(small_model, capsys):
    assert main(["profile", str(small_model), "--runs", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^  (\S+)\s+(vkconv\.Conv)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [r[0].rpartition("!")[2] for r in rows] == ["Conv#0", "Conv#3", "Conv#5"], out
    for _, _, opencv_ms, vk_ms in rows:
        # OpenCV times the whole Python layer call, which contains the vkconv op
        assert 0 < float(vk_ms) <= float(opencv_ms) + 0.002
    total = re.search(r"^  sum\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert total and float(total[2]) == pytest.approx(sum(float(r[3]) for r in rows), abs=0.003)
    assert "median of 2 forwards" in out and "3 vkconv layers took" in out


def _bad_inputs(tmp_path, small_model):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    np.save(tmp_path / "wrong.npy", np.zeros((1, 8, 19, 24), np.float32))
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    two = tmp_path / "two.onnx"
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 5, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(two))
    m = str(small_model)
    return {
        "missing model": (["run", str(tmp_path / "nope.onnx")], "no such model file"),
        "corrupt model": (["profile", str(corrupt)], "not an ONNX model"),
        "missing input": (["run", m, "--input", str(tmp_path / "nope.png")], "no such file"),
        "not an image": (["run", str(tmp_path / "rgb.onnx"), "--input", str(text)], "cannot read it as an image"),
        "wrong npy shape": (["run", m, "--input", str(tmp_path / "wrong.npy")], "does not fit input 'x'"),
        "npy of strings": (["run", m, "--input", str(tmp_path / "strings.npy")], "expected a numeric array"),
        "image for 8 channels": (["run", m, "--input", str(text)], "1 or 3 channels"),
        "two inputs": (["run", str(two), "--input", str(tmp_path / "wrong.npy")], "this one has 2"),
        "mismatched channels": (["run", str(two)], "channels"),
    }


BAD = ["missing model", "corrupt model", "missing input", "not an image", "wrong npy shape", "npy of strings",
       "image for 8 channels", "two inputs", "mismatched channels"]


@needs_cv2
@pytest.mark.parametrize("case", BAD)
def test_bad_paths_and_inputs_are_one_line(case, small_model, tmp_path, capsys):
    onnx.save(_rgb_conv_model([1, 3, "h", "w"]), str(tmp_path / "rgb.onnx"))
    argv, message = _bad_inputs(tmp_path, small_model)[case]
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vkconv: error: "), captured.err
    assert message in lines[0] and "Traceback" not in captured.err and "internal error" not in lines[0]
    assert main(["--debug", *argv]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_run_errors_through_python_dash_m(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vkconv", "run", str(tmp_path / "missing.onnx")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines() == [f"vkconv: error: {tmp_path / 'missing.onnx'}: no such model file"]


@needs_cv2
def test_model_error_is_one_line_on_the_real_stderr(tmp_path):
    """OpenCV writes its own ERROR line to fd 2 for a node it cannot import; the CLI keeps it out."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(np.zeros((4, 5, 3, 3), np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "bad.onnx"))
    res = subprocess.run([sys.executable, "-m", "vkconv", "run", str(tmp_path / "bad.onnx")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vkconv: error: ") and "channels" in lines[0], res.stderr


# -- bench --------------------------------------------------------------------------------------
# Oracles: the tiny case's FLOP count by hand (2 x 8 x 8 x 3 x 3 x 16 x 16); vkconv's output against
# OpenCV's and ncnn's own convolutions of the same arrays (the benchmark's diff columns); PNG bytes
# against the PNG signature and, with OpenCV, cv2.imread; sparse site and pair counts against numpy.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bench_conv_tiny_case_writes_jsonl_and_png(tmp_path):
    out = tmp_path / "results"
    res = subprocess.run([sys.executable, "-m", "vkconv", "bench", "conv", "--quick", "--cases", "tiny",
                          "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    [jsonl] = out.glob("conv-*.jsonl")
    assert f"results: {jsonl}" in res.stdout
    assert "4/4" in res.stderr  # progress over 4 peers x 1 case, tqdm bar or plain lines
    records = _jsonl(jsonl)
    meta = next(r for r in records if r.get("peer") == "meta")
    assert meta["repeat"] == 5 and meta["warmup"] == 1
    vk = next(r for r in records if r.get("peer") == "vkconv")
    assert vk["case"] == "tiny" and vk["runs"] == 5 and vk["ms"] > 0 and vk["ms_device"] > 0
    assert vk["kernel"] in ("implicit_gemm", "winograd", "gemm1x1", "depthwise", "direct")
    assert vk["choice"] == "heuristic" and vk["candidate"].startswith(vk["kernel"])  # the tests' cache is empty
    probe = next(r for r in records if r.get("peer") == "probe")
    assert probe["gflops"] > 0 and probe["chains"] in (8, 16, 32)
    [row] = [r for r in records if r.get("case") == "tiny" and "peer" not in r]
    assert row["gflop"] == pytest.approx(2 * 8 * 8 * 9 * 16 * 16 / 1e9)
    assert (row["cin"], row["cout"], row["k"], row["stride"], row["size"]) == (8, 8, 3, 1, 16)
    assert row["vkconv_ms"] == vk["ms"] and row["gflops"] == pytest.approx(row["gflop"] / vk["ms"] * 1e3)
    for peer, module in (("opencv", "cv2"), ("opencl", "cv2"), ("ncnn", "ncnn")):
        if _has(module) and not any(r.get("peer") == peer and "skipped" in r for r in records):
            assert row[f"{peer}_diff"] <= 1e-4, row  # the same convolution computed by the peer
            assert row[f"ratio_vkconv_{peer}"] == pytest.approx(vk["ms"] / row[f"{peer}_ms"])
    assert records[-1]["peer"] == "summary"
    pngs = list(out.glob("conv-*.png"))
    if not _has("matplotlib"):
        assert not pngs and "matplotlib is not installed" in res.stdout
        return
    [png] = pngs
    assert f"chart: {png}" in res.stdout
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    if cv2 is not None:
        image = cv2.imread(str(png))
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100


def test_bench_script_wrappers_still_run(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "conv.py"), "--cases", "tiny", "--quick",
                          "--peers", "vkconv", "--out", str(tmp_path)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "tiny" in res.stdout and len(list(tmp_path.glob("conv-*.jsonl"))) == 1
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "sparse.py"), "--help"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and "--no-spconv" in res.stdout and "--out" in res.stdout


def test_bench_help(capsys):
    assert main(["bench", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: vkconv bench")
    for text in ("{conv,deform,sparse,all}", "--quick", "--out DIR", "--cases", "JSON", "PNG", "matplotlib",
                 "tqdm", "deform DeformConv (DCNv2 3x3", "PASS/FAIL against issue 4's targets"):
        assert text in out, text


@pytest.mark.parametrize("argv", [["bench", "frobnicate"], ["bench", "conv", "--bogus"]])
def test_bench_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: vkconv" in capsys.readouterr().err


def test_bench_deform_without_its_module_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(benchmarks, "available", lambda: ["conv", "sparse"])
    assert main(["bench", "deform"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "'deform' is not available" in lines[0] and "conv, sparse" in lines[0]


@pytest.mark.parametrize("argv, message", [
    (["bench", "conv", "--cases", "vgg1_1,nope"], "cases: unknown nope"),
    (["bench", "sparse", "--cases", "tiny"], "--cases selects cases of `bench conv` only"),
])
def test_bench_bad_cases_are_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not list(tmp_path.iterdir())


def test_report_without_tqdm_and_matplotlib(monkeypatch, tmp_path, capsys):
    # None in sys.modules makes the import fail as if the package were not installed.
    for name in ("tqdm", "matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)
    with report.Progress(2, "bench x") as progress:
        progress.step("case a")
        progress.note("peer y: skipped")
        progress.step("case b")
    assert capsys.readouterr().err.splitlines() == ["bench x [1/2] case a", "peer y: skipped",
                                                    "bench x [2/2] case b"]
    note = report.bar_chart(tmp_path / "c.png", ["a"], {"s": [1.0]}, title="t", ylabel="ms")
    assert "matplotlib is not installed" in note and not (tmp_path / "c.png").exists()


def _expected_sparse_counts(idx: np.ndarray, grid, subm: bool) -> tuple[int, int]:
    """(output sites, pairs incl. SubM's centre tap) of a 3x3x3 kernel, stride 2 pad 1 unless SubM,
    by brute force over the 27 taps."""
    grid = np.array(grid)
    stride, pad = (1, 1) if subm else (2, 1)
    out_grid = (grid + 2 * pad - 3) // stride + 1
    sites = set(map(tuple, idx[:, 1:]))
    pairs, outs = 0, set()
    for tap in np.ndindex(3, 3, 3):
        num = idx[:, 1:] + pad - np.array(tap)  # out * stride = in + pad - tap
        ok = np.all((num % stride == 0) & (num >= 0) & (num // stride < out_grid), axis=1)
        o = num[ok] // stride
        if subm:
            ok_sites = [tuple(p) in sites for p in o]
            o = o[ok_sites]
        pairs += len(o)
        outs |= set(map(tuple, o))
    return len(outs), pairs


def test_bench_sparse_small_run(tmp_path, capsys):
    files = sparse_bench.run(quick=True, out=tmp_path, points=1500, spconv=False, dense=False)
    printed = capsys.readouterr().out
    [jsonl] = [f for f in files if f.suffix == ".jsonl"]
    assert f"results: {jsonl}" in printed and "scan" in printed
    meta, *rows = _jsonl(jsonl)
    assert meta["peer"] == "meta" and meta["points"] == 1500 and meta["spconv"] is False
    assert [r["layer"] for r in rows] == list(sparse_bench.LAYERS)
    idx = sparse_bench.scan_cloud(np.random.default_rng(0), 1500, sparse_bench.GRID)
    for r in rows:
        assert r["cloud"] == "scan" and r["channels"] == 16 and "sp_total_ms" not in r
        assert 0 < r["vk_compute_ms"] and 0 < r["vk_rulebook_ms"] and 0 < r["vk_total_ms"]
        assert (r["n_out"], r["pairs"]) == _expected_sparse_counts(idx, sparse_bench.GRID, r["layer"] == "SubM k3")
    assert [f.suffix for f in files] == ([".jsonl", ".png"] if _has("matplotlib") else [".jsonl"])


def test_bench_deform_quick_writes_jsonl_and_png(tmp_path):
    out = tmp_path / "results"
    res = subprocess.run([sys.executable, "-m", "vkconv", "bench", "deform", "--quick", "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    [jsonl] = out.glob("deform-*.jsonl")
    assert f"results: {jsonl}" in res.stdout
    assert "2/2" in res.stderr  # progress over the 2 quick cases, tqdm bar or plain lines
    meta, *rows = _jsonl(jsonl)
    assert meta["peer"] == "meta" and (meta["runs"], meta["warmup"], meta["repeat"]) == (5, 1, 1)
    assert meta["sample_limit"] == 0.25 and meta["efficiency_target"] == 0.6
    assert [(r["channels"], r["size"], r["offset_group"]) for r in rows] == [(16, 16, 1), (16, 16, 2)]
    for r in rows:
        assert r["case"] == f"16->16 16x16 og={r['offset_group']}" and r["rounds"] == 1
        assert r["gflop"] == pytest.approx(2 * 16 * 16 * 9 * 16 * 16 / 1e9)  # 2 x MACs by hand
        assert r["vkconv_ms"] > 0 and r["gflops"] == pytest.approx(r["gflop"] / r["vkconv_ms"] * 1e3)
        # the dense 3x3 conv of the same size, timed alternately: the same FLOPs
        assert r["dense_ms"] > 0 and r["dense_gflops"] == pytest.approx(r["gflop"] / r["dense_ms"] * 1e3)
        assert r["efficiency"] > 0 and r["efficient"] == (r["efficiency"] >= 0.6)
        assert (f"efficiency >= 0.6: {'PASS' if r['efficient'] else 'FAIL'} ({r['efficiency']:.2f})"
                in res.stdout)
        fused = r["method"].startswith("deform fused ")  # the method that ran (heuristic choice)
        assert fused or r["method"].startswith("deform columns "), r["method"]
        if "dev_total_ms" in r:  # the queue has timestamps (lavapipe has)
            # medians over calls: each stage's is at most the total's (per call stage <= total)
            for stage in ("pack", "fused") if fused else ("pack", "sample", "gemm"):
                assert 0 < r[f"dev_{stage}_ms"] <= r["dev_total_ms"], (stage, r)
            assert f"{r['case']}: faster than torchvision: " in res.stdout
            if fused:  # it samples inside its one stage
                assert "sample_share" not in r and r["sampling_under_limit"] is None
                assert (f"sampling under 25% of device time: n/a (no stage of its own: {r['method']})"
                        in res.stdout)
            else:
                assert r["sample_share"] == pytest.approx(r["dev_sample_ms"] / r["dev_total_ms"])
                assert r["sampling_under_limit"] == (r["sample_share"] < 0.25)
                verdict = "PASS" if r["sampling_under_limit"] else "FAIL"
                assert f"sampling under 25% of device time: {verdict} ({r['sample_share']:.0%})" in res.stdout
        if _has("onnxruntime"):  # ONNX Runtime's own DeformConv of the same arrays
            assert r["onnxruntime_diff"] <= 1e-4, r
            assert r["ratio_onnxruntime_vkconv"] == pytest.approx(r["onnxruntime_ms"] / r["vkconv_ms"])
        if not _has("torchvision"):
            assert r["faster_than_torchvision"] is None and "torchvision_ms" not in r
    if not _has("torchvision"):
        assert "skipped torchvision: torchvision not importable" in res.stdout
    if _has("ncnn"):
        assert rows[0]["ncnn_diff"] <= 1e-4 and rows[1]["ncnn_skipped"] == "ncnn's DeformableConv2D has no offset groups"
    assert "| case | vkconv ms | on-device ms | sampling ms | sampling % |" in res.stdout
    pngs = list(out.glob("deform-*.png"))
    if not _has("matplotlib"):
        assert not pngs and "matplotlib is not installed" in res.stdout
        return
    [png] = pngs
    assert f"chart: {png}" in res.stdout and png.read_bytes().startswith(PNG_SIGNATURE)


def test_bench_deform_script_help_and_bad_flags(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "deform.py"), "--help"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    for flag in ("--runs", "--warmup", "--repeat", "--cases", "--og", "--peers", "--quick", "--out"):
        assert flag in res.stdout, flag
    for argv, message in ((["--runs", "3"], "runs: must be at least 5"), (["--cases", "64x"], "--cases"),
                          (["--og", "3"], "offset_groups"), (["--peers", "cudnn"], "peers: unknown")):
        res = subprocess.run([sys.executable, str(ROOT / "bench" / "deform.py"), *argv, "--out", str(tmp_path)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert res.returncode == 2 and message in res.stderr, (argv, res.stderr)
    assert not list(tmp_path.iterdir())
