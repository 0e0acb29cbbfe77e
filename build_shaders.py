#!/usr/bin/env python3
"""Compile every ``shaders/**/*.comp`` to SPIR-V and embed it in ``vkconv/runtime/_spirv.py``.

Like OpenCV dnn's vkcom ``spirv_generator.py``, the SPIR-V words are embedded in the package so that
installing and running vkconv never needs glslang.  Unlike it, a shader that fails to compile, or
that ``spirv-val`` rejects under any environment in ``VALIDATE_ENVS``, stops the build with glslang's /
spirv-val's own message, the module and the environment: no shader is ever skipped.

Variants: a shader may declare, in its first comment block, lines of the form
``// variant: NAME -DMACRO=VALUE ... [--target-env=vulkan1.X]``; each line produces one embedded
module ``NAME``, compiled for ``COMPILE_ENV`` unless it names a newer environment (a module that
needs SPIR-V 1.3, e.g. subgroup operations: the host then checks the device supports them).
A shader without variant lines produces one module named after its file stem.

Usage::

    python build_shaders.py          # (re)generate vkconv/runtime/_spirv.py
    python build_shaders.py --check  # exit 1 naming every stale or missing module

``--check`` compares SHA-256 digests of each shader's source, of every file it includes, of its
macros and of the compile target against the digests recorded in the generated module, so it does
not depend on the exact glslang build that produced the words.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHADER_DIR = ROOT / "shaders"
INCLUDE_DIR = SHADER_DIR / "include"
OUTPUT = ROOT / "vkconv" / "runtime" / "_spirv.py"
# (shader folder, generated module) pairs: the runtime's shaders, and the benchmarks' own (the FMA
# probe), which the runtime does not carry.  Both include from shaders/include.
TARGETS = ((SHADER_DIR, OUTPUT), (ROOT / "bench" / "shaders", ROOT / "cv_plugin" / "bench" / "_spirv.py"))
# SPIR-V 1.0 (glslang's vulkan1.0 target) is the one version every Vulkan 1.x driver must accept; a
# newer target would only change how storage buffers are spelled (StorageBuffer vs BufferBlock).
COMPILE_ENV = "vulkan1.0"
# Every environment the embedded modules are claimed valid for: each module is checked with
# `spirv-val --target-env E` for each E (tests/test_spirv.py checks the embedded words again).
# spirv-val 2023.1 (Debian 12) knows no vulkan1.4; the Vulkan 1.4 check is the validation layer's
# run of the test suite on Mesa 25's lavapipe (scripts/second-driver.sh).
VALIDATE_ENVS: tuple[str, ...] = ("vulkan1.0", "vulkan1.1", "vulkan1.2", "vulkan1.3")

_VARIANT_RE = re.compile(r"^//\s*variant:\s*(\w+)((?:\s+-D\w+(?:=\S+)?)*)(?:\s+--target-env=(vulkan1\.\d))?\s*$",
                         re.MULTILINE)
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


@dataclass(frozen=True)
class Module:
    name: str
    source: Path
    defines: tuple[str, ...]
    target: str = COMPILE_ENV


def discover(folder: Path = SHADER_DIR) -> list[Module]:
    """Every module to build from ``folder``, sorted by name so the output is deterministic."""
    modules = []
    for src in sorted(folder.rglob("*.comp")):
        text = src.read_text()
        variants = _VARIANT_RE.findall(text)
        if variants:
            for name, flags, target in variants:
                if target and target not in VALIDATE_ENVS:
                    raise SystemExit(f"build_shaders: {src.relative_to(ROOT)}: variant {name} targets {target}, "
                                     f"not one of {VALIDATE_ENVS}")
                modules.append(Module(name, src, tuple(flags.split()), target or COMPILE_ENV))
        else:
            modules.append(Module(src.stem, src, ()))
    names = [m.name for m in modules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SystemExit(f"build_shaders: duplicate module names {dupes}")
    return sorted(modules, key=lambda m: m.name)


def _includes(path: Path, seen: set[Path]) -> None:
    for inc in _INCLUDE_RE.findall(path.read_text()):
        for base in (path.parent, INCLUDE_DIR):
            candidate = (base / inc).resolve()
            if candidate.exists():
                break
        else:
            raise SystemExit(f"build_shaders: {path.relative_to(ROOT)} includes missing file {inc!r}")
        if candidate not in seen:
            seen.add(candidate)
            _includes(candidate, seen)


def digest(module: Module) -> str:
    """SHA-256 over the source, its transitive includes (sorted by path), the macros and the target."""
    files: set[Path] = set()
    _includes(module.source, files)
    h = hashlib.sha256()
    for path in [module.source, *sorted(files)]:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(module.defines).encode())
    h.update(b"\0" + module.target.encode())  # a new target makes every module stale
    return h.hexdigest()


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise SystemExit(f"build_shaders: {name} not found; install Debian's glslang-tools and spirv-tools")
    return exe


def compile_module(module: Module, workdir: Path) -> bytes:
    out = workdir / f"{module.name}.spv"
    cmd = [_tool("glslangValidator"), "-V", "--target-env", module.target, "-S", "comp",
           f"-I{INCLUDE_DIR}", *module.defines, "-o", str(out), str(module.source)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"build_shaders: glslangValidator failed on {module.name} "
                         f"({module.source.relative_to(ROOT)}):\n{res.stdout}{res.stderr}")
    for env in VALIDATE_ENVS[VALIDATE_ENVS.index(module.target):]:  # the environments that take its SPIR-V
        problem = validate(out, env)
        if problem:
            raise SystemExit(f"build_shaders: spirv-val --target-env {env} rejected {module.name} "
                             f"({module.source.relative_to(ROOT)}):\n{problem}")
    return out.read_bytes()


def validate(spv: Path, env: str) -> str | None:
    """spirv-val's complaint about the module in ``spv`` under ``env``, or None when it is valid."""
    res = subprocess.run([_tool("spirv-val"), "--target-env", env, str(spv)], capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stdout + res.stderr).strip() or f"exit status {res.returncode}"


