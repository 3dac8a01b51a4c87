"""Every topology validation message, exactly as a user reads it (file:line: yaml.path: what).

tests/unit/test_topology_validation.py pins the first ones; this file pins the rest, one
rule each, so that a rule dropped or a message made vaguer fails a test. Where one
mistake causes follow-up errors, the full list is pinned too: it is what the user sees.
"""
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
TWO = """\
apiVersion: beluga.testbed/v1alpha1
kind: Topology
name: t2
hosts:
  count: 2
host_bridges:
  - id: hb0
    bus_nr: 12
    root_ports:
      - id: hb0-rp0
        switch:
          id: sw0
          downstream_ports: 2
          devices: [mem0, mem1]
  - id: hb1
    bus_nr: 64
    root_ports:
      - id: hb1-rp0
        switch:
          id: sw1
          downstream_ports: 2
          devices: [mem2, mem3]
devices:
  - {id: mem0, size_mib: 256, serial: 0x1000}
  - {id: mem1, size_mib: 256, serial: 0x1001}
  - {id: mem2, size_mib: 256, serial: 0x1002}
  - {id: mem3, size_mib: 256, serial: 0x1003}
windows:
  - {id: fmw0, size_mib: 1024, targets: [hb0, hb1], granularity_bytes: 4096}
pool:
  window: fmw0
  devices: [mem0, mem2, mem1, mem3]
  granularity_bytes: 4096
"""
HOSTS = "hosts:\n  count: 2\n  vcpus: 1\n  memory_mib: 1024\n"


def hosts(replacement: str) -> str:
    return BASE.replace(HOSTS, replacement)


def errors(text: str) -> list[str]:
    with pytest.raises(T.TopologyError) as e:
        T.parse(text, "my.yaml")
    return e.value.errors


def test_the_bases_are_valid():
    assert T.parse(BASE, "my.yaml").pool.devices == ("mem0", "mem1")
    assert T.parse(TWO, "my.yaml").pool.devices == ("mem0", "mem2", "mem1", "mem3")


def test_yaml_syntax():
    assert errors("a: [\n") == [
        "my.yaml:2: not valid YAML: expected the node content, but found '<stream end>'"]


def test_top_not_mapping():
    assert errors("- 1\n- 2\n") == [
        'my.yaml:1: (top): expected a mapping, got a list']


def test_unknown_key_no_close_match():
    assert errors(BASE + "zzz: 1\n") == [
        'my.yaml:26: zzz: unknown key (known: apiVersion, kind, name, hosts, host_bridges, devices, windows, pool, description, '
        'kernel)']


def test_missing_required_key():
    assert errors(BASE.replace("kind: Topology\n", "")) == [
        "my.yaml:1: (top): missing required key 'kind'"]


def test_integer_expected():
    assert errors(BASE.replace("  vcpus: 1\n", "  vcpus: many\n")) == [
        "my.yaml:6: hosts.vcpus: expected an integer, got a string 'many'"]


def test_boolean_is_not_an_integer():
    assert errors(BASE.replace("  vcpus: 1\n", "  vcpus: true\n")) == [
        'my.yaml:6: hosts.vcpus: expected an integer, got a boolean True']


def test_list_expected():
    assert errors(BASE.replace("windows:\n  - {id: fmw0, size_mib: 512, targets: [hb0], granularity_bytes: 4096}\n", "windows: fmw0\n")) == [
        'my.yaml:20: windows: expected a list, got a string',
        "my.yaml:22: pool.window: unknown window 'fmw0' (known: )"]


def test_bus_number_reused():
    assert errors(TWO.replace("bus_nr: 64", "bus_nr: 12")) == [
        'my.yaml:16: host_bridges[1].bus_nr: bus number 12 already used by host_bridges[0]']


def test_host_count_out_of_range():
    assert errors(hosts("hosts:\n  count: 9\n")) == [
        'my.yaml:5: hosts.count: expected 1 to 8 hosts, got 9']


def test_host_list_empty():
    assert errors(hosts("hosts: []\n")) == [
        'my.yaml:4: hosts: expected 1 to 8 hosts, got 0']


