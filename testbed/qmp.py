"""QMP through the qemu.qmp library, with a timeout on every step.

    with QMP(host.files.qmp) as q:            # one connection and one event loop
        q.execute("stop")
        q.event_wait("STOP", timeout_s=5)     # QEMU's own word that the vCPUs stopped
        q.execute("cont")
        q.event_wait("RESUME", timeout_s=5)

Events are collected from the moment the connection is made, so an event that QEMU
sends while the command that causes it is still being answered is not missed: a wait
looks first at what came in before it. `execute(sock, command)` is the one-shot form.
"""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.message import Message

from .log import TestbedError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 5.0
TICK_S = 0.1


class EventTimeout(TestbedError):
    """The QMP event did not come in time."""


class QMP:
    """One QMP connection to one QEMU, open for the object's life (a context manager).

    Not thread-safe: one object per thread. Every call runs this object's own event loop
    until the call is done (not asyncio.run: it puts its own SIGINT handler in place,
    which turns Ctrl-C into a cancellation of the command, and a command that completes
    anyway returns normally: the Ctrl-C was lost, and `up` then waited out its QMP timeout
    instead of rolling back at once; tests/unit/test_lifecycle_faults.py caught it). Here
    Ctrl-C stays a KeyboardInterrupt, and the call's task is cancelled on the way out."""

    def __init__(self, sock: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.sock = Path(sock)
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None
        self._listener: EventListener | None = None
        self._events: list[dict] = []  # received, not yet returned by a wait

    # ------------------------------------------------------------ life
    def connect(self) -> QMP:
        if self._client is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("beluga-testbed")
        self._listener = EventListener()  # every event, from the start
        self._client.register_listener(self._listener)
        try:
            self._run(self._client.connect(str(self.sock)), self.timeout_s)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Disconnect (QEMU may be gone, after `quit`) and close the event loop."""
        loop, client = self._loop, self._client
        self._loop = self._client = None
        if loop is None:
            return
        try:
            if client is not None:
                try:
                    loop.run_until_complete(asyncio.wait_for(client.disconnect(), self.timeout_s))
                except Exception:  # noqa: BLE001 - QEMU may be gone after 'quit'
                    pass
        finally:
            _drain(loop)

    def __enter__(self) -> QMP:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ use
    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                timeout_s: float | None = None) -> Any:
        """Run one QMP command; its return value. Raises qemu.qmp.ExecuteError for a QMP
        error reply, TimeoutError when QEMU does not answer within `timeout_s`."""
        client = self._connected()
        return self._run(client.execute(command, dict(arguments) if arguments else None),
                         self.timeout_s if timeout_s is None else timeout_s)

    def event_wait(self, name: str, timeout_s: float, match: Mapping[str, Any] | None = None) -> dict:
        """The first event called `name` (and whose message holds `match`: a nested
        subset, e.g. {"data": {"reason": "host-qmp-quit"}}) received since the connection
        was made and not yet returned by an earlier wait; waits up to `timeout_s` for one.
        Raises EventTimeout, which names the events that did come."""
        self._connected()
        for i, ev in enumerate(self._events):
            if _is(ev, name, match):
                return self._events.pop(i)
        seen: list[str] = []

        async def wait() -> dict:
            assert self._listener is not None
            while True:
                msg: Message = await self._listener.get()
                ev = dict(msg)
                if _is(ev, name, match):
                    return ev
                self._events.append(ev)
                seen.append(str(ev.get("event")))

        try:
            return self._run(wait(), timeout_s)
        except TimeoutError:
            raise EventTimeout(f"QMP {self.sock}: no {name} event within {timeout_s:g} s"
                               + (f" (matching {dict(match)})" if match else "")
                               + (f"; came: {', '.join(seen)}" if seen else "")) from None

    # ------------------------------------------------------------ inside
    def _connected(self) -> QMPClient:
        if self._client is None:
            raise TestbedError(f"QMP {self.sock}: not connected")
        return self._client

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        loop = self._loop
        assert loop is not None
        task = loop.create_task(asyncio.wait_for(coro, timeout_s))
        # The loop wakes every TICK_S: a Ctrl-C that lands on another thread (the kernel
        # picks one) only sets Python's flag, which the main thread checks when it runs
        # again; asleep in select() for an event_wait's whole timeout, it did not (60 s
        # in tests/unit/test_qmp.py).
        tick: list[asyncio.TimerHandle] = []

        def again() -> None:
            tick[:] = [loop.call_later(TICK_S, again)]
        again()
        try:
            return loop.run_until_complete(task)
        except asyncio.TimeoutError:
            raise TimeoutError(f"QMP {self.sock}: no answer within {timeout_s:g} s") from None
        finally:
            tick[0].cancel()
            if not task.done():  # Ctrl-C: the call is cancelled, the KeyboardInterrupt goes on
                task.cancel()
                loop.run_until_complete(asyncio.gather(task, return_exceptions=True))


def _is(ev: Mapping[str, Any], name: str, match: Mapping[str, Any] | None) -> bool:
    return ev.get("event") == name and (match is None or _holds(ev, match))


def _holds(value: Any, want: Any) -> bool:
    """`want` is a nested subset of `value` (mappings compared key by key, the rest by ==)."""
    if isinstance(want, Mapping):
        return isinstance(value, Mapping) and all(k in value and _holds(value[k], v) for k, v in want.items())
    return value == want


def _drain(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what still runs on `loop`, then close it."""
    try:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def execute(sock: Path, command: str, arguments: Mapping[str, Any] | None = None, *,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Run one QMP command on a connection of its own; raises qemu.qmp.ExecuteError for a
    QMP error reply. Ctrl-C stays a KeyboardInterrupt (see QMP)."""
    with QMP(sock, timeout_s=timeout_s) as q:
        return q.execute(command, arguments)

