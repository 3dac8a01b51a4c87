"""Run a user's program on testbed hosts: foreground or background, per-host environment,
a timeout that kills the program's whole process group, stdout and stderr captured whole.

One SSH channel per host carries the program's output as it is written; a thread per host
streams it into `<out_dir>/<host>.stdout` and `.stderr` and keeps their tails. The remote
side is one shell: it records its pid (sshd makes every command a session and process
group leader, so that pid is also the group id) and then runs the program as its child,
so a program killed by a signal exits 128+N like in any shell, and a timeout can kill the
program and everything it started with one `kill -- -PGID` over a second connection.

Every program gets the pool in its environment (`pool_env`): BELUGA_DAX, BELUGA_POOL_SIZE,
BELUGA_INTERLEAVE_WAYS, BELUGA_INTERLEAVE_GRANULARITY, BELUGA_HOST, BELUGA_HOST_INDEX,
BELUGA_HOST_COUNT. What the caller passes in `env` overrides them.
"""
from __future__ import annotations

import re
import select
import shlex
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .. import ssh
from ..log import TestbedError

GUEST_RUN_DIR = "/run/beluga/programs"  # in the guest (tmpfs): one folder per running program
TAIL_BYTES = 4096  # what ProgramResult keeps of each stream (the files hold everything)
KILL_GRACE_S = 3.0  # after SIGTERM to the group, before SIGKILL
CLOSE_WAIT_S = 10.0  # after SIGKILL, how long the channel may take to report the end
LINGER_S = 2.0  # after the program exits, how long what it left in the background may hold its output
POLL_S = 0.5  # the longest a host thread waits on its channel before rechecking host and deadline
NOTE = "beluga-testbed:"  # prefix of the lines this module adds to a program's stderr
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ProgramResult:
    """How a program ended on one host. `exit_code` is None when it has none: the host
    died, the connection broke, or the timeout killed it (then `timed_out`)."""
    host: str
    exit_code: int | None
    stdout_path: Path
    stderr_path: Path
    stdout_tail: str
    stderr_tail: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def env_problems(env: object) -> list[str]:
    """Why `env` is not a usable environment (names a shell accepts, string values); [] if it is.
    For validating a scenario before anything boots."""
    if not isinstance(env, dict):
        return [f"expected a mapping of variable names to strings, got {type(env).__name__}"]
    out = []
    for k, v in env.items():
        if not isinstance(k, str) or not ENV_NAME.fullmatch(k):
            out.append(f"{k!r}: not a variable name (letters, digits and '_', not starting with a digit)")
        elif not isinstance(v, str):
            out.append(f"{k}: expected a string value, got {type(v).__name__} (quote it in YAML: \"{v}\")")
        elif "\0" in v:
            out.append(f"{k}: the value contains a NUL byte")
    return out


def pool_env(testbed, host: str) -> dict[str, str]:
    """The pool as this host sees it. BELUGA_DAX is left out while the pool is not
    provisioned (`up --no-provision`): there is no dax device to name."""
    names = [h.name for h in testbed.hosts]
    if host not in names:
        testbed.host(host)  # raises the located error, with the host list
    t = testbed.topology
    env = {
        "BELUGA_POOL_SIZE": str(t.pool_size_bytes),
        "BELUGA_INTERLEAVE_WAYS": str(len(t.pool.devices)),
        "BELUGA_INTERLEAVE_GRANULARITY": str(t.pool.granularity_bytes),
        "BELUGA_HOST": host,
        "BELUGA_HOST_INDEX": str(names.index(host)),
        "BELUGA_HOST_COUNT": str(len(names)),
    }
    dax = testbed.dax(host)
    if dax:
        env["BELUGA_DAX"] = dax
    return env


def exports(env: dict[str, str]) -> str:
    """`export K='v'; ...` for a remote shell, every value quoted."""
    return "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())