def render(entries: list[tuple[Module, str, bytes]]) -> str:
    lines = [
        '"""SPIR-V of a folder of shaders, generated by build_shaders.py — do not edit."""',
        "",
        "# name -> SHA-256 of (source, includes, macros) the words were built from",
        "DIGESTS: dict[str, str] = {",
        *[f"    {m.name!r}: {d!r}," for m, d, _ in entries],
        "}",
        "",
        "# name -> SPIR-V words as little-endian bytes",
        "SPIRV: dict[str, bytes] = {",
    ]
    for m, _, words in entries:
        lines.append(f"    {m.name!r}: (")
        for i in range(0, len(words), 32):
            lines.append(f"        {words[i:i + 32]!r}")
        lines.append("    ),")
    lines += ["}", ""]
    return "\n".join(lines)


def load_embedded(output: Path) -> dict[str, str]:
    if not output.exists():
        return {}
    namespace: dict = {}
    exec(compile(output.read_text(), str(output), "exec"), namespace)
    return namespace.get("DIGESTS", {})


def check() -> int:
    problems, count = [], 0
    for folder, output in TARGETS:
        embedded = load_embedded(output)
        modules = discover(folder)
        count += len(modules)
        for m in modules:
            if m.name not in embedded:
                problems.append(f"{m.name}: missing from {output.relative_to(ROOT)} ({m.source.relative_to(ROOT)})")
            elif embedded[m.name] != digest(m):
                problems.append(f"{m.name}: stale, {m.source.relative_to(ROOT)} or its includes changed")
        for name in sorted(set(embedded) - {m.name for m in modules}):
            problems.append(f"{name}: embedded in {output.relative_to(ROOT)} but no shader produces it any more")
    for p in problems:
        print(f"build_shaders --check: {p}", file=sys.stderr)
    if problems:
        print("run: python build_shaders.py", file=sys.stderr)
        return 1
    print(f"build_shaders --check: {count} modules up to date")
    return 0


def build() -> int:
    for folder, output in TARGETS:
        modules = discover(folder)
        with tempfile.TemporaryDirectory() as tmp:
            entries = [(m, digest(m), compile_module(m, Path(tmp))) for m in modules]
        output.write_text(render(entries))
        print(f"build_shaders: wrote {len(entries)} modules to {output.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the embedded SPIR-V is stale or missing")
    args = parser.parse_args(argv)
    return check() if args.check else build()


if __name__ == "__main__":
    sys.exit(main())
