"""QMP through the qemu.qmp library, with a timeout on every step."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient


async def _execute(sock: Path, command: str, arguments: dict | None, timeout_s: float) -> Any:
    client = QMPClient("beluga-testbed")
    await asyncio.wait_for(client.connect(str(sock)), timeout_s)
    try:
        return await asyncio.wait_for(client.execute(command, arguments), timeout_s)
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), timeout_s)
        except Exception:  # noqa: BLE001 - QEMU may be gone after 'quit'
            pass


def execute(sock: Path, command: str, arguments: dict | None = None, *, timeout_s: float = 5.0) -> Any:
    """Run one QMP command; raises qemu.qmp.ExecuteError for a QMP error reply."""
    return asyncio.run(_execute(sock, command, arguments, timeout_s))
