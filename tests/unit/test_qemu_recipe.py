"""The QEMU recipe (qemu/build.sh) without building QEMU: its key, the patch series applied
in order, the patch that does not apply named in the error, the deb-src mirror found in
apt folders of every form, a built key found again without network, a failing step named.

The functions are the ones build.sh sources (qemu/recipe.sh, scripts/apt-sources.sh), run
by bash as the build runs them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "qemu" / "recipe.sh"
APT_LIB = REPO / "scripts" / "apt-sources.sh"
DATA = Path(__file__).parent / "data" / "apt"
VERSION = "1:10.2.2+ds-1"

pytestmark = pytest.mark.skipif(shutil.which("patch") is None, reason="needs patch(1) (dpkg-dev depends on it)")


def sh(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in bash -euo pipefail with recipe.sh and apt-sources.sh sourced."""
    script = f'. "{APT_LIB}"; . "{RECIPE}"; {code}'
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script, "bash", *args],
                          capture_output=True, text=True, env=env)


def key(version: str, patches: Path, extra: str = "") -> str:
    r = sh(f'{extra}recipe_key "$1" "$2"', version, str(patches))
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[0-9a-f]{16}\n", r.stdout), r.stdout
    return r.stdout.strip()


# Two patches of one file where the second needs the first: applied out of order, it fails.
ORIG = "one\ntwo\nthree\n"
P1 = """--- a/hw/cxl.txt
+++ b/hw/cxl.txt
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
"""
P2 = """--- a/hw/cxl.txt
+++ b/hw/cxl.txt
@@ -1,3 +1,4 @@
 one
 TWO
 three
+four
"""
BAD = """--- a/hw/cxl.txt
+++ b/hw/cxl.txt
@@ -1,3 +1,3 @@
 eins
-zwei
+ZWEI
 drei
"""


def series(tmp: Path, patches: dict[str, str], order: list[str], comments: bool = True) -> Path:
    d = tmp / "patches"
    d.mkdir()
    for name, text in patches.items():
        (d / name).write_text(text)
    lines = (["# our patches, in order", ""] if comments else []) + order
    (d / "series").write_text("\n".join(lines) + "\n")
    return d


def tree(tmp: Path) -> Path:
    src = tmp / "src"
    (src / "hw").mkdir(parents=True)
    (src / "hw" / "cxl.txt").write_text(ORIG)
    return src


def test_the_shipped_series_gives_a_key():
    assert key(VERSION, REPO / "qemu" / "patches")


def test_key_follows_version_patches_order_and_configure(tmp_path):
    d = series(tmp_path, {"0001-a.patch": P1, "0002-b.patch": P2}, ["0001-a.patch", "0002-b.patch"])
    k = key(VERSION, d)
    assert key(VERSION, d) == k
    assert key("1:10.2.3+ds-1", d) != k
    # comments and blank lines are no part of the recipe
    (d / "series").write_text("0001-a.patch\n0002-b.patch\n")
    assert key(VERSION, d) == k
    (d / "series").write_text("0002-b.patch\n0001-a.patch\n")
    assert key(VERSION, d) != k
    (d / "series").write_text("0001-a.patch\n0002-b.patch\n")
    (d / "0002-b.patch").write_text(P2.replace("+four", "+five"))
    k2 = key(VERSION, d)
    assert k2 != k
    assert key(VERSION, d, extra="QEMU_CONFIGURE_OPTS+=(--enable-debug-tcg); ") != k2


def test_key_is_the_same_wherever_the_cache_is(tmp_path):
    d = series(tmp_path, {"0001-a.patch": P1}, ["0001-a.patch"])
    env = dict(os.environ, BELUGA_TESTBED_CACHE=str(tmp_path / "elsewhere"))
    r = sh('recipe_key "$1" "$2"', VERSION, str(d), env=env)
    assert r.stdout.strip() == key(VERSION, d)


def test_a_series_entry_without_its_file_is_named(tmp_path):
    d = series(tmp_path, {"0001-a.patch": P1}, ["0001-a.patch", "0002-gone.patch"])
    r = sh('recipe_key "$1" "$2"', VERSION, str(d))
    assert r.returncode != 0
    assert f"{d}/series: 0002-gone.patch: no such file" in r.stderr


def test_series_applied_in_order(tmp_path):
    d = series(tmp_path, {"0001-a.patch": P1, "0002-b.patch": P2}, ["0001-a.patch", "0002-b.patch"])
    src = tree(tmp_path)
    r = sh('apply_series "$1" "$2"', str(src), str(d))
    assert r.returncode == 0, r.stderr
    assert (src / "hw" / "cxl.txt").read_text() == "one\nTWO\nthree\nfour\n"
    assert r.stderr.splitlines() == ["  applied 0001-a.patch", "  applied 0002-b.patch"]


def test_series_out_of_order_names_the_patch_that_fails(tmp_path):
    d = series(tmp_path, {"0001-a.patch": P1, "0002-b.patch": P2}, ["0002-b.patch", "0001-a.patch"])
    src = tree(tmp_path)
    r = sh('apply_series "$1" "$2"', str(src), str(d))
    assert r.returncode != 0
    assert f"{d}/0002-b.patch (patch 1 of 2 in {d}/series) does not apply to {src}:" in r.stderr
    assert (src / "hw" / "cxl.txt").read_text() == ORIG  # nothing half-applied


