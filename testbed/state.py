"""The model of a running testbed: typed, frozen records loaded from `state.json` once.

A running testbed is a folder `<state>/<name>/` whose `state.json` this module alone
reads and writes. `TestbedState.load` parses it into frozen records (the topology's YAML
text is parsed once, on first use, and kept with the record); a change is a new record (`with_host`, `with_pool`) that `save`
writes atomically (a temporary file renamed over the old one), so a reader never sees
half a file and no code changes a shared dict under another.

The file carries `state_version`; one without it is version 1 (the format before the
field). A file of another version, or one that lacks a field, is refused with an error
that names the file and says how to get rid of it.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from . import topology as topo
from .log import TestbedError
from .qemucmd import HostFiles
from .shares import Share

STATE_FILE = "state.json"
STATE_VERSION = 1
LOG_TAIL_LINES = 15


def pid_is_ours(pid: int | None, host_dir: Path) -> bool:
    """Alive and still the QEMU we started (pids get reused): its command line names the
    host's folder. Not for a child just started: Popen returns while the child is still
    in execve (vfork), and /proc shows an empty command line until it is done (196 of 200
    reads right after Popen, here); machine.Machine asks its own Popen instead."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(host_dir).encode() in cmdline


@dataclass(frozen=True)
class HostRecord:
    """One host of a testbed as state.json has it: its QEMU's pid (None until it starts),
    the SSH forward's port, its folder and QEMU argv."""
    name: str
    pid: int | None
    ssh_port: int
    dir: Path
    argv: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))
        object.__setattr__(self, "argv", tuple(self.argv))

    @property
    def files(self) -> HostFiles:
        return HostFiles(self.dir)

    def alive(self) -> bool:
        return pid_is_ours(self.pid, self.dir)

    def said(self, marker: bytes) -> bool:
        """Whether the guest printed `marker` on its serial console (the boot script's lines)."""
        try:
            with open(self.files.serial_log, "rb") as f:
                return marker in f.read()
        except OSError:
            return False

    def line_with(self, marker: bytes) -> str:
        """The first console line that holds `marker` (the whole line: it says why)."""
        try:
            text = self.files.serial_log.read_bytes()
        except OSError:
            return marker.decode()
        for line in text.splitlines():
            if marker in line:
                return line.decode(errors="replace").strip()
        return marker.decode()

    def log_tail(self) -> str:
        """The last lines of the QEMU log and the serial log, each under a header naming it."""
        tail = []
        for f, label in ((self.files.qemu_log, "QEMU log"), (self.files.serial_log, "serial log")):
            try:
                lines = f.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            except OSError:
                continue
            if lines:
                tail.append(f"--- {self.name} {label} ({f}), last lines:\n" + "\n".join(lines))
        return "\n".join(tail)

    def failed(self, why: str) -> TestbedError:
        """An error that says why the host failed, with the end of its logs."""
        return TestbedError(f"{self.name}: {why}\n" + self.log_tail())

    def wait_said(self, marker: bytes, *, timeout_s: float, failed: bytes | None = None,
                  stop: threading.Event | None = None, proc: subprocess.Popen | None = None) -> None:
        """Wait for the guest to print `marker` on its console. Watching the serial log
        costs the guest nothing; raises when it prints `failed`, QEMU exits (`proc`, where
        this process started it, gives the exit status), or time is up."""
        deadline = time.monotonic() + timeout_s
        while not self.said(marker):
            if failed and self.said(failed):
                raise TestbedError(f"{self.name}: the guest said {self.line_with(failed)!r}")
            if stop is not None and stop.is_set():
                raise TestbedError(f"{self.name}: wait abandoned")  # another host failed first
            if proc is not None and proc.poll() is not None:
                raise self.failed(f"QEMU exited while booting (exit {proc.returncode})")
            if not self.alive():
                raise self.failed("QEMU exited while booting")
            if time.monotonic() > deadline:
                raise self.failed(f"the guest did not say {marker.decode()!r} on its console "
                                  f"within {timeout_s:.0f} s")
            time.sleep(0.1)

    def to_json(self) -> dict:
        return {"name": self.name, "pid": self.pid, "ssh_port": self.ssh_port, "dir": str(self.dir),
                "argv": list(self.argv)}

    @classmethod
    def from_json(cls, d: Mapping) -> HostRecord:
        return cls(d["name"], d.get("pid"), int(d["ssh_port"]), Path(d["dir"]), tuple(d.get("argv") or ()))


