"""reset without VMs: the pool zeroed through real (shared, mapped) files; which guest
processes are the base system; poison lists parsed from the kernel's trace lines; the
report says what was not undone. SSH results and QMP answers are the faked boundary."""
import json
import subprocess
import sys
import time
import mmap
import os
from pathlib import Path

import pytest

from testbed import cli, reset
from testbed.guest import reset as guest_reset
from testbed import ssh
from testbed import topology as T
from testbed.reset import HostReset, ResetReport


def test_zeroing_a_pool_file_is_seen_through_a_shared_mapping_and_keeps_its_size(tmp_path):
    f = tmp_path / "mem0.raw"
    size = 8 << 20
    with open(f, "wb") as fh:
        fh.truncate(size)
    fd = os.open(f, os.O_RDWR)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)  # what QEMU holds (share=on)
    for off in (0, 4096 * 3 + 7, size - 1):
        m[off] = 0xAB
    assert reset.zero_file(f) == size
    assert os.path.getsize(f) == size
    assert m[0] == 0 and m[4096 * 3 + 7] == 0 and m[size - 1] == 0
    assert f.read_bytes() == bytes(size)
    m.close()
    os.close(fd)


def test_where_holes_cannot_be_punched_only_the_data_is_overwritten(tmp_path):
    f = tmp_path / "mem1.raw"
    with open(f, "wb") as fh:
        fh.truncate(4 << 20)
        fh.seek(3 << 20)
        fh.write(b"\xff" * 100)
    fd = os.open(f, os.O_RDWR)
    try:
        reset._write_zeros_over_data(fd, 4 << 20)
    finally:
        os.close(fd)
    assert f.read_bytes() == bytes(4 << 20)


def proc(pid, ppid, start, flags=0, cmd="x", comm=None):
    return {"pid": pid, "ppid": ppid, "flags": flags, "start": start, "comm": comm or cmd.split()[0], "cmd": cmd}


def test_the_base_system_is_what_started_before_boot_ended_kernel_threads_and_the_resets_own_chain():
    """Everything a test or scenario started goes; the base sshd's per-connection processes
    stay (another client's open connection survives), what runs under them does not."""
    boot_end = 2400  # ticks
    procs = {p["pid"]: p for p in [
        proc(1, 0, 10, cmd="init"),
        proc(2, 0, 10, cmd="[kthreadd]"),
        proc(40, 2, 5000, flags=guest_reset.PF_KTHREAD, cmd="[kworker/0:2]"),   # a kernel thread started late
        proc(150, 1, 1980, cmd="sshd: /usr/sbin/sshd [listener]", comm="sshd"),
        proc(160, 1, 1990, cmd="init"),                                        # the console's askfirst
        proc(300, 150, 9000, cmd="sshd-session: root [priv]", comm="sshd-session"),  # another client's
        proc(303, 300, 9000, cmd="sshd-session: root@notty", comm="sshd-session"),   # connection
        proc(301, 303, 9001, cmd="beluga serve /dev/dax0.0"),
        proc(330, 1, 9200, cmd="/usr/sbin/sshd -p 2222", comm="sshd"),          # a test's own sshd...
        proc(331, 330, 9300, cmd="sshd-session: root@notty", comm="sshd-session"),  # ... and its session
        proc(320, 1, 9100, cmd="sleep 1000"),                                   # left by a test, reparented
        proc(400, 150, 9500, cmd="sshd-session: root@notty", comm="sshd-session"),  # this reset's...
        proc(401, 400, 9501, cmd="sh -c python3 ..."),
        proc(402, 401, 9502, cmd="python3 -I -S -c ..."),                      # ... and itself
    ]}
    assert guest_reset.to_stop(procs, 402, boot_end) == [301, 320, 330, 331]
    assert guest_reset.to_stop(procs, 402, boot_end, base_pids=[330]) == [301, 320]  # a late base daemon


