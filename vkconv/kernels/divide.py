"""Host side of ``shaders/include/divide.glsl``: magic numbers that turn an index division by a
run-time divisor into a multiply and a shift inside shaders."""
from __future__ import annotations


def magic(d: int) -> tuple[int, int]:
    """``(m, l)`` with ``floor(n / d) == (n * m) >> (31 + l)`` for every ``0 <= n < 2**31``."""
    if not 1 <= d < 2**31:
        raise ValueError(f"divisor: expected 1 <= d < 2**31, got {d}")
    shift = (d - 1).bit_length()
    return -(-(1 << (31 + shift)) // d), shift
