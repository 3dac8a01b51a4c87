"""Under CI the integration tests fail when they cannot run; elsewhere they skip."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_integration_without_qemu(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path)  # no qemu-system-x86_64 on it
    env["PYTHONPATH"] = str(REPO)
    env["BELUGA_TESTBED_STATE"] = str(tmp_path / "state")
    env["BELUGA_TESTBED_POOLS"] = str(tmp_path / "pools")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "tests/integration/test_boot.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_missing_qemu_fails_the_run(tmp_path, ci):
    r = run_integration_without_qemu(tmp_path, ci)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "CI: the integration tests cannot run: qemu-system-x86_64 not installed: run 'make setup'" in r.stdout
    assert " skipped" not in r.stdout.splitlines()[-1]


def test_elsewhere_missing_qemu_skips_with_the_reason(tmp_path):
    r = run_integration_without_qemu(tmp_path, None)
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.splitlines()[-1]
    assert " skipped" in last and "passed" not in last and "failed" not in last and "error" not in last
    assert "qemu-system-x86_64 not installed: run 'make setup'" in r.stdout
