"""vkconv's logger: ``logging.getLogger("vkconv")``, silent unless the application or
``VKCONV_LOG`` asks.

Modules log through children of it (``vkconv.runtime.context``, ``vkconv.runtime.pipeline``, ``vkconv.runtime.command``,
``vkconv.runtime.plan``; ``cv_plugin`` logs on ``vkconv`` itself), so a level or a handler set on
``logging.getLogger("vkconv")`` covers them all.  As libraries should, vkconv itself attaches only
a :class:`logging.NullHandler`; ``VKCONV_LOG=debug|info|warning`` (read once, when vkconv is
imported) adds a stderr handler at that level, without touching the application's code.

At ``debug``: the device chosen, each compute pipeline created (shader name and specialization
constants), each dispatch recorded (workgroup count and local size), each execution plan built (its
input and output shapes), and ``cv_plugin.read_net``'s routing summary.  Dispatches are recorded
once per plan, not per call, so debug logging does not slow a steady-state forward.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

ENV_VAR = "VKCONV_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}

logger = logging.getLogger("vkconv")
logger.addHandler(logging.NullHandler())

_handler: logging.Handler | None = None


def configure_logging(level: str | int | None = None) -> logging.Handler | None:
    """Send vkconv's log records at ``level`` and above to stderr (replacing an earlier call's handler).

    ``level``: ``"debug"``, ``"info"``, ``"warning"`` or a :mod:`logging` level; ``None`` reads
    ``VKCONV_LOG`` (unset or empty: leave logging alone and return None).  An unknown name raises
    ValueError.  Returns the handler it attached.
    """
    global _handler
    if level is None:
        level = os.environ.get(ENV_VAR, "").strip()
        if not level:
            return None
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"level: expected one of {', '.join(LEVELS)}, got {level!r}")
        level = LEVELS[level.lower()]
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    _handler.setLevel(level)
    logger.addHandler(_handler)
    logger.setLevel(level)
    return _handler


def _configure_from_env() -> None:
    """At import: a bad ``VKCONV_LOG`` must not stop ``import vkconv``, so it only warns."""
    try:
        configure_logging()
    except ValueError as exc:
        warnings.warn(f"{ENV_VAR}: {exc}; logging left off", RuntimeWarning, stacklevel=2)


_configure_from_env()
