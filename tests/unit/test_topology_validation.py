"""Each validation rule, with the exact message a user reads (file:line: path: what).

Limits that depend on the machine are checked against tests/unit/conftest.py's
MACHINE (4 cores, 8192 MiB of RAM, 4096 MiB for pools)."""
import os

import pytest

from testbed import topology as T
from testbed.topology import this_machine as real_machine  # before conftest replaces it

BASE = """\
apiVersion: beluga.testbed/v1alpha1
kind: Topology
name: t
hosts:
  count: 2
  vcpus: 1
  memory_mib: 1024
host_bridges:
  - id: hb0
    bus_nr: 12
    root_ports:
      - id: hb0-rp0
        switch:
          id: sw0
          downstream_ports: 2
          devices: [mem0, mem1]
devices:
  - {id: mem0, size_mib: 256, serial: 0x1000}
  - {id: mem1, size_mib: 256, serial: 0x1001}
windows:
  - {id: fmw0, size_mib: 512, targets: [hb0], granularity_bytes: 4096}
pool:
  window: fmw0
  devices: [mem0, mem1]
  granularity_bytes: 4096
"""


def errors(text: str) -> list[str]:
    with pytest.raises(T.TopologyError) as e:
        T.parse(text, "my.yaml")
    return e.value.errors


def test_base_is_valid():
    t = T.parse(BASE, "my.yaml")
    assert [h.name for h in t.hosts] == ["host0", "host1"]
    assert t.pool_size_bytes == 512 << 20


@pytest.mark.parametrize("name", T.builtin_names())
def test_builtins_are_valid(name):
    t = T.load(name)
    assert t.name == name
    assert len({d.serial for d in t.devices}) == len(t.devices)


def test_builtin_4hosts_shape():
    t = T.load("4hosts-1switch")
    assert len(t.hosts) == 4
    sw = t.host_bridges[0].root_ports[0].switch
    assert len(sw.ports) == 4 and [p.device for p in sw.ports] == ["mem0", "mem1", "mem2", "mem3"]
    assert all(d.size_mib == 256 for d in t.devices)
    assert t.window("fmw0").targets == ("hb0",) and t.pool.devices == ("mem0", "mem1", "mem2", "mem3")


def test_unknown_key_did_you_mean():
    assert errors(BASE.replace("  memory_mib: 1024", "  memroy_mib: 1024")) == [
        "my.yaml:7: hosts.memroy_mib: unknown key (did you mean 'memory_mib'?)"]


def test_host_list_field_error_names_index():
    text = BASE.replace("hosts:\n  count: 2\n  vcpus: 1\n  memory_mib: 1024\n",
                        "hosts:\n  - {name: a}\n  - {name: b}\n  - {name: c, memory_mib: 128}\n")
    assert errors(text) == [
        "my.yaml:7: hosts[2].memory_mib: expected at least 512 MiB (the guest kernel and sshd need it), got 128"]


def test_device_size_multiple_of_256():
    assert errors(BASE.replace("{id: mem1, size_mib: 256,", "{id: mem1, size_mib: 300,"))[0] == (
        "my.yaml:19: devices[1].size_mib: expected a positive multiple of 256 MiB (CXL decoders map 256 MiB units), got 300")


def test_window_too_small():
    assert errors(BASE.replace("size_mib: 512, targets", "size_mib: 256, targets")) == [
        "my.yaml:23: pool.window: window 'fmw0' is 256 MiB, too small for the pool's 512 MiB"]


def test_interleave_ways_kernel_accepts():
    text = (BASE.replace("downstream_ports: 2", "downstream_ports: 5")
            .replace("devices: [mem0, mem1]\n", "devices: [mem0, mem1, mem2, mem3, mem4]\n", 1)
            .replace("  - {id: mem1, size_mib: 256, serial: 0x1001}\n",
                     "  - {id: mem1, size_mib: 256, serial: 0x1001}\n" +
                     "".join(f"  - {{id: mem{i}, size_mib: 256, serial: 0x100{i}}}\n" for i in (2, 3, 4)))
            .replace("size_mib: 512, targets", "size_mib: 2048, targets")
            .replace("  devices: [mem0, mem1]\n  granularity", "  devices: [mem0, mem1, mem2, mem3, mem4]\n  granularity"))
    assert errors(text) == [
        "my.yaml:27: pool.devices: 5 devices: interleave ways the kernel accepts are 1, 2, 3, 4, 6, 8, 12, 16"]


