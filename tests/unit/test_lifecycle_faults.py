"""`up` and `down` under faults, with a fake QEMU (tests/unit/data/fake_qemu.py) that binds
the SSH forward's port, writes its pid file and sockets and answers on QMP, but boots no
guest. Real processes, files, sockets and ports; the SSH probe is the only thing faked."""
import json
import shlex
import os
import shutil
import signal as signal_mod
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from testbed import image as image_mod
from testbed import lifecycle, qemucmd
from testbed.log import TestbedError

DATA = Path(__file__).parent / "data"


class Fakes:
    def __init__(self, root: Path):
        self.root = root
        self.state = root / "state"
        self.pools = root / "pools"
        self.record = root / "qemu-starts.jsonl"

    def starts(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def alive(self, pids=None) -> list[int]:
        """Those of `pids` (default: every fake QEMU that got as far as recording its start)
        still running, zombies aside."""
        out = []
        for pid in pids if pids is not None else [s["pid"] for s in self.starts()]:
            try:
                st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if st != "Z":
                out.append(pid)
        return out


@pytest.fixture
def fakes(monkeypatch):
    # A short root: unix socket paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="bt-", dir="/tmp"))
    f = Fakes(root)
    qemu = root / "qemu-system-x86_64"
    qemu.write_text(f"#!/bin/sh\nexec {sys.executable} {DATA / 'fake_qemu.py'} \"$@\"\n")
    qemu.chmod(0o755)
    img = root / "image"
    img.mkdir()
    for n in ("vmlinux", "initrd.img"):
        (img / n).write_bytes(b"")
    with open(img / "rootfs.raw", "wb") as fh:
        fh.truncate(1 << 20)
    fake_image = image_mod.Image(key="fake", path=img,
                                 manifest={"kernel_file": "vmlinux", "kernel_cmdline": "console=ttyS0"})
    monkeypatch.setattr(qemucmd, "QEMU", str(qemu))
    monkeypatch.setattr(image_mod, "require_image", lambda: fake_image)
    monkeypatch.setattr(lifecycle.ssh, "wait_ready", lambda *a, **k: None)  # no guest, no sshd
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(f.state))
    monkeypatch.setenv("BELUGA_TESTBED_POOLS", str(f.pools))
    monkeypatch.setenv("FAKE_QEMU_RECORD", str(f.record))
    yield f
    for pid in f.alive():
        os.kill(pid, 9)
    shutil.rmtree(root, ignore_errors=True)


def up(name="tb", topology="2hosts-1switch"):
    return lifecycle.up(topology, name=name, accel="tcg", provision=False)


def _fail_second_qemu_start(monkeypatch, exc: BaseException) -> list[int]:
    """The second QEMU start raises `exc` (an error, or Ctrl-C arriving right then).
    Returns the pids of the QEMUs started."""
    real = subprocess.Popen
    pids: list[int] = []

    def popen(argv, *a, **k):
        if argv[0] == qemucmd.QEMU and len(pids) == 1:
            raise exc
        p = real(argv, *a, **k)
        if argv[0] == qemucmd.QEMU:
            pids.append(p.pid)
        return p
    monkeypatch.setattr(subprocess, "Popen", popen)
    return pids


