"""guest_pool.py (runs inside the guests) with fake cxl/daxctl answers and /sys, /proc.

The guest kernel names memory devices memN in probe order, which changes from boot to
boot and differs between hosts: the region's targets must follow the topology's order
of serial numbers, whatever the names.
"""
from __future__ import annotations

import io
import json

import pytest

from testbed.guest import pool as G

MB = 1 << 20


class FakeGuestOS:
    """What the guest's tools and files answer; records each command."""

    def __init__(self, memdevs: dict[str, int], *, regions=None, dax_mode="devdax", hostname="host0",
                 iomem="00000000-0009ffff : System RAM\n") -> None:
        self.memdevs = memdevs  # memN -> serial, as `cxl list -M` reports them
        self.regions = regions or []
        self.dax_mode = dax_mode
        self.hostname = hostname
        self.iomem = iomem
        self.commands: list[tuple[str, ...]] = []

    def sh(self, *argv):
        self.commands.append(argv)
        if argv[:3] == ("cxl", "list", "-M"):
            return json.dumps([{"memdev": m, "serial": s} for m, s in self.memdevs.items()])
        if argv[:3] == ("cxl", "list", "-R"):
            return json.dumps(self.regions) if self.regions else ""
        if argv[:3] == ("cxl", "list", "-D"):
            return json.dumps([{"decoder": "decoder0.1", "volatile_capable": True},
                               {"decoder": "decoder0.0", "volatile_capable": True}])
        if argv[:2] == ("cxl", "create-region"):
            ways = int(argv[argv.index("-w") + 1])
            self.regions = [{"region": "region0", "size": ways * 256 * MB, "interleave_ways": ways,
                             "interleave_granularity": int(argv[argv.index("-g") + 1]), "decoder": "decoder0.0"}]
            return json.dumps(self.regions[0])
        if argv[:2] == ("daxctl", "list"):
            return json.dumps([{"chardev": "dax0.0", "mode": self.dax_mode}])
        if argv[:2] == ("daxctl", "reconfigure-device"):
            self.dax_mode = "devdax"
            return ""
        raise AssertionError(f"unexpected command {argv}")

    def open(self, path, *a, **kw):
        files = {"/proc/modules": "cxl_mem 16384 0 - Live\n", "/proc/iomem": self.iomem,
                 "/proc/sys/kernel/hostname": self.hostname + "\n"}
        if path in files:
            return io.StringIO(files[path])
        return open(path, *a, **kw)


@pytest.fixture
def guest(monkeypatch):
    def make(memdevs, **kw) -> FakeGuestOS:
        g = FakeGuestOS(memdevs, **kw)
        monkeypatch.setattr(G, "sh", g.sh)
        monkeypatch.setattr(G, "open", g.open, raising=False)
        real_isdir, real_listdir, real_exists = G.os.path.isdir, G.os.listdir, G.os.path.exists
        monkeypatch.setattr(G.os.path, "exists", lambda p: True if p == "/proc/modules" else real_exists(p))
        endpoints = [f"endpoint{i + 4}" for i in range(len(memdevs))]
        monkeypatch.setattr(G.os.path, "isdir",
                            lambda p: True if p == "/sys/bus/cxl/devices" else real_isdir(p))
        monkeypatch.setattr(G.os, "listdir",
                            lambda p: ["root0", "port1", *endpoints] if p == "/sys/bus/cxl/devices" else real_listdir(p))
        return g
    return make


def create_region_argv(g: FakeGuestOS) -> tuple[str, ...]:
    (argv,) = [c for c in g.commands if c[:2] == ("cxl", "create-region")]
    return argv