def test_granularity_power_of_two():
    assert errors(BASE.replace("  granularity_bytes: 4096\n", "  granularity_bytes: 3000\n")) == [
        "my.yaml:25: pool.granularity_bytes: expected a power of two the kernel accepts "
        "(256, 512, 1024, 2048, 4096, 8192, 16384), got 3000"]


def test_duplicate_serial():
    assert errors(BASE.replace("serial: 0x1001", "serial: 0x1000")) == [
        "my.yaml:19: devices[1].serial: serial 0x1000 already used by devices[0]: "
        "serial numbers tell the devices apart inside the guests"]


def test_duplicate_id():
    assert errors(BASE.replace("id: sw0", "id: hb0")) == [
        "my.yaml:14: host_bridges[0].root_ports[0].switch.id: duplicate id 'hb0' (first used at line 9)"]


def test_not_enough_downstream_ports():
    assert errors(BASE.replace("downstream_ports: 2", "downstream_ports: 1")) == [
        "my.yaml:16: host_bridges[0].root_ports[0].switch.devices: 2 devices below switch 'sw0' but only 1 downstream ports"]


def test_unknown_device_did_you_mean():
    assert errors(BASE.replace("devices: [mem0, mem1]\n", "devices: [mem0, mem9]\n", 1)) == [
        "my.yaml:16: host_bridges[0].root_ports[0].switch.devices[1]: unknown device 'mem9' (did you mean 'mem1'? known: mem0, mem1)",
        "my.yaml:17: devices: device 'mem1' is not attached to any root port or switch"]


def test_cross_host_bridge_position_and_granularity():
    t = T.load("2hosts-2switches")
    text = T.resolve("2hosts-2switches").read_text()
    bad = text.replace("devices: [mem0, mem2, mem1, mem3]", "devices: [mem0, mem1, mem2, mem3]")
    errs = errors(bad)
    assert len(errs) == 2 and "interleave position 1 must be a device below host bridge 'hb1'" in errs[0]
    assert t.pool.devices == ("mem0", "mem2", "mem1", "mem3")
    bad = text.replace("  granularity_bytes: 4096\n", "  granularity_bytes: 8192\n")
    assert errors(bad)[0].endswith("pool.granularity_bytes: expected 4096 (the window's): the kernel requires the "
                                   "region granularity to equal the window's when the window interleaves host bridges")


def test_all_errors_reported_at_once():
    text = BASE.replace("memory_mib: 1024", "memory_mb: 1024").replace("serial: 0x1001", "serial: 0x1000") \
               .replace("  granularity_bytes: 4096\n", "  granularity_bytes: 100\n")
    errs = errors(text)
    assert len(errs) == 3
    assert [e.split(":")[1] for e in errs] == ["7", "19", "25"]


def test_version_and_kind():
    errs = errors(BASE.replace("beluga.testbed/v1alpha1", "beluga.testbed/v9").replace("kind: Topology", "kind: Pod"))
    assert errs == ["my.yaml:1: apiVersion: expected 'beluga.testbed/v1alpha1', got 'beluga.testbed/v9'",
                    "my.yaml:2: kind: expected 'Topology', got 'Pod'"]


def test_bad_yaml_and_unknown_name():
    assert errors("a: [")[0].startswith("my.yaml:1: not valid YAML")
    with pytest.raises(T.TopologyError) as e:
        T.load("4host-1switch")
    assert "did you mean '4hosts-1switch'?" in e.value.errors[0]


def test_draw_shows_tree():
    out = T.draw(T.load("4hosts-1switch"), {"mem2": "/p/mem2.raw"})
    assert "└── hb0 (host bridge, bus 12)" in out
    assert "sw0 (switch, 4 downstream ports)" in out
    assert "mem2 (type-3 volatile, 256 MiB, serial 0x1002) [pool position 2] -> /p/mem2.raw" in out


# ---------------------------------------------------------------- hostile YAML (testbed/yamlcheck.py)