def test_a_bad_patch_is_named_and_later_ones_are_not_tried(tmp_path):
    d = series(tmp_path, {"0001-a.patch": P1, "0002-bad.patch": BAD, "0003-b.patch": P2},
               ["0001-a.patch", "0002-bad.patch", "0003-b.patch"])
    src = tree(tmp_path)
    r = sh('apply_series "$1" "$2"', str(src), str(d))
    assert r.returncode != 0
    assert f"{d}/0002-bad.patch (patch 2 of 3 in {d}/series) does not apply" in r.stderr
    assert "FAILED" in r.stderr  # patch's own words say which hunk
    assert "0003-b.patch" not in r.stderr
    # the first patch stays applied, nothing of the bad one (no .rej, no .orig)
    assert (src / "hw" / "cxl.txt").read_text() == "one\nTWO\nthree\n"
    assert sorted(p.name for p in (src / "hw").iterdir()) == ["cxl.txt"]


def test_an_empty_series_applies_nothing(tmp_path):
    d = series(tmp_path, {}, [])
    src = tree(tmp_path)
    r = sh('apply_series "$1" "$2"', str(src), str(d))
    assert (r.returncode, r.stderr) == (0, "")
    assert (src / "hw" / "cxl.txt").read_text() == ORIG


# apt folder -> (deb-src mirror for unstable on a bookworm machine, for bookworm itself)
MIRRORS = {
    # deb822 only: no deb-src anywhere, the bookworm mirror serves unstable too
    "deb822-only": ("http://deb.debian.org/debian", "http://deb.debian.org/debian"),
    # "Types: deb deb-src" in mirror.sources is an enabled deb-src entry for bookworm
    "mixed": ("http://later.example/debian", "http://mirror.example.org/debian"),
    # a one-line deb-src entry for bookworm wins over the deb one for that suite
    "one-line-only": ("http://ftp.de.debian.org/debian", "http://src.example/debian"),
    "options": ("http://opts.example/debian", "http://opts.example/debian"),
    "none": ("", ""),
}


@pytest.mark.parametrize("case", sorted(MIRRORS))
def test_source_mirror_from_the_machines_apt_folder(case):
    for suite, want in zip(("unstable", "bookworm"), MIRRORS[case]):
        r = sh('source_mirror "$1" "$2" bookworm', str(DATA / case), suite)
        assert r.returncode == 0, r.stderr
        assert r.stdout == (want + "\n" if want else "")


def test_source_mirror_prefers_an_enabled_deb_src_entry_of_that_suite(tmp_path):
    d = tmp_path / "apt" / "sources.list.d"
    d.mkdir(parents=True)
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb-src\nURIs: http://off.example/debian\nSuites: unstable\nComponents: main\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian/\nSuites: unstable\nComponents: main\n")
    r = sh('source_mirror "$1" unstable bookworm', str(tmp_path / "apt"))
    assert r.stdout == "http://src.example/debian\n"


def test_deb_src_entries_are_apart_from_deb_ones():
    r = sh('apt_entries "$1" deb-src', str(DATA / "one-line-only"))
    assert r.stdout == "http://src.example/debian bookworm\n"
    r = sh('apt_entries "$1"', str(DATA / "one-line-only"))
    assert "src.example" not in r.stdout


def build_copy(tmp_path: Path) -> Path:
    """A copy of the recipe's three files at their places in a fake repository."""
    root = tmp_path / "repo"
    for rel in ("qemu/build.sh", "qemu/recipe.sh", "scripts/apt-sources.sh", "qemu/patches/series"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, root / rel)
    return root


def test_a_built_key_is_found_again_without_building(tmp_path):
    """The second `make qemu` prints the path at once: no apt, no network, no root."""
    root = build_copy(tmp_path)
    cache = tmp_path / "cache"
    k = key(VERSION, root / "qemu" / "patches")
    binary = cache / "qemu" / k / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    env = dict(os.environ, BELUGA_TESTBED_CACHE=str(cache), PATH="/usr/bin:/bin")
    env.pop("BELUGA_QEMU_VERSION", None)
    r = subprocess.run(["bash", str(root / "qemu" / "build.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{binary}\n"
    assert r.stderr == f"✓ QEMU {VERSION} ({k}) is built already\n"


def test_a_failing_step_is_named(tmp_path):
    """Any failing command ends the build with its step, line and command: the ERR trap,
    checked on a copy of the script with a command that fails planted in one step."""
    root = build_copy(tmp_path)
    script = root / "qemu" / "build.sh"
    text = script.read_text()
    anchor = 'begin "source index"\n'
    assert anchor in text
    script.write_text(text.replace(anchor, anchor + "false planted failure\n", 1))
    env = dict(os.environ, BELUGA_TESTBED_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert re.search(r'✗ QEMU build failed \(exit 1\) in step "source index" at qemu/build.sh:\d+: false planted failure',
                     r.stderr), r.stderr
    assert "hint:" in r.stderr
    assert r.stdout == ""