@dataclass(frozen=True)
class PoolHost:
    """One host's pool region, as its guest reported it (testbed/guest/pool.py) and the
    host machine verified it (`ready`)."""
    dax: str | None
    region: str | None = None
    dax_mode: str | None = None
    targets: tuple[str, ...] | None = None
    ready: bool = False
    report: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the guest's whole answer

    @classmethod
    def from_report(cls, r: Mapping[str, Any], *, ready: bool = False) -> PoolHost:
        targets = r.get("targets")
        return cls(r.get("dax"), r.get("region"), r.get("dax_mode"),
                   tuple(targets) if targets is not None else None, bool(ready), dict(r))

    def to_json(self) -> dict:
        return {**self.report, "region": self.region, "dax": self.dax, "dax_mode": self.dax_mode,
                "targets": list(self.targets) if self.targets is not None else None, "ready": self.ready}

    @classmethod
    def from_json(cls, d: Mapping) -> PoolHost:
        return cls.from_report({k: v for k, v in d.items() if k != "ready"}, ready=bool(d.get("ready")))


@dataclass(frozen=True)
class PoolState:
    """The pool as provisioning left it: one record per host."""
    hosts: Mapping[str, PoolHost]

    def ready(self) -> PoolState:
        """The same pool, every host verified."""
        return PoolState({n: dataclasses.replace(h, ready=True) for n, h in self.hosts.items()})

    def to_json(self) -> dict:
        return {"hosts": {n: h.to_json() for n, h in self.hosts.items()}}

    @classmethod
    def from_json(cls, d: Mapping | None) -> PoolState | None:
        if not d:
            return None
        return cls({n: PoolHost.from_json(h) for n, h in (d.get("hosts") or {}).items()})


@dataclass(frozen=True)
class KernelRecord:
    """The kernel and QEMU a testbed booted with, where they are not the image's and the
    default QEMU (kernel.py): what was given, and what QEMU was given."""
    given: Mapping[str, str | None]
    qemu: str
    kernel: str
    initrd: str
    version: str | None
    modules: str | None

    def to_json(self) -> dict:
        return {"given": dict(self.given), "qemu": self.qemu, "kernel": self.kernel, "initrd": self.initrd,
                "version": self.version, "modules": self.modules}

    @classmethod
    def from_json(cls, d: Mapping | None) -> KernelRecord | None:
        if not d:
            return None
        return cls(dict(d.get("given") or {}), d["qemu"], d["kernel"], d["initrd"], d.get("version"),
                   d.get("modules"))


