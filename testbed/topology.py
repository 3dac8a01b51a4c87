"""Topology files: versioned YAML describing the hosts and the CXL fabric they share.

Parsed once, validated once (every error gathered, each with file:line and the YAML
path), then passed around as frozen dataclasses. The YAML is read and checked by
testbed/yamlcheck.py (no aliases, no duplicate keys, bounded size and depth).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import names, paths, yamlcheck
from .kernel import UserKernel, from_yaml as kernel_from_yaml
from .yamlcheck import Checker, ConfigError, Doc, fmt_path, typename

API_VERSION = "beluga.testbed/v1alpha1"
BUILTIN_DIR = Path(__file__).resolve().parent / "topologies"

# What the Linux CXL driver accepts (drivers/cxl: eiw/eig encodings).
KERNEL_WAYS = (1, 2, 3, 4, 6, 8, 12, 16)
KERNEL_GRANULARITIES = (256, 512, 1024, 2048, 4096, 8192, 16384)
DEVICE_SIZE_ALIGN_MIB = 256  # CXL decoders map in 256 MiB units
MAX_HOSTS = 8
# Windows and the devices behind them are mapped into each guest's physical address
# space: 40 bits (1 TiB) with TCG's `-cpu max`, shared with RAM and PCI.
MAX_SIZE_MIB = 512 << 10
ADDRESS_SPACE_WHY = "mapped into the guests' physical address space, 40 bits (1 TiB) under TCG, shared with RAM"
# QEMU places a host bridge's root ports, and a switch's downstream ports, at the next
# free device number of one PCI bus: 0-31.
MAX_PORTS = 32
# `sn` of cxl-type3 is a uint64; QEMU reads all ones as "no serial number".
MAX_SERIAL = (1 << 64) - 2
MAX_BUS = 255  # PCI bus numbers are 8 bits


@dataclass(frozen=True)
class Machine:
    """What this machine can give a testbed: topologies are checked against it."""
    cpus: int
    memory_mib: int
    pools_fs: str  # the folder whose file system holds the devices' backing files
    pools_fs_mib: int


def this_machine() -> Machine:
    """CPU cores (os.cpu_count), RAM (MemTotal in /proc/meminfo) and the size of the file
    system that holds the pools (BELUGA_TESTBED_POOLS, /dev/shm by default)."""
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    folder = paths.pool_dir()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
        fs_mib = st.f_blocks * st.f_frsize >> 20
    except OSError:
        fs_mib = 0
    return Machine(cpus=os.cpu_count() or 1, memory_mib=mem_kib >> 10, pools_fs=str(folder), pools_fs_mib=fs_mib)


class TopologyError(ConfigError):
    """Every mistake in one topology file; printed as 'invalid topology:' and one line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("topology", errors)


@dataclass(frozen=True)
class Host:
    name: str
    vcpus: int
    memory_mib: int


@dataclass(frozen=True)
class Device:
    id: str
    size_mib: int
    serial: int

    @property
    def size_bytes(self) -> int:
        return self.size_mib << 20


@dataclass(frozen=True)
class DownstreamPort:
    id: str
    index: int
    device: str | None


@dataclass(frozen=True)
class Switch:
    id: str
    ports: tuple[DownstreamPort, ...]


@dataclass(frozen=True)
class RootPort:
    id: str
    index: int
    switch: Switch | None
    device: str | None


@dataclass(frozen=True)
class HostBridge:
    id: str
    bus_nr: int
    root_ports: tuple[RootPort, ...]


@dataclass(frozen=True)
class Window:
    id: str
    size_mib: int
    targets: tuple[str, ...]
    granularity_bytes: int


@dataclass(frozen=True)
class Pool:
    window: str
    devices: tuple[str, ...]  # in interleave order: position i is devices[i]
    granularity_bytes: int