def remote_command(run_dir: str, argv: list[str] | None, shell: str | None, env: dict[str, str]) -> str:
    """The command line sshd runs. The program is the shell's child (never exec'd: dash and
    bash exec the last command of `-c`, hence `; exit`), so its exit status is the shell's,
    128+N after signal N. The run folder (a few bytes of tmpfs) stays: the pgid in it is
    what kills processes the program left behind after it exited."""
    program = shlex.join(argv) if argv is not None else f"sh -c {shlex.quote(shell or '')}"
    d = shlex.quote(run_dir)
    script = (f"mkdir -p {d} && echo $$ > {d}/pgid || exit 125; {exports(env)}"
              f"{program} < /dev/null; exit $?")
    return f"exec sh -c {shlex.quote(script)}"


def kill_command(run_dir: str, signal: str) -> str:
    d = shlex.quote(run_dir)
    return f"[ -r {d}/pgid ] && kill -{signal} -- -$(cat {d}/pgid) 2>/dev/null; true"


class Stream(Protocol):
    """One running command behind SSH: the boundary the unit tests fake."""

    def wait(self, timeout_s: float) -> None: ...  # until output, the end, or timeout_s
    def read(self) -> tuple[bytes, bytes]: ...  # stdout and stderr that arrived, without blocking
    def ended(self) -> bool: ...  # the command's channel is closed (nothing more will arrive)
    def exit_status(self) -> int | None: ...  # None: it ended without one (connection lost, signal)
    def close(self) -> None: ...


class _SshStream:
    def __init__(self, h, key: Path, command: str) -> None:
        self._conn = ssh.connection(h.ssh_port, key)
        try:
            self._conn.open()
            self._chan = self._conn.transport.open_session(timeout=ssh.CONNECT_TIMEOUT_S)
            self._chan.exec_command(command)
            self._chan.shutdown_write()  # the program's stdin is /dev/null anyway
        except BaseException:
            self._conn.close()
            raise

    def wait(self, timeout_s: float) -> None:
        if not self.ended():
            select.select([self._chan], [], [], timeout_s)

    def read(self) -> tuple[bytes, bytes]:
        out, err = bytearray(), bytearray()
        while self._chan.recv_ready():
            out += self._chan.recv(65536)
        while self._chan.recv_stderr_ready():
            err += self._chan.recv_stderr(65536)
        return bytes(out), bytes(err)

    def ended(self) -> bool:
        c = self._chan
        transport = self._conn.transport
        return c.closed or (c.exit_status_ready() and c.eof_received) or transport is None or not transport.is_active()

    def exit_status(self) -> int | None:
        if not self._chan.exit_status_ready():
            return None
        code = self._chan.exit_status
        return None if code < 0 else code  # -1: an exit-signal instead of a status

    def close(self) -> None:
        self._conn.close()


def open_stream(h, key: Path, command: str) -> Stream:
    return _SshStream(h, key, command)


def run_command(h, key: Path, command: str, timeout_s: float) -> ssh.Result:
    return ssh.run(h.name, h.ssh_port, key, command, timeout_s=timeout_s)