def test_hosts_wrong_type():
    assert errors(hosts("hosts: four\n")) == [
        "my.yaml:4: hosts: expected a mapping with 'count' or a list of hosts, got a string"]


def test_vcpus_zero():
    assert errors(hosts("hosts:\n  count: 1\n  vcpus: 0\n")) == [
        'my.yaml:6: hosts.vcpus: expected at least 1 vCPU, got 0']


def test_duplicate_host_name():
    assert errors(hosts("hosts:\n  - {name: a}\n  - {name: a}\n")) == [
        "my.yaml:6: hosts[1].name: duplicate host name 'a'"]


def test_bad_host_name():
    assert errors(hosts("hosts:\n  - {name: a_b}\n")) == [
        "my.yaml:5: hosts[0].name: invalid name 'a_b': use lower-case letters, digits and '-', "
        "starting with a letter or digit, at most 63 characters"]


def test_unknown_device_no_close_match():
    assert errors(BASE.replace("devices: [mem0, mem1]\n", "devices: [mem0, zzz]\n", 1)) == [
        "my.yaml:16: host_bridges[0].root_ports[0].switch.devices[1]: unknown device 'zzz' (known: mem0, mem1)",
        "my.yaml:17: devices: device 'mem1' is not attached to any root port or switch"]


def test_device_attached_twice():
    assert errors(BASE.replace("devices: [mem0, mem1]\n", "devices: [mem0, mem0]\n", 1)) == [
        "my.yaml:16: host_bridges[0].root_ports[0].switch.devices[1]: device 'mem0' is already attached at host_bridges[0].root_ports[0].switch.devices[0]",
        "my.yaml:17: devices: device 'mem1' is not attached to any root port or switch"]


def test_bus_nr_out_of_range():
    assert errors(BASE.replace("bus_nr: 12", "bus_nr: 0")) == [
        'my.yaml:10: host_bridges[0].bus_nr: expected a PCI bus number 1..254, got 0']


def test_root_port_switch_and_device():
    assert errors(BASE.replace("      - id: hb0-rp0\n", "      - id: hb0-rp0\n        device: mem0\n")) == [
        "my.yaml:12: host_bridges[0].root_ports[0]: expected exactly one of 'switch' or 'device' below a root port",
        "my.yaml:18: devices: device 'mem0' is not attached to any root port or switch",
        "my.yaml:18: devices: device 'mem1' is not attached to any root port or switch"]


def test_a_root_port_without_switch_or_device_does_not_hide_the_next_ones():
    assert errors(BASE.replace("    root_ports:\n", "    root_ports:\n      - {id: hb0-rpx}\n")) == [
        "my.yaml:12: host_bridges[0].root_ports[0]: expected exactly one of 'switch' or 'device' below a root port"]


def test_as_many_root_ports_as_the_bus_has_device_numbers():
    rps = "".join(f"      - {{id: rp{i}, device: mem9}}\n" for i in range(31))
    errs = errors(BASE.replace("    root_ports:\n", "    root_ports:\n" + rps))
    assert errs[0] == ("my.yaml:12: host_bridges[0].root_ports[0].device: unknown device 'mem9' "
                       "(did you mean 'mem1'? known: mem0, mem1)")
    assert not [e for e in errs if "root ports:" in e]  # 32 root ports: no complaint about their number


def test_no_downstream_ports():
    assert errors(BASE.replace("downstream_ports: 2", "downstream_ports: 0")) == [
        'my.yaml:15: host_bridges[0].root_ports[0].switch.downstream_ports: expected at least 1 downstream port, got 0']


def test_more_devices_than_downstream_ports():
    assert errors(BASE.replace("downstream_ports: 2", "downstream_ports: 1")) == [
        "my.yaml:16: host_bridges[0].root_ports[0].switch.devices: 2 devices below switch 'sw0' but only "
        "1 downstream ports"]


def test_switch_device_not_an_id():
    assert errors(BASE.replace("devices: [mem0, mem1]\n", "devices: [mem0, 5]\n", 1)) == [
        'my.yaml:16: host_bridges[0].root_ports[0].switch.devices[1]: expected a device id, got an integer',
        "my.yaml:17: devices: device 'mem1' is not attached to any root port or switch"]


