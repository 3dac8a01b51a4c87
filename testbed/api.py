"""The testbed as a Python library: `from testbed import Testbed` (docs/api.md).

    from testbed import Testbed

    with Testbed.up("2hosts-1switch", name="ci-1") as tb:     # down when the block ends
        tb.pool.write(4096, b"hello")                         # through the backing files
        r = tb.exec(None, ["cxl", "list", "-M"], check=True)  # every host; r["host1"].stdout
        tb.poison(8192, 64)
        report = tb.reset()                                   # back to the state right after up

`Testbed.attach(name)` takes one that `beluga-testbed up` started. The command line
(cli.py) is a thin layer over this module: everything it does with running testbeds
(up, down, status, list, exec, ssh, cp, reset, logs export, provision, pool) is a call
here. Below it: lifecycle.py (up and down), state.py (the typed state), machine.py (one
QEMU per host), qmp.py (QMP commands and events).
"""
from __future__ import annotations

import contextlib
import shlex
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from . import faults, lifecycle, names, provision, ssh
from . import reset as reset_mod
from .log import TestbedError
from .par import map_parallel
from .reset import ResetReport
from .state import HostRecord, PoolState, TestbedState

__all__ = ["Testbed", "Host", "Pool", "PoolDevice", "Location", "ExecResult", "ExecResults", "ResetReport",
           "Plan", "TestbedError", "TestbedState"]

Location = provision.Location


@dataclass(frozen=True)
class Host:
    """One guest of a running testbed."""
    name: str
    index: int  # position in the topology (0 for the first host)
    ssh_port: int  # sshd of the guest, forwarded to 127.0.0.1
    pid: int | None  # its QEMU process on this machine
    dax: str | None  # the pool's devdax device in this guest (/dev/daxN.M), None before provisioning


@dataclass(frozen=True)
class Plan:
    """What `up` would start (`Testbed.plan`, `up --dry-run`): the testbed's name and each
    host's QEMU argv, in host order."""
    name: str
    argv: Mapping[str, list[str]]


@dataclass(frozen=True)
class PoolDevice:
    """One CXL memory device of the pool, backed by a file on this machine."""
    id: str
    serial: int
    position: int  # interleave position in the region
    file: Path
    size_bytes: int


@dataclass(frozen=True)
class ExecResult:
    """How a command ended on one host. `exit_code` is None when it has none (the
    connection failed or broke: `error` says why)."""
    host: str
    exit_code: int | None
    stdout: str
    stderr: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0

    def why(self) -> str:
        if self.error:
            return self.error
        last = self.stderr.strip().splitlines()[-1:] or [""]
        return f"exit {self.exit_code}" + (f": {last[0]}" if last[0] else "")


class ExecResults(Mapping[str, ExecResult]):
    """One ExecResult per host, in host order: `results["host0"].stdout`."""

    def __init__(self, argv: Sequence[str], results: Iterable[ExecResult]) -> None:
        self.argv = list(argv)
        self._by_host = {r.host: r for r in results}

    def __getitem__(self, host: str) -> ExecResult:
        return self._by_host[host]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_host)

    def __len__(self) -> int:
        return len(self._by_host)

    def __repr__(self) -> str:
        return f"ExecResults({self.argv!r}, {list(self._by_host.values())!r})"

    @property
    def ok(self) -> bool:
        """True when the command exited 0 on every host."""
        return all(r.ok for r in self._by_host.values())

    @property
    def failed(self) -> list[ExecResult]:
        return [r for r in self._by_host.values() if not r.ok]

    def check(self) -> ExecResults:
        """Self, or a TestbedError naming every host where the command failed and why."""
        if self.failed:
            raise TestbedError(f"{shlex.join(self.argv)} failed on "
                               + "; ".join(f"{r.host}: {r.why()}" for r in self.failed))
        return self


