"""The lifetime every op with device-resident weights shares (Conv, ConvTranspose, DeformConv,
ConvLSTM2D): ``close()`` (or leaving a ``with`` block) frees its buffers and recorded plans under the
op's lock, while the pipelines stay cached on the context for other ops."""
from __future__ import annotations

import threading
from typing import Self


class ResidentOp:
    """Subclasses set ``self._lock`` and implement :meth:`_release` (called with the lock held)."""

    _lock: threading.Lock

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free the device buffers and recorded plans (the shared pipelines stay cached)."""
        with self._lock:
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
