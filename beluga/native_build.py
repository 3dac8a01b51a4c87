"""Build the optional C module, ``beluga/_native*.so`` (the read path and the cache-line flushes of
beluga/coherence.py), in place (``make setup`` runs this).

``python -m beluga.native_build`` compiles ``beluga/_native.c`` with setuptools
when the source is newer than the built module (so a second run does nothing),
and says where the module is. Needs a C compiler and the Python headers
(scripts/setup-host.sh installs gcc and python3-dev when missing). The guests
never build it: without the module, beluga/readpath.py runs the same code in
Python.
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "_native.c"


def target() -> Path:
    return HERE / f"_native{sysconfig.get_config_var('EXT_SUFFIX')}"


def build(*, force: bool = False, quiet: bool = True) -> Path:
    out = target()
    if not force and out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    import tempfile

    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    ext = Extension("beluga._native", [str(SOURCE)], extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Werror"])
    with tempfile.TemporaryDirectory(prefix="beluga-native-") as tmp:
        dist = Distribution({"name": "beluga-native", "ext_modules": [ext]})
        dist.script_args = ["build_ext"]
        if quiet:
            dist.verbose = 0
        cmd = build_ext(dist)
        cmd.build_temp = tmp
        cmd.build_lib = tmp
        cmd.ensure_finalized()
        cmd.run()
        built = Path(cmd.get_ext_fullpath("beluga._native"))
        tmp_out = out.with_suffix(out.suffix + ".tmp")
        tmp_out.write_bytes(built.read_bytes())
        tmp_out.replace(out)  # atomic: a running process keeps its old mapping
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        out = build(force="--force" in args)
    except Exception as exc:  # compiler or headers missing: say so, the caller decides
        print(f"beluga native build failed: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
