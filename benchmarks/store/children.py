"""The benchmark's child servers (Redis, `beluga serve`, Mooncake's master and holder)."""
from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 10 s; nothing when it is gone already."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
