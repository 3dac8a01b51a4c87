"""Every host maps the same pool, byte for byte; the bytes sit where the interleave says."""
import hashlib
import json
import os
import shlex

from pathlib import Path

import pytest

from testbed import lifecycle, provision, ssh
from testbed.log import TestbedError

from .conftest import cli

WRITE_AT = 3 << 20          # region offset of the 1 MiB sample
SAMPLE = 1 << 20


def _guest(tb, h, code: str, *args, timeout_s=120):
    r = ssh.run(h.name, h.ssh_port, tb.key, f"python3 -c {shlex.quote(code)} " + " ".join(map(shlex.quote, args)),
                timeout_s=timeout_s)
    assert r.ok, f"{h.name}: {r.error or r.stderr}"
    return r.stdout


WRITE = """
import mmap, os, sys
dax, src, off = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(src, "rb").read()
fd = os.open(dax, os.O_RDWR)
span = (off + len(data) + (2 << 20) - 1) // (2 << 20) * (2 << 20)
m = mmap.mmap(fd, span, mmap.MAP_SHARED)
m[off:off + len(data)] = data
"""
READ_SHA = """
import hashlib, mmap, os, sys
dax, off, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(dax, os.O_RDONLY)
span = (off + n + (2 << 20) - 1) // (2 << 20) * (2 << 20)
m = mmap.mmap(fd, span, mmap.MAP_SHARED, mmap.PROT_READ)
print(hashlib.sha256(m[off:off + n]).hexdigest())
"""


ONE_WAY = str(Path(__file__).parent / "data" / "2hosts-1way.yaml")


def _switch_dports(node) -> list[int]:
    """nr_dports of every switch upstream port (depth 2: root0 -> host bridge -> switch) in `cxl list -BPT`."""
    out = []
    if isinstance(node, list):
        for n in node:
            out += _switch_dports(n)
    elif isinstance(node, dict):
        if node.get("depth") == 2 and "nr_dports" in node:
            out.append(node["nr_dports"])
        for v in node.values():
            if isinstance(v, (list, dict)):
                out += _switch_dports(v)
    return out


@pytest.mark.parametrize("topology", ["2hosts-1switch", "2hosts-2switches", "4hosts-1switch", ONE_WAY])
def test_bytes_written_on_one_host_read_identically_everywhere(topology, tmp_path):
    name = f"pool-{Path(topology).stem}"
    cli("up", topology, "--name", name)
    try:
        tb = lifecycle.find(name)
        t = tb.topology
        pool = tb.pool.hosts
        data = os.urandom(SAMPLE)
        blob = tmp_path / "blob"
        blob.write_bytes(data)
        h0 = tb.hosts[0]
        with ssh.connection(h0.ssh_port, tb.key) as c:
            c.put(str(blob), "/tmp/blob")
        _guest(tb, h0, WRITE, pool[h0.name].dax, "/tmp/blob", str(WRITE_AT))
        want = hashlib.sha256(data).hexdigest()
        for h in tb.hosts:
            assert _guest(tb, h, READ_SHA, pool[h.name].dax, str(WRITE_AT), str(SAMPLE)).strip() == want, h.name
        # On the host machine: every granule is in the backing file the arithmetic names.
        g = t.pool.granularity_bytes
        positions = set()
        for o in range(0, SAMPLE, g):
            loc = provision.locate(t, tb.pool_files, WRITE_AT + o)
            positions.add(loc.position)
            with open(loc.file, "rb") as f:
                f.seek(loc.file_offset)
                assert f.read(g) == data[o:o + g], f"granule at region offset {WRITE_AT + o:#x} not in {loc.file}"
        assert positions == set(range(len(t.pool.devices)))  # the sample covers every target
        # No host onlined the pool as System RAM; every host has it in devdax mode.
        for h in tb.hosts:
            out = _guest(tb, h, "import subprocess;print(open('/proc/iomem').read());"
                                "print(subprocess.run(['daxctl','list'],capture_output=True,text=True).stdout)")
            assert "System RAM (kmem)" not in out and '"mode":"devdax"' in out, h.name
        # Every host sees the switches of the topology with all their downstream ports.
        want = sorted(len(rp.switch.ports) for hb in t.host_bridges for rp in hb.root_ports if rp.switch)
        for h in tb.hosts:
            ports = json.loads(_guest(tb, h, "import subprocess;print(subprocess.run(['cxl','list','-BPT'],"
                                              "capture_output=True,text=True).stdout)"))
            assert sorted(_switch_dports(ports)) == want, h.name
        p = json.loads(cli("pool", name, "--json").stdout)
        assert p["ways"] == len(t.pool.devices) and p["size_bytes"] == t.pool_size_bytes
        assert [r["device"] for r in p["map"]] == list(t.pool.devices)
        assert all(hp["ready"] for hp in p["hosts"].values())
        assert "REGION OFFSET" in cli("pool", name).stdout
    finally:
        cli("down", name)


def test_wrong_target_order_is_caught(isolated_dirs):
    cli("up", "2hosts-1switch", "--name", "order", "--no-provision")
    try:
        tb = lifecycle.find("order")
        with pytest.raises(TestbedError) as e:
            provision.provision(tb, order_override={"host1": ["mem1", "mem0"]})
        msg = str(e.value)
        assert "pool verification failed" in msg
        assert "host1 at region offset 0x0: expected what host0 wrote there (device mem0, serial 0x1000), " \
               "found the bytes host0 wrote at offset 0x1000 (device mem1, serial 0x1001)" in msg
        st = json.loads(cli("status", "order", "--json").stdout)
        assert [h["pool"] for h in st["hosts"]] == ["not ready", "not ready"]
    finally:
        cli("down", "order")


def test_a_region_the_guest_cannot_make_at_boot_fails_up_with_its_error(isolated_dirs, monkeypatch):
    """The guest says 'pool failed' on its console; `up` shows the guest's own error and
    rolls back, leaving no QEMU and no state folder."""
    real = provision.pool_args

    def missing_device(t, order=None, sign=None):
        return {**real(t, order, sign), "serials": [0x1000, 0xDEAD], "timeout_s": 3}

    monkeypatch.setattr(provision, "pool_args", missing_device)
    with pytest.raises(TestbedError) as e:
        lifecycle.up("1host-1switch", name="noregion", accel="tcg")
    msg = str(e.value)
    assert "host0: pool create at boot failed: CXL devices not ready after 3 s" in msg
    assert "wanted [4096, 57005]" in msg
    assert "noregion" not in lifecycle.names()
    assert not (isolated_dirs[0] / "noregion").exists()
