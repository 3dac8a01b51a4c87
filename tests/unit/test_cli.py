"""The command line in-process (`main([...])`): exit codes, and what a user reads on
stdout (data) and stderr (progress, errors). SSH answers are faked; state is real files."""
from __future__ import annotations

import json
import signal

import pytest

from testbed import cli, lifecycle
from testbed import ssh
from testbed import topology as T
from testbed.ssh import Result
from testbed.state import TestbedState


@pytest.fixture(autouse=True)
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("BELUGA_TESTBED_POOLS", str(tmp_path / "pools"))
    # main() turns SIGTERM/SIGHUP into KeyboardInterrupt: give pytest its own handlers back.
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield tmp_path
    for s, h in old.items():
        signal.signal(s, h)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_testbed(tmp_path, name="tb", topology="2hosts-1switch") -> TestbedState:
    """A testbed's state as `up` leaves it, with hosts that are not running."""
    t = T.load(topology)
    d = lifecycle.testbed_dir(name)
    d.mkdir(parents=True)
    hosts = [{"name": h.name, "pid": None, "ssh_port": 10022 + i, "dir": str(d / h.name), "argv": []}
             for i, h in enumerate(t.hosts)]
    data = {"name": name, "topology": t.name, "topology_source": t.source,
            "topology_yaml": T.resolve(topology).read_text(), "accel": "tcg", "image": "k1",
            "created_at": "2026-01-01T00:00:00+0000", "pool_dir": str(tmp_path / "pools" / name),
            "pool_files": {d_.id: str(tmp_path / "pools" / name / f"{d_.id}.raw") for d_ in t.devices},
            "hosts": hosts, "pool": None}
    return TestbedState.from_json(data, d).save()


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bogus"])
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_status_of_a_testbed_that_is_not_there(capsys):
    code, out, err = run(capsys, "status", "nope")
    assert code == 1 and out == ""
    assert err == "✗ no testbed named 'nope'\n  hint: none is running; 'beluga-testbed up TOPOLOGY' starts one\n"


def test_down_needs_a_name_and_is_idempotent(capsys):
    code, _, err = run(capsys, "down")
    assert (code, err) == (1, "✗ name a testbed, or --all\n  hint: none is running\n")
    code, _, err = run(capsys, "down", "nope")
    assert (code, err) == (0, "✓ nope was not running (nothing to do)\n")
    code, out, err = run(capsys, "down", "--all")
    assert (code, out, err) == (0, "", "")


def test_up_with_an_unknown_topology_names_the_built_in_ones(capsys):
    code, out, err = run(capsys, "up", "4host-1switch")
    assert code == 1 and out == ""
    assert err.startswith("✗ invalid topology:\n  4host-1switch: no built-in topology of that name "
                          "(did you mean '4hosts-1switch'? built in: ")
    assert "Traceback" not in err


def test_topology_validate_reports_every_error_located(tmp_path, capsys):
    good = T.resolve("2hosts-1switch")
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("bus_nr: 12", "bus_nr: 0").replace("serial: 0x1001", "serial: 0x1000"))
    code, out, err = run(capsys, "topology", "validate", str(good))
    assert code == 0 and out == f"{good}: ok (2hosts-1switch: 2 host(s), 2 device(s), 2-way pool of 512 MiB)\n"
    code, out, err = run(capsys, "topology", "validate", str(bad))
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0] == "✗ invalid topology:" and sorted(lines[1:]) == [
        f"  {bad}:11: host_bridges[0].bus_nr: expected a PCI bus number 1..254, got 0",
        f"  {bad}:20: devices[1].serial: serial 0x1000 already used by devices[0]: "
        "serial numbers tell the devices apart inside the guests"]


def test_topology_show_lists_and_draws(capsys):
    code, out, _ = run(capsys, "topology", "show")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == T.builtin_names()
    code, out, _ = run(capsys, "topology", "show", "2hosts-1switch")
    assert code == 0 and out.startswith("2hosts-1switch: 2 host(s) (host0, host1)")


def test_up_dry_run_prints_each_hosts_command_and_starts_nothing(capsys):
    code, out, err = run(capsys, "up", "2hosts-1switch", "--name", "dry", "--dry-run")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "# dry/host0" and lines[2] == "# dry/host1" and lines[1].startswith("qemu-system-x86_64 ")
    assert "mem0.raw" in lines[1] and lines[1].count("cxl-type3") == 2
    assert lifecycle.names() == []


