"""What every benchmark shares: timing, JSON-lines results, a bar chart, a progress bar.

matplotlib and tqdm are optional (``pip install 'vkconv[bench]'``): without matplotlib the chart is
skipped with a note, without tqdm progress is one plain line per case on stderr.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from vkconv.runtime.context import get_context


def times(fn: Callable[[], object], warmup: int, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def median_ms(samples: Sequence[float]) -> float:
    """The median of ``samples`` (seconds) in milliseconds."""
    return 1e3 * statistics.median(samples)


def interleaved_ms(fns: Mapping[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median ms of each of ``fns`` (name -> callable), timed in turns (one call of each per turn
    after a warm-up call each), so that a load change on a shared machine hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for name, fn in fns.items():
            samples[name] += times(fn, warmup=0, repeat=1)
    return {name: median_ms(t) for name, t in samples.items()}


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line, each naming the Vulkan device and driver it was measured on
    (speeds differ between drivers of one device); the folder is created if needed."""
    info = get_context().info
    where = {"device": info.name, "driver": info.driver}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps({**where, **record}) + "\n")
    return path


def bar_chart(path: Path, labels: Sequence[str], series: Mapping[str, Sequence[float | None]], *,
              title: str, ylabel: str, log: bool = True) -> str:
    """Grouped bars, one group per label and one bar per series (None: no bar), saved as a PNG.

    Returns the line to print: where the chart is, or why there is none (no matplotlib)."""
    if not labels or not series:
        return "chart: skipped, no results to draw"
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot's import
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart: skipped, matplotlib is not installed (pip install 'vkconv[bench]')"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 5))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        heights = [math.nan if v is None else v for v in values]  # NaN: no bar, also on a log scale
        ax.bar([j + i * width for j in range(len(labels))], heights, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=45, ha="right")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f"chart: {path}"


class Progress:
    """Progress over ``total`` cases on stderr: a tqdm bar when tqdm is installed, else one line
    per finished case (``[3/12] vkconv vgg1_1``).  ``step(label)`` marks one case done."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, leave=True)

    def step(self, label: str) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        else:
            print(f"{self.desc} [{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """A line that does not garble the bar (a skipped peer, say)."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