@dataclass(frozen=True)
class Topology:
    name: str
    description: str
    source: str
    hosts: tuple[Host, ...]
    host_bridges: tuple[HostBridge, ...]
    devices: tuple[Device, ...]
    windows: tuple[Window, ...]
    pool: Pool
    kernel: UserKernel | None = None  # the optional `kernel:` mapping: a user's kernel and QEMU

    def device(self, id: str) -> Device:
        return next(d for d in self.devices if d.id == id)

    def window(self, id: str) -> Window:
        return next(w for w in self.windows if w.id == id)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def pool_size_bytes(self) -> int:
        return sum(self.device(d).size_bytes for d in self.pool.devices)

    def host_bridge_of(self, device_id: str) -> str:
        for hb in self.host_bridges:
            for rp in hb.root_ports:
                if rp.device == device_id:
                    return hb.id
                if rp.switch and any(p.device == device_id for p in rp.switch.ports):
                    return hb.id
        raise KeyError(device_id)


# ---------------------------------------------------------------- YAML with lines

def _Doc(file: str, text: str) -> Doc:  # noqa: N802 - the Doc of `text`, its loader's errors as a TopologyError
    try:
        return yamlcheck.load(text, file, "topology")
    except ConfigError as e:
        raise TopologyError(e.errors) from None


# ---------------------------------------------------------------- loading

def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not p.is_file():
            raise TopologyError([f"{name_or_path}: no such topology file"])
        return p
    builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    hint = yamlcheck.did_you_mean(name_or_path, builtin_names())
    raise TopologyError([f"{name_or_path}: no built-in topology of that name ({hint}built in: "
                         f"{', '.join(builtin_names())}); give a path to use a file"])


def load(name_or_path: str, machine: Machine | None = None) -> Topology:
    """The topology of that built-in name or file, checked against `machine` (this one)."""
    path = resolve(name_or_path)
    shown = path.name if path.parent == BUILTIN_DIR else str(path)
    try:
        doc = yamlcheck.read(path, "topology", shown)
    except ConfigError as e:
        raise TopologyError(e.errors) from None
    return _check(doc, machine or this_machine())


def parse(text: str, file: str = "<topology>", machine: Machine | None = None, *,
          check_paths: bool = True) -> Topology:
    """`check_paths=False`: the `kernel:` paths are taken as they are (a running testbed's
    topology, read back from its state: the files may be gone since; it runs without them)."""
    return _check(_Doc(file, text), machine or this_machine(), check_paths)


def _check(doc: Doc, machine: Machine, check_paths: bool = True) -> Topology:
    file = doc.file
    c = Checker(doc, "topology")
    top = c.mapping(doc.data, (), {"apiVersion": str, "kind": str, "name": str, "hosts": object,
                                   "host_bridges": list, "devices": list, "windows": list, "pool": dict},
                    {"description": str, "kernel": dict})
    if top is None:
        raise TopologyError(c.errors)
    if top.get("apiVersion") not in (None, API_VERSION):
        c.err(("apiVersion",), f"expected '{API_VERSION}', got '{top['apiVersion']}'")
    if top.get("kind") not in (None, "Topology"):
        c.err(("kind",), f"expected 'Topology', got '{top['kind']}'")
    if "name" in top:
        c.name(top["name"], ("name",))

    hosts = _hosts(c, doc.data.get("hosts"), ("hosts",), machine) if "hosts" in doc.data else []
    devices = _devices(c, top.get("devices", []), machine)
    dev_ids = {d.id for d in devices}
    bridges, attached = _bridges(c, top.get("host_bridges", []), dev_ids)
    windows = _windows(c, top.get("windows", []), {b.id for b in bridges})
    pool = _pool(c, top.get("pool"), windows, devices, bridges, attached)

    # Unique ids across the whole fabric: they become QEMU ids and QOM paths.
    seen: dict[str, tuple] = {}
    all_ids: list[tuple[str, tuple]] = []
    for i, b in enumerate(bridges):
        all_ids.append((b.id, ("host_bridges", i, "id")))
        for j, rp in enumerate(b.root_ports):
            all_ids.append((rp.id, ("host_bridges", i, "root_ports", j, "id")))
            if rp.switch:
                all_ids.append((rp.switch.id, ("host_bridges", i, "root_ports", j, "switch", "id")))
                all_ids.extend((p.id, ("host_bridges", i, "root_ports", j, "switch")) for p in rp.switch.ports)
    all_ids += [(d.id, ("devices", i, "id")) for i, d in enumerate(devices)]
    all_ids += [(w.id, ("windows", i, "id")) for i, w in enumerate(windows)]
    for id_, path in all_ids:
        if id_ in seen:
            c.err(path, f"duplicate id '{id_}' (first used at line {doc.line(seen[id_])})")
        else:
            seen[id_] = path
    bus_nrs: dict[int, int] = {}
    for i, b in enumerate(bridges):
        if b.bus_nr in bus_nrs:
            c.err(("host_bridges", i, "bus_nr"), f"bus number {b.bus_nr} already used by host_bridges[{bus_nrs[b.bus_nr]}]")
        bus_nrs[b.bus_nr] = i
    _bus_ranges(c, bridges)
    kernel = kernel_from_yaml(c, top["kernel"], check_paths=check_paths) if "kernel" in top else None

    if c.errors:
        raise TopologyError(c.errors)
    return Topology(name=top["name"], description=top.get("description", ""), source=file,
                    hosts=tuple(hosts), host_bridges=tuple(bridges), devices=tuple(devices),
                    windows=tuple(windows), pool=pool, kernel=kernel)  # type: ignore[arg-type]