TRACE = """\
# tracer: nop
          sh-220     [000] .....   101.501242: cxl_poison: memdev=mem1 host=0000:0f:00.0 serial=4096 trace_type=List region=region0 region_uuid=00000000-0000-0000-0000-000000000000 hpa=0x110002000 dpa=0x1000 dpa_length=0x80 source=Internal flags= overflow_time=0
          sh-220     [000] .....   101.501300: cxl_poison: memdev=mem0 host=0000:0e:00.0 serial=4097 trace_type=List region=region0 region_uuid=00000000-0000-0000-0000-000000000000 hpa=0x110003000 dpa=0x0 dpa_length=0x40 source=Injected flags= overflow_time=0
          sh-220     [000] .....   101.601300: cxl_poison: memdev=mem0 host=0000:0e:00.0 serial=4097 trace_type=Clear region=region0 region_uuid=00000000-0000-0000-0000-000000000000 hpa=0x110003000 dpa=0x0 dpa_length=0x40 source=Injected flags= overflow_time=0
 irq/42-0000:0f:-167     [000] .....    98.762658: cxl_general_media: memdev=mem1 host=0000:0f:00.0 serial=4096 log=Failure : dpa=0 hpa=110000000
"""


def test_poison_lists_are_read_from_the_kernels_list_events_only():
    found, serials = guest_reset.parse_poison(TRACE)
    assert found == {"mem1": [(0x1000, 0x80)], "mem0": [(0, 0x40)]}
    assert serials == {"mem1": 4096, "mem0": 4097}


class FakeHost:
    def __init__(self, name, root, alive=True):
        self.name, self.ssh_port, self.pid = name, 1, 1
        self._alive = alive

        class Files:
            qmp = root / f"{name}.qmp"
        self.files = Files()

    def alive(self):
        return self._alive


class FakeTb:
    def __init__(self, root: Path, dead=()):
        self.name = "unit"
        self.topology = T.load("2hosts-1switch")
        self.hosts = [FakeHost(h.name, root, h.name not in dead) for h in self.topology.hosts]
        self.pool_files = {}
        for d in self.topology.devices:
            f = root / f"{d.id}.raw"
            f.write_bytes(b"\x01" * 65536)
            self.pool_files[d.id] = f
        self.key = root / "key"
        self.dir = root


def test_the_report_says_what_was_undone_and_never_claims_more(tmp_path, monkeypatch):
    tb = FakeTb(tmp_path, dead=("host1",))
    qmp_calls = []

    def qmp(sock, cmd, args=None, **kw):
        qmp_calls.append((sock.name, cmd))
        return {"running": False, "status": "paused"} if cmd == "query-status" else {}

    monkeypatch.setattr(reset.qmp, "execute", qmp)
    guest = {"killed": [{"pid": 301, "cmd": "beluga serve"}], "files_removed": 2,
             "poison_cleared": [{"memdev": "mem1", "serial": 4096, "ranges": [[4096, 128]], "lines": 2}],
             "not_undone": ["poison: mem0 still lists 1 poisoned range(s) after clearing: dpa 0x0+0x40"]}
    runs = []

    def run(h, command, timeout_s):
        runs.append(h.name)
        return ssh.Result(h.name, 0, json.dumps(guest) + "\n", "")

    r = reset.reset(tb, run=run)
    assert runs == ["host0"]  # the dead host is not tried
    # The guest half went over SSH (no forward yet), which started the helper: QEMU is asked
    # to forward a port to it for the next reset.
    assert qmp_calls == [("host0.qmp", "query-status"), ("host0.qmp", "cont"), ("host0.qmp", "set_link"),
                         ("host0.qmp", "human-monitor-command")]
    rec = json.loads((tmp_path / reset.HELPER_FILE).read_text())
    assert list(rec["hosts"]) == ["host0"] and len(rec["token"]) == 32
    assert (tmp_path / reset.HELPER_FILE).stat().st_mode & 0o777 == 0o600
    assert r.hosts[0] == HostReset("host0", True, ("301: beluga serve",), ("mem0 (guest mem1) dpa 0x1000+0x80",), 2,
                                   "ssh-once")
    assert r.hosts[1] == HostReset("host1")
    assert not r.complete
    assert any(x.startswith("host1: QEMU is not running") for x in r.not_undone)
    assert "host0: poison: mem0 still lists 1 poisoned range(s) after clearing: dpa 0x0+0x40" in r.not_undone
    assert r.pool_bytes_zeroed == 2 * 65536
    assert all(f.read_bytes() == bytes(65536) for f in tb.pool_files.values())


