"""Tools that ship with the package but are not plugin code: the benchmarks (so that ``vkconv
bench`` works from an installed wheel), the model builders they and the demo share (:mod:`.zoo`)
and the soak run (:mod:`.soak`).

Each benchmark is a module here with ``run(*, quick: bool, out: Path) -> list[Path]`` (prints its
table, writes ``<name>-<time>.jsonl`` and, with matplotlib, ``<name>-<time>.png`` into ``out``,
returns the files written; ValueError names a bad argument) and ``main(argv, default_out)`` for
``python -m cv_plugin.bench.<name>``.  :mod:`.report` holds what they share.

``conv`` and ``sparse`` are always here; ``deform`` takes part when its module
``cv_plugin.bench.deform`` exists.  Modules are imported only when a benchmark is run, so that
listing them needs neither a device nor the optional peers.  ``zoo``, ``soak`` and ``report`` are
helpers, not benchmarks.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

NAMES = ("conv", "deform", "sparse")


def available() -> list[str]:
    """The benchmarks whose module exists, in :data:`NAMES` order."""
    return [n for n in NAMES if importlib.util.find_spec(f"{__name__}.{n}") is not None]


def load(name: str) -> ModuleType:
    """Benchmark ``name``'s module; ValueError when it is not one of :func:`available`."""
    if name not in available():
        raise ValueError(f"benchmark: {name!r} is not available in this vkconv "
                         f"(available: {', '.join(available())})")
    return importlib.import_module(f"{__name__}.{name}")