@pytest.mark.parametrize("memdevs", [
    {"mem0": 0x1000, "mem1": 0x1001, "mem2": 0x1002, "mem3": 0x1003},
    {"mem2": 0x1000, "mem0": 0x1001, "mem3": 0x1002, "mem1": 0x1003},  # probed in another order
    {"mem3": 0x1003, "mem1": 0x1000, "mem0": 0x1002, "mem2": 0x1001},
])
def test_targets_follow_the_serial_order_whatever_the_names(guest, memdevs):
    g = guest(memdevs)
    serials = [0x1000, 0x1002, 0x1001, 0x1003]  # the topology's position order (2hosts-2switches)
    r = G.create({"serials": serials, "granularity": 4096, "window_index": 1, "timeout_s": 1})
    by_serial = {s: m for m, s in memdevs.items()}
    want = [by_serial[s] for s in serials]
    argv = create_region_argv(g)
    assert argv[argv.index("-w") + 1] == "4" and argv[argv.index("-g") + 1] == "4096"
    assert list(argv[-4:]) == want and r["targets"] == want
    assert argv[argv.index("-d") + 1] == "decoder0.1", "window_index counts root decoders in name order"
    assert (r["region"], r["dax"], r["dax_mode"], r["size_bytes"], r["ways"]) == (
        "region0", "/dev/dax0.0", "devdax", 1024 * MB, 4)
    assert r["system_ram_cxl"] is False and r["signed"] == 0


def test_an_existing_region_is_kept_and_an_unbound_dax_is_made_devdax(guest):
    region = {"region": "region3", "size": 512 * MB, "interleave_ways": 2, "interleave_granularity": 4096,
              "decoder": "decoder0.0"}
    g = guest({"mem1": 0x1000, "mem0": 0x1001}, regions=[region], dax_mode="system-ram")
    r = G.create({"serials": [0x1000, 0x1001], "granularity": 4096, "timeout_s": 1})
    assert not [c for c in g.commands if c[:2] == ("cxl", "create-region")]
    assert ("daxctl", "reconfigure-device", "--mode=devdax", "-f", "dax0.0") in g.commands
    assert (r["region"], r["dax_mode"], r["targets"]) == ("region3", "devdax", ["mem1", "mem0"])


def test_a_device_that_never_shows_up_is_named(guest):
    guest({"mem0": 0x1000})
    with pytest.raises(SystemExit) as e:
        G.create({"serials": [0x1000, 0x1001], "granularity": 4096, "timeout_s": 0})
    assert str(e.value) == ("CXL devices not ready after 0 s: serials found [4096], wanted [4096, 4097]; "
                            "endpoints 1")


def test_cxl_memory_as_system_ram_is_reported(guest):
    guest({"mem0": 0x1000, "mem1": 0x1001}, iomem="1050000000-106fffffff : System RAM (kmem)\n")
    r = G.create({"serials": [0x1000, 0x1001], "granularity": 4096, "timeout_s": 1})
    assert r["system_ram_cxl"] is True


def test_write_read_clear_and_report_through_a_mapped_file(tmp_path, monkeypatch):
    """The verbs that move signatures, over a plain file standing in for /dev/daxX.Y."""
    dax = tmp_path / "dax0.0"
    with open(dax, "wb") as f:
        f.truncate(4 * MB)
    offsets, data = [0, 4096, 3 * MB + 5], ["ab" * 64, "cd" * 64, "ef" * 64]
    args = {"dax": str(dax), "offsets": offsets, "length": 64}
    assert G.write({**args, "data": data}) == {"written": 3}
    assert G.read(args) == {"data": data}
    result = tmp_path / "pool.json"
    result.write_text(json.dumps({"region": "region0", "dax": str(dax)}))
    assert G.report({"result": str(result), "offsets": offsets, "length": 64}) == {
        "region": {"region": "region0", "dax": str(dax)}, "data": data}
    assert G.report({"result": str(result)}) == {"region": {"region": "region0", "dax": str(dax)}}
    G.clear(args)
    assert G.read(args) == {"data": ["00" * 64] * 3}


def test_main_reads_args_from_a_file_and_writes_the_result_atomically(tmp_path, capsys):
    dax = tmp_path / "dax"
    with open(dax, "wb") as f:
        f.truncate(2 * MB)
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"dax": str(dax), "offsets": [0], "length": 8, "data": ["11" * 8]}))
    out = tmp_path / "out.json"
    G.main(["write", f"@{args}", "--out", str(out)])
    assert json.loads(out.read_text()) == {"written": 1} and not (tmp_path / "out.json.tmp").exists()
    G.main(["read", json.dumps({"dax": str(dax), "offsets": [0], "length": 8})])
    assert json.loads(capsys.readouterr().out) == {"data": ["11" * 8]}