class _Capture:
    """One stream of one host: written to its file as it arrives, the tail kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")
        self._tail = b""

    def add(self, data: bytes) -> None:
        if data:
            self._f.write(data)
            self._f.flush()
            self._tail = (self._tail + data)[-TAIL_BYTES:]

    def note(self, line: str) -> None:
        sep = b"\n" if self._tail and not self._tail.endswith(b"\n") else b""
        self.add(sep + f"{NOTE} {line}\n".encode())

    def close(self) -> str:
        self._f.close()
        return self._tail.decode("utf-8", errors="replace")


class _HostRun(threading.Thread):
    def __init__(self, testbed, h, command: str, run_dir: str, timeout_s: float, out_dir: Path) -> None:
        super().__init__(name=f"program-{h.name}", daemon=True)
        self.tb, self.h, self.command, self.run_dir = testbed, h, command, run_dir
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s  # join() may bring it forward
        self.why_stopped = f"timed out after {timeout_s:g} s"
        self.out = _Capture(out_dir / f"{h.name}.stdout")
        self.err = _Capture(out_dir / f"{h.name}.stderr")
        self.result: ProgramResult | None = None

    def stop(self, deadline: float, why: str) -> None:
        if deadline < self.deadline:
            self.why_stopped = why
            self.deadline = deadline

    def run(self) -> None:
        code, timed_out = None, False
        try:
            code, timed_out = self._run()
        except Exception as e:  # noqa: BLE001 - becomes this host's result, never lost
            self.err.note(f"{self.h.name}: the program could not be run: {type(e).__name__}: {e}")
        finally:
            self.result = ProgramResult(self.h.name, code, self.out.path, self.err.path, self.out.close(),
                                        self.err.close(), timed_out)

    def _run(self) -> tuple[int | None, bool]:
        h = self.h
        if not h.alive():
            self.err.note(f"{h.name} is not running (QEMU stopped): the program was not started")
            return None, False
        try:
            stream = open_stream(h, self.tb.key, self.command)
        except Exception as e:  # noqa: BLE001
            why = "QEMU stopped" if not h.alive() else f"{type(e).__name__}: {e}"
            self.err.note(f"{h.name}: cannot start the program over SSH ({why})")
            return None, False
        try:
            return self._follow(stream)
        finally:
            stream.close()

    def _drain(self, stream: Stream) -> None:
        out, err = stream.read()
        self.out.add(out)
        self.err.add(err)

    def _follow(self, stream: Stream) -> tuple[int | None, bool]:
        h = self.h
        linger_end = None  # set once the program has exited while its output is still open
        while True:
            until = self.deadline if linger_end is None else min(self.deadline, linger_end)
            stream.wait(max(0.0, min(POLL_S, until - time.monotonic())))
            self._drain(stream)
            if stream.ended():
                self._drain(stream)
                code = stream.exit_status()
                if code is None:
                    if not h.alive():
                        self.err.note(f"{h.name} died while the program ran (QEMU is not running): no exit status")
                    else:
                        self.err.note(f"{h.name}: the program ended without an exit status "
                                      "(the SSH connection broke, or its shell was killed)")
                return code, False
            if not h.alive():
                self._drain(stream)
                self.err.note(f"{h.name} died while the program ran (QEMU is not running): no exit status")
                return None, False
            code = stream.exit_status()
            if code is not None and linger_end is None:
                # It exited, but something it started in the background still holds its
                # stdout or stderr: sshd keeps the channel open until that closes.
                linger_end = time.monotonic() + LINGER_S
            if linger_end is not None and time.monotonic() >= linger_end:
                self._kill_leftovers(stream, code)
                return code, False
            if time.monotonic() >= self.deadline:
                self._kill(stream)
                return None, True

    def _kill_leftovers(self, stream: Stream, code: int | None) -> None:
        h = self.h
        r = run_command(h, self.tb.key, kill_command(self.run_dir, "KILL"), timeout_s=ssh.CONNECT_TIMEOUT_S + 5)
        end = time.monotonic() + CLOSE_WAIT_S
        while r.ok and not stream.ended() and time.monotonic() < end:
            stream.wait(min(POLL_S, max(0.0, end - time.monotonic())))
            self._drain(stream)
        self._drain(stream)
        self.err.note(f"{h.name}: the program exited {code}, but processes it left in the background held its "
                      f"output open {LINGER_S:g} s later: killed them (SIGKILL to its process group)"
                      + ("" if r.ok else f"; the kill failed: {r.why}"))

    def _kill(self, stream: Stream) -> None:
        """SIGTERM to the program's process group, SIGKILL after a grace period; each
        step waits for the channel to report the end."""
        h = self.h
        for sig, wait_s in (("TERM", KILL_GRACE_S), ("KILL", CLOSE_WAIT_S)):
            r = run_command(h, self.tb.key, kill_command(self.run_dir, sig), timeout_s=ssh.CONNECT_TIMEOUT_S + 5)
            if not r.ok and not stream.ended():
                why = "QEMU is not running" if not h.alive() else r.why
                self.err.note(f"{h.name}: {self.why_stopped}; could not kill the program ({why})")
                return
            end = time.monotonic() + wait_s
            while not stream.ended() and time.monotonic() < end:
                stream.wait(min(POLL_S, max(0.0, end - time.monotonic())))
                self._drain(stream)
            if stream.ended():
                self._drain(stream)
                self.err.note(f"{h.name}: {self.why_stopped}; killed the program's process group (SIG{sig})")
                return
        self.err.note(f"{h.name}: {self.why_stopped}; the program did not end after SIGKILL")


class ProgramHandle:
    """The program on each of its hosts. `join` waits and returns one result per host."""

    def __init__(self, runs: list[_HostRun]) -> None:
        self._runs = runs

    @property
    def hosts(self) -> list[str]:
        return [r.h.name for r in self._runs]

    def running(self) -> list[str]:
        return [r.h.name for r in self._runs if r.is_alive()]

    def join(self, timeout_s: float | None = None) -> dict[str, ProgramResult]:
        """Wait for every host's program. With `timeout_s`, a program still running after
        that long is killed (process group) and marked timed out; without it, each ends
        by its own timeout at the latest. Ctrl-C kills them all, then propagates."""
        if timeout_s is not None:
            deadline = time.monotonic() + max(0.0, timeout_s)
            for r in self._runs:
                r.stop(deadline, f"still running when the join's {timeout_s:g} s were up")
        try:
            for r in self._runs:
                while r.is_alive():
                    r.join(POLL_S)
        except BaseException:
            self.kill("interrupted")
            raise
        return {r.h.name: r.result for r in self._runs if r.result is not None}

    def kill(self, why: str = "killed") -> None:
        """Kill every host's program now and wait (bounded) for the kills to be done."""
        now = time.monotonic()
        for r in self._runs:
            r.stop(now, why)
        end = now + KILL_GRACE_S + CLOSE_WAIT_S + ssh.CONNECT_TIMEOUT_S * 2
        for r in self._runs:
            r.join(max(0.0, end - time.monotonic()))


