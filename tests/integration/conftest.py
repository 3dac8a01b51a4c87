"""Integration tests boot real QEMU guests from the built image (run by CI)."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from testbed import image

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def missing_prerequisite() -> str | None:
    """Why these tests cannot run here, or None."""
    if not shutil.which("qemu-system-x86_64"):
        return "qemu-system-x86_64 not installed: run 'make setup'"
    if image.find_image() is None:
        return "no guest image for the current recipe: run 'beluga-testbed image build' (make test does)"
    return None


@pytest.fixture(scope="session", autouse=True)
def _needs_qemu_and_image():
    """Skipped on a developer's machine without QEMU or the image; under CI (CI set, as
    .ci/run runs) that is a failure: a green run must mean the VMs really booted."""
    why = missing_prerequisite()
    if why is None:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI: the integration tests cannot run: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="package", autouse=True)  # not "session": its environment must not
def isolated_dirs():                               # leak into the unit tests that run after it
    """State and pools in folders of this test run (short paths: unix sockets live there)."""
    state = Path(tempfile.mkdtemp(prefix="bt-state-", dir="/tmp"))
    pools = Path(tempfile.mkdtemp(prefix="bt-pools-", dir="/dev/shm"))
    old = {k: os.environ.get(k) for k in ("BELUGA_TESTBED_STATE", "BELUGA_TESTBED_POOLS")}
    os.environ["BELUGA_TESTBED_STATE"] = str(state)
    os.environ["BELUGA_TESTBED_POOLS"] = str(pools)
    yield state, pools
    subprocess.run([sys.executable, "-m", "testbed.cli", "down", "--all"], cwd=REPO)
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(pools, ignore_errors=True)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def cli(*args, check=True, timeout=600):
    """Run the real command line, as a user would."""
    r = subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"beluga-testbed {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def qemu_processes_under(path: Path) -> list[str]:
    """Live (not zombie) QEMU processes whose command line mentions `path`."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"qemu-system" in cmd and str(path).encode() in cmd and state != "Z":
            out.append(f"{p.name}: {cmd[:120]!r}")
    return out
