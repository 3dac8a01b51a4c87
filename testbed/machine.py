"""One host's QEMU process: launched, watched until it answers on QMP, shut down.

    with Machine("host0", HostFiles(d / "host0"), argv) as m:   # launched here
        m.wait_started()                                         # LaunchError if it fails
        ...
    # shut down here, whatever happened in the block

A failed launch raises LaunchError, which carries the argv and the end of the host's
QEMU and serial logs (and says both in its message). Shutdown steps down from polite to
forceful, each step with a timeout: QMP `quit`, SIGTERM, SIGKILL. A machine that another
process started (`Machine.attach`, for `down` from a later command) is signalled only
while its pid is still ours (state.pid_is_ours): pids get reused.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

from . import paths, qmp
from .log import TestbedError
from .qemucmd import HostFiles
from .state import HostRecord, pid_is_ours

START_TIMEOUT_S = 60  # from exec to QEMU answering on QMP (its init done, the SSH forward bound)
QUIT_TIMEOUT_S = 3
TERM_TIMEOUT_S = 3
KILL_TIMEOUT_S = 5
# QEMU's words when the SSH forward's port is taken (it exits 1 at once):
# "-netdev user,...,hostfwd=tcp:127.0.0.1:39697-:22: Could not set up host forwarding rule ..."
PORT_TAKEN = "Could not set up host forwarding rule"


class LaunchError(TestbedError):
    """A QEMU that did not start: why, its argv and the end of its logs."""

    def __init__(self, host: str, why: str, argv: Sequence[str], log_tail: str) -> None:
        self.host, self.why, self.argv, self.log_tail = host, why, list(argv), log_tail
        super().__init__(f"{host}: {why}\n" + (log_tail + "\n" if log_tail else "")
                         + f"--- {host} QEMU command line:\n{shlex.join(self.argv)}")


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (or SIGTERM/SIGHUP) waits until the block is done, then raises: between the
    fork of a QEMU and the note of its pid it would orphan that QEMU. (Handlers, unlike a
    blocked signal mask, do not pass on to the child.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            raise KeyboardInterrupt


class Machine:
    """One host's QEMU. `on_start(pid)` runs as soon as the process exists, before any
    Ctrl-C can land (up saves the pid in state.json there)."""

    def __init__(self, name: str, files: HostFiles, argv: Sequence[str], *,
                 on_start: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.files = files
        self.argv = list(argv)
        self.on_start = on_start
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None

    @classmethod
    def attach(cls, host: HostRecord) -> Machine:
        """The QEMU of `host` as state.json records it, started by another process."""
        m = cls(host.name, host.files, host.argv)
        m._pid = host.pid
        return m

    # ------------------------------------------------------------ state
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else self._pid

    @property
    def process(self) -> subprocess.Popen | None:
        """The QEMU process, where this process started it."""
        return self._proc

    @property
    def returncode(self) -> int | None:
        """The exit status where this process started it and it exited; else None."""
        return self._proc.poll() if self._proc is not None else None

    def alive(self) -> bool:
        """Whether its QEMU runs. A child of this process is ours until reaped (its pid
        cannot be reused before); another's pid only while /proc says it is our QEMU."""
        if self._proc is not None:
            return self._proc.poll() is None
        return pid_is_ours(self.pid, self.files.dir)

    def __repr__(self) -> str:
        return f"Machine({self.name!r}, pid={self.pid})"

    # ------------------------------------------------------------ launch
    def launch(self) -> Machine:
        """Start QEMU, its output in the host's QEMU log; `on_start` has run on return."""
        if self._proc is not None:
            raise TestbedError(f"{self.name}: already launched (pid {self._proc.pid})")
        with os.fdopen(paths.create_private(self.files.qemu_log), "w") as log, interrupts_deferred():
            # umask: QEMU creates the QMP and serial sockets, the serial log and the pid file;
            # the serial console is a root shell in the guest.
            self._proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, umask=paths.UMASK)
            if self.on_start is not None:
                try:
                    self.on_start(self._proc.pid)
                except BaseException:  # nobody would know of this QEMU: it goes now
                    self.kill()
                    raise
        return self

    def wait_started(self, timeout_s: float = START_TIMEOUT_S) -> str | None:
        """None once QEMU answers on its QMP socket: its monitor starts after the netdevs, so
        the SSH forward's port is bound by then. Otherwise why not."""
        p = self._proc
        assert p is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while p.poll() is None:
            if self.files.qmp.exists():
                try:
                    qmp.execute(self.files.qmp, "query-status", timeout_s=2)
                    return None
                except Exception:  # noqa: BLE001 - not listening yet, or exiting: poll() says which
                    pass
            if time.monotonic() > deadline:
                return f"QEMU did not answer on its QMP socket within {timeout_s:.0f} s"
            time.sleep(0.05)
        return f"QEMU exited at start (exit {p.returncode})"

    def port_taken(self) -> bool:
        """Whether QEMU said that the SSH forward's port was taken."""
        try:
            return PORT_TAKEN in self.files.qemu_log.read_text(errors="replace")
        except OSError:
            return False

    def failed(self, why: str) -> LaunchError:
        return LaunchError(self.name, why, self.argv, self._record().log_tail())

    def _record(self) -> HostRecord:
        return HostRecord(self.name, self.pid, 0, self.files.dir, tuple(self.argv))

    # ------------------------------------------------------------ shutdown
    def shutdown(self, *, polite: bool = True) -> None:
        """Polite to forceful, each with a timeout: QMP quit (`polite`), SIGTERM, SIGKILL.
        Signals only a QEMU that is still ours. Raises if it outlives SIGKILL."""
        if not self.alive():
            self._reap()
            return
        if polite:
            with contextlib.suppress(Exception):
                qmp.execute(self.files.qmp, "quit", timeout_s=2)
            if self._wait_gone(QUIT_TIMEOUT_S):
                return
        for sig, wait_s in ((signal.SIGTERM, TERM_TIMEOUT_S), (signal.SIGKILL, KILL_TIMEOUT_S)):
            if not self.alive():
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)  # type: ignore[arg-type]
            if self._wait_gone(wait_s):
                return
        if self.alive():
            raise TestbedError(f"{self.name}: QEMU (pid {self.pid}) did not exit after SIGKILL")
        self._reap()

    def kill(self) -> None:
        """Stop it without asking (rollback: its files go next, nothing to save)."""
        self.shutdown(polite=False)

    def crash(self, timeout_s: float = KILL_TIMEOUT_S * 2) -> None:
        """SIGKILL at once (a host crash, the fault), and wait until it is gone."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)  # type: ignore[arg-type]
        if not self._wait_gone(timeout_s):
            raise TestbedError(f"{self.name}: QEMU (pid {self.pid}) did not exit after SIGKILL")

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                self._reap()
                return True
            time.sleep(0.05)
        return not self.alive()

    def _reap(self) -> None:
        """Collect its exit status, where it is a child of this process (the CLI that ran `up`)."""
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0)
        elif self.pid:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(self.pid, os.WNOHANG)

    # ------------------------------------------------------------ with
    def __enter__(self) -> Machine:
        return self.launch()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        """Shut down: politely when the block ended well, at once when it raised."""
        self.shutdown(polite=et is None)