@pytest.mark.parametrize("exc", [OSError(24, "Too many open files"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_a_failure_while_launching_stops_every_qemu_started_so_far(fakes, monkeypatch, exc):
    started = _fail_second_qemu_start(monkeypatch, exc)
    with pytest.raises(type(exc)):
        up()
    assert len(started) == 1
    assert fakes.alive(started) == []  # host0's QEMU did not outlive its files
    assert not (fakes.state / "tb").exists() and not (fakes.pools / "tb").exists()


def test_a_host_that_fails_to_start_rolls_back_the_others(fakes, monkeypatch):
    monkeypatch.setenv("FAKE_QEMU_FAIL", "host1")
    with pytest.raises(TestbedError, match=r"host1: QEMU exited at start \(exit 1\)") as e:
        up()
    assert "cannot start (FAKE_QEMU_FAIL)" in str(e.value)  # the end of its log, in the error
    assert fakes.alive() == []
    assert not (fakes.state / "tb").exists() and not (fakes.pools / "tb").exists()


def test_ctrl_c_while_waiting_for_qemu_stops_every_qemu(fakes, monkeypatch):
    import _thread
    import threading
    monkeypatch.setenv("FAKE_QEMU_HANG", "host1")  # host1 never answers: up waits on it

    late = []

    def interrupt_once_both_run():
        # Well inside up's 60 s QMP wait, with room for a loaded machine (CI with VMs
        # running beside it took over 30 s to start the two stand-ins once).
        deadline = time.monotonic() + 50
        while len(fakes.starts()) < 2 or not (fakes.state / "tb/host1/serial.sock").exists():
            if time.monotonic() > deadline:
                late.append("the stand-in QEMUs did not start within 50 s: nothing to interrupt")
                return
            time.sleep(0.02)
        _thread.interrupt_main()
    # Ctrl-C as the CLI gets it: Python's own SIGINT handler. interrupt_main() does
    # nothing when an earlier test of the session left SIGINT ignored or at SIG_DFL.
    old_handler = signal_mod.signal(signal_mod.SIGINT, signal_mod.default_int_handler)
    t = threading.Thread(target=interrupt_once_both_run)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                up()
            except Exception:
                assert not late, late[0]
                raise
    finally:
        t.join()
        signal_mod.signal(signal_mod.SIGINT, old_handler)
    assert len(fakes.starts()) == 2
    assert fakes.alive() == []
    assert not (fakes.state / "tb").exists()


def test_a_host_whose_port_is_taken_starts_again_on_another(fakes, monkeypatch):
    # Another program binds host1's port between the draw and QEMU's bind.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real = lifecycle._free_ports
    draws = []

    def free_ports(n, avoid=frozenset()):
        got = real(n, avoid)
        if not draws:
            got[1] = taken
        draws.append(got)
        return got
    monkeypatch.setattr(lifecycle, "_free_ports", free_ports)
    try:
        tb = up()
        ports = {h.name: h.ssh_port for h in tb.hosts}
        assert ports["host1"] != taken and len(set(ports.values())) == 2
        starts = [s["host"] for s in fakes.starts()]
        assert starts.count("host1") == 2 and starts.count("host0") == 1
        assert all(h.alive() for h in tb.hosts)
        assert f"hostfwd=tcp:127.0.0.1:{ports['host1']}-:22" in " ".join(tb.host("host1").argv)
        for h in tb.hosts:  # each QEMU really holds the port state.json names
            with pytest.raises(OSError), socket.socket() as s:
                s.bind(("127.0.0.1", h.ssh_port))
    finally:
        squatter.close()
        lifecycle.down("tb")
    assert fakes.alive() == []


def test_ports_drawn_for_one_testbed_are_distinct():
    for _ in range(300):
        ports = lifecycle._free_ports(8)
        assert len(set(ports)) == 8
    assert not set(lifecycle._free_ports(4, avoid=set(ports))) & set(ports)


def test_pid_is_in_state_as_soon_as_each_qemu_starts(fakes, monkeypatch):
    seen = []
    real = lifecycle._wait_started

    def wait_started(m):
        # By the time up waits for a host, state.json on disk already has every pid.
        seen.append({x["name"]: x["pid"] for x in json.loads((fakes.state / "tb/state.json").read_text())["hosts"]})
        return real(m)
    monkeypatch.setattr(lifecycle, "_wait_started", wait_started)
    try:
        up()
    finally:
        lifecycle.down("tb")
    pids = {s["host"]: s["pid"] for s in fakes.starts()}
    assert seen[0] == pids


def test_down_stops_qemu_even_when_state_json_is_lost(fakes):
    up()
    (fakes.state / "tb/state.json").write_text("{ truncated")
    assert len(fakes.alive()) == 2
    assert lifecycle.down("tb") is True
    assert fakes.alive() == []  # found through each host's pid file
    assert not (fakes.state / "tb").exists() and not (fakes.pools / "tb").exists()


def _modes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames, "."]:
            p = Path(dirpath) / n
            st = os.lstat(p)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "s" if stat.S_ISSOCK(st.st_mode) else "f"
            out[f"{p.relative_to(root.parent)} ({kind})"] = f"{stat.S_IMODE(st.st_mode):04o}"
    return out


def test_folders_are_0700_and_files_and_sockets_0600_whatever_the_umask(fakes):
    old = os.umask(0)
    try:
        tb = up()
    finally:
        os.umask(old)
    try:
        modes = {**_modes(fakes.state / "tb"), **_modes(fakes.pools / "tb")}
        kinds = {k.rsplit(" ", 1)[1] for k in modes}
        assert kinds == {"(d)", "(f)", "(s)"}
        for must in ("tb/host0/qmp.sock (s)", "tb/host1/serial.sock (s)", "tb/host0/serial.log (f)",
                     "tb/host0/qemu.pid (f)", "tb/host0/qemu.log (f)", "tb/host0/disk.qcow2 (f)",
                     "tb/state.json (f)", "tb/id_ed25519 (f)", "tb/id_ed25519.pub (f)", "tb/mem0.raw (f)"):
            assert must in modes
        wrong = {k: m for k, m in modes.items() if m != ("0700" if k.endswith("(d)") else "0600")}
        assert wrong == {}
        for root in (fakes.state, fakes.pools):
            assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(fakes.state / ".tb.lock").st_mode) == 0o600
    finally:
        lifecycle.down(tb.name)


def test_a_launch_error_carries_the_argv_and_the_log_tail(fakes, monkeypatch):
    from testbed.machine import LaunchError
    monkeypatch.setenv("FAKE_QEMU_FAIL", "host0")
    with pytest.raises(LaunchError) as e:
        up(topology="1host-1switch")
    assert e.value.host == "host0" and e.value.argv[0] == qemucmd.QEMU and "-qmp" in e.value.argv
    assert "cannot start (FAKE_QEMU_FAIL)" in e.value.log_tail
    assert str(e.value).endswith("--- host0 QEMU command line:\n" + shlex.join(e.value.argv))


def test_hang_stops_the_vcpus_until_qemu_says_resume(fakes):
    """The fault waits for QEMU's own STOP and RESUME events (the fake sends them as QEMU does)."""
    from testbed import faults, qmp
    tb = up(topology="1host-1switch")
    try:
        h = tb.host("host0")
        seen = []
        hang = threading.Thread(target=faults.hang_host, args=(h, 2.0))
        hang.start()
        while hang.is_alive() and not seen:
            if qmp.execute(h.files.qmp, "query-status")["status"] == "paused":
                seen.append("paused")
            time.sleep(0.05)
        hang.join()
        assert seen == ["paused"], "the host was stopped during the hang"
        assert qmp.execute(h.files.qmp, "query-status")["running"] is True
    finally:
        lifecycle.down("tb")
    assert fakes.alive() == []


def test_kill_returns_once_the_qemu_is_gone_and_down_still_cleans_up(fakes):
    from testbed import faults
    tb = up()
    faults.kill_host(tb.host("host1"))
    assert [h.alive() for h in tb.hosts] == [True, False]
    with pytest.raises(TestbedError, match="host1 is not running"):
        faults.kill_host(tb.host("host1"))
    assert lifecycle.down("tb") is True
    assert fakes.alive() == []
