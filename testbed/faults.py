"""Faults on demand: QMP device errors, machine-level faults, and pool corruption from the
host; below them, every fault kind a scenario can name (one dataclass and its `run` each)."""
from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

from . import deploy, paths, provision, qmp
from .log import TestbedError
from .machine import Machine
from .scenario import Choice, Fault, Hosts, Int, Name, OneHost, Seconds, arg, check_block, fault


EVENT_TIMEOUT_S = 10  # for QEMU's STOP and RESUME events after `stop` and `cont`


def kill_host(h) -> None:
    """A host crash: SIGKILL its QEMU (h: a state.HostRecord); returns once it is gone."""
    if not h.alive():
        raise TestbedError(f"{h.name} is not running")
    Machine.attach(h).crash()


def hang_host(h, seconds: float) -> None:
    """A host hang: QMP `stop`, and QEMU's STOP event (the vCPUs are stopped from then on);
    `seconds`; then `cont`, and its RESUME event. The host runs again however this ends
    (Ctrl-C included). QEMU's monitor serves one client at a time, so no connection is
    held while the host hangs: reset() and other QMP commands work meanwhile (a reset
    that resumed the host leaves nothing to `cont` here)."""
    with qmp.QMP(h.files.qmp) as q:
        was_running = q.execute("query-status")["running"]
        q.execute("stop")
        if was_running:  # a host stopped already sends no second STOP
            q.event_wait("STOP", EVENT_TIMEOUT_S)
    try:
        time.sleep(seconds)
    finally:
        with qmp.QMP(h.files.qmp) as q:
            if not q.execute("query-status")["running"]:
                q.execute("cont")
                q.event_wait("RESUME", EVENT_TIMEOUT_S)


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


# ---------------------------------------------------------------- fault kinds
# One frozen dataclass per fault (its YAML fields) with the method that injects it.
# `r` is the runner's Run (hosts, roles, the store's block locations), `rec` the step's
# record, whose `details` go into the report.

def _block_checks(self, sc, t, c) -> None:
    check_block(sc, self, c)


@fault("kill_host", "SIGKILL of the host's QEMU (a crash)")
class KillHost(Fault):
    primary: ClassVar[str] = "host"
    host: Any = arg(Hosts(), "the host(s) to crash", yaml="kill_host")

    def run(self, r, rec) -> None:
        for n in r.live(r.resolve(self.host)):
            kill_host(r.hosts[n])
            r.killed.add(n)
        rec.details["killed"] = sorted(r.killed)


@fault("hang_host", "QMP `stop`, then `cont` after N seconds")
class HangHost(Fault):
    primary: ClassVar[str] = "host"
    host: Any = arg(Hosts(), "the host(s) to stop", yaml="hang_host")
    seconds: float = arg(Seconds(), "how long the host stays stopped")

    def run(self, r, rec) -> None:
        names = r.live(r.resolve(self.host))
        errors: list[BaseException] = []

        def one(n):
            try:
                hang_host(r.hosts[n], self.seconds)
            except Exception as e:  # noqa: BLE001 - reported below, after every host is running again
                errors.append(e)
        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rec.details.update({"hung": names, "seconds": self.seconds})
        if errors:
            raise errors[0]


@fault("nic_down", "QMP `set_link` down on the guest NIC")
class NicDown(Fault):
    primary: ClassVar[str] = "host"
    host: Any = arg(Hosts(), "the host(s) whose NIC goes down", yaml="nic_down")

    def run(self, r, rec) -> None:
        _link(r, rec, self.host, False)


@fault("nic_up", "QMP `set_link` up on the guest NIC")
class NicUp(Fault):
    primary: ClassVar[str] = "host"
    host: Any = arg(Hosts(), "the host(s) whose NIC comes up", yaml="nic_up")

    def run(self, r, rec) -> None:
        _link(r, rec, self.host, True)


def _link(r, rec, on, up: bool) -> None:
    names = r.live(r.resolve(on))
    for n in names:
        set_link(r.hosts[n], up)
    rec.details.update({"link": "up" if up else "down", "hosts": names})


@fault("poison", "QMP `cxl-inject-poison` on the device and device address (DPA) that hold the block's "
                 "first bytes, computed with the interleave arithmetic; injected into every live host's "
                 "copy of the device")
class Poison(Fault):
    set: str = arg(Name(), "the set of the block to hit")
    index: int = arg(Int(0), "the block's index")
    length_bytes: int = arg(Int(64, 1 << 20), "bytes to poison (whole 64-byte lines)", 64)
    check = _block_checks

    def run(self, r, rec) -> None:
        loc = r.block_location(self.set, self.index)
        # Each VM emulates its own copy of the device: the media fault is reported by all of them.
        for n in r.live(list(r.hosts)):
            inject_poison(r.hosts[n], loc["device"], loc["dpa"], self.length_bytes)
        r.faults_at[f"{self.set}/{self.index}"] = rec.index
        rec.details.update({"block": f"{self.set}/{self.index}", **loc})


@fault("media_event", "QMP `cxl-inject-general-media-event` / `cxl-inject-dram-event` ('failure' log) "
                      "at the block's DPA")
class MediaEvent(Fault):
    set: str = arg(Name(), "the set of the block to hit")
    index: int = arg(Int(0), "the block's index")
    kind_: str = arg(Choice(("general_media", "dram")), "the event record", "general_media", yaml="kind")
    check = _block_checks

    def run(self, r, rec) -> None:
        loc = r.block_location(self.set, self.index)
        for n in r.live(list(r.hosts)):
            inject_media_event(r.hosts[n], loc["device"], self.kind_, loc["dpa"])
        r.faults_at[f"{self.set}/{self.index}"] = rec.index
        rec.details.update({"block": f"{self.set}/{self.index}", **loc})


@fault("bitflip", "flip bits in the pool's backing file, from the host machine, inside the block")
class Bitflip(Fault):
    set: str = arg(Name(), "the set of the block to hit")
    index: int = arg(Int(0), "the block's index")
    bits: int = arg(Int(1, 4096), "how many bits (one per byte)", 1)
    offset: int = arg(Int(0), "where in the block's bytes", 100)
    check = _block_checks

    def run(self, r, rec) -> None:
        loc = r.block_location(self.set, self.index)
        if self.offset + self.bits > loc["length_bytes"]:
            raise TestbedError(f"offset {self.offset} + {self.bits} bits is past the block's "
                               f"{loc['length_bytes']} bytes")
        where = provision.locate(r.topology, r.tb.pool_files, loc["data_offset"] + self.offset)
        changed = flip_bits(where.file, where.file_offset, self.bits)
        r.faults_at[f"{self.set}/{self.index}"] = rec.index
        rec.details.update({"block": f"{self.set}/{self.index}", "file": str(where.file), "file_offsets": changed,
                            "device": where.device})


@fault("kill_service", "`pkill -9` of `beluga serve` on the current service host")
class KillService(Fault):
    def run(self, r, rec) -> None:
        rec.details["killed_on"] = r.service_host
        rec.details["was_running"] = deploy.kill_service(r.tb, r.hosts[r.service_host])


@fault("start_service", "start the service on H; it recovers the committed index from the pool")
class StartService(Fault):
    primary: ClassVar[str] = "host"
    host: str = arg(OneHost(), "where the service starts", yaml="start_service")

    def run(self, r, rec) -> None:
        host = r.resolve(self.host)[0]
        rec.details["ready"] = deploy.start_service(r.tb, r.hosts[host], r.dax[host], r.serve_options() + ["--force"])
        r.service_host = host
        rec.details["service_host"] = host