def _hosts(c: Checker, value: Any, path: tuple, machine: Machine) -> list[Host]:
    out: list[Host] = []
    if isinstance(value, dict):
        m = c.mapping(value, path, {"count": int}, {"vcpus": int, "memory_mib": int, "name_prefix": str})
        if m is None or "count" not in m:
            return out
        if not 1 <= m["count"] <= MAX_HOSTS:
            c.err(path + ("count",), f"expected 1 to {MAX_HOSTS} hosts, got {m['count']}")
            return out
        prefix = m.get("name_prefix", "host")
        made = [f"{prefix}{i}" for i in range(m["count"])]
        bad = next((why for n in made if (why := names.problem(n))), None)
        if bad:  # for example "invalid name 'Host_0': ..."
            c.err(path + ("name_prefix",), bad)
            return out
        # One spec for the values every host shares, so each mistake is reported once.
        specs = [({"name": made[0], "vcpus": m.get("vcpus", 1), "memory_mib": m.get("memory_mib", 1024)}, path)]
    elif isinstance(value, list):
        if not 1 <= len(value) <= MAX_HOSTS:
            c.err(path, f"expected 1 to {MAX_HOSTS} hosts, got {len(value)}")
            return out
        made = []
        specs = []
        for i, h in enumerate(value):
            m = c.mapping(h, path + (i,), {"name": str}, {"vcpus": int, "memory_mib": int})
            if m and "name" in m:
                specs.append(({"vcpus": 1, "memory_mib": 1024, **m}, path + (i,)))
    else:
        c.err(path, f"expected a mapping with 'count' or a list of hosts, got {typename(value)}")
        return out
    names_seen: set[str] = set()
    for spec, p in specs:
        if spec["vcpus"] < 1:
            c.err(p + ("vcpus",), f"expected at least 1 vCPU, got {spec['vcpus']}")
        elif spec["vcpus"] > machine.cpus:
            c.err(p + ("vcpus",), f"expected at most {machine.cpus} vCPUs (this machine has {machine.cpus} "
                                  f"CPU cores, os.cpu_count()), got {spec['vcpus']}")
        if spec["memory_mib"] < 512:
            c.err(p + ("memory_mib",), f"expected at least 512 MiB (the guest kernel and sshd need it), got {spec['memory_mib']}")
        elif spec["memory_mib"] > machine.memory_mib:
            c.err(p + ("memory_mib",), f"expected at most {machine.memory_mib} MiB (this machine's RAM, MemTotal "
                                       f"in /proc/meminfo), got {spec['memory_mib']}")
        if spec["name"] in names_seen:
            c.err(p + ("name",), f"duplicate host name '{spec['name']}'")
        if p != path:  # names made from name_prefix were checked above
            c.name(spec["name"], p + ("name",))
        names_seen.add(spec["name"])
        out += [Host(name=n, vcpus=spec["vcpus"], memory_mib=spec["memory_mib"]) for n in (made or [spec["name"]])]
    total = sum(h.memory_mib for h in out)
    if all(512 <= h.memory_mib <= machine.memory_mib for h in out) and total > machine.memory_mib:
        c.err(path, f"{len(out)} hosts need {total} MiB of memory together, more than this machine's "
                    f"{machine.memory_mib} MiB (MemTotal in /proc/meminfo)")
    return out