@dataclass(frozen=True)
class Pool:
    """The shared CXL pool: one interleaved region that every host maps as devdax.

    Region offset `o` is on device `devices[(o // granularity) % ways]` at device (and
    backing-file) offset `(o // stripe) * granularity + o % granularity`; `locate` does
    the arithmetic. `read` and `write` go through the backing files on this machine:
    every guest sees the bytes at once (share=on)."""
    size_bytes: int
    ways: int
    granularity_bytes: int
    window: str
    devices: tuple[PoolDevice, ...]  # in interleave position order
    dax: Mapping[str, str | None]  # host name -> its dax device
    _topology: object = field(repr=False, compare=False)
    _files: Mapping[str, Path] = field(repr=False, compare=False)

    @property
    def stripe_bytes(self) -> int:
        return self.granularity_bytes * self.ways

    def locate(self, offset: int) -> Location:
        """Where region offset `offset` lives: position, device, serial, backing file and offset."""
        self._check_range(offset, 1)
        return provision.locate(self._topology, dict(self._files), offset)

    def _check_range(self, offset: int, length: int) -> None:
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0 \
                or offset + length > self.size_bytes:
            raise TestbedError(f"pool range {offset!r}+{length!r} is outside the pool (0..{self.size_bytes:#x})")

    def chunks(self, offset: int, length: int) -> list[tuple[Location, int]]:
        """The range as (location, length) pieces, one per interleave granule it touches."""
        self._check_range(offset, length)
        out = []
        end = offset + length
        while offset < end:
            n = min(end, (offset // self.granularity_bytes + 1) * self.granularity_bytes) - offset
            out.append((provision.locate(self._topology, dict(self._files), offset), n))
            offset += n
        return out

    def read(self, offset: int, length: int) -> bytes:
        """The pool's bytes at [offset, offset+length), read from the backing files."""
        from . import paths
        out = bytearray()
        for loc, n in self.chunks(offset, length):
            with paths.open_nofollow(loc.file, "rb") as f:
                f.seek(loc.file_offset)
                got = f.read(n)
            out += got + bytes(n - len(got))
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Write `data` at region offset `offset` through the backing files."""
        from . import paths
        pos = 0
        for loc, n in self.chunks(offset, len(data)):
            with paths.open_nofollow(loc.file, "r+b") as f:
                f.seek(loc.file_offset)
                f.write(data[pos:pos + n])
            pos += n


class Testbed:
    """A running testbed. Make one with `Testbed.up(...)` or `Testbed.attach(name)`; as a
    context manager it goes down on exit unless `keep` (attach: always kept)."""

    __test__ = False  # not a pytest test class, in the users' test files that import it

    def __init__(self, state: TestbedState, *, keep: bool = True) -> None:
        self._state = state
        self.keep = keep
        self._down = False
        # One SSH connection per host, kept open between calls: a new one costs a key
        # exchange and an sshd start in the guest (0.5-2.5 s under TCG on a busy machine),
        # a command on an open one a tenth of that. Keyed by host, port and QEMU pid.
        self._conns: dict[tuple[str, int, int | None], object] = {}
        self._conns_lock = threading.Lock()

    # ------------------------------------------------------------ making one
    @classmethod
    def up(cls, topology: str, *, name: str | None = None, shares: Sequence[str] = (), keep: bool = False,
           accel: str = "auto", provision: bool = True, kernel: str | Path | None = None,
           initrd: str | Path | None = None, modules: str | Path | None = None,
           qemu: str | Path | None = None, retain: bool = False) -> Testbed:
        """Boot `topology` (a built-in name or a YAML file) and make the pool; returns once
        every host is ready. `name` defaults to the topology's name. `shares` are
        `HOST_DIR[:GUEST_DIR[:rw]]` folders mounted in every guest (as `up --share`).
        `kernel`, `initrd`, `modules` and `qemu`: a user's kernel (with its modules tree)
        and QEMU binary, as `up --kernel/--initrd/--modules/--qemu` (docs/kernels.md).
        `keep`: leave it running when the `with` block ends. `retain`: should `up` fail,
        leave what it started for inspection instead of rolling back (`up --retain`)."""
        kwargs = cls._up_options(name, shares, kernel, initrd, modules, qemu)
        if retain:
            kwargs["retain"] = True
        state = lifecycle.up(topology, name=name, accel=accel, provision=provision, **kwargs)
        return cls(state, keep=keep)

    @classmethod
    def plan(cls, topology: str, *, name: str | None = None, shares: Sequence[str] = (), accel: str = "auto",
             provision: bool = True, kernel: str | Path | None = None, initrd: str | Path | None = None,
             modules: str | Path | None = None, qemu: str | Path | None = None) -> Plan:
        """What `up` with the same arguments would start, without starting or making
        anything (`up --dry-run`): each host's QEMU argv. `accel="auto"` plans for TCG
        (the probe that picks KVM boots a guest)."""
        kwargs = cls._up_options(name, shares, kernel, initrd, modules, qemu)
        _, name_, argv = lifecycle.plan(topology, name, accel="tcg" if accel == "auto" else accel,
                                        provision=provision, **kwargs)
        return Plan(name_, argv)

    @staticmethod
    def _up_options(name: str | None, shares: Sequence[str], kernel: str | Path | None, initrd: str | Path | None,
                    modules: str | Path | None, qemu: str | Path | None) -> dict:
        """up's and plan's options checked and typed, every mistake before anything boots."""
        if name is not None:
            names.check(name, "testbed name")
        kwargs: dict = {}
        if shares:
            from . import shares as shares_mod
            kwargs["shares"] = shares_mod.parse_all(list(shares))
        for k, v in (("kernel", kernel), ("initrd", initrd), ("modules", modules), ("qemu", qemu)):
            if v is not None:
                kwargs[k] = Path(v)
        return kwargs

    @classmethod
    def attach(cls, name: str) -> Testbed:
        """A testbed that is already up (started by `beluga-testbed up` or another process).
        Leaving a `with` block does not take it down; `down()` does."""
        return cls(lifecycle.find(names.check(name, "testbed name")), keep=True)

    @staticmethod
    def running() -> list[str]:
        """Names of the testbeds that are up."""
        return lifecycle.names()

    @staticmethod
    def down_named(name: str) -> bool:
        """Take testbed `name` down, whatever state it is in (up, half up, its state file
        lost or unreadable): every QEMU stopped, every file removed. Idempotent: False when
        nothing of it was there (`beluga-testbed down NAME`)."""
        return lifecycle.down(names.check(name, "testbed name"))

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if not self.keep:
            self.down()
        else:
            self.close()

    def close(self) -> None:
        """Close the SSH connections this object keeps open (the testbed stays up)."""
        with self._conns_lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            with contextlib.suppress(Exception):
                c.close()

    def _run(self, h: HostRecord, command: str, timeout_s: float) -> ssh.Result:
        """`command` on host h over its kept connection (opened, or opened again, as needed)."""
        k = (h.name, h.ssh_port, h.pid)
        with self._conns_lock:
            c = self._conns.pop(k, None)
        if c is None or c.transport is None or not c.transport.is_active():
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
            c = ssh.connection(h.ssh_port, self.key)
        try:
            c.open()  # no-op when open
            # Opening a channel waits up to an hour by default: a guest whose link is down
            # (a `nic` fault) would hold this call that long.
            c.transport.channel_timeout = min(timeout_s, ssh.CONNECT_TIMEOUT_S)
            r = c.run(command, hide=True, warn=True, timeout=timeout_s, in_stream=False)
        except Exception as e:  # noqa: BLE001 - reported per host, as ssh.run does
            with contextlib.suppress(Exception):
                c.close()
            return ssh.Result(h.name, -1, "", "", error=f"{type(e).__name__}: {e}")
        with self._conns_lock:
            old = self._conns.pop(k, None)
            self._conns[k] = c
        if old is not None and old is not c:
            with contextlib.suppress(Exception):
                old.close()
        return ssh.Result(h.name, r.exited, r.stdout, r.stderr)

    def __repr__(self) -> str:
        return f"Testbed({self.name!r}, hosts={[h.name for h in self.hosts]})"

    # ------------------------------------------------------------ what it is
    @property
    def name(self) -> str:
        return self._state.name

    @property
    def topology(self) -> str:
        """The topology's name."""
        return self._state.topology_name

    @property
    def state(self) -> TestbedState:
        """The typed, frozen record of this testbed (state.py) as last read: its parsed
        topology, hosts, pids, ports, files, pool, shares, kernel."""
        return self._state

    @property
    def hosts(self) -> tuple[Host, ...]:
        """Every host, in topology order."""
        return tuple(Host(h.name, i, h.ssh_port, h.pid, self._state.dax(h.name))
                     for i, h in enumerate(self._state.hosts))

    def status(self) -> dict:
        """What `beluga-testbed status --json` prints: topology, accel, image, creation
        time, and per host its pid, SSH port, state (running/stopped) and pool (ready, not
        ready, or '-' when stopped); the shares and the user's kernel, if any."""
        return lifecycle.describe(self._state)

    def select(self, host: str | None, all_: bool = False) -> list[Host]:
        """Every host (`all_`), or the one named `host`: what `exec NAME HOST|--all` runs on.
        An error with the host list when neither is given, or both."""
        self.check_shell(None, host, all_)
        chosen = {h.name for h in lifecycle.resolve_hosts(self._state, host, all_)}
        return [h for h in self.hosts if h.name in chosen]

    def host(self, host: str | Host) -> Host:
        """The host named `host` (an error with the host list and a did-you-mean if none is)."""
        return next(h for h in self.hosts if h.name == self._host_state(host).name)

    @property
    def key(self) -> Path:
        """The SSH private key of this testbed (root on every guest)."""
        return self._state.key

    def ssh_argv(self, host: str | Host, command: Sequence[str] | None = None) -> list[str]:
        """An `ssh` command line that reaches `host` (and runs `command` there)."""
        h = self._host_state(host)
        return ssh.ssh_argv(h.ssh_port, self.key, list(command) if command else None)

    @property
    def pool(self) -> Pool:
        """The pool's geometry, devices, backing files and per-host dax devices."""
        t = self._state.topology
        files = self._state.pool_files
        devs = tuple(PoolDevice(d, t.device(d).serial, i, files[d], t.device(d).size_bytes)
                     for i, d in enumerate(t.pool.devices))
        return Pool(t.pool_size_bytes, len(t.pool.devices), t.pool.granularity_bytes, t.pool.window, devs,
                    {h.name: h.dax for h in self.hosts}, t, files)

    def alive(self, host: str | Host) -> bool:
        """Whether the host's QEMU runs (False after `kill`)."""
        return self._host_state(host).alive()

    # ------------------------------------------------------------ using it
    def exec(self, hosts: str | Host | Sequence[str | Host] | None, argv: Sequence[str], *,
             timeout_s: float = ssh.COMMAND_TIMEOUT_S, check: bool = False, env: Mapping[str, str] | None = None,
             pool_env: bool = False) -> ExecResults:
        """Run `argv` (each word quoted for the guest's shell) on one host, several, or every
        host (None), in parallel; one result per host. `check`: raise if it fails anywhere.
        `pool_env`: the BELUGA_* pool variables a program run gets (BELUGA_DAX, ...), as
        `exec --pool-env`; `env`: more variables (over those), each value quoted."""
        from .scenario import programs
        if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
            raise TestbedError(f"argv must be a non-empty list of strings, got {argv!r}",
                               hint="e.g. ['ls', '-l', '/dev'], or ['sh', '-c', 'a | b'] for a shell line")
        if problems := programs.env_problems(dict(env or {})):
            raise TestbedError("env: " + "; ".join(problems))
        targets = self._hosts_states(hosts)
        line = shlex.join(argv)

        def command(h) -> str:
            full = {**(programs.pool_env(self._state, h.name) if pool_env else {}), **(env or {})}
            return programs.exports(full) + line if full else line

        def one(h) -> ExecResult:
            if not h.alive():
                return ExecResult(h.name, None, "", "", error=f"{h.name} is not running (QEMU stopped)")
            r = self._run(h, command(h), timeout_s)
            if r.error is not None or r.exit_code < 0:
                return ExecResult(h.name, None, r.stdout, r.stderr, error=r.error or r.why)
            return ExecResult(h.name, r.exit_code, r.stdout, r.stderr)

        results = ExecResults(argv, map_parallel(one, targets))
        return results.check() if check else results

    def shell(self, hosts: str | Host | Sequence[str | Host] | None, line: str, *,
              timeout_s: float = ssh.COMMAND_TIMEOUT_S, pool_env: bool = False) -> ExecResults:
        """Run a shell command line as typed (not quoted: `a | b` is a pipe) on hosts in
        parallel, each over a connection of its own (what one command from a terminal
        wants; `exec` keeps connections open for the next call), as `beluga-testbed exec`.
        `pool_env`: the BELUGA_* pool variables first. A host that does not answer gets a
        result with `error` set."""
        from .scenario import programs
        self.check_shell(line)
        targets = self._hosts_states(hosts)

        def one(h: HostRecord) -> ExecResult:
            full = programs.exports(programs.pool_env(self._state, h.name)) + line if pool_env else line
            r = ssh.run(h.name, h.ssh_port, self.key, full, timeout_s=timeout_s)
            if r.error is not None:
                return ExecResult(h.name, None, r.stdout, r.stderr, error=r.error)
            return ExecResult(h.name, r.exit_code, r.stdout, r.stderr)

        return ExecResults(["sh", "-c", line], map_parallel(one, targets))

    @staticmethod
    def check_shell(line: str | None, host: str | None = None, all_: bool = False) -> None:
        """The mistakes in `shell`'s and `select`'s arguments alone, found before any
        testbed is looked up: no command line (None: not checked), a host and `all_` both."""
        if line is not None and (not isinstance(line, str) or not line.strip()):
            raise TestbedError("no command given", hint="beluga-testbed exec NAME HOST|--all -- CMD ...")
        if host and all_:  # it ran on every host, whatever HOST said
            raise TestbedError(f"both a host ({host}) and --all", hint="name one host, or --all for every host")

    def exec_ok(self, host: str | Host, argv: Sequence[str], *, timeout_s: float = ssh.COMMAND_TIMEOUT_S) -> ExecResult:
        """Run `argv` on one host; its result, or a TestbedError if it did not exit 0."""
        h = self._host_state(host)
        return self.exec(h.name, argv, timeout_s=timeout_s, check=True)[h.name]

    def copy_in(self, hosts: str | Host | Sequence[str | Host] | None, src: str | Path, dst: str, *,
                recursive: bool = False) -> list[str]:
        """Copy local file (or folder, with `recursive`) `src` to `dst` on each host (None:
        every host) over SFTP, as `beluga-testbed cp` (testbed/transfer.py); a `dst` that is
        a folder or ends in '/' receives it under its name. Keeps the file mode. Returns
        HOST:PATH of every copy; every host's error at once."""
        from . import transfer
        return transfer.copy_in(self._state, self._hosts_states(hosts), Path(src), dst, recursive=recursive)

    def copy_out(self, hosts: str | Host | Sequence[str | Host] | None, src: str, dst: str | Path, *,
                 recursive: bool = False) -> list[Path]:
        """Copy `src` from each host to local `dst`; from several hosts (None: every host,
        when there are several) into `dst/<host>/`. Returns the local paths written."""
        from . import transfer
        return [Path(p) for p in transfer.copy_out(self._state, self._hosts_states(hosts), src, Path(dst),
                                                   recursive=recursive)]

    def copy(self, src: str, dst: str, *, all_hosts: bool = False, recursive: bool = False) -> list[str]:
        """scp-style copy, as `beluga-testbed cp`: one side is HOST:PATH (or :PATH with
        `all_hosts`: every host), the other a local path. Returns where each copy went."""
        from . import transfer
        return transfer.copy(self._state, src, dst, all_hosts=all_hosts, recursive=recursive)

    @staticmethod
    def check_copy(src: str, dst: str, *, all_hosts: bool = False, recursive: bool = False) -> None:
        """The mistakes `copy` would find in its arguments alone (both sides local or
        remote, a local source that is missing, a folder without `recursive`), before any
        testbed is looked up."""
        from . import transfer
        if transfer.sides(src, dst, all_hosts=all_hosts)[0] is None:  # into the guests
            transfer.check_source(Path(src), recursive=recursive)

    def export_logs(self, dest: str | Path | None = None) -> Path:
        """Every host's serial and QEMU logs, its dmesg (where it runs) and the state in one
        folder: `dest` (made if missing; default ./beluga-logs-NAME-TIME). Returns it."""
        dest = Path(dest) if dest is not None else None
        if dest is not None and dest.exists() and not dest.is_dir():
            raise TestbedError(f"{dest}: not a folder", hint="name a folder to write (made if missing)")
        return lifecycle.export_logs(self.name, dest)

    def provision(self) -> PoolState:
        """Make (again) and verify the pool in every guest (`beluga-testbed provision`);
        the pool's per-host record, also in the state from then on."""
        self._require_up()
        self._state = provision.provision(self._state)
        return self._state.pool

    def pool_table(self) -> dict:
        """What `beluga-testbed pool --json` prints: geometry, the interleave rule, per host
        its region and dax device, and region offset -> device -> backing file offset."""
        return provision.pool_table(self._state)

    def run_program(self, hosts: str | Host | Sequence[str | Host] | None, argv: Sequence[str] | None = None, *,
                    shell: str | None = None, env: Mapping[str, str] | None = None,
                    host_env: Mapping[str, Mapping[str, str]] | None = None, timeout_s: float = 600,
                    background: bool = False, out_dir: str | Path | None = None):
        """A user's program on hosts, as a scenario's `run` step (testbed/scenario/programs.py): argv
        (or one `shell` line), the pool in its environment (BELUGA_DAX, BELUGA_POOL_SIZE,
        BELUGA_HOST_INDEX, ...) overridden by `env` and `host_env[host]`, stdout and stderr
        whole in `out_dir/<host>.stdout|.stderr` (default: a new temporary folder), a
        timeout that kills its process group. Returns a ProgramHandle: `join()` gives one
        ProgramResult per host (a foreground run is joined already). reset() kills a
        background one."""
        import tempfile
        from .scenario import programs
        names_ = [h.name for h in self._hosts_states(hosts)]
        out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"beluga-{self.name}-"))
        return programs.run_program(self._state, names_, list(argv) if argv is not None else None, shell,
                                    dict(env or {}), timeout_s, background, out,
                                    host_env={k: dict(v) for k, v in (host_env or {}).items()} or None)

    # ------------------------------------------------------------ faults
    def poison(self, offset: int, length: int = 64, *, hosts: Sequence[str | Host] | None = None) -> list[Location]:
        """Poison the pool's 64-byte lines over [offset, offset+length) in the devices of
        `hosts` (default: every running host: each VM emulates its own copy of each
        device). Returns the device locations poisoned, one per granule touched."""
        locs = self._device_chunks(offset, length)
        for h in self._fault_hosts(hosts):
            for loc, n in locs:
                faults.inject_poison(h, loc.device, loc.file_offset, n)
        return [loc for loc, _ in locs]

    def media_event(self, offset: int, kind: str = "general_media", *,
                    hosts: Sequence[str | Host] | None = None) -> Location:
        """A media error record ('general_media' or 'dram') in the failure log of the device
        holding region offset `offset`, on `hosts` (default: every running host)."""
        if kind not in ("general_media", "dram"):
            raise TestbedError(f"unknown media event kind {kind!r}", hint="'general_media' or 'dram'")
        loc = self.pool.locate(offset)
        for h in self._fault_hosts(hosts):
            faults.inject_media_event(h, loc.device, kind, loc.file_offset)
        return loc

    def kill(self, host: str | Host) -> None:
        """A host crash: SIGKILL its QEMU. Only `down` + `up` brings it back (reset cannot)."""
        faults.kill_host(self._host_state(host))

    def hang(self, host: str | Host, seconds: float) -> None:
        """A host hang: its vCPUs stop for `seconds` (QMP stop, then cont). Blocks meanwhile;
        run it in a thread to act during the hang. reset() resumes a host left stopped."""
        if not seconds >= 0:
            raise TestbedError(f"hang seconds must be >= 0, got {seconds!r}")
        faults.hang_host(self._host_state(host), seconds)

    def nic(self, host: str | Host, up: bool) -> None:
        """Take the host's network link down (up=False) or up again. reset() sets it up."""
        faults.set_link(self._host_state(host), bool(up))

    def flip_bits(self, offset: int, count: int = 1) -> list[int]:
        """Corrupt the pool from this machine: flip one bit in each of `count` bytes from
        region offset `offset` (in the backing files). Returns the region offsets changed."""
        if not isinstance(count, int) or count < 1:
            raise TestbedError(f"count must be a positive number of bytes, got {count!r}")
        changed = []
        for loc, n in self.pool.chunks(offset, count):
            got = faults.flip_bits(loc.file, loc.file_offset, n)
            changed += [loc.region_offset + (o - loc.file_offset) for o in got]
        return changed

    # ------------------------------------------------------------ reset and down
    def reset(self, *, poison: bool = True) -> ResetReport:
        """Back to the state right after `up`, without rebooting (testbed/reset.py): hung
        hosts resumed, links up, every process started after boot killed, poison cleared
        through the devices' mailboxes (`poison=False` skips that), trace buffers empty,
        /tmp and /dev/shm emptied, the pool zeroed. What could not be undone (a killed
        host, ...) is in the report's `not_undone`."""
        self._require_up()
        self._state = lifecycle.find(self.name)
        return reset_mod.reset(self._state, poison=poison, run=self._run)

    def _adopt(self, other: Testbed) -> None:
        """Stand for `other` from now on (the pytest plugin's fresh testbed after a down/up)."""
        self.close()
        self._state, self._down = other._state, other._down

    def down(self) -> bool:
        """Stop every host and remove the testbed's files. Idempotent."""
        self._down = True
        self.close()
        return lifecycle.down(self.name)

    # ------------------------------------------------------------ helpers
    def _require_up(self) -> None:
        if self._down:
            raise TestbedError(f"testbed '{self.name}' was taken down")

    def _host_state(self, host: str | Host) -> HostRecord:
        n = host.name if isinstance(host, Host) else host
        if not isinstance(n, str):
            raise TestbedError(f"expected a host name, got {type(n).__name__}")
        all_ = self._state.hosts
        for h in all_:
            if h.name == n:
                return h
        import difflib
        close = difflib.get_close_matches(n, [h.name for h in all_], n=1)
        raise TestbedError(f"testbed '{self.name}' has no host {n!r}",
                           hint=(f"did you mean '{close[0]}'? " if close else "")
                           + f"hosts: {', '.join(h.name for h in all_)}")

    def _hosts_states(self, hosts) -> list[HostRecord]:
        self._require_up()
        if hosts is None:
            return list(self._state.hosts)
        if isinstance(hosts, (str, Host)):
            return [self._host_state(hosts)]
        out = [self._host_state(h) for h in hosts]
        if not out:
            raise TestbedError("no hosts given", hint="None means every host")
        return out

    def _fault_hosts(self, hosts) -> list[HostRecord]:
        targets = self._hosts_states(hosts)
        live = [h for h in targets if h.alive()]
        if not live:
            raise TestbedError(f"none of {', '.join(h.name for h in targets)} is running")
        return live

    def _device_chunks(self, offset: int, length: int) -> list[tuple[Location, int]]:
        if not isinstance(length, int) or length < 1:
            raise TestbedError(f"length must be a positive number of bytes, got {length!r}")
        return self.pool.chunks(offset, length)