def test_alias_bomb_is_refused_where_it_stands():
    # 9 levels of 9 aliases: expanded, 9**9 strings (this shape took 6.4 s at 916 bytes).
    bomb = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    errs = errors(bomb)
    assert errs[:3] == [
        "my.yaml:1: a: anchor '&a': anchors and aliases are not supported, write the value out",
        "my.yaml:2: b: anchor '&b': anchors and aliases are not supported, write the value out",
        "my.yaml:2: b[0]: alias '*a': anchors and aliases are not supported, write the value out"]
    assert errs[20:] == ["my.yaml: ... and 61 more errors of these kinds"]


def test_recursive_alias_is_an_error_not_a_recursion_error():
    text = BASE.replace("hosts:\n  count: 2\n  vcpus: 1\n  memory_mib: 1024\n", "hosts: &h [*h]\n")
    assert errors(text) == [
        "my.yaml:4: hosts: anchor '&h': anchors and aliases are not supported, write the value out",
        "my.yaml:4: hosts[0]: alias '*h': anchors and aliases are not supported, write the value out"]


def test_duplicate_key_is_located_not_last_wins():
    assert errors(BASE.replace("  memory_mib: 1024\n", "  memory_mib: 1024\n  vcpus: 2\n")) == [
        "my.yaml:8: hosts.vcpus: duplicate key 'vcpus' (first at line 6)"]


def test_non_scalar_keys():
    assert errors(BASE.replace("  memory_mib: 1024\n", "  memory_mib: 1024\n  [x]: 1\n  ? {a: 1}\n  : 2\n")) == [
        "my.yaml:8: hosts: expected a plain key, got a list",
        "my.yaml:9: hosts: expected a plain key, got a mapping"]


def test_lists_where_ids_belong():
    text = BASE.replace("targets: [hb0]", "targets: [[hb0]]").replace(
        "  devices: [mem0, mem1]\n  granularity", "  devices: [{id: mem0}, mem1]\n  granularity")
    assert errors(text) == [
        "my.yaml:21: windows[0].targets[0]: expected a host bridge id, got a list",
        "my.yaml:24: pool.devices[0]: expected a device id, got a mapping"]


def test_nesting_size_tags_and_documents_are_bounded():
    assert errors(BASE + "description: " + "[" * 40 + "]" * 40 + "\n") == [
        "my.yaml:26: description" + "[0]" * 31 + ": nested more than 32 levels deep"]
    assert errors(BASE + "description: '" + "x" * (256 << 10) + "'\n") == [
        "my.yaml: more than 262144 bytes: a topology file is a few kilobytes"]
    assert errors(BASE.replace("name: t", "name: !!python/object/apply:os.system [ls]")) == [
        "my.yaml:3: name: tag '!!python/object/apply:os.system' is not supported"]
    assert errors(BASE + "---\nname: u\n") == ["my.yaml:26: expected one YAML document, found a second one ('---')"]
    assert errors(BASE.replace("serial: 0x1001", "serial: " + "9" * 5000)) == [
        "my.yaml:19: devices[1].serial: cannot read '" + "9" * 56 + "... as an integer"]
    assert errors(BASE + "\x00") == ["my.yaml:26: not valid YAML: special characters are not allowed (character 0x0000)"]


