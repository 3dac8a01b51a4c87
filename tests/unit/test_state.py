"""The typed state of a running testbed (testbed/state.py) and the Machine of one host
(testbed/machine.py), with real files and real processes."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import topology as T
from testbed.log import TestbedError
from testbed.machine import Machine
from testbed.qemucmd import HostFiles
from testbed.state import STATE_VERSION, HostRecord, PoolHost, PoolState, TestbedState, pid_is_ours


def state_json(tmp_path: Path, topology: str = "2hosts-1switch") -> dict:
    t = T.load(topology)
    return {"name": "tb", "topology": t.name, "topology_source": t.source,
            "topology_yaml": T.resolve(topology).read_text(), "accel": "tcg", "image": "k1",
            "created_at": "2026-01-01T00:00:00+0000", "pool_dir": str(tmp_path / "pools" / "tb"),
            "pool_files": {d.id: str(tmp_path / "pools" / "tb" / f"{d.id}.raw") for d in t.devices},
            "hosts": [{"name": h.name, "pid": None, "ssh_port": 10022 + i, "dir": str(tmp_path / h.name),
                       "argv": ["qemu-system-x86_64", "-name", h.name]} for i, h in enumerate(t.hosts)],
            "pool": None, "shares": [], "kernel": None}


def test_a_state_as_up_wrote_it_before_versions_loads_and_saves_the_same(tmp_path):
    old = state_json(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps(old))
    st = TestbedState.load(tmp_path)
    assert st.topology.name == "2hosts-1switch" and [h.ssh_port for h in st.hosts] == [10022, 10023]
    assert st.topology is st.topology, "parsed once"
    st.save()
    assert json.loads((tmp_path / "state.json").read_text()) == {**old, "state_version": STATE_VERSION}


def test_changes_are_new_records_saved_whole(tmp_path):
    st = TestbedState.from_json(state_json(tmp_path), tmp_path).save()
    st2 = st.with_host("host1", pid=4242).with_pool(PoolState({"host0": PoolHost("/dev/dax0.0", ready=True)}))
    assert st.host("host1").pid is None and st.pool is None, "the old record is unchanged"
    with pytest.raises(dataclasses.FrozenInstanceError):
        st2.name = "x"  # type: ignore[misc]
    st2.save()
    back = TestbedState.load(tmp_path)
    assert back.host("host1").pid == 4242 and back.dax("host0") == "/dev/dax0.0" and back.dax("host1") is None
    assert back.pool.hosts["host0"].ready and back.topology is not None
    assert not (tmp_path / "state.json.tmp").exists()


def test_a_state_of_another_version_or_without_a_field_is_refused_with_the_file_named(tmp_path):
    f = tmp_path / "state.json"
    f.write_text(json.dumps({**state_json(tmp_path), "state_version": 2}))
    with pytest.raises(TestbedError) as e:
        TestbedState.load(tmp_path)
    assert str(e.value).startswith(f"{f}: state_version 2; this beluga-testbed reads version 1\n  hint: ")
    broken = state_json(tmp_path)
    del broken["hosts"]
    f.write_text(json.dumps(broken))
    with pytest.raises(TestbedError) as e:
        TestbedState.load(tmp_path)
    assert str(e.value) == (f"{f}: not a testbed state this version reads: field 'hosts' is missing\n"
                            f"  hint: 'beluga-testbed down {tmp_path.name}' removes it")
    f.write_text("{ truncated")
    with pytest.raises(TestbedError, match=r"state.json: not JSON"):
        TestbedState.load(tmp_path)


def sleeper(d: Path) -> list[str]:
    """A stand-in QEMU: its command line names the host's folder, as QEMU's does."""
    return [sys.executable, "-c", "import sys, time; time.sleep(600)", str(d)]


def test_a_machine_in_a_with_block_runs_and_is_stopped_at_its_end(tmp_path):
    started = []
    with Machine("host0", HostFiles(tmp_path), sleeper(tmp_path), on_start=started.append) as m:
        assert m.alive() and started == [m.pid]
        assert (tmp_path / "qemu.log").is_file()
    assert not m.alive()


def test_a_machine_that_exits_at_start_says_why_with_its_argv_and_log(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('qemu: -device cxl-type3: bad'); sys.exit(3)"]
    m = Machine("host0", HostFiles(tmp_path), argv).launch()
    why = m.wait_started(timeout_s=30)
    assert why == "QEMU exited at start (exit 3)"
    e = m.failed(why)
    assert e.argv == argv and "qemu: -device cxl-type3: bad" in e.log_tail
    assert str(e).startswith("host0: QEMU exited at start (exit 3)\n--- host0 QEMU log (")


def test_shutdown_never_signals_a_pid_that_is_not_our_qemu(tmp_path):
    other = subprocess.Popen(sleeper(tmp_path / "someone-else"))
    # Popen returns once the child is in execve (vfork), before /proc shows its new
    # command line (empty in 196 of 200 reads right after Popen here): wait for it, or
    # the check below would pass for the wrong reason.
    deadline = time.monotonic() + 30
    while not pid_is_ours(other.pid, tmp_path / "someone-else"):
        assert time.monotonic() < deadline, "the sleeper's command line never showed"
        time.sleep(0.01)
    try:
        m = Machine.attach(HostRecord("host0", other.pid, 0, tmp_path / "host0"))
        assert not m.alive()
        m.shutdown()
        m.crash()
        assert other.poll() is None, "a process whose command line is not this host's QEMU is left alone"
        ours = Machine.attach(HostRecord("host0", other.pid, 0, tmp_path / "someone-else"))
        assert ours.alive()
        ours.shutdown()  # no QMP socket: SIGTERM (and reaped: it is a child of this process)
        assert not ours.alive() and not Path(f"/proc/{other.pid}").exists()
    finally:
        other.kill()
        other.wait()