def test_a_guest_that_cannot_be_reached_is_reported_not_assumed_reset(tmp_path, monkeypatch):
    tb = FakeTb(tmp_path)
    monkeypatch.setattr(reset.qmp, "execute", lambda *a, **k: {"running": True, "status": "running"})
    r = reset.reset(tb, run=lambda h, c, t: ssh.Result(h.name, -1, "", "", error="NoValidConnectionsError: refused"))
    assert not r.complete
    assert [x.split(":")[0] for x in r.not_undone] == ["host0", "host1"]
    assert "processes, poison and trace buffers were not reset" in r.not_undone[0]


def test_cli_reset_exits_1_and_lists_what_it_could_not_undo(monkeypatch, capsys):
    report = ResetReport("tb1", 1.5, (HostReset("host0", killed=("7: sleep",)),), 1 << 20,
                         ("host1: QEMU is not running (killed?)",))

    class Fake:
        @staticmethod
        def attach(name):
            assert name == "tb1"

            class T:
                def reset(self, poison=True):
                    return report
            return T()

    monkeypatch.setattr("testbed.api.Testbed", Fake)
    assert cli.main(["reset", "tb1"]) == 1
    err = capsys.readouterr().err
    assert "host0: 1 process(es) killed" in err
    assert "✗ host1: QEMU is not running (killed?)" in err
    with pytest.raises(SystemExit):
        cli.main(["reset", "../x"])


def test_the_guests_json_writer_reads_back_as_json_whatever_the_command_lines_hold():
    out = {"killed": [{"pid": 7, "cmd": 'sh -c "echo \\\\ ok"\ttab\x01 é 🐋 \u2028'}], "ok": True, "none": None,
           "seconds": 0.25, "phases": {}, "list": [1, -2, [3]]}
    assert json.loads(guest_reset.dumps(out)) == out


def test_the_guest_reads_its_arguments_as_words():
    assert guest_reset.parse_args(["poison=0", "kill_deadline_s=2.5"]) == {"poison": False, "kill_deadline_s": 2.5}
    assert guest_reset.parse_args(["poison=1"]) == {"poison": True}


def test_emptying_tmp_removes_links_not_what_they_point_to(tmp_path):
    top, outside = tmp_path / "tmp", tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_text("x")
    (top / "link-dir").symlink_to(outside)
    (top / "link-file").symlink_to(outside / "keep.txt")
    assert guest_reset.remove_tree(str(top)) == 5
    assert list(top.iterdir()) == []
    assert (outside / "keep.txt").read_text() == "keep"


# ----------------------------------------------------------- the resident helper's protocol
# The helper (guest/reset.py's serve) and the client (reset.CLIENT, run by bash) talk
# through real FIFOs here; only the reset itself (`main`, which would stop this machine's
# processes) is replaced by one that says what it was asked.
REPO = Path(__file__).resolve().parents[2]
ONCE = "import json, sys\nprint(json.dumps({'once': sys.argv[1:]}))\n"


def start_fake_helper(folder: Path, main_body: str, token=None, port=None) -> subprocess.Popen:
    code = ("import json, sys, time\nfrom testbed.guest import reset as g\n" + main_body
            + f"\ng.main = main\ng.serve({str(folder)!r}, {token!r}, {port!r})\n")
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    for _ in range(500):
        if guest_reset.helper_alive(str(folder)):
            return p
        time.sleep(0.02)
    p.kill()
    raise AssertionError("the helper did not start")


def client(folder: Path, **args) -> tuple[int, dict]:
    cmd = reset.guest_command(args or {"poison": True}, folder=str(folder), script=ONCE)
    p = subprocess.Popen(["bash", "-c", cmd], stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=60)
    return p.pid, json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "reset-0123456789ab"


def test_the_helper_answers_a_request_and_keeps_the_clients_chain(folder):
    h = start_fake_helper(folder, "def main(args, anchor=None):\n"
                                  "    return {'anchor': anchor, 'poison': args['poison'], 'not_undone': []}")
    try:
        for poison in (False, True):  # one helper, several requests
            pid, out = client(folder, poison=poison)
            assert out == {"anchor": pid, "poison": poison, "not_undone": [], "helper": True}
        assert h.poll() is None
        assert not list(folder.glob("out.*"))  # the reply FIFOs are gone
    finally:
        h.kill()
        h.wait()