def test_window_granularity():
    assert errors(BASE.replace("targets: [hb0], granularity_bytes: 4096", "targets: [hb0], granularity_bytes: 100")) == [
        'my.yaml:21: windows[0].granularity_bytes: expected a power of two the kernel accepts (256, 512, 1024, 2048, 4096, 8192, 16384), got 100']


def test_window_size():
    assert errors(BASE.replace("size_mib: 512, targets", "size_mib: 700, targets")) == [
        'my.yaml:21: windows[0].size_mib: expected a positive multiple of 256 MiB, got 700']


def test_window_unknown_target():
    assert errors(BASE.replace("targets: [hb0]", "targets: [hb9]")) == [
        "my.yaml:21: windows[0].targets[0]: unknown host bridge 'hb9' (known: hb0)",
        "my.yaml:24: pool.devices[0]: interleave position 0 must be a device below host bridge 'hb9' (window 'fmw0' target 0), but 'mem0' is below 'hb0'",
        "my.yaml:24: pool.devices[1]: interleave position 1 must be a device below host bridge 'hb9' (window 'fmw0' target 0), but 'mem1' is below 'hb0'"]


def test_window_ways():
    assert errors(BASE.replace("targets: [hb0]", "targets: [hb0, hb0, hb0, hb0, hb0]")) == [
        'my.yaml:21: windows[0].targets: 5 targets: interleave ways the kernel accepts are 1, 2, 3, 4, 6, 8, 12, 16',
        "my.yaml:24: pool.devices: 2 devices cannot be spread evenly over the window's 5 host bridges"]


def test_pool_unknown_window():
    assert errors(BASE.replace("  window: fmw0\n", "  window: fmw9\n")) == [
        "my.yaml:23: pool.window: unknown window 'fmw9' (known: fmw0)"]


def test_pool_unknown_device():
    assert errors(BASE.replace("  devices: [mem0, mem1]\n  gran", "  devices: [mem0, mem9]\n  gran")) == [
        "my.yaml:24: pool.devices[1]: unknown device 'mem9' (known: mem0, mem1)"]


def test_pool_device_twice():
    assert errors(BASE.replace("  devices: [mem0, mem1]\n  gran", "  devices: [mem0, mem0]\n  gran")) == [
        'my.yaml:24: pool.devices: a device appears twice in the pool']


def test_pool_mixed_sizes():
    assert errors(BASE.replace("{id: mem1, size_mib: 256,", "{id: mem1, size_mib: 512,").replace("size_mib: 512, targets", "size_mib: 1024, targets")) == [
        'my.yaml:24: pool.devices: interleaved devices must have one size, got [256, 512] MiB']


def test_pool_ways_not_multiple_of_window_ways():
    assert errors(TWO.replace("devices: [mem0, mem2, mem1, mem3]", "devices: [mem0, mem2, mem1]")) == [
        "my.yaml:32: pool.devices: 3 devices cannot be spread evenly over the window's 2 host bridges"]


def test_pool_position_below_wrong_bridge():
    assert errors(TWO.replace("devices: [mem0, mem2, mem1, mem3]", "devices: [mem0, mem1, mem2, mem3]")) == [
        "my.yaml:32: pool.devices[1]: interleave position 1 must be a device below host bridge 'hb1' (window 'fmw0' target 1), but 'mem1' is below 'hb0'",
        "my.yaml:32: pool.devices[2]: interleave position 2 must be a device below host bridge 'hb0' (window 'fmw0' target 0), but 'mem2' is below 'hb1'"]


def test_pool_granularity_differs_across_bridges():
    assert errors(TWO.replace("  granularity_bytes: 4096\n", "  granularity_bytes: 8192\n")) == [
        "my.yaml:33: pool.granularity_bytes: expected 4096 (the window's): the kernel requires the region granularity to equal the window's when the window interleaves host bridges"]


def test_pool_granularity_below_window():
    assert errors(BASE.replace("  granularity_bytes: 4096\n", "  granularity_bytes: 2048\n")) == [
        "my.yaml:25: pool.granularity_bytes: expected at least the window's 4096"]