def _devices(c: Checker, value: list, machine: Machine) -> list[Device]:
    out = []
    serials: dict[int, int] = {}
    for i, d in enumerate(value):
        p = ("devices", i)
        m = c.mapping(d, p, {"id": str, "size_mib": int, "serial": int}, {})
        if not m or len(m) < 3:
            continue
        # A device with a bad id is left out: references to it are then reported too.
        ok = c.name(m["id"], p + ("id",))
        if m["size_mib"] <= 0 or m["size_mib"] % DEVICE_SIZE_ALIGN_MIB:
            c.err(p + ("size_mib",), f"expected a positive multiple of {DEVICE_SIZE_ALIGN_MIB} MiB "
                                     f"(CXL decoders map 256 MiB units), got {m['size_mib']}")
        elif m["size_mib"] > MAX_SIZE_MIB:
            c.err(p + ("size_mib",), f"expected at most {MAX_SIZE_MIB} MiB (a device is {ADDRESS_SPACE_WHY}), "
                                     f"got {m['size_mib']}")
        if not 0 <= m["serial"] <= MAX_SERIAL:
            c.err(p + ("serial",), f"expected a serial number from 0 to {MAX_SERIAL:#x} (64 bits; QEMU reads all "
                                   f"ones as none), got {m['serial']:#x}")
        elif m["serial"] in serials:
            c.err(p + ("serial",), f"serial {m['serial']:#x} already used by devices[{serials[m['serial']]}]: "
                                   "serial numbers tell the devices apart inside the guests")
        serials[m["serial"]] = i
        if ok:
            out.append(Device(id=m["id"], size_mib=m["size_mib"], serial=m["serial"]))
    need = sum(d.size_mib for d in out)
    if all(_size_ok(d.size_mib) for d in out) and need > machine.pools_fs_mib:
        c.err(("devices",), f"the devices' backing files need {need} MiB, more than the {machine.pools_fs_mib} MiB "
                            f"of the file system that holds the pools ({machine.pools_fs}; BELUGA_TESTBED_POOLS "
                            "chooses another folder)")
    return out


def _size_ok(mib: int) -> bool:
    return 0 < mib <= MAX_SIZE_MIB and mib % DEVICE_SIZE_ALIGN_MIB == 0


