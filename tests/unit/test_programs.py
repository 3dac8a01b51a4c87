"""testbed.programs: the SSH boundary is faked by running the very command sshd would run
in a local shell, in its own session (as sshd does); each host's QEMU is stood in for by a
real process whose command line names the host folder, so `alive()` and a host's death
work as with real VMs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from testbed import ssh
from testbed.scenario import programs
from testbed import topology as T
from testbed.log import TestbedError
from testbed.state import TestbedState, pid_is_ours


class LocalStream:
    """A command run by a local shell; its pipes read by threads. The stream ends without
    an exit status when the host's stand-in process dies, like an SSH channel whose
    QEMU went away."""

    def __init__(self, h, command: str) -> None:
        self.h = h
        self.p = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        self.chunks = {"out": bytearray(), "err": bytearray()}
        self.lock = threading.Lock()
        self.event = threading.Event()
        self.lost = False
        self.readers = [threading.Thread(target=self._pump, args=(f, k), daemon=True)
                        for f, k in ((self.p.stdout, "out"), (self.p.stderr, "err"))]
        for t in self.readers:
            t.start()

    def _pump(self, f, k):
        for data in iter(lambda: f.read1(65536), b""):
            with self.lock:
                self.chunks[k] += data
            self.event.set()
        self.event.set()

    def wait(self, timeout_s):
        self.event.wait(timeout_s)
        self.event.clear()

    def read(self):
        with self.lock:
            out, err = bytes(self.chunks["out"]), bytes(self.chunks["err"])
            self.chunks["out"].clear()
            self.chunks["err"].clear()
        return out, err

    def ended(self):
        if not self.h.alive() and not self.lost:
            self.lost = True  # the connection goes with the host; the guest's processes too
            os.killpg(self.p.pid, signal.SIGKILL)
        return self.p.poll() is not None and not any(t.is_alive() for t in self.readers)

    def exit_status(self):
        if self.lost or self.p.returncode is None or self.p.returncode < 0:
            return None
        return self.p.returncode

    def close(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()


def local_run(h, key, command, timeout_s):
    if not h.alive():
        return ssh.Result(h.name, -1, "", "", error="NoValidConnectionsError: connection refused")
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout_s)
    return ssh.Result(h.name, r.returncode, r.stdout, r.stderr)


@pytest.fixture
def qemus():
    """host name -> the process standing in for its QEMU."""
    procs: dict[str, subprocess.Popen] = {}
    yield procs
    for p in procs.values():
        p.kill()
        p.wait()


@pytest.fixture
def tb(tmp_path, monkeypatch, qemus):
    """A 2hosts-1switch testbed whose hosts are stand-in processes and whose 'SSH' is local."""
    monkeypatch.setattr(programs, "GUEST_RUN_DIR", str(tmp_path / "guest-run"))
    monkeypatch.setattr(programs, "open_stream", lambda h, key, command: LocalStream(h, command))
    monkeypatch.setattr(programs, "run_command", local_run)
    monkeypatch.setattr(programs, "KILL_GRACE_S", 1.0)
    topo = T.resolve("2hosts-1switch")
    hosts = []
    for i, name in enumerate(["host0", "host1"]):
        d = tmp_path / "state" / name
        d.mkdir(parents=True)
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", str(d)])
        qemus[name] = p
        # Popen returns once the child is in execve (vfork), before /proc shows its new
        # command line: until then the host would not count as running (pid_is_ours).
        wait_for(lambda: pid_is_ours(p.pid, d), "the stand-in QEMU's command line")
        hosts.append({"name": name, "pid": p.pid, "ssh_port": 10022 + i, "dir": str(d), "argv": []})
    data = {"name": "t", "topology_yaml": topo.read_text(), "topology_source": str(topo), "hosts": hosts,
            "pool": {"hosts": {"host0": {"dax": "/dev/dax0.0"}, "host1": {"dax": "/dev/dax1.0"}}},
            "accel": "tcg", "image": "k1", "created_at": "2026-01-01T00:00:00+0000",
            "pool_dir": str(tmp_path / "pools"), "pool_files": {}}
    return TestbedState.from_json(data, tmp_path / "state")


def wait_for(cond, what, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def run(tb, tmp_path, hosts=("host0",), argv=None, shell=None, env=None, timeout_s=30, background=False, **kw):
    return programs.run_program(tb, list(hosts), argv, shell, env or {}, timeout_s, background, tmp_path / "out", **kw)


def test_argv_words_reach_the_program_unchanged(tb, tmp_path):
    words = ["a b", "$HOME", "'q'", '"dq"', "; rm -rf /tmp/x", "`id`", "*", "new\nline", ""]
    res = run(tb, tmp_path, argv=[sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))",
                                  *words]).join()
    r = res["host0"]
    assert r.exit_code == 0 and not r.timed_out and r.ok
    assert json.loads(r.stdout_path.read_text()) == words
    assert r.stdout_path == tmp_path / "out" / "host0.stdout" and r.stderr_path == tmp_path / "out" / "host0.stderr"


def test_every_host_gets_the_pool_and_its_own_identity(tb, tmp_path):
    res = run(tb, tmp_path, hosts=["host0", "host1"], shell="env | grep ^BELUGA_ | sort; echo X=$X; echo Y=$Y",
              env={"X": "it's $x", "BELUGA_HOST_COUNT": "9"}, host_env={"host1": {"Y": "only host1"}}).join()
    want = {"BELUGA_DAX": "/dev/dax0.0", "BELUGA_HOST": "host0", "BELUGA_HOST_COUNT": "9",
            "BELUGA_HOST_INDEX": "0", "BELUGA_INTERLEAVE_GRANULARITY": "4096",
            "BELUGA_INTERLEAVE_WAYS": "2", "BELUGA_POOL_SIZE": str(512 << 20), "X": "it's $x", "Y": ""}
    # The fake runs the program on this machine: this process's own BELUGA_* settings
    # (BELUGA_TESTBED_STATE, BELUGA_NATIVE from `make test`, ...) show there too.
    inherited = {k for k in os.environ if k.startswith("BELUGA_")} - set(want)
    env0 = dict(line.split("=", 1) for line in res["host0"].stdout_tail.splitlines())
    assert {k: v for k, v in env0.items() if k not in inherited} == want
    env1 = dict(line.split("=", 1) for line in res["host1"].stdout_tail.splitlines())
    assert (env1["BELUGA_HOST"], env1["BELUGA_HOST_INDEX"], env1["BELUGA_DAX"], env1["Y"]) == \
        ("host1", "1", "/dev/dax1.0", "only host1")


def test_pool_env_without_a_provisioned_pool_has_no_dax(tb):
    tb = tb.with_pool(None)
    env = programs.pool_env(tb, "host1")
    assert "BELUGA_DAX" not in env and env["BELUGA_HOST_COUNT"] == "2"
    with pytest.raises(TestbedError, match=r"no host 'host7' \(hosts: host0, host1\)"):
        programs.pool_env(tb, "host7")


def test_exit_codes_and_signals_as_a_shell_reports_them(tb, tmp_path):
    assert run(tb, tmp_path, shell="echo oops >&2; exit 3").join()["host0"].exit_code == 3
    r = run(tb, tmp_path, shell="kill -SEGV $$").join()["host0"]
    assert r.exit_code == 128 + signal.SIGSEGV and not r.timed_out


def test_output_is_captured_whole_and_the_tail_kept(tb, tmp_path):
    r = run(tb, tmp_path, argv=[sys.executable, "-c",
                                "import sys; sys.stdout.write('x' * 1_000_000 + 'END\\n'); sys.stderr.write('e' * 10)"]
            ).join()["host0"]
    assert r.stdout_path.stat().st_size == 1_000_004
    assert len(r.stdout_tail) == programs.TAIL_BYTES and r.stdout_tail.endswith("xEND\n")
    assert r.stderr_tail == "e" * 10


def test_timeout_kills_the_whole_process_group(tb, tmp_path):
    pids = tmp_path / "pids"
    r = run(tb, tmp_path, shell=f"sleep 300 & echo $! > {pids}; trap '' TERM; sleep 300", timeout_s=1).join()["host0"]
    assert r.timed_out and r.exit_code is None and not r.ok
    assert "timed out after 1 s; killed the program's process group (SIGKILL)" in r.stderr_tail
    child = int(pids.read_text())
    wait_for(lambda: not Path(f"/proc/{child}").exists() or
             Path(f"/proc/{child}/stat").read_text().split(") ")[1].startswith("Z"), "the background child to die")


def test_an_exited_program_is_not_held_up_by_what_it_left_in_the_background(tb, tmp_path):
    pids = tmp_path / "pids"
    r = run(tb, tmp_path, shell=f"sleep 300 & echo $! > {pids}; echo done; exit 4", timeout_s=120).join()["host0"]
    assert (r.exit_code, r.timed_out, r.stdout_tail) == (4, False, "done\n")
    assert "the program exited 4, but processes it left in the background held its output open 2 s later: " \
           "killed them (SIGKILL to its process group)" in r.stderr_tail
    child = int(pids.read_text())
    wait_for(lambda: not Path(f"/proc/{child}").exists() or
             Path(f"/proc/{child}/stat").read_text().split(") ")[1].startswith("Z"), "the background child to die")


def test_background_runs_until_joined(tb, tmp_path):
    flag = tmp_path / "go"
    h = run(tb, tmp_path, hosts=["host0", "host1"], background=True,
            shell=f"while [ ! -e {flag} ]; do sleep 0.05; done; echo done $BELUGA_HOST")
    assert sorted(h.running()) == ["host0", "host1"]  # still waiting for the flag
    flag.touch()
    res = h.join()
    assert {n: (r.exit_code, r.stdout_tail) for n, r in res.items()} == \
        {"host0": (0, "done host0\n"), "host1": (0, "done host1\n")}
    assert h.running() == []


def test_join_timeout_kills_what_still_runs(tb, tmp_path):
    h = run(tb, tmp_path, hosts=["host0", "host1"], background=True, timeout_s=600,
            shell='[ "$BELUGA_HOST" = host0 ] && exit 0; sleep 600')
    res = h.join(timeout_s=0.5)
    assert res["host0"].exit_code == 0 and not res["host0"].timed_out
    assert res["host1"].timed_out and "still running when the join's 0.5 s were up" in res["host1"].stderr_tail


def test_a_host_that_dies_mid_run_has_no_exit_code(tb, tmp_path, qemus):
    h = run(tb, tmp_path, hosts=["host0", "host1"], background=True, shell="echo started; sleep 300", timeout_s=120)
    out1 = tmp_path / "out" / "host1.stdout"
    wait_for(lambda: out1.exists() and out1.read_text() == "started\n", "host1's program to start")
    qemus["host1"].kill()  # the host's QEMU is gone
    qemus["host1"].wait()
    res = h.join(timeout_s=1)
    r = res["host1"]
    assert r.exit_code is None and not r.timed_out
    assert r.stdout_tail == "started\n"
    assert "host1 died while the program ran (QEMU is not running): no exit status" in r.stderr_tail
    assert r.stderr_path.read_text().endswith("no exit status\n")  # the note is in the file too
    assert res["host0"].timed_out  # host0's own program was still running: the join ended it


def test_a_host_that_is_down_at_start(tb, tmp_path, qemus):
    qemus["host1"].kill()
    qemus["host1"].wait()
    res = run(tb, tmp_path, hosts=["host0", "host1"], argv=["true"]).join()
    assert res["host0"].exit_code == 0
    assert res["host1"].exit_code is None
    assert "host1 is not running (QEMU stopped): the program was not started" in res["host1"].stderr_tail


@pytest.mark.parametrize("kw, message", [
    ({"argv": ["true"], "shell": "true"}, "either an argv list or a shell string, exactly one"),
    ({}, "either an argv list or a shell string, exactly one"),
    ({"argv": []}, "argv must be a non-empty list of strings"),
    ({"shell": "  "}, "the shell string is empty"),
    ({"argv": ["true"], "timeout_s": 0}, "timeout_s must be positive, got 0"),
    ({"argv": ["true"], "hosts": []}, "no hosts to run the program on"),
    ({"argv": ["true"], "hosts": ["host0", "host0"]}, "host\\(s\\) named twice: host0"),
    ({"argv": ["true"], "hosts": ["hots1"]}, "testbed 't' has no host 'hots1' \\(hosts: host0, host1\\)"),
    ({"argv": ["true"], "env": {"A-B": "1", "N": 3}},
     "environment: 'A-B': not a variable name .*; N: expected a string value, got int"),
    ({"argv": ["true"], "host_env": {"host1": {"X": "1"}}}, "host_env names host\\(s\\) the program does not run on"),
])
def test_mistakes_are_refused_before_anything_runs(tb, tmp_path, kw, message):
    with pytest.raises(TestbedError, match=message):
        run(tb, tmp_path, **kw)
    assert not (tmp_path / "out").exists()


def test_remote_command_quotes_the_environment_and_runs_the_program_as_a_child():
    cmd = programs.remote_command("/run/beluga/programs/abc", ["prog", "a b"], None, {"K": "v'; rm -rf /"})
    # The shell must stay the program's parent (no exec of the program): `exit $rc` last.
    script = subprocess.run([sys.executable, "-c", "import shlex,sys; print(shlex.split(sys.argv[1])[3])", cmd],
                            capture_output=True, text=True).stdout
    assert script.rstrip().endswith("prog 'a b' < /dev/null; exit $?")
    assert "export K='v'\"'\"'; rm -rf /'; " in script


def test_exec_pool_env_gives_each_host_its_own_variables(tmp_path, monkeypatch, capsys):
    """`exec --pool-env`: the command runs after the host's own exports (ssh.run faked:
    each host's command is run by a local shell)."""
    from testbed import cli
    topo = T.resolve("2hosts-1switch")
    state = tmp_path / "state"
    (state / "t").mkdir(parents=True)
    (state / "t" / "state.json").write_text(json.dumps({
        "name": "t", "topology": "2hosts-1switch", "topology_yaml": topo.read_text(), "topology_source": str(topo),
        "accel": "tcg", "image": "k", "created_at": "now", "pool_dir": str(tmp_path / "pools" / "t"), "pool_files": {},
        "hosts": [{"name": n, "pid": None, "ssh_port": 0, "dir": str(state / "t" / n), "argv": []}
                  for n in ("host0", "host1")],
        "pool": {"hosts": {"host0": {"dax": "/dev/dax0.0"}, "host1": {"dax": "/dev/dax1.0"}}}}))
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(state))

    def local(host, port, key, command, timeout_s):
        r = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        return ssh.Result(host, r.returncode, r.stdout, r.stderr)

    monkeypatch.setattr(ssh, "run", local)
    assert cli.main(["exec", "t", "--all", "--pool-env", "--", 'echo "$BELUGA_HOST_INDEX $BELUGA_DAX"']) == 0
    assert capsys.readouterr().out == "=== host0 (exit 0)\n0 /dev/dax0.0\n=== host1 (exit 0)\n1 /dev/dax1.0\n"
    assert cli.main(["exec", "t", "host1", "--", 'echo "[$BELUGA_DAX]"']) == 0  # without the flag: nothing set
    assert capsys.readouterr().out == "[]\n"
