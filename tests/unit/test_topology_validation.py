"""Each validation rule, with the exact message a user reads (file:line: path: what)."""
import pytest

from testbed import topology as T

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
