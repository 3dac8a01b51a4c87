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
    """Run one QMP command; raises qemu.qmp.ExecuteError for a QMP error reply.

    Not asyncio.run: it puts its own SIGINT handler in place, which turns Ctrl-C into a
    cancellation of the command, and a command that completes anyway returns normally:
    the Ctrl-C was lost (`up` then waited out its QMP timeout instead of rolling back at
    once; tests/unit/test_lifecycle_faults.py caught it). Here Ctrl-C stays a
    KeyboardInterrupt, and the command's task is cancelled on the way out."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_execute(sock, command, arguments, timeout_s))
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
