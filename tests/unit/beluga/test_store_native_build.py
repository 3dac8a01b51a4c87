"""`python -m beluga.native_build` (what `make setup` runs) on a machine without a compiler, and with one.

The build runs on a copy of the module's two files in a temporary folder, so the real
beluga/_native*.so is never touched; the compiler is hidden by pointing CC at nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from beluga import native_build

HERE = Path(native_build.__file__).parent


def _copy(tmp_path: Path) -> Path:
    pkg = tmp_path / "beluga"
    pkg.mkdir()
    for name in ("native_build.py", "_native.c"):
        shutil.copy2(HERE / name, pkg / name)
    return pkg


def _build(pkg: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(pkg / "native_build.py")], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_without_a_compiler_the_build_says_so_and_leaves_no_module(tmp_path):
    pkg = _copy(tmp_path)
    r = _build(pkg, CC=str(tmp_path / "no-such-cc"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("beluga native build failed: ") and "Traceback" not in r.stderr, r.stderr
    assert not list(pkg.glob("_native*.so*")), list(pkg.iterdir())  # nothing half-written


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "gcc")) is None, reason="no C compiler on this machine")
def test_with_a_compiler_it_builds_once_and_a_second_run_does_nothing(tmp_path):
    pkg = _copy(tmp_path)
    r = _build(pkg)
    assert r.returncode == 0, r.stderr
    built = Path(r.stdout.strip())
    assert built.parent == pkg and built.name.startswith("_native") and built.suffix == ".so"
    first = built.stat().st_mtime_ns
    r = _build(pkg, CC=str(tmp_path / "no-such-cc"))  # up to date: the compiler is not even needed
    assert r.returncode == 0 and Path(r.stdout.strip()) == built and built.stat().st_mtime_ns == first
