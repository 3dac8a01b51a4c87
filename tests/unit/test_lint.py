"""pyflakes' checks over the whole tree (through ruff): unused imports and variables,
undefined names, syntax errors. Catches what the tests may never execute."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _ruff() -> str | None:
    return shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(_ruff() is None, reason="ruff not installed: pip install -e '.[test]' (make setup does)")
def test_no_pyflakes_findings():
    r = subprocess.run([_ruff(), "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
