"""Faults on demand: QMP device errors, machine-level faults, and pool corruption from the host."""
from __future__ import annotations

import os
import signal
import time

from . import paths, qmp
from .log import TestbedError


def kill_host(h) -> None:
    """A host crash: SIGKILL its QEMU."""
    if not h.alive():
        raise TestbedError(f"{h.name} is not running")
    os.kill(h.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while h.alive() and time.monotonic() < deadline:
        try:
            os.waitpid(h.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)


def hang_host(h, seconds: float) -> None:
    """A host hang: QMP stop, then cont after `seconds`."""
    qmp.execute(h.files.qmp, "stop")
    try:
        time.sleep(seconds)
    finally:
        qmp.execute(h.files.qmp, "cont")


def set_link(h, up: bool) -> None:
    qmp.execute(h.files.qmp, "set_link", {"name": "nic0", "up": up})


def _device_path(device_id: str) -> str:
    return f"/machine/peripheral/{device_id}"


def inject_poison(h, device_id: str, dpa: int, length: int) -> None:
    # Poison is tracked per 64-byte line: start and length must be multiples of 64.
    start = dpa - dpa % 64
    qmp.execute(h.files.qmp, "cxl-inject-poison",
                {"path": _device_path(device_id), "start": start, "length": max(64, length - length % 64)})


def inject_media_event(h, device_id: str, kind: str, dpa: int) -> None:
    """A general-media or DRAM event record, 'failure' log, at device address dpa."""
    base = {"path": _device_path(device_id), "log": "failure", "flags": 1, "dpa": dpa - dpa % 64,
            "descriptor": 3, "type": 3, "transaction-type": 192}
    if kind == "general_media":
        qmp.execute(h.files.qmp, "cxl-inject-general-media-event", base)
    elif kind == "dram":
        qmp.execute(h.files.qmp, "cxl-inject-dram-event", base)
    else:
        raise TestbedError(f"unknown media event kind {kind!r} (known: general_media, dram)")


def flip_bits(path, offset: int, bits: int = 1) -> list[int]:
    """Flip `bits` bits in the backing file at `offset` (one per byte from there);
    returns the byte offsets changed."""
    changed = []
    with paths.open_nofollow(path, "r+b") as f:
        for i in range(bits):
            f.seek(offset + i)
            b = f.read(1)[0]
            f.seek(offset + i)
            f.write(bytes([b ^ (1 << (i % 8))]))
            changed.append(offset + i)
    return changed