def test_no_such_file_and_unknown_builtin_without_a_close_name():
    with pytest.raises(T.TopologyError) as e:
        T.load("nope.yaml")
    assert e.value.errors == ["nope.yaml: no such topology file"]
    with pytest.raises(T.TopologyError) as e:
        T.load("zzzz")
    assert e.value.errors == [f"zzzz: no built-in topology of that name (built in: {', '.join(T.builtin_names())}); "
                              "give a path to use a file"]


# ---------------------------------------------------------------- found by `make mutate`

def test_host_list_defaults():
    t = T.parse(hosts("hosts:\n  - {name: a}\n  - {name: b, vcpus: 2, memory_mib: 2048}\n"), "my.yaml")
    assert [(h.name, h.vcpus, h.memory_mib) for h in t.hosts] == [("a", 1, 1024), ("b", 2, 2048)]


def test_bus_number_1_is_valid():
    assert T.parse(BASE.replace("bus_nr: 12", "bus_nr: 1"), "my.yaml").host_bridges[0].bus_nr == 1


def test_a_host_bridge_that_is_not_a_mapping_is_an_error_not_a_crash():
    text = TWO.replace("  - id: hb0\n    bus_nr: 12\n", "  - 5\n  - id: hb0\n    bus_nr: 12\n", 1)
    text = text.replace("  - id: hb0\n    bus_nr: 12\n    root_ports:\n      - id: hb0-rp0\n        switch:\n"
                        "          id: sw0\n          downstream_ports: 2\n          devices: [mem0, mem1]\n", "", 1)
    errs = errors(text)
    assert errs[0] == "my.yaml:7: host_bridges[0]: expected a mapping, got an integer"


def test_a_half_written_host_bridge_does_not_hide_the_next_one():
    """An incomplete entry reports what it lacks; the entries after it are still checked
    (their devices count as attached, so there is no follow-up error about them)."""
    assert errors(BASE.replace("host_bridges:\n", "host_bridges:\n  - id: hbx\n")) == [
        "my.yaml:9: host_bridges[0]: missing required key 'bus_nr'",
        "my.yaml:9: host_bridges[0]: missing required key 'root_ports'"]


def test_a_half_written_switch_is_an_error_not_a_crash():
    errs = errors(BASE.replace("          downstream_ports: 2\n          devices: [mem0, mem1]\n", ""))
    assert errs[:2] == ["my.yaml:13: host_bridges[0].root_ports[0].switch: missing required key 'downstream_ports'",
                        "my.yaml:13: host_bridges[0].root_ports[0].switch: missing required key 'devices'"]


def test_a_half_written_window_does_not_hide_the_next_one():
    text = BASE.replace("windows:\n", "windows:\n  - {id: fmwx, size_mib: 512}\n")
    assert errors(text) == [
        "my.yaml:21: windows[0]: missing required key 'targets'",
        "my.yaml:21: windows[0]: missing required key 'granularity_bytes'"]


def test_the_limits_themselves_are_allowed():
    """Eight hosts, as many vCPUs as the machine has cores (tests/unit/conftest.py: 4)."""
    t = T.parse(hosts("hosts:\n  count: 8\n  vcpus: 4\n  memory_mib: 1024\n"), "my.yaml")
    assert len(t.hosts) == 8 and {h.vcpus for h in t.hosts} == {4}


def test_serial_numbers_from_zero_to_the_largest_are_allowed():
    t = T.parse(BASE.replace("serial: 0x1000", "serial: 0").replace("serial: 0x1001", f"serial: {T.MAX_SERIAL:#x}"),
                "my.yaml")
    assert [d.serial for d in t.devices] == [0, T.MAX_SERIAL]


def test_a_topologys_kernel_section_is_checked_too():
    n = len(BASE.splitlines())
    assert errors(BASE + "kernel:\n  modules: /nonexistent/beluga-modules\n") == [
        f"my.yaml:{n + 2}: kernel.modules: /nonexistent/beluga-modules: no such folder"]


