"""Finding the Debian mirror in apt's sources, in every form a fresh machine may have.

Debian's own container images have only sources.list.d/debian.sources (deb822); older
installs only a one-line sources.list; many machines both. Setup (scripts/apt-sources.sh,
before Python exists) and the image builder (testbed/image.py) must agree on all of them.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testbed import image
from testbed.log import TestbedError

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "scripts" / "apt-sources.sh"
DATA = Path(__file__).parent / "data" / "apt"

# fixture folder -> (mirror for bookworm, has bookworm-backports)
CASES = {
    "deb822-only": ("http://deb.debian.org/debian", False),
    "one-line-only": ("http://ftp.de.debian.org/debian", False),
    # sources.list has only nodesource; sources.list.d/ is read by file name: a disabled
    # deb822 stanza, then extra.list, then mirror.sources.
    "mixed": ("http://later.example/debian", False),
    "options": ("http://opts.example/debian", False),
    "backports": ("http://deb.debian.org/debian", True),
    "none": ("", False),
}


def sh(func: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", f'. "$0"; {func} "$@"', str(LIB), *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_setup_finds_the_mirror(case):
    mirror, _ = CASES[case]
    r = sh("debian_mirror", str(DATA / case), "bookworm")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == mirror


@pytest.mark.parametrize("case", sorted(CASES))
def test_setup_sees_backports(case):
    _, has = CASES[case]
    assert (sh("apt_has_suite", str(DATA / case), "bookworm-backports").returncode == 0) is has


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][0]))
def test_image_builder_finds_the_same_mirror(case, monkeypatch):
    monkeypatch.delenv("BELUGA_TESTBED_MIRROR", raising=False)
    assert image.apt_mirror(DATA / case) == CASES[case][0]


def test_image_builder_without_a_mirror_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("BELUGA_TESTBED_MIRROR", raising=False)
    with pytest.raises(TestbedError, match=r"no Debian mirror found in .*sources.list") as e:
        image.apt_mirror(DATA / "none")
    assert "BELUGA_TESTBED_MIRROR" in e.value.hint


def test_a_missing_apt_folder_is_no_error(tmp_path):
    r = sh("debian_mirror", str(tmp_path / "nothing"), "bookworm")
    assert (r.returncode, r.stdout) == (0, "")
    assert image.apt_entries(tmp_path / "nothing") == []


def test_setup_failure_is_loud_and_located(tmp_path):
    """A failing command in setup prints which command failed, where, and a hint: the
    ERR trap. Checked on a copy of the script with a command that fails planted in it."""
    script = tmp_path / "scripts" / "setup-host.sh"
    script.parent.mkdir()
    shutil.copy(LIB, script.parent / LIB.name)
    text = (REPO / "scripts" / "setup-host.sh").read_text()
    text = text.replace("QEMU_MIN_MAJOR=10\n", "QEMU_MIN_MAJOR=10\nfalse planted failure\n", 1)
    script.write_text(text)
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert "✗ setup failed (exit 1) at scripts/setup-host.sh:" in r.stderr
    assert "false planted failure" in r.stderr
    assert "hint:" in r.stderr
