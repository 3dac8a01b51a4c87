"""Fixtures of the unit tests.

Topologies are checked against one fixed machine, not the one they run on, so the
messages that name its cores, RAM and pool space read the same everywhere.

`guests`: a testbed whose guests are faked at the true boundaries: SSH (the commands the
runner sends get the answers the guest-side driver would print) and QMP (each command
recorded; poison and media events land in the guests' trace). Everything on this side of
those boundaries (the scenario model, the runner, the faults' arithmetic, the pool's
backing files, the report) is the real code."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from beluga.keys import name_key
from testbed import lifecycle, provision, qmp, ssh, topology
from testbed.state import pid_is_ours

MACHINE = topology.Machine(cpus=4, memory_mib=8192, pools_fs="/dev/shm", pools_fs_mib=4096)


@pytest.fixture(autouse=True)
def _fixed_machine(monkeypatch):
    monkeypatch.setattr(topology, "this_machine", lambda: MACHINE)


BLOCK_SLOT = 1 << 17  # where the fake store puts block k of the pool: k * BLOCK_SLOT + 4096


class FakeGuests:
    def __init__(self, topo: str, tmp: Path) -> None:
        self.topology = topology.load(topo)
        self.tmp = tmp
        hosts = []
        for i, h in enumerate(self.topology.hosts):
            d = tmp / h.name
            d.mkdir(parents=True)
            hosts.append(lifecycle.HostState(h.name, None, 20000 + i, d, []))
        pool_files = {}
        for dev in self.topology.devices:
            f = tmp / f"{dev.id}.raw"
            with open(f, "wb") as fh:
                fh.truncate(dev.size_bytes)  # sparse
            pool_files[dev.id] = f
        self.tb = SimpleNamespace(
            name="fake", topology=self.topology, hosts=hosts, key=tmp / "id_ed25519", pool_files=pool_files,
            dax=lambda host: "/dev/dax0.0")
        self.tb.host = lambda name: next(h for h in self.tb.hosts if h.name == name)
        self.by_port = {h.ssh_port: h.name for h in hosts}
        self.blocks: dict[str, int] = {}      # "set/i" -> slot number in the pool
        self.sizes: dict[str, int] = {}
        self.next_slot = 0
        self.torn: set[str] = set()           # returned as valid with the wrong bytes (a store bug)
        self.damaged: set[str] = set()        # detected by checksum: a miss
        self.poisoned: set[str] = set()
        self.trace: dict[str, list[str]] = {h.name: [] for h in hosts}
        self.reserved = 0
        self.clients: list[dict] = []
        self.service_on: str | None = None
        self.commands: list[tuple[str, str]] = []
        self.qmp: list[tuple[str, str, dict | None]] = []
        self.procs: list[subprocess.Popen] = []
        # verb -> exception the "SSH layer" raises, or (exception, calls to let through first)
        self.crash_on: dict[str, object] = {}
        self.coherence: dict[str, list[dict]] = {}  # host -> the sanitizer's reports in its report file

    # ---------------------------------------------------------------- processes
    def start_qemus(self) -> None:
        """A real process per host standing in for its QEMU (kill_host signals it)."""
        hosts = []
        for h in self.tb.hosts:
            p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(h.dir)])
            self.procs.append(p)
            # Popen returns while the child is still in execve: /proc shows its command
            # line (what alive() reads) a moment later.
            deadline = time.monotonic() + 30
            while not pid_is_ours(p.pid, h.dir) and time.monotonic() < deadline:
                time.sleep(0.01)
            hosts.append(lifecycle.HostState(h.name, p.pid, h.ssh_port, h.dir, []))
        self.tb.hosts = hosts

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()

    # ---------------------------------------------------------------- the guest side
    def slot(self, key: str, size: int) -> int:
        """Store a block; past the pool's capacity the oldest blocks are evicted (LRU-ish)."""
        if key not in self.blocks:
            self.blocks[key] = self.next_slot
            self.sizes[key] = size
            self.next_slot += 1
            while sum(self.sizes.values()) > self.topology.pool_size_bytes * 0.9:
                old = next(iter(self.sizes))
                del self.sizes[old], self.blocks[old]
        return self.blocks[key]

    def is_down(self, host: str) -> bool:
        """A host whose stand-in QEMU was killed answers no SSH connection."""
        h = next(h for h in self.tb.hosts if h.name == host)
        return h.pid is not None and not h.alive()

    def answer(self, host: str, command: str, out_stream=None) -> tuple[int, str, str]:
        if self.is_down(host):
            raise ConnectionRefusedError(f"{host}: connection refused")
        self.commands.append((host, command))
        words = shlex.split(command)
        if "guest_store.py" in command:
            i = next(k for k, w in enumerate(words) if w.endswith("guest_store.py"))
            verb, args = words[i + 1], json.loads(words[i + 2])
            if verb in self.crash_on:
                exc, after = self.crash_on[verb] if isinstance(self.crash_on[verb], tuple) else (self.crash_on[verb], 0)
                if after <= 0:
                    raise exc
                self.crash_on[verb] = (exc, after - 1)
            return 0, getattr(self, f"do_{verb}")(host, args, out_stream), ""
        if "beluga.cli format" in command:
            return 0, json.dumps({"geometry": {"segments": 8}}) + "\n", ""
        if "beluga.cli serve" in command:
            self.service_on = host
            return 0, json.dumps({"pid": 4242, "host": host}) + "\n", ""
        if command.startswith("pkill"):
            was, self.service_on = self.service_on, None
            return (0, "killed\n", "") if was else (1, "", "")
        if words[:2] == ["grep", "-m1"]:
            pattern = words[words.index("-e") + 1]
            hits = [line for line in self.trace[host] if pattern in line]
            return 0, (hits[0] + "\n" if hits else ""), ""
        return 0, "", ""

    def do_coherence(self, host, a, out):
        reports = sorted(self.coherence.get(host, []), key=lambda x: x["unix_ns"])
        if a.get("clear"):
            self.coherence.pop(host, None)
        return json.dumps({"count": len(reports), "reports": reports[:5]})

    def do_enable_trace(self, host, a, out):
        return json.dumps({"enabled": ["cxl_poison"]})

    def do_put(self, host, a, out):
        done = []
        for i in range(a["start"], a["start"] + a["count"]):
            self.slot(f"{a['set']}/{i}", a["size"])
            done.append(i)
            if out is not None:
                out.write(f"committed {i}\n")
        return json.dumps({"committed": done})

    def changed_offsets(self) -> list[int]:
        """Region offsets of every non-zero byte in the (sparse, zero) backing files: what
        a bitflip from the host changed. Only the files' data extents are read."""
        t = self.topology
        g, n = t.pool.granularity_bytes, len(t.pool.devices)
        out = []
        for pos, dev in enumerate(t.pool.devices):
            with open(self.tb.pool_files[dev], "rb") as f:
                fd, at = f.fileno(), 0
                while True:
                    try:
                        start = os.lseek(fd, at, os.SEEK_DATA)
                    except OSError:
                        break
                    end = os.lseek(fd, start, os.SEEK_HOLE)
                    f.seek(start)
                    chunk = f.read(end - start)
                    for i, b in enumerate(chunk):
                        if b:
                            fo = start + i
                            out.append((fo // g) * g * n + pos * g + fo % g)
                    at = end
        return out

    def do_get(self, host, a, out):
        hits, misses, torn, corrupt = [], [], [], 0
        for off in self.changed_offsets():  # the checksum catches bytes changed under a block
            for k in self.blocks:
                if self.offset(k) <= off < self.offset(k) + a["size"]:
                    self.damaged.add(k)
        for i in range(a["start"], a["start"] + a["count"]):
            k = f"{a['set']}/{i}"
            if k not in self.blocks:
                misses.append(i)
            elif k in self.torn:
                torn.append(i)
            elif k in self.damaged:
                misses.append(i)
                corrupt += 1
            else:
                hits.append(i)
        return json.dumps({"hits": hits, "misses": misses, "torn": torn, "corrupt_misses": corrupt})

    def offset(self, key: str) -> int:
        return self.blocks[key] * BLOCK_SLOT + 4096

    def do_locate(self, host, a, out):
        k = f"{a['set']}/{a['index']}"
        if k not in self.blocks:
            raise ssh_failure(f"block {k} is not in the store")
        return json.dumps({"data_offset": self.offset(k), "length_bytes": a["size"], "generation": 1})

    def do_scan(self, host, a, out):
        removed = []
        for k in sorted(self.poisoned):
            if k in self.blocks:
                removed.append({"key": name_key(k).hex(), "data_offset": self.offset(k), "length_bytes": 64})
                del self.blocks[k], self.sizes[k]
        events = [{"event": line.split(":")[0].split()[-1], "hpa": 0x1000, "line": line} for line in self.trace[host]]
        return json.dumps({"events": events, "region_base": 0, "affected": [], "quarantined": removed})

    def do_stat(self, host, a, out):
        return json.dumps({"blocks": len(self.blocks), "reserved": self.reserved, "segments": 1,
                           "service": {"running": self.service_on is not None}, "clients": self.clients})

    # ---------------------------------------------------------------- QMP
    def execute(self, sock: Path, command: str, arguments: dict | None = None, *, timeout_s: float = 5.0):
        host = Path(sock).parent.name
        self.qmp.append((host, command, arguments))
        if command in ("cxl-inject-poison", "cxl-inject-general-media-event", "cxl-inject-dram-event"):
            dev = arguments["path"].rsplit("/", 1)[-1]
            dpa = arguments.get("start", arguments.get("dpa"))
            for k in list(self.blocks):
                loc = provision.locate(self.topology, self.tb.pool_files, self.offset(k))
                if loc.device == dev and loc.file_offset - loc.file_offset % 64 == dpa:
                    self.poisoned.add(k)
            event = {"cxl-inject-poison": "cxl_poison", "cxl-inject-dram-event": "cxl_dram"}.get(
                command, "cxl_general_media")
            self.trace[host].append(f"  kworker-1 [000] ..... 1.0: {event}: memdev={dev} dpa={dpa:#x} hpa=0x1000")
        return {}


def ssh_failure(msg: str) -> Exception:
    return _GuestExit(msg)


class _GuestExit(Exception):
    pass


class _Conn:
    def __init__(self, fake: FakeGuests, host: str) -> None:
        self.fake, self.host = fake, host

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, command, hide=True, warn=False, out_stream=None, err_stream=None, timeout=None, in_stream=None):
        try:
            code, out, err = self.fake.answer(self.host, command, out_stream)
        except _GuestExit as e:
            code, out, err = 1, "", str(e)
        return SimpleNamespace(exited=code, stdout=out, stderr=err)

    def put(self, fileobj, remote):
        self.fake.commands.append((self.host, f"<put {remote}>"))


class _FakeQMP:
    """qmp.QMP on FakeGuests: each command recorded (FakeGuests.execute); `stop` and `cont`
    send the STOP and RESUME events QEMU sends."""

    def __init__(self, fake: FakeGuests, sock) -> None:
        self.fake, self.sock, self.events = fake, Path(sock), []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, command, arguments=None, *, timeout_s=None):
        host = self.sock.parent.name
        stopped = self.fake.__dict__.setdefault("stopped", set())
        if command == "query-status":
            return {"status": "paused" if host in stopped else "running", "running": host not in stopped}
        if (command == "stop") == (host not in stopped) and command in ("stop", "cont"):
            self.events.append({"event": "STOP" if command == "stop" else "RESUME"})
            (stopped.add if command == "stop" else stopped.discard)(host)
        return self.fake.execute(self.sock, command, arguments)

    def event_wait(self, name, timeout_s, match=None):
        for i, e in enumerate(self.events):
            if e["event"] == name:
                return self.events.pop(i)
        raise qmp.EventTimeout(f"no {name} event")


