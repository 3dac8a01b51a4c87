"""`up`, its rollback and `down`, with real processes standing in for QEMU.

No VM boots here: each host's "QEMU" is a small real process (its command line names
the host's folder, as QEMU's does, so the pid checks apply), which writes the guest's
console lines to the serial log or exits the way a broken QEMU does. QMP and SSH are
the faked boundaries. What must hold whatever the failure: after a failed `up`
without --retain, no process of the testbed is left and no file either; with --retain
both are left, and `down` removes them.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from testbed import image as image_mod
from testbed import lifecycle as L
from testbed import machine, paths, qmp
from testbed.log import TestbedError

FAKE_QEMU = r"""
import signal, socket, sys, time
host_dir, mode = sys.argv[1], sys.argv[2]
if mode == "exit":
    print("qemu-system-x86_64: -device cxl-type3: memory backend is too small", flush=True)
    sys.exit(3)
qmp = socket.socket(socket.AF_UNIX)  # where QEMU's monitor listens (the fake QMP answers for it)
qmp.bind(host_dir + "/qmp.sock")
qmp.listen()
if mode == "boot":
    with open(host_dir + "/serial.log", "ab") as f:
        f.write(b"[    2.0] beluga: sshd started\n")
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
while True:
    time.sleep(1)
"""


def live_processes_under(path: Path) -> list[int]:
    """Pids of live (not zombie) processes whose command line mentions `path`."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path).encode() in cmd and state != "Z":
            out.append(int(p.name))
    return out


def wait_for(cond, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def bed(tmp_path, monkeypatch):
    """State and pools under tmp_path, a fake image, fake QEMUs by host, QMP and SSH faked."""
    state, pools = tmp_path / "s", tmp_path / "p"
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(state))
    monkeypatch.setenv("BELUGA_TESTBED_POOLS", str(pools))
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    for f in ("vmlinux", "initrd.img", "disk.qcow2"):
        (img_dir / f).write_bytes(b"")
    img = image_mod.Image(key="testkey", path=img_dir, manifest={"kernel_file": "vmlinux", "kernel_cmdline": "console=ttyS0"})
    monkeypatch.setattr(L.image_mod, "require_image", lambda: img)
    monkeypatch.setattr(L.accel_mod, "choose", lambda requested, kernel: ("tcg", "accelerator tcg (test)"))

    modes: dict[str, str] = {}  # host -> exit | boot | hang; default boot

    def host_argv(t, name, h, **kw):
        return [sys.executable, "-c", FAKE_QEMU, str(L.testbed_dir(name) / h.name), modes.get(h.name, "boot")]

    monkeypatch.setattr(L, "_host_argv", host_argv)
    real_run = L.subprocess.run

    def run(argv, *a, **kw):  # qemu-img: the overlay file, without qemu-img's work
        if argv[0] == "qemu-img":
            Path(argv[-1]).write_bytes(b"")
            return L.subprocess.CompletedProcess(argv, 0)
        return real_run(argv, *a, **kw)

    monkeypatch.setattr(L.subprocess, "run", run)
    qmp_calls = []

    def qmp_execute(sock, command, arguments=None, *, timeout_s=5.0):
        """QEMU's answers: its status while it runs; to 'quit', it exits."""
        qmp_calls.append((Path(sock).parent.name, command))
        tb = json.loads((Path(sock).parent.parent / L.STATE_FILE).read_text())
        pid = next(h["pid"] for h in tb["hosts"] if h["dir"] == str(Path(sock).parent))
        if command == "query-status":
            return {"status": "running", "running": True}
        assert command == "quit", command
        os.kill(pid, signal.SIGTERM)
        return {}

    monkeypatch.setattr(qmp, "execute", qmp_execute)
    monkeypatch.setattr(L.ssh, "wait_ready", lambda port, key, *, timeout_s, alive=lambda: True: None)

    class Bed:
        pass

    b = Bed()
    b.state, b.pools, b.modes, b.qmp_calls, b.tmp = state, pools, modes, qmp_calls, tmp_path
    yield b
    # Whatever a test did: no fake QEMU outlives it.
    for pid in live_processes_under(tmp_path):
        os.kill(pid, signal.SIGKILL)


