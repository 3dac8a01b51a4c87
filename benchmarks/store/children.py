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


def remove_orphans(folder: str, prefix: str) -> list[str]:
    """Remove ``folder/<prefix><pid>...`` files whose process is gone (a run killed with SIGKILL
    leaves its pool in /dev/shm, where it holds memory until reboot). -> the paths removed.

    Only names of exactly that form are touched, and never one whose pid is alive.
    """
    import os
    import re

    pattern = re.compile(re.escape(prefix) + r"(\d+)(?:[-.][\w.-]*)?")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive (or not ours to signal): keep it
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, ValueError):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(path)
        except OSError:
            pass
    return removed
