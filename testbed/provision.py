"""The shared pool inside the guests: one RAM region per host in devdax mode, the same
target order everywhere (by serial number: guest memN names are not stable), then a
verification that every host decodes every region offset to the same backing bytes.
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from . import ssh
from .log import TestbedError, step
from .par import map_parallel
from .topology import Topology

GUEST_SCRIPT = Path(__file__).with_name("guest_pool.py")
SIGNATURE_BYTES = 64
ROUNDS = 2  # every interleave position is sampled this many times, in different strides


@dataclass(frozen=True)
class Location:
    """Where a region offset lives: interleave position, device, backing file and offset."""
    region_offset: int
    position: int
    device: str
    serial: int
    file: Path
    file_offset: int


def locate(t: Topology, pool_files: dict[str, Path], offset: int) -> Location:
    """The interleave arithmetic: with N ways and granularity g, region offset o is on
    position (o // g) % N at device offset (o // (g * N)) * g + o % g. It holds across
    host bridges too, because position i sits below window target i mod (window ways)."""
    g, n = t.pool.granularity_bytes, len(t.pool.devices)
    pos = (offset // g) % n
    dev = t.device(t.pool.devices[pos])
    return Location(offset, pos, dev.id, dev.serial, pool_files[dev.id], (offset // (g * n)) * g + offset % g)


def sample_offsets(t: Topology) -> list[int]:
    """One offset in every interleave granule of the first ROUNDS stripes, plus granules
    spread over the whole pool and the last granule: every target, near and far."""
    g, n = t.pool.granularity_bytes, len(t.pool.devices)
    size = t.pool_size_bytes
    offs = [i * g for i in range(n * ROUNDS)]
    stripe = g * n
    stripes = size // stripe
    for k in (stripes // 3, (2 * stripes) // 3, stripes - 1):
        offs += [k * stripe + i * g + (i * 64) % g for i in range(n)]
    return sorted(set(o for o in offs if o + SIGNATURE_BYTES <= size))


def signature(nonce: bytes, offset: int) -> bytes:
    s = b"BELUGA-VERIFY:" + nonce + b":" + offset.to_bytes(8, "little")
    return s + bytes(SIGNATURE_BYTES - len(s))


def _guest(tb, h, verb: str, args: dict, timeout_s: float = 120) -> dict:
    script = GUEST_SCRIPT.read_text()
    cmd = f"python3 -c {shlex.quote(script)} {verb} {shlex.quote(json.dumps(args))}"
    return ssh.run_json(h, tb.key, cmd, what=f"pool {verb}", timeout_s=timeout_s)


def pool_args(t: Topology, order: list[str] | None = None) -> dict:
    """What the guest side (guest_pool.py create) needs: targets by serial, in order."""
    serial_of = {d.id: d.serial for d in t.devices}
    return {"serials": [serial_of[d] for d in (order or t.pool.devices)],
            "granularity": t.pool.granularity_bytes,
            "window_index": [w.id for w in t.windows].index(t.pool.window)}


# Waits for the region that the guest's boot script creates (images/rootfs/usr/lib/beluga/boot).
_BOOT_RESULT = ("for i in $(seq 1200); do "
                "[ -s /run/beluga/pool.json ] && exec cat /run/beluga/pool.json; "
                "[ -s /run/beluga/pool.err ] && { cat /run/beluga/pool.err >&2; exit 1; }; "
                "sleep 0.1; done; echo 'no pool after 120 s' >&2; exit 1")


def provision(tb, *, order_override: dict[str, list[str]] | None = None, at_boot: bool = False) -> dict:
    """Create and verify the pool on every host of a running testbed; records the result
    in the testbed's state. With `at_boot`, the guests already create the region while
    booting and this collects their results. `order_override` (host -> device ids)
    exists to prove that verification catches a wrong target order."""
    t: Topology = tb.topology
    hosts = tb.hosts

    def create(h):
        order = (order_override or {}).get(h.name)
        if at_boot and order is None:
            return ssh.run_json(h, tb.key, _BOOT_RESULT, what="pool create at boot", timeout_s=150)
        return _guest(tb, h, "create", pool_args(t, order))

    with step(f"pool: {len(t.pool.devices)}-way RAM region in devdax mode on {len(hosts)} host(s)"):
        regions = dict(zip([h.name for h in hosts], map_parallel(create, hosts)))
        for name, r in regions.items():
            if r["size_bytes"] != t.pool_size_bytes or r["ways"] != len(t.pool.devices):
                raise TestbedError(f"{name}: region {r['region']} is {r['size_bytes']} bytes, {r['ways']}-way; "
                                   f"expected {t.pool_size_bytes} bytes, {len(t.pool.devices)}-way")
            if r["dax_mode"] != "devdax":
                raise TestbedError(f"{name}: {r['dax']} is in mode {r['dax_mode']}, expected devdax")
            if r["system_ram_cxl"]:
                raise TestbedError(f"{name}: CXL memory shows up as System RAM (kmem) in /proc/iomem")
    pool = {"hosts": {n: {**r, "ready": False} for n, r in regions.items()}}
    tb.data["pool"] = pool
    tb.save()
    with step(f"pool: verify the mapping across {len(hosts)} host(s) and the backing files"):
        verify(tb, regions)
    for n in pool["hosts"]:
        pool["hosts"][n]["ready"] = True
    tb.data["pool"] = pool
    tb.save()
    return pool


def verify(tb, regions: dict[str, dict]) -> None:
    t: Topology = tb.topology
    hosts = tb.hosts
    writer = hosts[0]
    offsets = sample_offsets(t)
    nonce = os.urandom(8).hex().encode()
    sigs = {o: signature(nonce, o) for o in offsets}
    common = {"offsets": offsets, "length": SIGNATURE_BYTES}
    _guest(tb, writer, "write", {**common, "dax": regions[writer.name]["dax"],
                                 "data": [sigs[o].hex() for o in offsets]})
    errors: list[str] = []
    by_sig = {s: o for o, s in sigs.items()}

    def where(data: bytes) -> str:
        if data in by_sig:
            o = by_sig[data]
            loc = locate(t, tb.pool_files, o)
            return f"the bytes {writer.name} wrote at offset {o:#x} (device {loc.device}, serial {loc.serial:#x})"
        return "zeros" if not any(data) else "unknown bytes"

    def read(h):
        return h, _guest(tb, h, "read", {**common, "dax": regions[h.name]["dax"]})["data"]

    try:
        for h, data in map_parallel(read, hosts[1:] if len(hosts) > 1 else hosts):
            for o, hx in zip(offsets, data):
                got = bytes.fromhex(hx)
                if got != sigs[o]:
                    loc = locate(t, tb.pool_files, o)
                    errors.append(f"{h.name} at region offset {o:#x}: expected what {writer.name} wrote there "
                                  f"(device {loc.device}, serial {loc.serial:#x}), found {where(got)}")
        # From the host machine: the bytes must sit where the interleave arithmetic says.
        for o in offsets:
            loc = locate(t, tb.pool_files, o)
            with open(loc.file, "rb") as f:
                f.seek(loc.file_offset)
                got = f.read(SIGNATURE_BYTES)
            if got != sigs[o]:
                errors.append(f"backing file {loc.file} at {loc.file_offset:#x} (device {loc.device}, position "
                              f"{loc.position}) should hold region offset {o:#x} as written by {writer.name}, "
                              f"found {where(got)}")
    finally:
        _guest(tb, writer, "clear", {**common, "dax": regions[writer.name]["dax"]})
    if errors:
        shown = errors[:12] + ([f"... and {len(errors) - 12} more"] if len(errors) > 12 else [])
        raise TestbedError("pool verification failed: hosts do not map the same bytes\n  " + "\n  ".join(shown),
                           hint="the region's target order differs between hosts")


def pool_table(tb) -> dict:
    """What `beluga-testbed pool` prints: geometry, per-host dax, and offset -> device -> file."""
    t: Topology = tb.topology
    pool = tb.data.get("pool") or {}
    g, n = t.pool.granularity_bytes, len(t.pool.devices)
    rows = []
    for i in range(n):
        loc = locate(t, tb.pool_files, i * g)
        rows.append({"region_offset": loc.region_offset, "position": loc.position, "device": loc.device,
                     "serial": loc.serial, "file": str(loc.file), "file_offset": loc.file_offset})
    return {
        "name": tb.name, "size_bytes": t.pool_size_bytes, "ways": n, "granularity_bytes": g,
        "window": t.pool.window, "stripe_bytes": g * n,
        "rule": f"region offset o -> position (o // {g}) % {n}, device offset (o // {g * n}) * {g} + o % {g}",
        "hosts": {name: {k: r.get(k) for k in ("region", "dax", "dax_mode", "ready", "targets")}
                  for name, r in (pool.get("hosts") or {}).items()},
        "map": rows,
    }