def test_without_a_live_helper_the_client_runs_the_reset_once_itself(folder):
    pid, out = client(folder, poison=False)  # no helper ever started
    assert out == {"once": [f"helper={folder}", "poison=0"]}
    h = start_fake_helper(folder, "def main(args, anchor=None):\n    return {}")
    h.kill()
    h.wait()  # a pid file and a FIFO are left, nobody holds it
    assert not guest_reset.helper_alive(str(folder))
    pid, out = client(folder, poison=True)
    assert out == {"once": [f"helper={folder}", "poison=1"]}


def test_a_helper_that_dies_during_a_request_leaves_the_reset_to_the_client(folder, tmp_path):
    started = tmp_path / "started"
    h = start_fake_helper(folder, "def main(args, anchor=None):\n"
                                  f"    open({str(started)!r}, 'w').close()\n    time.sleep(60)")
    try:
        c = subprocess.Popen(["bash", "-c", reset.guest_command({"poison": True}, folder=str(folder), script=ONCE)],
                             stdout=subprocess.PIPE, text=True)
        for _ in range(500):
            if started.exists():
                break
            time.sleep(0.02)
        h.kill()
        out, _ = c.communicate(timeout=60)
        assert json.loads(out.strip().splitlines()[-1]) == {"once": [f"helper={folder}", "poison=1"]}
    finally:
        h.kill()
        h.wait()


def test_a_failing_reset_in_the_helper_is_reported_and_the_helper_goes_on(folder):
    h = start_fake_helper(folder, "n = [0]\ndef main(args, anchor=None):\n    n[0] += 1\n"
                                  "    if n[0] == 1:\n        raise OSError(5, 'Input/output error')\n"
                                  "    return {'not_undone': []}")
    try:
        _, out = client(folder)
        assert out == {"not_undone": ["the reset helper failed: OSError: [Errno 5] Input/output error"],
                       "helper": True}
        _, out = client(folder)
        assert out == {"not_undone": [], "helper": True}
        (folder / "req").write_text(f"1 {folder}/out.1 poison=1 bogus\n")  # a malformed request: ignored
        _, out = client(folder)
        assert out == {"not_undone": [], "helper": True} and h.poll() is None
    finally:
        h.kill()
        h.wait()


def test_the_first_scan_walks_the_tree_under_init_and_skips_kernel_threads():
    if not os.path.exists("/proc/1/task/1/children"):
        pytest.skip("this kernel has no /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)")
    child = subprocess.Popen(["sleep", "60"])
    try:
        procs = guest_reset.user_processes()
        assert os.getpid() in procs and child.pid in procs
        assert not any(p["flags"] & guest_reset.PF_KTHREAD for p in procs.values())
        assert {os.getpid(), child.pid} <= set(guest_reset.processes())  # the full scan, kernel threads too
    finally:
        child.kill()
        child.wait()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_with_a_forwarded_port_the_helper_answers_over_tcp_with_the_token_only(folder, tmp_path, monkeypatch):
    port = free_port()
    h = start_fake_helper(folder, "def main(args, anchor=None):\n"
                                  "    return {'killed': [{'pid': 7, 'cmd': 'sleep 60'}], 'not_undone': [],"
                                  " 'anchor_is_me': anchor == __import__('os').getpid()}", token="t0ken", port=port)
    try:
        for _ in range(500):  # listening once a connection gets an answer
            try:
                __import__("socket").create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        tb = FakeTb(tmp_path)
        monkeypatch.setattr(reset.qmp, "execute", lambda *a, **k: {"running": True, "status": "running"})
        monkeypatch.setattr(reset, "helper_dir", lambda: str(folder))
        runs = []

        def run(h, command, timeout_s):
            runs.append(h.name)
            return ssh.Result(h.name, 0, json.dumps({"killed": [], "not_undone": []}) + "\n", "")

        (tmp_path / reset.HELPER_FILE).write_text(json.dumps(
            {"token": "t0ken", "hosts": {n: {"pid": 1, "port": port} for n in ("host0", "host1")}}))
        r = reset.reset(tb, run=run)
        assert runs == []  # no SSH at all
        assert [x.killed for x in r.hosts] == [("7: sleep 60",)] * 2 and r.complete
        assert [x.via for x in r.hosts] == ["tcp", "tcp"]
        assert reset._guest_tcp(None, port, "t0ken", {"poison": True})["anchor_is_me"] is True
        # Without the token the helper says nothing: the reset goes over SSH.
        (tmp_path / reset.HELPER_FILE).write_text(json.dumps(
            {"token": "guess", "hosts": {n: {"pid": 1, "port": port} for n in ("host0", "host1")}}))
        assert reset._guest_tcp(None, port, "guess", {"poison": True}) is None
        # Nor to a request for another version of the script (its own replaces it, over SSH).
        monkeypatch.setattr(reset, "helper_dir", lambda: str(folder) + "-new")
        assert reset._guest_tcp(None, port, "t0ken", {"poison": True}) is None
        monkeypatch.setattr(reset, "helper_dir", lambda: str(folder))
        r = reset.reset(tb, run=run)
        assert sorted(runs) == ["host0", "host1"] and r.complete
        assert [x.via for x in r.hosts] == ["ssh-once", "ssh-once"]  # the fake SSH answers as a one-shot
        assert h.poll() is None
    finally:
        h.kill()
        h.wait()


