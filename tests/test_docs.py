"""Every ```python block of README.md and docs/*.md runs.

A file's blocks run in order in one namespace (later blocks may use earlier ones' names), in a fresh
directory holding ``model.onnx``: a small Conv network with one input ``input`` of shape
``[1, 3, H, W]`` (any height and width), so that examples can load "model.onnx" as users would.
A block preceded by a ``<!-- skip-test -->`` line is not run (for code that needs packages the
test environment lacks, such as torchvision).  A block that imports keras runs only where keras is
installed (the ``keras`` extra; it is in CI).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = "<!-- skip-test -->"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
IMPORTS_KERAS = re.compile(r"^\s*(import keras\b|from keras\b)", re.M)
HAS_KERAS = importlib.util.find_spec("keras") is not None


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, skipped) for each ```python block, in order."""
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append((line, m.group(1), before == SKIP_MARK))
    return blocks


def test_block_extraction():
    text = ("intro\n```python\nx = 1\n```\n<!-- skip-test -->\n```python\nimport torchvision\n```\n"
            "```sh\nls\n```\n```python\ny = 2\n```\n")
    assert python_blocks(text) == [(2, "x = 1\n", False), (6, "import torchvision\n", True),
                                   (12, "y = 2\n", False)]


def test_keras_blocks_are_recognised():
    assert IMPORTS_KERAS.search("import os\nimport keras\n") and IMPORTS_KERAS.search("from keras import ops")
    assert not IMPORTS_KERAS.search("from cv_plugin.keras import to_onnx\nimport kerasx\n")


def _example_model(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)

    def t(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [t("w1", 8, 3, 3, 3), t("b1", 8), t("gamma", 8), t("beta", 8), t("mean", 8),
             numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "var"), t("w2", 4, 8, 1, 1)]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"]),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["output"])]
    graph = helper.make_graph(
        nodes, "docs_example", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, "H", "W"])], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


WITH_CODE = [d for d in DOCS if python_blocks(d.read_text())]


def test_the_usage_docs_have_examples():
    assert {ROOT / "README.md", ROOT / "docs" / "USAGE.md", ROOT / "docs" / "COMMON_PROBLEMS.md"} <= set(WITH_CODE)


@pytest.mark.parametrize("doc", WITH_CODE, ids=_ids)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    blocks = python_blocks(doc.read_text())
    _example_model(tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    ran = 0
    for line, code, skipped in blocks:
        if skipped or (IMPORTS_KERAS.search(code) and not HAS_KERAS):
            continue
        try:
            exec(compile(code, f"{doc.name}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own code
        except Exception as exc:
            pytest.fail(f"{_ids(doc)}, python block at line {line}: {type(exc).__name__}: {exc}")
        ran += 1
    assert ran, f"every python block of {_ids(doc)} is marked {SKIP_MARK}"