def _bridges(c: Checker, value: list, dev_ids: set[str]) -> tuple[list[HostBridge], dict[str, tuple]]:
    out = []
    attached: dict[str, tuple] = {}

    def attach(dev: str, path: tuple) -> None:
        if not c.name(dev, path):
            return
        if dev not in dev_ids:
            hint = yamlcheck.did_you_mean(dev, dev_ids)
            c.err(path, f"unknown device '{dev}' ({hint}known: {', '.join(sorted(dev_ids))})")
        elif dev in attached:
            c.err(path, f"device '{dev}' is already attached at {fmt_path(attached[dev])}")
        else:
            attached[dev] = path

    for i, b in enumerate(value):
        p = ("host_bridges", i)
        m = c.mapping(b, p, {"id": str, "bus_nr": int, "root_ports": list}, {})
        if not m or len(m) < 3:
            continue
        c.name(m["id"], p + ("id",))
        if not 1 <= m["bus_nr"] <= 254:
            c.err(p + ("bus_nr",), f"expected a PCI bus number 1..254, got {m['bus_nr']}")
        if len(m["root_ports"]) > MAX_PORTS:
            c.err(p + ("root_ports",), f"{len(m['root_ports'])} root ports: QEMU places a host bridge's root ports "
                                       f"at device numbers 0-{MAX_PORTS - 1} of its bus, at most {MAX_PORTS}")
        rps = []
        for j, rp in enumerate(m["root_ports"]):
            rpp = p + ("root_ports", j)
            r = c.mapping(rp, rpp, {"id": str}, {"switch": dict, "device": str})
            if not r or "id" not in r:
                continue
            c.name(r["id"], rpp + ("id",))
            if ("switch" in r) == ("device" in r):
                c.err(rpp, "expected exactly one of 'switch' or 'device' below a root port")
                continue
            sw = None
            if "device" in r:
                attach(r["device"], rpp + ("device",))
            else:
                sp = rpp + ("switch",)
                s = c.mapping(r["switch"], sp, {"id": str, "downstream_ports": int, "devices": list}, {})
                if not s or len(s) < 3:
                    continue
                n = s["downstream_ports"]
                if c.name(s["id"], sp + ("id",)) and 1 <= n <= MAX_PORTS \
                        and names.problem(f"{s['id']}-dsp{n - 1}"):
                    c.err(sp + ("id",), f"makes port id '{s['id']}-dsp{n - 1}', longer than {names.MAX_LEN} characters")
                if n < 1:
                    c.err(sp + ("downstream_ports",), f"expected at least 1 downstream port, got {n}")
                elif n > MAX_PORTS:
                    c.err(sp + ("downstream_ports",), f"expected at most {MAX_PORTS} downstream ports (QEMU places a "
                                                      f"switch's downstream ports at device numbers 0-{MAX_PORTS - 1} "
                                                      f"of its internal PCI bus), got {n}")
                elif len(s["devices"]) > n:
                    c.err(sp + ("devices",), f"{len(s['devices'])} devices below switch '{s['id']}' but only "
                                             f"{n} downstream ports")
                listed: list[str | None] = []
                for k, dev in enumerate(s["devices"]):
                    if not isinstance(dev, str):
                        c.err(sp + ("devices", k), f"expected a device id, got {typename(dev)}")
                        dev = None
                    else:
                        attach(dev, sp + ("devices", k))
                    listed.append(dev)
                ports = [DownstreamPort(id=f"{s['id']}-dsp{k}", index=k, device=listed[k] if k < len(listed) else None)
                         for k in range(min(max(n, 0), MAX_PORTS))]
                sw = Switch(id=s["id"], ports=tuple(ports))
            rps.append(RootPort(id=r["id"], index=j, switch=sw, device=r.get("device")))
        out.append(HostBridge(id=m["id"], bus_nr=m["bus_nr"], root_ports=tuple(rps)))
    for d in sorted(dev_ids - set(attached)):
        c.err(("devices",), f"device '{d}' is not attached to any root port or switch")
    return out, attached


def _bus_ranges(c: Checker, bridges: list[HostBridge]) -> None:
    """The buses below a host bridge are numbered from its bus_nr up: one for each root
    port, switch (its internal bus) and downstream port. They must stay within 8 bits and
    not run into the next host bridge's."""
    spans = []
    for i, b in enumerate(bridges):
        below = sum(1 + (1 + len(rp.switch.ports) if rp.switch else 0) for rp in b.root_ports)
        spans.append((b.bus_nr, b.bus_nr + below, i, b))
        if 1 <= b.bus_nr and b.bus_nr + below > MAX_BUS:
            c.err(("host_bridges", i, "bus_nr"), f"host bridge '{b.id}' needs buses {b.bus_nr} to {b.bus_nr + below} "
                                                 f"(one per root port, switch and downstream port), past {MAX_BUS}: "
                                                 "PCI bus numbers are 8 bits")
    spans.sort(key=lambda s: s[:2])
    for (lo, hi, _, b), (lo2, _, i2, b2) in zip(spans, spans[1:]):
        if lo < lo2 <= hi:
            c.err(("host_bridges", i2, "bus_nr"), f"bus {lo2} of host bridge '{b2.id}' is among the buses {lo} to {hi} "
                                                  f"that host bridge '{b.id}' needs (one per root port, switch and "
                                                  "downstream port)")