def assert_gone(bed, name: str) -> None:
    assert live_processes_under(bed.tmp) == [], "every host process of the testbed is stopped"
    assert not (bed.state / name).exists(), "no state folder is left"
    assert not (bed.pools / name).exists(), "no pool files are left"
    assert L.names() == []


def test_up_status_down(bed, capsys):
    tb = L.up("2hosts-1switch", name="ok", accel="tcg", provision=False)
    assert [h.name for h in tb.hosts] == ["host0", "host1"] and all(h.alive() for h in tb.hosts)
    assert sorted(p.name for p in (bed.pools / "ok").iterdir()) == ["mem0.raw", "mem1.raw"]
    assert (bed.pools / "ok" / "mem0.raw").stat().st_size == 256 << 20
    st = L.status("ok")
    assert [(h["name"], h["state"], h["pool"]) for h in st["hosts"]] == [
        ("host0", "running", "not ready"), ("host1", "running", "not ready")]
    assert (st["topology"], st["accel"], st["image"]) == ("2hosts-1switch", "tcg", "testkey")
    assert L.names() == ["ok"]
    assert "✓ ok is up: 2 host(s) ready" in capsys.readouterr().err
    assert L.down("ok") is True
    assert sorted(c for c in bed.qmp_calls if c[1] == "quit") == [("host0", "quit"), ("host1", "quit")], \
        "QMP quit first, politely"
    assert_gone(bed, "ok")
    assert L.down("ok") is False, "down is idempotent"


def test_a_host_that_exits_at_start_rolls_everything_back(bed, capsys):
    bed.modes["host1"] = "exit"
    with pytest.raises(TestbedError) as e:
        L.up("2hosts-1switch", name="rb", accel="tcg", provision=False)
    msg = str(e.value)
    assert msg.startswith("host1: QEMU exited") and "(exit 3)" in msg
    assert "qemu-system-x86_64: -device cxl-type3: memory backend is too small" in msg, "the QEMU log's tail"
    assert "✓ roll back 'rb'" in capsys.readouterr().err
    assert_gone(bed, "rb")


def test_ssh_that_never_answers_rolls_back_the_running_hosts(bed, monkeypatch):
    def wait_ready(port, key, *, timeout_s, alive=lambda: True):
        raise TimeoutError(f"no SSH answer on 127.0.0.1:{port} within 180 s")

    monkeypatch.setattr(L.ssh, "wait_ready", wait_ready)
    with pytest.raises(TestbedError) as e:
        L.up("2hosts-1switch", name="rb", accel="tcg", provision=False)
    assert "no SSH answer on 127.0.0.1:" in str(e.value)
    assert_gone(bed, "rb")


def test_a_pool_that_fails_to_provision_rolls_back(bed, monkeypatch):
    from testbed import provision

    def fail(tb, **kw):
        assert all(h.alive() for h in tb.hosts), "provisioning runs on booted hosts"
        raise TestbedError("host1: pool create at boot failed: no space left in decoder0.0")

    monkeypatch.setattr(provision, "provision", fail)
    with pytest.raises(TestbedError) as e:
        L.up("2hosts-1switch", name="rb", accel="tcg")
    assert str(e.value) == "host1: pool create at boot failed: no space left in decoder0.0"
    assert_gone(bed, "rb")