@dataclass(frozen=True)
class TestbedState:
    """A running testbed: what `up` made, read from its state folder `dir`."""
    __test__ = False  # not a pytest test class

    name: str
    dir: Path
    topology_name: str
    topology_source: str | None  # where `up` read the topology (a file, or a built-in's name)
    topology_yaml: str | None  # the text it read: the topology is parsed from it once, on first use
    accel: str
    image: str
    created_at: str
    pool_dir: Path
    pool_files: Mapping[str, Path]
    hosts: tuple[HostRecord, ...]
    pool: PoolState | None = None
    shares: tuple[Share, ...] = ()
    kernel: KernelRecord | None = None
    parsed: topo.Topology | None = field(default=None, repr=False, compare=False)  # set once parsed

    @property
    def topology(self) -> topo.Topology:
        """The topology `up` started, parsed from the text it read then (once per loaded
        state: `with_host` and `with_pool` keep the parsed one)."""
        if self.parsed is None:
            if self.topology_yaml is None or self.topology_source is None:
                raise TestbedError(f"{self.state_file}: field 'topology_yaml' is missing",
                                   hint=f"'beluga-testbed down {self.name}' removes it")
            # A memo on a frozen record: the value never changes, only when it is computed.
            object.__setattr__(self, "parsed", topo.parse(self.topology_yaml, self.topology_source,
                                                          check_paths=False))
        return self.parsed  # type: ignore[return-value]

    @property
    def key(self) -> Path:
        """The SSH private key (root on every guest)."""
        return self.dir / "id_ed25519"

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    def host(self, name: str) -> HostRecord:
        for h in self.hosts:
            if h.name == name:
                return h
        raise TestbedError(f"testbed '{self.name}' has no host '{name}' "
                           f"(hosts: {', '.join(h.name for h in self.hosts)})")

    def dax(self, host: str) -> str | None:
        """The pool's devdax device in `host`'s guest; None before provisioning."""
        p = self.pool.hosts.get(host) if self.pool else None
        return p.dax if p else None

    def with_host(self, name: str, **changes: Any) -> TestbedState:
        """The same testbed with host `name`'s record changed (pid, ssh_port, argv)."""
        self.host(name)  # the located error for a name that is not one
        return dataclasses.replace(self, hosts=tuple(dataclasses.replace(h, **changes) if h.name == name else h
                                                     for h in self.hosts))

    def with_pool(self, pool: PoolState | None) -> TestbedState:
        return dataclasses.replace(self, pool=pool)

    # ------------------------------------------------------------ on disk
    def to_json(self) -> dict:
        return {
            "state_version": STATE_VERSION,
            "name": self.name, "topology": self.topology_name, "topology_source": self.topology_source,
            "topology_yaml": self.topology_yaml,
            "accel": self.accel, "image": self.image, "created_at": self.created_at, "pool_dir": str(self.pool_dir),
            "pool_files": {k: str(v) for k, v in self.pool_files.items()},
            "hosts": [h.to_json() for h in self.hosts],
            "pool": self.pool.to_json() if self.pool else None,
            "shares": [s.to_state() for s in self.shares],
            "kernel": self.kernel.to_json() if self.kernel else None,
        }

    @classmethod
    def from_json(cls, d: Mapping, dir: Path, *, source: str = STATE_FILE) -> TestbedState:
        """The state in `d` (state.json's content) of the testbed in folder `dir`. `source`
        names the file in errors."""
        if not isinstance(d, Mapping):
            raise TestbedError(f"{source}: not a testbed state (a JSON object was expected)",
                               hint=f"'beluga-testbed down {Path(dir).name}' removes it")
        version = d.get("state_version", 1)
        if version != STATE_VERSION:
            raise TestbedError(f"{source}: state_version {version!r}; this beluga-testbed reads version "
                               f"{STATE_VERSION}",
                               hint=f"take it down with the beluga-testbed that started it "
                                    f"('beluga-testbed down {Path(dir).name}' stops its QEMUs here too)")
        try:
            st = cls(
                name=d["name"], dir=Path(dir), topology_name=d.get("topology", ""),
                topology_source=d.get("topology_source"),
                topology_yaml=d.get("topology_yaml"), accel=d["accel"], image=d["image"], created_at=d["created_at"],
                pool_dir=Path(d.get("pool_dir") or paths.pool_dir() / d["name"]),
                pool_files={k: Path(v) for k, v in (d.get("pool_files") or {}).items()},
                hosts=tuple(HostRecord.from_json(h) for h in d["hosts"]),
                pool=PoolState.from_json(d.get("pool")),
                shares=tuple(Share.from_state(s) for s in d.get("shares") or ()),
                kernel=KernelRecord.from_json(d.get("kernel")),
            )
            if "topology" not in d:  # the name, from the topology itself
                st = dataclasses.replace(st, topology_name=st.topology.name)
            return st
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"field {e.args[0]!r} is missing" if isinstance(e, KeyError) else str(e)
            raise TestbedError(f"{source}: not a testbed state this version reads: {what}",
                               hint=f"'beluga-testbed down {Path(dir).name}' removes it") from None

    @classmethod
    def load(cls, dir: Path) -> TestbedState:
        """The state saved in folder `dir` (state.json)."""
        f = Path(dir) / STATE_FILE
        try:
            d = json.loads(f.read_text())
        except ValueError as e:
            raise TestbedError(f"{f}: not JSON ({e})", hint=f"'beluga-testbed down {Path(dir).name}' removes it") \
                from None
        return cls.from_json(d, Path(dir), source=str(f))

    def save(self) -> TestbedState:
        """Write state.json atomically (0600); returns self, so `st = st.with_...(...).save()`."""
        tmp = self.dir / (STATE_FILE + ".tmp")
        paths.write_private(tmp, json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(self.dir / STATE_FILE)
        return self