def _check_granularity(c: Checker, path: tuple, g: int) -> None:
    if g not in KERNEL_GRANULARITIES:
        c.err(path, f"expected a power of two the kernel accepts ({', '.join(map(str, KERNEL_GRANULARITIES))}), got {g}")


def _windows(c: Checker, value: list, bridge_ids: set[str]) -> list[Window]:
    out = []
    for i, w in enumerate(value):
        p = ("windows", i)
        m = c.mapping(w, p, {"id": str, "size_mib": int, "targets": list, "granularity_bytes": int}, {})
        if not m or len(m) < 4:
            continue
        c.name(m["id"], p + ("id",))
        if m["size_mib"] <= 0 or m["size_mib"] % DEVICE_SIZE_ALIGN_MIB:
            c.err(p + ("size_mib",), f"expected a positive multiple of {DEVICE_SIZE_ALIGN_MIB} MiB, got {m['size_mib']}")
        elif m["size_mib"] > MAX_SIZE_MIB:
            c.err(p + ("size_mib",), f"expected at most {MAX_SIZE_MIB} MiB (a window is {ADDRESS_SPACE_WHY}), "
                                     f"got {m['size_mib']}")
        _check_granularity(c, p + ("granularity_bytes",), m["granularity_bytes"])
        targets = m["targets"]
        for k, t in enumerate(targets):
            if not isinstance(t, str):
                c.err(p + ("targets", k), f"expected a host bridge id, got {typename(t)}")
                targets = []  # nothing below is checked against this window
            elif not c.name(t, p + ("targets", k)):
                targets = []
            elif t not in bridge_ids:
                c.err(p + ("targets", k), f"unknown host bridge '{t}' (known: {', '.join(sorted(bridge_ids))})")
        if len(m["targets"]) not in KERNEL_WAYS:
            c.err(p + ("targets",), f"{len(m['targets'])} targets: interleave ways the kernel accepts are "
                                    f"{', '.join(map(str, KERNEL_WAYS))}")
        out.append(Window(id=m["id"], size_mib=m["size_mib"], targets=tuple(targets),
                          granularity_bytes=m["granularity_bytes"]))
    return out


def _pool(c: Checker, value: Any, windows: list[Window], devices: list[Device],
          bridges: list[HostBridge], attached: dict[str, tuple]) -> Pool | None:
    p = ("pool",)
    m = c.mapping(value, p, {"window": str, "devices": list, "granularity_bytes": int}, {})
    if not m or len(m) < 3:
        return None
    win = next((w for w in windows if w.id == m["window"]), None)
    if not c.name(m["window"], p + ("window",)):
        pass
    elif win is None:
        c.err(p + ("window",), f"unknown window '{m['window']}' (known: {', '.join(w.id for w in windows)})")
    by_id = {d.id: d for d in devices}
    devs = m["devices"]
    for k, d in enumerate(devs):
        if not isinstance(d, str):
            c.err(p + ("devices", k), f"expected a device id, got {typename(d)}")
        elif not c.name(d, p + ("devices", k)):
            pass
        elif d not in by_id:
            c.err(p + ("devices", k), f"unknown device '{d}' (known: {', '.join(sorted(by_id))})")
    if not all(isinstance(d, str) for d in devs):
        _check_granularity(c, p + ("granularity_bytes",), m["granularity_bytes"])
        return None
    if len(set(devs)) != len(devs):
        c.err(p + ("devices",), "a device appears twice in the pool")
    ways = len(devs)
    if ways not in KERNEL_WAYS:
        c.err(p + ("devices",), f"{ways} devices: interleave ways the kernel accepts are {', '.join(map(str, KERNEL_WAYS))}")
    _check_granularity(c, p + ("granularity_bytes",), m["granularity_bytes"])
    known = [d for d in devs if d in by_id]
    if win and win.targets and known and len(known) == ways and all(_size_ok(by_id[d].size_mib) for d in known):
        sizes = {by_id[d].size_mib for d in known}
        if len(sizes) > 1:
            c.err(p + ("devices",), f"interleaved devices must have one size, got {sorted(sizes)} MiB")
        need = sum(by_id[d].size_mib for d in known)
        if need > win.size_mib:
            c.err(p + ("window",), f"window '{win.id}' is {win.size_mib} MiB, too small for the pool's {need} MiB")
        hb_of = {}
        for b in bridges:
            for rp in b.root_ports:
                for dev in ([rp.device] if rp.device else [pt.device for pt in rp.switch.ports if pt.device]):
                    hb_of[dev] = b.id
        wways = len(win.targets)
        if ways % wways:
            c.err(p + ("devices",), f"{ways} devices cannot be spread evenly over the window's {wways} host bridges")
        else:
            # Position i must sit below the window's target (i mod window ways):
            # that is how the host bridges split the address space.
            for k, d in enumerate(known):
                want = win.targets[k % wways]
                if d in hb_of and hb_of[d] != want:
                    c.err(p + ("devices", k), f"interleave position {k} must be a device below host bridge "
                                              f"'{want}' (window '{win.id}' target {k % wways}), "
                                              f"but '{d}' is below '{hb_of[d]}'")
        if wways > 1 and m["granularity_bytes"] != win.granularity_bytes:
            c.err(p + ("granularity_bytes",), f"expected {win.granularity_bytes} (the window's): the kernel requires "
                                              "the region granularity to equal the window's when the window "
                                              "interleaves host bridges")
        if m["granularity_bytes"] in KERNEL_GRANULARITIES and m["granularity_bytes"] < win.granularity_bytes:
            c.err(p + ("granularity_bytes",), f"expected at least the window's {win.granularity_bytes}")
    return Pool(window=m["window"], devices=tuple(devs), granularity_bytes=m["granularity_bytes"])