def test_an_interrupt_rolls_back_and_is_raised_again(bed, monkeypatch, capsys):
    def interrupted(port, key, *, timeout_s, alive=lambda: True):
        raise KeyboardInterrupt

    monkeypatch.setattr(L.ssh, "wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        L.up("2hosts-1switch", name="rb", accel="tcg", provision=False)
    assert "interrupted" in capsys.readouterr().err
    assert_gone(bed, "rb")


def test_retain_keeps_everything_for_inspection_until_down(bed, capsys):
    bed.modes["host1"] = "exit"
    with pytest.raises(TestbedError):
        L.up("2hosts-1switch", name="kept", accel="tcg", retain=True, provision=False)
    assert "--retain: leaving 'kept' as it is" in capsys.readouterr().err
    assert (bed.state / "kept" / L.STATE_FILE).is_file() and (bed.pools / "kept" / "mem0.raw").is_file()
    tb = L.find("kept")
    wait_for(lambda: tb.host("host0").alive(), what="host0 to run")
    assert not tb.host("host1").alive()
    assert L.names() == ["kept"]
    assert L.down("kept") is True
    assert_gone(bed, "kept")


def test_up_refuses_a_name_in_use(bed):
    L.up("1host-1switch", name="dup", accel="tcg", provision=False)
    with pytest.raises(TestbedError) as e:
        L.up("1host-1switch", name="dup", accel="tcg", provision=False)
    assert str(e.value) == ("testbed 'dup' is up (host0 running)\n"
                            "  hint: 'beluga-testbed down dup' first, or pick another --name")
    assert L.find("dup").host("host0").alive(), "the running testbed is left alone"
    L.down("dup")
    assert_gone(bed, "dup")


def test_up_over_leftovers_says_so(bed):
    L.up("1host-1switch", name="left", accel="tcg", provision=False)
    tb = L.find("left")
    pid = tb.host("host0").pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not tb.host("host0").alive(), what="the host to die")
    with pytest.raises(TestbedError) as e:
        L.up("1host-1switch", name="left", accel="tcg", provision=False)
    assert str(e.value).startswith("testbed 'left' has leftovers from an earlier run\n")
    assert L.down("left") is True
    assert_gone(bed, "left")


def test_a_second_command_on_the_same_testbed_is_refused(bed):
    paths.state_dir().mkdir(parents=True)
    with open(paths.state_dir() / ".busy.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TestbedError) as e:
            L.down("busy")
    assert str(e.value) == "another beluga-testbed command is working on 'busy'\n  hint: wait for it to finish"


def test_find_names_what_is_running(bed):
    with pytest.raises(TestbedError) as e:
        L.find("nope")
    assert str(e.value) == ("no testbed named 'nope'\n"
                            "  hint: none is running; 'beluga-testbed up TOPOLOGY' starts one")
    L.up("1host-1switch", name="one", accel="tcg", provision=False)
    with pytest.raises(TestbedError) as e:
        L.find("nope")
    assert str(e.value) == "no testbed named 'nope'\n  hint: running: one"
    with pytest.raises(TestbedError) as e:
        L.find("one").host("host7")
    assert str(e.value) == "testbed 'one' has no host 'host7' (hosts: host0)"
    L.down("one")


def test_down_of_a_host_that_ignores_quit_and_sigterm_escalates(bed, monkeypatch):
    """A QEMU stuck so that QMP gets no answer and SIGTERM is ignored still goes (SIGKILL)."""
    bed.modes["host0"] = "boot"
    L.up("1host-1switch", name="stuck", accel="tcg", provision=False)
    tb = L.find("stuck")
    pid = tb.host("host0").pid

    def no_answer(sock, command, arguments=None, *, timeout_s=5.0):
        raise TimeoutError("QMP did not answer")

    monkeypatch.setattr(qmp, "execute", no_answer)
    sent = []
    real_kill = os.kill
    monkeypatch.setattr(machine.Machine, "_wait_gone", lambda m, t: (not m.alive()) if sent else False)

    def kill(p, sig):
        sent.append(sig)
        if sig == signal.SIGKILL:
            real_kill(p, sig)
            wait_for(lambda: not L.pid_is_ours(p, tb.host("host0").dir), what="SIGKILL to take effect")

    monkeypatch.setattr(L.os, "kill", kill)
    assert L.down("stuck") is True
    assert sent == [signal.SIGTERM, signal.SIGKILL] and pid not in live_processes_under(bed.tmp)
    assert_gone(bed, "stuck")
