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

from . import paths, ssh
from . import reset as reset_mod
from .log import TestbedError, step
from .par import map_parallel
from .state import PoolHost, PoolState
from .topology import Topology

GUEST_SCRIPT = Path(__file__).parent / "guest" / "pool.py"
POOL_ARGS_FILE = "pool-args.json"  # in the testbed's state folder; the guests read it through fw_cfg
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
    cmd = f"python3 -S -c {shlex.quote(script)} {verb} {shlex.quote(json.dumps(args))}"
    return ssh.run_json(h, tb.key, cmd, what=f"pool {verb}", timeout_s=timeout_s)


def signing_plan(t: Topology) -> dict:
    """Which host writes the verification signatures, where and what: the first host,
    a fresh nonce, the sampled offsets."""
    nonce = os.urandom(8).hex().encode()
    offsets = sample_offsets(t)
    return {"host": t.hosts[0].name, "offsets": offsets, "length": SIGNATURE_BYTES,
            "data": [signature(nonce, o).hex() for o in offsets]}


def pool_args(t: Topology, order: list[str] | None = None, sign: dict | None = None) -> dict:
    """What the guest side (guest_pool.py create) needs: targets by serial, in order, and
    (at boot) the signatures that one host writes once its region is up."""
    serial_of = {d.id: d.serial for d in t.devices}
    args = {"serials": [serial_of[d] for d in (order or t.pool.devices)],
            "granularity": t.pool.granularity_bytes,
            "window_index": [w.id for w in t.windows].index(t.pool.window)}
    if sign:
        args["sign"] = sign
    return args


# What the guest's boot script says on the console once its region is made (or not):
# images/rootfs/usr/lib/beluga/boot. The host waits for it on the serial log, which costs
# the guest nothing, where polling over SSH would spend its one vCPU on execs.
POOL_READY, POOL_FAILED = b"beluga: pool ready", b"beluga: pool failed"
BOOT_POOL_TIMEOUT_S = 150
FW_GUEST_SCRIPT = "/sys/firmware/qemu_fw_cfg/by_name/opt/beluga/guest_pool.py/raw"


def _collect_at_boot(tb, sign: dict) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """One SSH call per host once its console says the region is made: the region and, on
    every host but the writer (once the writer's console says so too: its signatures are
    then in place), the bytes at the signed offsets."""
    writer = tb.host(sign["host"])
    hosts = tb.hosts
    reset_start = reset_mod.start_command(reset_mod.helper_token(tb))

    def collect(h):
        try:
            h.wait_said(POOL_READY, failed=POOL_FAILED, timeout_s=BOOT_POOL_TIMEOUT_S)
        except TestbedError:
            if not h.said(POOL_FAILED):
                raise
            err = ssh.run(h.name, h.ssh_port, tb.key, "cat /run/beluga/pool.err")
            raise TestbedError(f"{h.name}: pool create at boot failed: {err.stdout.strip() or err.why}") from None
        reads = h.name != writer.name or len(hosts) == 1
        if reads:
            # The writer's own collect() reports why, should its region fail.
            writer.wait_said(POOL_READY, failed=POOL_FAILED, timeout_s=BOOT_POOL_TIMEOUT_S)
        args = {"offsets": sign["offsets"], "length": sign["length"]} if reads else {}
        # The same call starts the guest's reset helper, in the background (testbed/reset.py).
        r = ssh.run_json(h, tb.key, f"{reset_start}python3 -S {FW_GUEST_SCRIPT} report {shlex.quote(json.dumps(args))}",
                         what="pool create at boot", timeout_s=60)
        return h.name, r

    out = dict(map_parallel(collect, hosts))
    reset_mod.forward_helpers(tb)
    return {n: r["region"] for n, r in out.items()}, {n: r["data"] for n, r in out.items() if "data" in r}