# ---------------------------------------------------------------- drawing

def draw(t: Topology, pool_files: dict[str, str] | None = None) -> str:
    """The tree: hosts -> host bridge -> root port -> switch -> port -> device -> backing file."""
    pool_files = pool_files or {}
    lines = [f"{t.name}: {len(t.hosts)} host(s) ({', '.join(h.name for h in t.hosts)}), "
             f"each {t.hosts[0].vcpus} vCPU / {t.hosts[0].memory_mib} MiB, every host sees this fabric:"]

    def dev_line(dev_id: str) -> str:
        d = t.device(dev_id)
        f = pool_files.get(dev_id, f"<pools>/{dev_id}.raw")
        role = f" [pool position {t.pool.devices.index(dev_id)}]" if dev_id in t.pool.devices else ""
        return f"{d.id} (type-3 volatile, {d.size_mib} MiB, serial {d.serial:#x}){role} -> {f}"

    for bi, hb in enumerate(t.host_bridges):
        last_b = bi == len(t.host_bridges) - 1
        lines.append(f"{'└' if last_b else '├'}── {hb.id} (host bridge, bus {hb.bus_nr})")
        pre_b = "    " if last_b else "│   "
        for ri, rp in enumerate(hb.root_ports):
            last_r = ri == len(hb.root_ports) - 1
            lines.append(f"{pre_b}{'└' if last_r else '├'}── {rp.id} (root port {rp.index})")
            pre_r = pre_b + ("    " if last_r else "│   ")
            if rp.device:
                lines.append(f"{pre_r}└── {dev_line(rp.device)}")
                continue
            sw = rp.switch
            assert sw is not None
            lines.append(f"{pre_r}└── {sw.id} (switch, {len(sw.ports)} downstream ports)")
            pre_s = pre_r + "    "
            for pi, port in enumerate(sw.ports):
                last_p = pi == len(sw.ports) - 1
                lines.append(f"{pre_s}{'└' if last_p else '├'}── {port.id}")
                if port.device:
                    lines.append(f"{pre_s}{'    ' if last_p else '│   '}└── {dev_line(port.device)}")
    for w in t.windows:
        lines.append(f"window {w.id}: {w.size_mib} MiB over {', '.join(w.targets)}, granularity {w.granularity_bytes}")
    lines.append(f"pool: {len(t.pool.devices)}-way over {', '.join(t.pool.devices)}, granularity "
                 f"{t.pool.granularity_bytes}, {t.pool_size_bytes >> 20} MiB, in window {t.pool.window}")
    return "\n".join(lines)