def test_host_count_defaults():
    t = T.parse(hosts("hosts:\n  count: 2\n"), "my.yaml")
    assert [(h.name, h.vcpus, h.memory_mib) for h in t.hosts] == [("host0", 1, 1024), ("host1", 1, 1024)]


def test_smallest_hosts_still_count_against_the_machines_memory(monkeypatch):
    small = T.Machine(cpus=4, memory_mib=2048, pools_fs="/dev/shm", pools_fs_mib=4096)
    monkeypatch.setattr(T, "this_machine", lambda: small)
    assert errors(hosts("hosts:\n  count: 8\n  memory_mib: 512\n")) == [
        "my.yaml:4: hosts: 8 hosts need 4096 MiB of memory together, more than this machine's 2048 MiB "
        "(MemTotal in /proc/meminfo)"]


def test_hosts_as_large_as_the_machine_still_count_against_its_memory(monkeypatch):
    small = T.Machine(cpus=4, memory_mib=2048, pools_fs="/dev/shm", pools_fs_mib=4096)
    monkeypatch.setattr(T, "this_machine", lambda: small)
    assert errors(hosts("hosts:\n  count: 2\n  memory_mib: 2048\n")) == [
        "my.yaml:4: hosts: 2 hosts need 4096 MiB of memory together, more than this machine's 2048 MiB "
        "(MemTotal in /proc/meminfo)"]


def test_a_window_of_size_zero():
    assert errors(BASE.replace("size_mib: 512, targets", "size_mib: 0, targets")) == [
        "my.yaml:21: windows[0].size_mib: expected a positive multiple of 256 MiB, got 0",
        "my.yaml:23: pool.window: window 'fmw0' is 0 MiB, too small for the pool's 512 MiB"]


ONE_DEVICE = (BASE.replace("devices: [mem0, mem1]\n", "devices: [mem0]\n", 1)
              .replace("  - {id: mem1, size_mib: 256, serial: 0x1001}\n", "")
              .replace("  devices: [mem0, mem1]\n  gran", "  devices: [mem0]\n  gran")
              .replace("size_mib: 512, targets", "size_mib: 256, targets"))


@pytest.mark.parametrize("ports", [1, 10, 32])
def test_port_ids_made_from_a_switch_id_must_stay_names(ports):
    """The switch's ports are named '<switch id>-dsp<k>': with 1, 10 and 32 (the most)
    downstream ports, a switch id one character too long is refused."""
    last = f"-dsp{ports - 1}"
    fits = "s" * (63 - len(last))
    text = ONE_DEVICE.replace("downstream_ports: 2", f"downstream_ports: {ports}")
    assert T.parse(text.replace("id: sw0", f"id: {fits}"), "my.yaml").host_bridges[0].root_ports[0].switch.id == fits
    assert errors(text.replace("id: sw0", f"id: {fits}s")) == [
        f"my.yaml:14: host_bridges[0].root_ports[0].switch.id: makes port id '{fits}s{last}', longer than 63 characters"]


def test_hosts_without_a_count():
    assert errors(hosts("hosts:\n  vcpus: 1\n")) == ["my.yaml:4: hosts: missing required key 'count'"]


def test_a_half_written_device_does_not_hide_the_next_ones():
    assert errors(BASE.replace("devices:\n  - {id: mem0", "devices:\n  - {id: memx, size_mib: 256}\n  - {id: mem0")) == [
        "my.yaml:18: devices[0]: missing required key 'serial'"]


def test_a_window_may_be_as_large_as_the_limit_and_no_larger():
    most = T.MAX_SIZE_MIB
    assert T.parse(BASE.replace("size_mib: 512, targets", f"size_mib: {most}, targets"), "my.yaml").windows[0].size_mib \
        == most
    assert errors(BASE.replace("size_mib: 512, targets", f"size_mib: {most + 256}, targets")) == [
        f"my.yaml:21: windows[0].size_mib: expected at most {most} MiB (a window is {T.ADDRESS_SPACE_WHY}), "
        f"got {most + 256}"]


def test_a_half_written_pool_is_an_error_not_a_crash():
    assert errors(BASE.replace("  granularity_bytes: 4096\n", "")) == [
        "my.yaml:22: pool: missing required key 'granularity_bytes'"]