def provision(tb, *, order_override: dict[str, list[str]] | None = None, at_boot: bool = False):
    """Create and verify the pool on every host of a running testbed (a state.TestbedState);
    records the result in the testbed's state.json (each host `ready` once verified) and
    returns the testbed's new state (its `pool` that result). With `at_boot`, the guests already create the region while
    booting and this collects their results. `order_override` (host -> device ids)
    exists to prove that verification catches a wrong target order."""
    t: Topology = tb.topology
    hosts = tb.hosts

    sign, reads = None, None
    if at_boot and not order_override:
        sign = json.loads((tb.dir / POOL_ARGS_FILE).read_text()).get("sign")

    with step(f"pool: {len(t.pool.devices)}-way RAM region in devdax mode on {len(hosts)} host(s)"):
        if sign:
            regions, reads = _collect_at_boot(tb, sign)
        else:
            regions = dict(zip([h.name for h in hosts], map_parallel(
                lambda h: _guest(tb, h, "create", pool_args(t, (order_override or {}).get(h.name))), hosts)))
        for name, r in regions.items():
            if r["size_bytes"] != t.pool_size_bytes or r["ways"] != len(t.pool.devices):
                raise TestbedError(f"{name}: region {r['region']} is {r['size_bytes']} bytes, {r['ways']}-way; "
                                   f"expected {t.pool_size_bytes} bytes, {len(t.pool.devices)}-way")
            if r["dax_mode"] != "devdax":
                raise TestbedError(f"{name}: {r['dax']} is in mode {r['dax_mode']}, expected devdax")
            if r["system_ram_cxl"]:
                raise TestbedError(f"{name}: CXL memory shows up as System RAM (kmem) in /proc/iomem")
    pool = PoolState({n: PoolHost.from_report(r) for n, r in regions.items()})
    tb = tb.with_pool(pool).save()
    with step(f"pool: verify the mapping across {len(hosts)} host(s) and the backing files"):
        verify(tb, regions, sign, reads)
    return tb.with_pool(pool.ready()).save()


def verify(tb, regions: dict[str, dict], sign: dict | None = None,
           reads: dict[str, list[str]] | None = None) -> None:
    """One host's signatures (written at boot by `sign`'s host, or now over SSH) must read
    back identically on every other host (`reads`, when collected at boot, else read now),
    and sit in the backing files where the interleave arithmetic puts them. The host
    machine then zeroes them in those files."""
    t: Topology = tb.topology
    hosts = tb.hosts
    if sign is None or regions[sign["host"]].get("signed") != len(sign["offsets"]):
        sign, reads = signing_plan(t), None
        writer = tb.host(sign["host"])
        _guest(tb, writer, "write", {**sign, "dax": regions[writer.name]["dax"]})
    writer = tb.host(sign["host"])
    offsets = sign["offsets"]
    sigs = {o: bytes.fromhex(d) for o, d in zip(offsets, sign["data"])}
    common = {"offsets": offsets, "length": SIGNATURE_BYTES}
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
        others = [h for h in hosts if h.name != writer.name] or [writer]
        got_back = [(h, reads[h.name]) for h in others] if reads else map_parallel(read, others)
        for h, data in got_back:
            for o, hx in zip(offsets, data):
                got = bytes.fromhex(hx)
                if got != sigs[o]:
                    loc = locate(t, tb.pool_files, o)
                    errors.append(f"{h.name} at region offset {o:#x}: expected what {writer.name} wrote there "
                                  f"(device {loc.device}, serial {loc.serial:#x}), found {where(got)}")
        # From the host machine: the bytes must sit where the interleave arithmetic says.
        for o in offsets:
            loc = locate(t, tb.pool_files, o)
            with paths.open_nofollow(loc.file, "rb") as f:
                f.seek(loc.file_offset)
                got = f.read(SIGNATURE_BYTES)
            if got != sigs[o]:
                errors.append(f"backing file {loc.file} at {loc.file_offset:#x} (device {loc.device}, position "
                              f"{loc.position}) should hold region offset {o:#x} as written by {writer.name}, "
                              f"found {where(got)}")
    finally:
        # The guests map the backing files (share=on): zeroing the bytes there zeroes them
        # for every host, without another round over SSH.
        for o in offsets:
            loc = locate(t, tb.pool_files, o)
            with paths.open_nofollow(loc.file, "r+b") as f:
                f.seek(loc.file_offset)
                f.write(bytes(SIGNATURE_BYTES))
        if errors:  # the writer's bytes may sit elsewhere: clear them through its own mapping too
            _guest(tb, writer, "clear", {**common, "dax": regions[writer.name]["dax"]})
    if errors:
        shown = errors[:12] + ([f"... and {len(errors) - 12} more"] if len(errors) > 12 else [])
        raise TestbedError("pool verification failed: hosts do not map the same bytes\n  " + "\n  ".join(shown),
                           hint="the region's target order differs between hosts")


def pool_table(tb) -> dict:
    """What `beluga-testbed pool` prints: geometry, per-host dax, and offset -> device -> file."""
    t: Topology = tb.topology
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
        "hosts": {name: {"region": r.region, "dax": r.dax, "dax_mode": r.dax_mode, "ready": r.ready,
                         "targets": list(r.targets) if r.targets is not None else None}
                  for name, r in (tb.pool.hosts.items() if tb.pool else ())},
        "map": rows,
    }