def run_program(testbed, hosts: list[str], argv: list[str] | None, shell: str | None, env: dict[str, str],
                timeout_s: float, background: bool, out_dir: Path, *,
                host_env: dict[str, dict[str, str]] | None = None) -> ProgramHandle:
    """Start a program on `hosts` (names) at once: `argv` (each word quoted for the remote
    shell) or `shell` (one string for `sh -c`), exactly one of them. Each host's
    environment is pool_env() overridden by `env`, then by `host_env[host]`. Output goes to
    `out_dir/<host>.stdout` and `.stderr`. A foreground run is joined before returning."""
    if (argv is None) == (shell is None):
        raise TestbedError("a program is either an argv list or a shell string, exactly one of them")
    if argv is not None and (not argv or not all(isinstance(a, str) for a in argv)):
        raise TestbedError(f"argv must be a non-empty list of strings, got {argv!r}")
    if shell is not None and not shell.strip():
        raise TestbedError("the shell string is empty")
    if not timeout_s > 0:
        raise TestbedError(f"timeout_s must be positive, got {timeout_s!r}")
    if not hosts:
        raise TestbedError("no hosts to run the program on")
    if dup := sorted({h for h in hosts if hosts.count(h) > 1}):
        raise TestbedError(f"host(s) named twice: {', '.join(dup)}")
    problems = env_problems(env or {})
    for name, e in (host_env or {}).items():
        problems += [f"{name}: {p}" for p in env_problems(e)]
    if problems:
        raise TestbedError("environment: " + "; ".join(problems))
    targets = [testbed.host(n) for n in hosts]  # unknown names: an error with the host list
    if unknown := sorted(set(host_env or {}) - set(hosts)):
        raise TestbedError(f"host_env names host(s) the program does not run on: {', '.join(unknown)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    runs = []
    for h in targets:
        full = {**pool_env(testbed, h.name), **(env or {}), **(host_env or {}).get(h.name, {})}
        run_dir = f"{GUEST_RUN_DIR}/{run_id}-{h.name}"
        runs.append(_HostRun(testbed, h, remote_command(run_dir, argv, shell, full), run_dir, timeout_s, out_dir))
    for r in runs:
        r.start()
    handle = ProgramHandle(runs)
    if not background:
        handle.join()
    return handle
