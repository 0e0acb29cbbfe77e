"""The persistent cache of tuned kernel choices: one JSON file per device, driver and vkconv version.

Where: ``$VKCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/vkconv``, else ``~/.cache/vkconv``.  A file is
named after the device and holds::

    {"format": 1, "vkconv": "0.1.0", "device": {...identity...},
     "entries": {"<op shape signature>": {"candidate": {...}, "ms": ..., ...}, ...}}

The identity is what a kernel's speed depends on: device name, vendor and device id, the
device and driver UUIDs (lavapipe's device UUID spells its Mesa version), the driver version, the
``VKCONV_LIMITS`` profile and vkconv's version; a file whose identity or format differs is foreign
and ignored.  Writers take an exclusive ``flock`` on ``<file>.lock``, re-read the file, merge their
entries in and replace the file atomically (temporary file + ``os.replace``), so several processes
tuning at once lose nothing and readers never see half a file.  A corrupt, truncated or foreign
file is ignored with one warning per process (the next write replaces it), never an error.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

from vkconv.runtime.context import Context, vk
from vkconv.runtime.version import __version__

try:
    import fcntl
except ImportError:  # not POSIX: atomic replace still keeps the file whole; merges may race
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT = 1


def cache_dir() -> Path:
    """``$VKCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/vkconv``, else ``~/.cache/vkconv``."""
    explicit = os.environ.get("VKCONV_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vkconv"


def device_identity(ctx: Context) -> dict[str, Any]:
    """What identifies ``ctx``'s device and driver for the cache (JSON-ready)."""
    ids = vk.VkPhysicalDeviceIDProperties()
    props = vk.VkPhysicalDeviceProperties2(pNext=ids)
    vk.vkGetPhysicalDeviceProperties2(ctx.physical_device, props)
    return {"name": ctx.info.name, "vendor_id": props.properties.vendorID,
            "device_id": props.properties.deviceID, "device_uuid": bytes(ids.deviceUUID).hex(),
            "driver_uuid": bytes(ids.driverUUID).hex(), "driver_version": props.properties.driverVersion,
            "api_version": ctx.info.api_version, "limits": os.environ.get("VKCONV_LIMITS", ""),
            "vkconv": __version__}


class TuneCache:
    """The entries of one device's cache file, read lazily and merged on every write."""

    def __init__(self, identity: dict[str, Any], directory: Path | None = None):
        self.identity = identity
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        name = re.sub(r"[^A-Za-z0-9]+", "-", identity["name"]).strip("-")[:40] or "device"
        self.path = (directory or cache_dir()) / f"{name}-{digest}.json"
        self._lock = threading.Lock()
        self._entries: dict[str, dict] | None = None
        self._warned = False

    def _read(self) -> dict[str, dict]:
        """The file's entries; {} (with one warning) when it is missing, corrupt or foreign."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._warn(f"cannot read it ({exc})")
            return {}
        try:
            data = json.loads(text)
        except ValueError as exc:
            self._warn(f"not valid JSON ({exc}); it is ignored and will be rewritten")
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("device") != self.identity \
                or not isinstance(data.get("entries"), dict):
            self._warn("written for another format, device, driver or vkconv version; it is ignored")
            return {}
        return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"vkconv tuning cache {self.path}: {why}", RuntimeWarning, stacklevel=4)

    def get(self, key: str) -> dict | None:
        """The entry for op shape signature ``key``, or None."""
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            return self._entries.get(key)

    def entries(self) -> dict[str, dict]:
        """Every entry, as last read or written."""
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            return dict(self._entries)

    def put(self, key: str, entry: dict) -> None:
        """Store ``entry`` under ``key``: merged with what other processes wrote meanwhile, under
        the lock file, and written atomically.  An unwritable cache folder is logged, not raised:
        the choice still holds for this process."""
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self._file_lock():
                    merged = self._read()
                    merged[key] = entry
                    self._write(merged)
                self._entries = merged
            except OSError as exc:
                log.warning("tuning cache %s not written: %s", self.path, exc)
                self._entries = {**(self._entries or {}), key: entry}

    def clear(self) -> None:
        """Delete the file (and forget its entries)."""
        with self._lock, self._file_lock():
            self.path.unlink(missing_ok=True)
            self._entries = {}

    @contextlib.contextmanager
    def _file_lock(self):
        if fcntl is None or not self.path.parent.is_dir():
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, entries: dict[str, dict]) -> None:
        data = {"format": FORMAT, "vkconv": self.identity["vkconv"], "device": self.identity,
                "entries": dict(sorted(entries.items()))}
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


_caches: dict[tuple[str, str], TuneCache] = {}
_caches_lock = threading.Lock()


def cache_for(ctx: Context) -> TuneCache:
    """The cache of ``ctx``'s device in the current cache folder (one object per identity and
    folder, so a changed ``VKCONV_CACHE_DIR`` or ``VKCONV_LIMITS`` takes effect)."""
    identity = device_identity(ctx)
    directory = cache_dir()
    key = (json.dumps(identity, sort_keys=True), str(directory))
    with _caches_lock:
        cache = _caches.get(key)
        if cache is None:
            cache = _caches[key] = TuneCache(identity, directory)
        return cache