def test_exec_needs_a_command_and_a_host(tmp_path, capsys):
    write_testbed(tmp_path)
    code, _, err = run(capsys, "exec", "tb", "--all")
    assert (code, err) == (1, "✗ no command given\n  hint: beluga-testbed exec NAME HOST|--all -- CMD ...\n")
    code, _, err = run(capsys, "exec", "tb", "--", "true")
    assert (code, err) == (1, "✗ name a host, or --all\n  hint: hosts: host0, host1\n")
    code, _, err = run(capsys, "exec", "tb", "host9", "--", "true")
    assert (code, err) == (1, "✗ testbed 'tb' has no host 'host9' (hosts: host0, host1)\n")


def test_exec_on_all_hosts_exit_code_follows_the_worst_host(tmp_path, capsys, monkeypatch):
    write_testbed(tmp_path)
    sent = []

    def fake_run(host, port, key, command, *, timeout_s):
        sent.append((host, port, command, timeout_s))
        if host == "host0":
            return Result(host, 0, "ok from host0\n", "")
        return Result(host, 2, "", "ls: cannot access '/nope': No such file or directory\n")

    monkeypatch.setattr(ssh, "run", fake_run)
    code, out, err = run(capsys, "exec", "tb", "--all", "--timeout", "7", "--", "ls", "/nope")
    assert code == 1
    assert sorted(sent) == [("host0", 10022, "ls /nope", 7.0), ("host1", 10023, "ls /nope", 7.0)]
    assert out == "=== host0 (exit 0)\nok from host0\n=== host1 (exit 2)\n"
    assert err == "ls: cannot access '/nope': No such file or directory\n✗ failed on 1 of 2 host(s): host1\n"

    monkeypatch.setattr(ssh, "run", lambda host, port, key, command, *, timeout_s: Result(host, 0, "hi\n", ""))
    code, out, err = run(capsys, "exec", "tb", "host1", "--", "echo hi")
    assert (code, out, err) == (0, "hi\n", "")

    monkeypatch.setattr(ssh, "run", lambda host, port, key, command, *, timeout_s: Result(
        host, -1, "", "", error="NoValidConnectionsError: Unable to connect to port 10023"))
    code, out, err = run(capsys, "exec", "tb", "host1", "--", "true")
    assert code == 1 and err == ("✗ host1: NoValidConnectionsError: Unable to connect to port 10023\n"
                                 "✗ failed on 1 of 1 host(s): host1\n")


def test_status_and_list_of_a_testbed(tmp_path, capsys):
    write_testbed(tmp_path)
    code, out, _ = run(capsys, "list")
    assert (code, out) == (0, "tb\n")
    code, out, _ = run(capsys, "status", "tb", "--json")
    st = json.loads(out)
    assert code == 0 and [(h["name"], h["state"], h["pool"]) for h in st["hosts"]] == [
        ("host0", "stopped", "-"), ("host1", "stopped", "-")]
    code, out, _ = run(capsys, "status")
    assert code == 0 and out.splitlines()[0] == "tb (topology 2hosts-1switch, accel tcg, image k1, since 2026-01-01T00:00:00+0000)"


def test_pool_before_provisioning(tmp_path, capsys):
    write_testbed(tmp_path)
    code, out, _ = run(capsys, "pool", "tb")
    assert code == 0
    assert "pool of tb: 512 MiB, 2-way, granularity 4096 B (stripe 8192 B), window fmw0" in out
    assert "hosts: pool not provisioned yet ('beluga-testbed provision NAME')" in out


def test_run_needs_a_scenario(capsys):
    code, _, err = run(capsys, "run")
    assert (code, err) == (1, "✗ name a scenario (a file or a built-in name)\n  hint: 'beluga-testbed run --list'\n")


def test_image_rm_needs_keys(capsys):
    code, _, err = run(capsys, "image", "rm")
    assert (code, err) == (1, "✗ name the image keys to remove, or --all\n  hint: 'beluga-testbed image list' shows the keys\n")


def test_an_interrupt_exits_130(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle, "names", interrupted)
    code, _, err = run(capsys, "list")
    assert (code, err) == (130, "✗ interrupted\n")


def test_sigterm_becomes_an_interrupt(capsys, monkeypatch):
    """`kill` of the CLI (or a closed terminal) runs the same clean-up as Ctrl-C."""
    import os

    def killed():
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have interrupted this")

    monkeypatch.setattr(lifecycle, "names", killed)
    code, _, err = run(capsys, "list")
    assert (code, err) == (130, "✗ interrupted\n")