def test_file_is_read_bounded_and_as_utf8(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_bytes(b"# " + b"x" * (300 << 10) + b"\n")
    with pytest.raises(T.TopologyError) as e:
        T.load(str(f))
    assert e.value.errors == [f"{f}: more than 262144 bytes: a topology file is a few kilobytes"]
    f.write_bytes(BASE.encode().replace(b"name: t", b"name: \xff"))
    with pytest.raises(T.TopologyError) as e:
        T.load(str(f))
    assert e.value.errors == [f"{f}:3: not UTF-8 text (byte 57)"]


def test_topology_error_reads_as_invalid_topology():
    with pytest.raises(T.TopologyError) as e:
        T.parse(BASE.replace("  memory_mib: 1024\n", "  memory_mib: 1024\n  vcpus: 2\n"), "my.yaml")
    assert str(e.value) == "invalid topology:\n  my.yaml:8: hosts.vcpus: duplicate key 'vcpus' (first at line 6)"


# ---------------------------------------------------------------- names and ids (testbed/names.py)

RULE = "use lower-case letters, digits and '-', starting with a letter or digit, at most 63 characters"


def test_device_id_that_is_a_path_or_qemu_options_is_refused():
    text = BASE.replace("mem0", "../../../cache/images/KEY/rootfs").replace(
        "mem1", "'mem0,share=off,mem-path=/etc/passwd'")
    assert errors(text) == [  # in the file's order
        f"my.yaml:16: host_bridges[0].root_ports[0].switch.devices[0]: invalid name "
        f"'../../../cache/images/KEY/rootfs': {RULE}",
        f"my.yaml:16: host_bridges[0].root_ports[0].switch.devices[1]: invalid name "
        f"'mem0,share=off,mem-path=/etc/passwd': {RULE}",
        f"my.yaml:18: devices[0].id: invalid name '../../../cache/images/KEY/rootfs': {RULE}",
        f"my.yaml:19: devices[1].id: invalid name 'mem0,share=off,mem-path=/etc/passwd': {RULE}",
        f"my.yaml:24: pool.devices[0]: invalid name '../../../cache/images/KEY/rootfs': {RULE}",
        f"my.yaml:24: pool.devices[1]: invalid name 'mem0,share=off,mem-path=/etc/passwd': {RULE}"]


def test_every_fabric_id_and_reference_is_a_name():
    text = (BASE.replace("name: t", "name: ..").replace("id: hb0\n", "id: HB0\n").replace("- id: hb0-rp0", "- id: rp,0")
            .replace("id: sw0", "id: sw/0").replace("{id: fmw0", "{id: fmw.0").replace("targets: [hb0]", "targets: [hb/0]")
            .replace("  window: fmw0", "  window: 'fmw0,x'"))
    assert errors(text) == [
        f"my.yaml:3: name: invalid name '..': {RULE}",
        f"my.yaml:9: host_bridges[0].id: invalid name 'HB0': {RULE}",
        f"my.yaml:12: host_bridges[0].root_ports[0].id: invalid name 'rp,0': {RULE}",
        f"my.yaml:14: host_bridges[0].root_ports[0].switch.id: invalid name 'sw/0': {RULE}",
        f"my.yaml:21: windows[0].id: invalid name 'fmw.0': {RULE}",
        f"my.yaml:21: windows[0].targets[0]: invalid name 'hb/0': {RULE}",
        f"my.yaml:23: pool.window: invalid name 'fmw0,x': {RULE}"]


def test_host_names_and_name_prefix():
    assert errors(BASE.replace("  count: 2\n", "  count: 2\n  name_prefix: Host_\n")) == [
        f"my.yaml:6: hosts.name_prefix: invalid name 'Host_0': {RULE}"]
    text = BASE.replace("hosts:\n  count: 2\n  vcpus: 1\n  memory_mib: 1024\n", "hosts:\n  - {name: a}\n  - {name: ..}\n")
    assert errors(text) == [f"my.yaml:6: hosts[1].name: invalid name '..': {RULE}"]


def test_switch_id_too_long_for_its_port_ids():
    sw = "s" * 60
    assert errors(BASE.replace("id: sw0", f"id: {sw}")) == [
        f"my.yaml:14: host_bridges[0].root_ports[0].switch.id: makes port id '{sw}-dsp1', longer than 63 characters"]


# ---------------------------------------------------------------- numeric bounds

def test_vcpus_and_memory_against_this_machine():
    assert errors(BASE.replace("vcpus: 1", "vcpus: 100000000").replace("memory_mib: 1024", "memory_mib: 9000")) == [
        "my.yaml:6: hosts.vcpus: expected at most 4 vCPUs (this machine has 4 CPU cores, os.cpu_count()), got 100000000",
        "my.yaml:7: hosts.memory_mib: expected at most 8192 MiB (this machine's RAM, MemTotal in /proc/meminfo), got 9000"]
    assert errors(BASE.replace("memory_mib: 1024", "memory_mib: 5000")) == [
        "my.yaml:4: hosts: 2 hosts need 10000 MiB of memory together, more than this machine's 8192 MiB "
        "(MemTotal in /proc/meminfo)"]


def test_vcpus_against_the_real_machine(monkeypatch):
    monkeypatch.setattr(T, "this_machine", real_machine)
    n = os.cpu_count()
    assert errors(BASE.replace("vcpus: 1", f"vcpus: {n + 1}")) == [
        f"my.yaml:6: hosts.vcpus: expected at most {n} vCPUs (this machine has {n} CPU cores, os.cpu_count()), got {n + 1}"]


def test_downstream_ports_within_a_qemu_switch():
    assert errors(BASE.replace("downstream_ports: 2", "downstream_ports: 3000000")) == [
        "my.yaml:15: host_bridges[0].root_ports[0].switch.downstream_ports: expected at most 32 downstream ports "
        "(QEMU places a switch's downstream ports at device numbers 0-31 of its internal PCI bus), got 3000000"]


def test_root_ports_within_a_host_bridge_bus():
    rps = "".join(f"      - {{id: rp{i}, device: mem9}}\n" for i in range(32))
    errs = errors(BASE.replace("    root_ports:\n", "    root_ports:\n" + rps))
    assert errs[0] == ("my.yaml:11: host_bridges[0].root_ports: 33 root ports: QEMU places a host bridge's root "
                       "ports at device numbers 0-31 of its bus, at most 32")


def test_bus_numbers_stay_8_bit_and_apart():
    assert errors(BASE.replace("bus_nr: 12", "bus_nr: 252")) == [
        "my.yaml:10: host_bridges[0].bus_nr: host bridge 'hb0' needs buses 252 to 256 (one per root port, switch "
        "and downstream port), past 255: PCI bus numbers are 8 bits"]
    text = T.resolve("2hosts-2switches").read_text().replace("bus_nr: 64", "bus_nr: 14")
    assert errors(text) == [
        "my.yaml:19: host_bridges[1].bus_nr: bus 14 of host bridge 'hb1' is among the buses 12 to 16 "
        "that host bridge 'hb0' needs (one per root port, switch and downstream port)"]


def test_device_and_window_sizes_bounded():
    assert errors(BASE.replace("{id: mem1, size_mib: 256", f"{{id: mem1, size_mib: {2**40}")) == [
        "my.yaml:19: devices[1].size_mib: expected at most 524288 MiB (a device is mapped into the guests' physical "
        "address space, 40 bits (1 TiB) under TCG, shared with RAM), got 1099511627776"]
    assert errors(BASE.replace("size_mib: 512, targets", f"size_mib: {2**40}, targets")) == [
        "my.yaml:21: windows[0].size_mib: expected at most 524288 MiB (a window is mapped into the guests' physical "
        "address space, 40 bits (1 TiB) under TCG, shared with RAM), got 1099511627776"]


def test_backing_files_fit_the_pools_file_system():
    text = BASE.replace("size_mib: 256", "size_mib: 4096").replace("size_mib: 512, targets", "size_mib: 8192, targets")
    assert errors(text) == [
        "my.yaml:17: devices: the devices' backing files need 8192 MiB, more than the 4096 MiB of the file system "
        "that holds the pools (/dev/shm; BELUGA_TESTBED_POOLS chooses another folder)"]


@pytest.mark.parametrize("serial, shown", [("-1", "-0x1"), ("0xffffffffffffffff", "0xffffffffffffffff")])
def test_serial_within_64_bits(serial, shown):
    assert errors(BASE.replace("serial: 0x1001", f"serial: {serial}")) == [
        "my.yaml:19: devices[1].serial: expected a serial number from 0 to 0xfffffffffffffffe "
        f"(64 bits; QEMU reads all ones as none), got {shown}"]


def test_topology_validate_refuses_a_path_in_a_device_id(tmp_path, capsys):
    from testbed import cli
    f = tmp_path / "evil.yaml"
    f.write_text(BASE.replace("{id: mem0,", "{id: ../../../cache/images/KEY/rootfs,"))
    assert cli.main(["topology", "validate", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"✗ invalid topology:\n  {f}:16: host_bridges[0].root_ports[0].switch.devices[0]: "
                          f"unknown device 'mem0'")  # in the file's order
    assert f"\n  {f}:18: devices[0].id: invalid name '../../../cache/images/KEY/rootfs': {RULE}\n" in err