def test_the_token_reaches_the_helper_through_a_file_never_its_command_line(folder):
    cmd = reset.guest_command({"poison": True, "port": 1}, "s3cret", folder=str(folder),
                              script="import sys\nprint(open(sys.argv[1].split('=')[1] + '.token').read())\n")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "s3cret"
    assert (folder.parent / (folder.name + ".token")).stat().st_mode & 0o777 == 0o600
    assert guest_reset.take_token(str(folder) + ".token") == "s3cret"
    assert not (folder.parent / (folder.name + ".token")).exists()


def test_up_starts_the_helper_in_the_background_with_its_token_and_port(folder):
    """The real guest script in start mode (no reset is ever asked of it here: on this
    machine a reset would stop this machine's processes)."""
    port = free_port()
    r = subprocess.run(["bash", "-c", reset.start_command("tok3n", folder=str(folder), port=port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == ""  # in the background: the SSH call it rides on is not held
    try:
        for _ in range(1000):
            if guest_reset.helper_alive(str(folder)):
                break
            time.sleep(0.02)
        assert guest_reset.helper_alive(str(folder))
        assert not (folder.parent / (folder.name + ".token")).exists()  # taken by the helper
        import socket
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # listening; a wrong token:
            c.sendall(b"wrong reset-0123456789ab poison=1\n")                 # closed without a word
            c.settimeout(10)
            assert c.recv(100) == b""
    finally:
        pid = int((folder / "pid").read_text().split()[0]) if (folder / "pid").exists() else None
        if pid and guest_reset.helper_alive(str(folder)):
            os.kill(pid, 9)


def test_up_forwards_a_port_to_each_running_guests_helper_and_records_it_privately(tmp_path, monkeypatch):
    tb = FakeTb(tmp_path, dead=("host1",))
    asked = []

    def qmp(sock, cmd, args=None, **kw):
        asked.append((sock.name, cmd, args["command-line"]))
        return ""  # HMP says nothing when the forward is made
    monkeypatch.setattr(reset.qmp, "execute", qmp)
    token = reset.helper_token(tb)
    reset.forward_helpers(tb)
    rec = json.loads((tmp_path / reset.HELPER_FILE).read_text())
    assert rec["token"] == token and list(rec["hosts"]) == ["host0"]  # host1's QEMU is not running
    port = rec["hosts"]["host0"]["port"]
    assert asked == [("host0.qmp", "human-monitor-command", f"hostfwd_add net0 tcp:127.0.0.1:{port}-:47811")]
    reset.forward_helpers(tb)  # once per QEMU
    assert len(asked) == 1
    # A QEMU that refuses (its answer is an error text) leaves that host to SSH.
    monkeypatch.setattr(reset.qmp, "execute", lambda *a, **k: "Could not set up host forwarding rule 'x'\r\n")
    tb.hosts[0].pid = 2
    reset.forward_helpers(tb)
    assert json.loads((tmp_path / reset.HELPER_FILE).read_text())["hosts"]["host0"]["port"] == port