@pytest.fixture
def guests(tmp_path, monkeypatch):
    """FakeGuests on 4hosts-1switch; `guests.use("2hosts-1switch")` for another topology."""
    made: list[FakeGuests] = []

    def make(topo: str = "4hosts-1switch") -> FakeGuests:
        fake = FakeGuests(topo, tmp_path / f"tb{len(made)}")
        made.append(fake)

        def run(host, port, key, command, *, timeout_s=ssh.COMMAND_TIMEOUT_S):
            try:
                code, out, err = fake.answer(fake.by_port[port], command)
            except _GuestExit as e:
                return ssh.Result(host, 1, "", str(e))
            except ConnectionRefusedError as e:
                return ssh.Result(host, -1, "", "", error=f"NoValidConnectionsError: {e}")
            return ssh.Result(host, code, out, err)

        monkeypatch.setattr(ssh, "run", run)
        monkeypatch.setattr(ssh, "connection", lambda port, key: _Conn(fake, fake.by_port[port]))
        monkeypatch.setattr(qmp, "execute", fake.execute)
        monkeypatch.setattr(qmp, "QMP", lambda sock, timeout_s=5.0: _FakeQMP(fake, sock))
        return fake

    ns = SimpleNamespace(use=make)
    yield ns
    for f in made:
        f.close()

