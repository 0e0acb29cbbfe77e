"""Fused activation epilogues: the Python side of ``shaders/include/activation.glsl``."""
from __future__ import annotations

from dataclasses import dataclass

# name (lower case, no underscores) -> (ACT constant in activation.glsl, default a, default b)
_KINDS = {
    "relu": (1, 0.0, 0.0),
    "clip": (2, float("-inf"), float("inf")),
    "leakyrelu": (3, 0.01, 0.0),
    "hardswish": (4, 0.0, 0.0),
    "hardsigmoid": (5, 0.2, 0.5),
    "sigmoid": (6, 0.0, 0.0),
    "tanh": (7, 0.0, 0.0),
}
NAMES = ("Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh")


@dataclass(frozen=True)
class Activation:
    """An epilogue: ``kind`` is the shader's ACT constant, ``a``/``b`` its two parameters."""

    kind: int = 0
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def parse(cls, spec) -> Activation:
        """``None``, an ONNX op name (``"Relu"``, ``"sigmoid"``...), or ``(name, *params)``:

        ``("Clip", min, max)``, ``("LeakyRelu", alpha)``, ``("HardSigmoid", alpha, beta)``;
        omitted parameters take ONNX's defaults.
        """
        if spec is None:
            return cls()
        if isinstance(spec, Activation):
            return spec
        if isinstance(spec, str):
            name, params = spec, ()
        elif isinstance(spec, (tuple, list)) and spec:
            name, params = spec[0], tuple(spec[1:])
        else:
            name, params = None, ()
        if not isinstance(name, str):
            raise ValueError(f"activation: expected a name or (name, *params), got {spec!r}")
        key = name.lower().replace("_", "")
        if key not in _KINDS:
            raise ValueError(f"activation: unknown {name!r}; supported: {', '.join(NAMES)}")
        kind, a, b = _KINDS[key]
        if len(params) > 2:
            raise ValueError(f"activation: {name} takes at most 2 parameters, got {params!r}")
        values = list(params) + [a, b][len(params):]
        try:
            a, b = (float(x) for x in values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"activation: parameters of {name} must be numbers, got {params!r}") from exc
        if key == "clip" and a > b:
            raise ValueError(f"activation: Clip min {a} is greater than max {b}")
        return cls(kind, a, b)
