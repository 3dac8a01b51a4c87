"""Provisioning's host side with fake guests at the SSH boundary and real backing files.

A fake guest answers the commands that testbed/provision.py sends over SSH
(guest_pool.py create/write/read/clear/report) the way a real guest's devdax region
would: region offset o is at interleave position (o // g) % N, in that position's
device, whose bytes are the device's backing file on this machine. Each fake host
has its own target order, so a host that builds its region in the wrong order (or all
hosts in the same wrong order) is a host that maps different bytes.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from testbed import provision as P
from testbed import topology as T
from testbed.log import TestbedError
from testbed.ssh import Result
from testbed.state import TestbedState


class FakeGuests:
    """The SSH boundary: every guest's answer to guest_pool.py, over the real backing files."""

    def __init__(self, t: T.Topology, pool_files: dict[str, Path], orders: dict[str, list[str]]) -> None:
        self.t = t
        self.pool_files = pool_files
        self.orders = orders  # host -> device ids in the order its region interleaves them
        self.calls: list[tuple[str, str, dict]] = []
        self.region_overrides: dict[str, dict] = {}
        self.fail: dict[tuple[str, str], str] = {}  # (host, verb) -> why
        self.written: set[tuple[Path, int]] = set()  # every (backing file, offset) a guest wrote

    def _where(self, host: str, offset: int) -> tuple[Path, int]:
        g, order = self.t.pool.granularity_bytes, self.orders[host]
        n = len(order)
        return self.pool_files[order[(offset // g) % n]], (offset // (g * n)) * g + offset % g

    def _write(self, host: str, offsets, length, data) -> int:
        for o, hx in zip(offsets, data):
            f, at = self._where(host, o)
            self.written.add((f, at))
            with open(f, "r+b") as fh:
                fh.seek(at)
                fh.write(bytes.fromhex(hx)[:length])
        return len(offsets)

    def _read(self, host: str, offsets, length) -> list[str]:
        out = []
        for o in offsets:
            f, at = self._where(host, o)
            with open(f, "rb") as fh:
                fh.seek(at)
                out.append(fh.read(length).hex())
        return out

    def region(self, host: str, args: dict | None = None) -> dict:
        serial_to_id = {d.serial: d.id for d in self.t.devices}
        if args is not None and "serials" in args:
            self.orders[host] = [serial_to_id[s] for s in args["serials"]]
        r = {"region": "region0", "size_bytes": self.t.pool_size_bytes, "ways": len(self.t.pool.devices),
             "granularity_bytes": self.t.pool.granularity_bytes, "dax": "/dev/dax0.0", "dax_mode": "devdax",
             "targets": [f"mem{i}" for i in range(len(self.t.pool.devices))], "decoder": "decoder0.0",
             "system_ram_cxl": False, "signed": 0}
        r.update(self.region_overrides.get(host, {}))
        return r

    def run_json(self, h, key, command, *, what, timeout_s=120):
        argv = shlex.split(command)
        verb, args = argv[-2], json.loads(argv[-1])
        self.calls.append((h.name, verb, args))
        if (h.name, verb) in self.fail:
            raise TestbedError(f"{h.name}: {what} failed: {self.fail[(h.name, verb)]}")
        if verb == "create":
            return self.region(h.name, args)
        if verb == "write":
            return {"written": self._write(h.name, args["offsets"], args["length"], args["data"])}
        if verb == "read":
            return {"data": self._read(h.name, args["offsets"], args["length"])}
        if verb == "clear":
            n = len(args["offsets"])
            return {"written": self._write(h.name, args["offsets"], args["length"], ["00" * args["length"]] * n)}
        if verb == "report":
            out = {"region": self.region(h.name)}
            if args.get("offsets"):
                out["data"] = self._read(h.name, args["offsets"], args["length"])
            return out
        raise AssertionError(f"unexpected guest command {verb}")

    def verbs(self, host: str | None = None) -> list[str]:
        return [v for h, v, _ in self.calls if host is None or h == host]


def make_testbed(tmp_path: Path, topology: str) -> TestbedState:
    """A real Testbed object (state in tmp_path) whose hosts are not running."""
    t = T.load(topology)
    pools = tmp_path / "pools"
    pools.mkdir()
    files = {}
    for d in t.devices:
        f = pools / f"{d.id}.raw"
        with open(f, "wb") as fh:
            fh.truncate(d.size_bytes)  # sparse, like lifecycle's
        files[d.id] = str(f)
    hosts = []
    for i, h in enumerate(t.hosts):
        hd = tmp_path / h.name
        hd.mkdir()
        hosts.append({"name": h.name, "pid": None, "ssh_port": 10022 + i, "dir": str(hd), "argv": []})
    data = {"name": "tb", "topology": t.name, "topology_source": t.source,
            "topology_yaml": T.resolve(topology).read_text(), "pool_files": files, "hosts": hosts, "pool": None,
            "accel": "tcg", "image": "k1", "created_at": "2026-01-01T00:00:00+0000", "pool_dir": str(pools)}
    return TestbedState.from_json(data, tmp_path).save()


def guests_for(tb: TestbedState, monkeypatch, orders: dict[str, list[str]] | None = None) -> FakeGuests:
    t = tb.topology
    g = FakeGuests(t, tb.pool_files, orders or {h.name: list(t.pool.devices) for h in tb.hosts})
    monkeypatch.setattr(P.ssh, "run_json", g.run_json)
    return g


def left_in_backing_files(g: FakeGuests) -> list[tuple[Path, int]]:
    """The places a guest wrote to that do not hold zeros now (the files are large and sparse)."""
    out = []
    for f, at in sorted(g.written):
        with open(f, "rb") as fh:
            fh.seek(at)
            if any(fh.read(P.SIGNATURE_BYTES)):
                out.append((f, at))
    return out


@pytest.fixture(params=["2hosts-1switch", "2hosts-2switches", "4hosts-1switch"])
def tb(request, tmp_path):
    return make_testbed(tmp_path, request.param)


# ------------------------------------------------------------ arithmetic

def test_locate_follows_the_interleave_rule(tmp_path):
    tb = make_testbed(tmp_path, "2hosts-2switches")  # positions mem0, mem2, mem1, mem3; g = 4096
    t, files = tb.topology, tb.pool_files
    want = {0: ("mem0", 0), 4096: ("mem2", 0), 8192: ("mem1", 0), 12288: ("mem3", 0),
            16384 + 5: ("mem0", 4096 + 5), 4 * 16384 + 4096 + 100: ("mem2", 4 * 4096 + 100)}
    for offset, (dev, file_offset) in want.items():
        loc = P.locate(t, files, offset)
        assert (loc.device, loc.file, loc.file_offset) == (dev, files[dev], file_offset)
        assert loc.position == t.pool.devices.index(dev) and loc.serial == t.device(dev).serial


def test_sample_offsets_reach_every_position_near_and_far(tb):
    t = tb.topology
    g, n = t.pool.granularity_bytes, len(t.pool.devices)
    offs = P.sample_offsets(t)
    assert offs == sorted(set(offs))
    positions = [(o // g) % n for o in offs]
    for pos in range(n):
        assert positions.count(pos) >= P.ROUNDS + 3  # the first rounds, then three stripes spread out
    assert max(offs) // (g * n) == t.pool_size_bytes // (g * n) - 1, "the last stripe is sampled"
    assert max(offs) + P.SIGNATURE_BYTES <= t.pool_size_bytes
    assert min(offs) == 0


def test_signatures_differ_by_offset_and_nonce():
    a, b = P.signature(b"n1", 0), P.signature(b"n1", 4096)
    assert len(a) == len(b) == P.SIGNATURE_BYTES and a != b and P.signature(b"n2", 0) != a
    assert a.startswith(b"BELUGA-VERIFY:n1:")


def test_signing_plan_is_the_first_host_writing_every_sampled_offset(tmp_path):
    t = T.load("2hosts-1switch")
    plan, again = P.signing_plan(t), P.signing_plan(t)
    assert plan["host"] == "host0" and plan["offsets"] == P.sample_offsets(t) and plan["length"] == P.SIGNATURE_BYTES
    assert len(plan["data"]) == len(plan["offsets"]) and len(set(plan["data"])) == len(plan["data"])
    assert plan["data"] != again["data"], "a fresh nonce every time: an old run's bytes never pass"


def test_pool_args_give_targets_by_serial_in_pool_order():
    t = T.load("2hosts-2switches")
    args = P.pool_args(t)
    assert args["serials"] == [0x1000, 0x1002, 0x1001, 0x1003]  # mem0, mem2, mem1, mem3
    assert args["granularity"] == 4096 and args["window_index"] == 0 and "sign" not in args
    assert P.pool_args(t, ["mem3", "mem2", "mem1", "mem0"])["serials"] == [0x1003, 0x1002, 0x1001, 0x1000]
    assert P.pool_args(t, sign={"host": "host0"})["sign"] == {"host": "host0"}


# ------------------------------------------------------------ provision over SSH

def test_provision_creates_verifies_and_records_the_pool(tb, monkeypatch):
    g = guests_for(tb, monkeypatch)
    pool = P.provision(tb).pool
    names = [h.name for h in tb.hosts]
    assert sorted(pool.hosts) == sorted(names) and all(r.ready for r in pool.hosts.values())
    saved = json.loads((tb.dir / "state.json").read_text())
    assert all(saved["pool"]["hosts"][n]["ready"] for n in names)
    serials = [tb.topology.device(d).serial for d in tb.topology.pool.devices]
    assert all(args["serials"] == serials for _, v, args in g.calls if v == "create")
    assert g.verbs("host0").count("write") == 1 and "clear" not in g.verbs()
    for other in names[1:]:
        assert g.verbs(other) == ["create", "read"]
    assert g.written and not left_in_backing_files(g), "the host machine zeroes the signatures in the backing files"


def test_one_host_with_another_target_order_fails_verification_naming_it(tmp_path, monkeypatch):
    tb = make_testbed(tmp_path, "2hosts-1switch")
    g = guests_for(tb, monkeypatch)
    with pytest.raises(TestbedError) as e:
        P.provision(tb, order_override={"host1": ["mem1", "mem0"]})
    msg = str(e.value)
    assert msg.startswith("pool verification failed: hosts do not map the same bytes\n")
    assert ("host1 at region offset 0x0: expected what host0 wrote there (device mem0, serial 0x1000), "
            "found the bytes host0 wrote at offset 0x1000 (device mem1, serial 0x1001)") in msg
    assert "hint: the region's target order differs between hosts" in msg
    assert "backing file" not in msg, "host0's bytes are where the arithmetic says"
    assert g.verbs("host0")[-1] == "clear", "the writer clears its signatures through its own mapping too"
    assert not left_in_backing_files(g)
    saved = json.loads((tb.dir / "state.json").read_text())
    assert not any(r["ready"] for r in saved["pool"]["hosts"].values())


def test_a_backing_file_that_disagrees_fails_verify_naming_file_offset_and_device(tmp_path, monkeypatch):
    """Every host agrees with every other (the same wrong order everywhere): only the
    check of the backing files on this machine can tell that the pool is not laid out
    as the topology says."""
    tb = make_testbed(tmp_path, "2hosts-1switch")
    g = guests_for(tb, monkeypatch, orders={"host0": ["mem1", "mem0"], "host1": ["mem1", "mem0"]})
    t = tb.topology
    regions = {h.name: {"dax": "/dev/dax0.0"} for h in tb.hosts}
    with pytest.raises(TestbedError) as e:
        P.verify(tb, regions)
    msg = str(e.value)
    f0, f1 = tb.pool_files["mem0"], tb.pool_files["mem1"]
    assert (f"backing file {f0} at 0x0 (device mem0, position 0) should hold region offset 0x0 as written by host0, "
            f"found the bytes host0 wrote at offset 0x1000 (device mem1, serial 0x1001)") in msg
    assert (f"backing file {f1} at 0x0 (device mem1, position 1) should hold region offset 0x1000 as written by "
            f"host0, found the bytes host0 wrote at offset 0x0 (device mem0, serial 0x1000)") in msg
    assert "host1 at region offset" not in msg, "the hosts agree with each other"
    n = len(P.sample_offsets(t))
    shown = [x for x in msg.splitlines() if x.strip().startswith("backing file")]
    assert len(shown) == n == 10, "every sampled offset sits in the other device"
    assert not left_in_backing_files(g)


def test_a_backing_file_with_other_bytes_is_reported_as_such(tmp_path, monkeypatch):
    tb = make_testbed(tmp_path, "2hosts-1switch")
    g = guests_for(tb, monkeypatch)
    real_write = g._write

    def write_then_damage(host, offsets, length, data):
        n = real_write(host, offsets, length, data)
        with open(tb.pool_files["mem1"], "r+b") as f:  # something else scribbles on mem1's first granule
            f.write(b"\xff" * 64)
        return n

    monkeypatch.setattr(g, "_write", write_then_damage)
    with pytest.raises(TestbedError) as e:
        P.verify(tb, {h.name: {"dax": "/dev/dax0.0"} for h in tb.hosts})
    msg = str(e.value)
    assert ("host1 at region offset 0x1000: expected what host0 wrote there (device mem1, serial 0x1001), "
            "found unknown bytes") in msg
    assert (f"backing file {tb.pool_files['mem1']} at 0x0 (device mem1, position 1) should hold region offset "
            "0x1000 as written by host0, found unknown bytes") in msg


@pytest.mark.parametrize("override, message", [
    ({"size_bytes": 256 << 20}, "host1: region region0 is 268435456 bytes, 2-way; expected 536870912 bytes, 2-way"),
    ({"ways": 1}, "host1: region region0 is 536870912 bytes, 1-way; expected 536870912 bytes, 2-way"),
    ({"dax_mode": "system-ram"}, "host1: /dev/dax0.0 is in mode system-ram, expected devdax"),
    ({"system_ram_cxl": True}, "host1: CXL memory shows up as System RAM (kmem) in /proc/iomem"),
])
def test_a_region_not_as_the_topology_says_stops_provisioning(tmp_path, monkeypatch, override, message):
    tb = make_testbed(tmp_path, "2hosts-1switch")
    g = guests_for(tb, monkeypatch)
    g.region_overrides["host1"] = override
    with pytest.raises(TestbedError) as e:
        P.provision(tb)
    assert str(e.value) == message
    assert "write" not in g.verbs(), "nothing is verified on a wrong region"
    assert TestbedState.load(tb.dir).pool is None


def test_a_guest_command_that_fails_names_the_host(tmp_path, monkeypatch):
    tb = make_testbed(tmp_path, "2hosts-1switch")
    g = guests_for(tb, monkeypatch)
    g.fail[("host1", "read")] = "Permission denied"
    with pytest.raises(TestbedError) as e:
        P.provision(tb)
    assert str(e.value) == "host1: pool read failed: Permission denied"
    assert not left_in_backing_files(g), "the signatures are cleared even when a read fails"


# ------------------------------------------------------------ at boot

def _boot(tb: TestbedState, said: dict[str, bytes]) -> dict:
    """The guests' boot: each console says what `said` gives; returns the signing plan in place."""
    plan = P.signing_plan(tb.topology)
    (tb.dir / P.POOL_ARGS_FILE).write_text(json.dumps(P.pool_args(tb.topology, sign=plan)))
    for h in tb.hosts:
        h.files.serial_log.write_bytes(b"[    1.0] boot\n" + said.get(h.name, P.POOL_READY) + b"\n")
    return plan


def test_at_boot_the_writer_signed_and_the_others_report_what_they_read(tmp_path, monkeypatch):
    tb = make_testbed(tmp_path, "4hosts-1switch")
    g = guests_for(tb, monkeypatch)
    plan = _boot(tb, {})
    g._write("host0", plan["offsets"], plan["length"], plan["data"])  # host0's boot script signed
    real_region = g.region
    monkeypatch.setattr(g, "region", lambda host, args=None: {**real_region(host, args),
                                                              "signed": len(plan["offsets"]) if host == "host0" else 0})
    pool = P.provision(tb, at_boot=True).pool
    assert all(r.ready for r in pool.hosts.values())
    assert g.verbs() and set(g.verbs()) == {"report"}, "one SSH call per host, nothing written over SSH"
    reports = {h: a for h, v, a in g.calls}
    assert reports["host0"] == {} and all(reports[f"host{i}"]["offsets"] == plan["offsets"] for i in (1, 2, 3))
    assert not left_in_backing_files(g)


def test_at_boot_without_signatures_verify_signs_over_ssh(tmp_path, monkeypatch):
    tb = make_testbed(tmp_path, "2hosts-1switch")
    g = guests_for(tb, monkeypatch)
    _boot(tb, {})  # the writer's region says signed: 0 (e.g. its boot script could not write)
    P.provision(tb, at_boot=True)
    assert g.verbs("host0") == ["report", "write"] and g.verbs("host1") == ["report", "read"]


def test_a_guest_whose_pool_failed_at_boot_says_why(tmp_path, monkeypatch):
    tb = make_testbed(tmp_path, "2hosts-1switch")
    guests_for(tb, monkeypatch)
    _boot(tb, {"host1": P.POOL_FAILED})
    asked = []

    def fake_run(host, port, key, command, **kw):
        asked.append((host, command))
        return Result(host, 0, "cxl create-region: no space left in decoder0.0\n", "")

    monkeypatch.setattr(P.ssh, "run", fake_run)
    with pytest.raises(TestbedError) as e:
        P.provision(tb, at_boot=True)
    assert str(e.value) == "host1: pool create at boot failed: cxl create-region: no space left in decoder0.0"
    assert asked == [("host1", "cat /run/beluga/pool.err")]


# ------------------------------------------------------------ pool table

def test_pool_table_maps_each_position_to_its_file(tmp_path, monkeypatch):
    tb = make_testbed(tmp_path, "2hosts-2switches")
    guests_for(tb, monkeypatch)
    assert P.pool_table(tb)["hosts"] == {}
    tb = P.provision(tb)
    p = P.pool_table(tb)
    assert (p["size_bytes"], p["ways"], p["granularity_bytes"], p["stripe_bytes"]) == (1 << 30, 4, 4096, 16384)
    assert p["rule"] == "region offset o -> position (o // 4096) % 4, device offset (o // 16384) * 4096 + o % 4096"
    assert [(r["region_offset"], r["position"], r["device"], r["file_offset"]) for r in p["map"]] == [
        (0, 0, "mem0", 0), (4096, 1, "mem2", 0), (8192, 2, "mem1", 0), (12288, 3, "mem3", 0)]
    assert p["map"][1]["file"] == str(tb.pool_files["mem2"]) and p["map"][1]["serial"] == 0x1002
    assert p["hosts"]["host1"] == {"region": "region0", "dax": "/dev/dax0.0", "dax_mode": "devdax", "ready": True,
                                   "targets": ["mem0", "mem1", "mem2", "mem3"]}


def test_many_misplaced_offsets_are_counted_not_all_listed(tmp_path, monkeypatch):
    tb = make_testbed(tmp_path, "4hosts-1switch")
    rotated = ["mem1", "mem2", "mem3", "mem0"]
    guests_for(tb, monkeypatch, orders={h.name: list(rotated) for h in tb.hosts})
    n = len(P.sample_offsets(tb.topology))
    with pytest.raises(TestbedError) as e:
        P.verify(tb, {h.name: {"dax": "/dev/dax0.0"} for h in tb.hosts})
    lines = str(e.value).splitlines()
    assert n > 12 and sum(x.strip().startswith("backing file") for x in lines) == 12
    assert lines[-2].strip() == f"... and {n - 12} more"


def test_a_writer_whose_bytes_land_nowhere_reads_as_zeros(tmp_path, monkeypatch):
    tb = make_testbed(tmp_path, "2hosts-1switch")
    g = guests_for(tb, monkeypatch)
    monkeypatch.setattr(g, "_write", lambda host, offsets, length, data: len(offsets))
    with pytest.raises(TestbedError) as e:
        P.verify(tb, {h.name: {"dax": "/dev/dax0.0"} for h in tb.hosts})
    msg = str(e.value)
    assert "host1 at region offset 0x0: expected what host0 wrote there (device mem0, serial 0x1000), found zeros" in msg
    assert (f"backing file {tb.pool_files['mem0']} at 0x0 (device mem0, position 0) should hold region offset 0x0 "
            "as written by host0, found zeros") in msg


@pytest.mark.parametrize("granularity", [256, 512, 4096])
@pytest.mark.parametrize("ways", [1, 2, 4, 8])
def test_no_signature_straddles_two_granules(ways, granularity):
    """The host-side check reads each signature from one device's file: a signature that
    ran into the next granule would sit in two devices."""
    devices = "".join(f"  - {{id: m{i}, size_mib: 256, serial: {0x1000 + i}}}\n" for i in range(ways))
    ids = ", ".join(f"m{i}" for i in range(ways))
    t = T.parse(f"""\
apiVersion: beluga.testbed/v1alpha1
kind: Topology
name: t
hosts: {{count: 1}}
host_bridges:
  - id: hb0
    bus_nr: 12
    root_ports:
      - id: rp0
        switch: {{id: sw0, downstream_ports: {ways}, devices: [{ids}]}}
devices:
{devices}windows:
  - {{id: w0, size_mib: {256 * ways}, targets: [hb0], granularity_bytes: {granularity}}}
pool: {{window: w0, devices: [{ids}], granularity_bytes: {granularity}}}
""", "t.yaml")
    offs = P.sample_offsets(t)
    assert all(o % granularity + P.SIGNATURE_BYTES <= granularity for o in offs)
    assert {(o // granularity) % ways for o in offs} == set(range(ways))


@pytest.mark.parametrize("wrong, shown, more", [(11, 11, None), (12, 12, None), (13, 12, "... and 1 more")])
def test_at_most_twelve_mismatches_are_listed(tmp_path, monkeypatch, wrong, shown, more):
    tb = make_testbed(tmp_path, "2hosts-2switches")
    g = guests_for(tb, monkeypatch)
    real_read = g._read

    def host1_misreads_the_first(host, offsets, length):
        data = real_read(host, offsets, length)
        return ["00" * length] * wrong + data[wrong:] if host == "host1" else data

    monkeypatch.setattr(g, "_read", host1_misreads_the_first)
    with pytest.raises(TestbedError) as e:
        P.verify(tb, {h.name: {"dax": "/dev/dax0.0"} for h in tb.hosts})
    lines = str(e.value).splitlines()
    assert sum(x.strip().startswith("host1 at region offset") for x in lines) == shown
    assert [x.strip() for x in lines if x.strip().startswith("...")] == ([more] if more else [])
