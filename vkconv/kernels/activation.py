"""Fused activation epilogues and elementwise programs: the Python side of
``shaders/include/activation.glsl``."""
from __future__ import annotations

from dataclasses import dataclass, replace

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


OP_CODES = {"Add": 0, "Sub": 1, "Mul": 2, "Div": 3}
OP_ACTIVATION = 16  # + an activation kind
IMMEDIATE = -1  # an operand that reads the instruction's immediate ``fa``
MAX_INSTRUCTIONS = 8
_POST_BASE = 200  # specialization constant id of POST_N in activation.glsl


@dataclass(frozen=True)
class Instruction:
    """One step of an elementwise program.  ``op``: an ``OP_CODES`` value (``a op b``) or
    ``OP_ACTIVATION + kind`` (``activation(a)`` with parameters ``fa``, ``fb``).  Operands are
    registers (inputs from 0, 4 + k: instruction k's result) or :data:`IMMEDIATE` (``fa``)."""

    op: int
    a: int
    b: int = IMMEDIATE
    fa: float = 0.0
    fb: float = 0.0

    def constants(self) -> list[int | float]:
        """The instruction as the shaders' five specialization constants."""
        return [self.op, self.a, self.b, float(self.fa), float(self.fb)]


def activation_instruction(activation, register: int) -> Instruction:
    """The instruction applying ``activation`` (any :meth:`Activation.parse` spec) to ``register``."""
    act = Activation.parse(activation)
    return Instruction(OP_ACTIVATION + act.kind, register, register, act.a, act.b)


def check_program(program, n_inputs: int) -> None:
    """ValueError unless ``program`` has 1..8 instructions, each reading only the ``n_inputs``
    input registers and earlier results."""
    if not 1 <= len(program) <= MAX_INSTRUCTIONS:
        raise ValueError(f"program: expected 1..{MAX_INSTRUCTIONS} instructions, got {len(program)}")
    for k, ins in enumerate(program):
        if any(r != IMMEDIATE and not (0 <= r < n_inputs or 4 <= r < 4 + k) for r in (ins.a, ins.b)):
            raise ValueError(f"program: instruction {k} reads a register not written before it: {ins}")


@dataclass(frozen=True)
class Activation:
    """An epilogue: ``kind`` is the shader's ACT constant, ``a``/``b`` its two parameters, and
    ``post`` an optional program over constants applied after it (register 0: the activated
    value), e.g. the scale, shift and written-out HardSwish that follow PP-LCNet's convolutions.

    Put the object itself in a pipeline's specialization tuple where the shader expects ACT: the
    pipeline takes ``kind`` there and the program's constants from :meth:`post_constants`."""

    kind: int = 0
    a: float = 0.0
    b: float = 0.0
    post: tuple[Instruction, ...] = ()

    def with_post(self, program) -> Activation:
        """This epilogue followed by ``program`` (checked as a one-input program)."""
        check_program(program, 1)
        return replace(self, post=tuple(program))

    def spec_constants(self, constant_id: int) -> list[tuple[int, int | float]]:
        """Specialization constants of this epilogue when it stands at ``constant_id`` of a
        pipeline's spec: the kind there, the post program at the ids activation.glsl gives it."""
        return [(constant_id, self.kind), *self.post_constants()]

    def post_constants(self) -> list[tuple[int, int | float]]:
        """``(constant id, value)`` of the post program in activation.glsl (none without one)."""
        if not self.post:
            return []
        values = [len(self.post)] + [v for ins in self.post for v in ins.constants()]
        return list(enumerate(values, _POST_BASE))

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
