"""The ``vkconv`` command line (also ``python -m vkconv``).

Subcommands:

``info``
    every Vulkan device with the limits vkconv sizes its kernels from, and which one
    ``VKCONV_DEVICE`` / the default preference (discrete > integrated > virtual > CPU) chooses.

Exit status: 0 on success, 1 when vkconv reports an error (no loader, no device, a device
selector that matches nothing), 2 for a usage error.  Errors are one line on stderr; ``--debug``
adds the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .context import DeviceInfo, choose_device, list_devices
from .errors import VkconvError


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps an integer (limits are powers of two)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _device_record(d: DeviceInfo, chosen: bool) -> dict:
    record = dataclasses.asdict(d)
    record.pop("rank")  # internal sort key, derived from the type
    record["max_workgroup_size"] = list(d.max_workgroup_size)
    record["max_workgroup_count"] = list(d.max_workgroup_count)
    record["chosen"] = chosen
    return record


def _device_lines(d: DeviceInfo, chosen: bool) -> list[str]:
    mark = "*" if chosen else " "
    tail = "  <- chosen" if chosen else ""
    size = "x".join(map(str, d.max_workgroup_size))
    count = "x".join(map(str, d.max_workgroup_count))
    return [
        f"{mark} [{d.index}] {d.name}  ({d.type}, Vulkan {d.api_version}){tail}",
        f"      workgroup: max {d.max_workgroup_invocations} invocations, size {size}, count {count}",
        f"      memory:    shared {_size(d.max_shared_memory)}, max storage buffer range "
        f"{_size(d.max_storage_buffer_range)}, push constants {_size(d.max_push_constants_size)}, "
        f"unified {_yes(d.unified_memory)}",
        f"      features:  subgroup size {d.subgroup_size}, fp16 storage {_yes(d.fp16_storage)}, "
        f"fp16 arithmetic {_yes(d.fp16_arithmetic)}, compute queue {_yes(d.has_compute_queue)}",
    ]


def cmd_info(args: argparse.Namespace) -> int:
    selector = os.environ.get("VKCONV_DEVICE") or None
    devices = list_devices()
    chosen = choose_device(devices, selector)  # NoDeviceError when none is usable or matches
    if args.json:
        print(json.dumps({
            "vkconv": __version__,
            "selector": selector,
            "chosen": chosen.index,
            "devices": [_device_record(d, d.index == chosen.index) for d in devices],
        }, indent=2))
        return 0
    how = f"VKCONV_DEVICE={selector}" if selector else "preference discrete > integrated > virtual > cpu"
    print(f"vkconv {__version__}: {len(devices)} Vulkan device(s), chosen by {how}")
    for d in devices:
        print("\n".join(_device_lines(d, d.index == chosen.index)))
    return 0


def _common() -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand.

    SUPPRESS keeps a subparser's default from overwriting a value given before the subcommand.
    """
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vkconv", parents=[_common()],
        description="ONNX-exact convolutions as GLSL compute shaders on any Vulkan device.")
    parser.add_argument("--version", action="version", version=f"vkconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = sub.add_parser("info", parents=[_common()], help="list Vulkan devices and the one vkconv uses",
                          description="List every Vulkan device, its limits, and which one vkconv "
                                      "chooses (VKCONV_DEVICE=<index|name part> overrides).")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `vkconv info | head`: stop quietly, and keep Python's exit flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if debug:
            traceback.print_exc()
        # VkconvError messages are written for users; anything else is a bug worth a traceback.
        what = "" if isinstance(exc, VkconvError) else f"internal error ({type(exc).__name__}): "
        hint = "" if debug or isinstance(exc, VkconvError) else " (rerun with --debug for the traceback)"
        print(f"vkconv: error: {what}{exc}{hint}", file=sys.stderr)
        return 1
