"""Where the testbed keeps things: cache (images), state (running testbeds), pools."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Guest images live here; `BELUGA_TESTBED_CACHE` overrides the XDG default."""
    if env := os.environ.get("BELUGA_TESTBED_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "beluga-testbed"


def state_dir() -> Path:
    """One folder per running testbed; `BELUGA_TESTBED_STATE` overrides the XDG default."""
    if env := os.environ.get("BELUGA_TESTBED_STATE"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "beluga-testbed"


def pool_dir() -> Path:
    """The pools' backing files: in memory, shared by every VM of a testbed."""
    return Path(os.environ.get("BELUGA_TESTBED_POOLS", "/dev/shm/beluga-testbed"))


def images_src() -> Path:
    return REPO_ROOT / "images"
