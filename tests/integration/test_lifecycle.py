"""up / exec / status / down of a two-host topology, and rollback after a failed launch."""
import json
import os
import shutil
from pathlib import Path

from .conftest import cli, qemu_processes_under

TOPO = Path(__file__).resolve().parents[2] / "testbed/topologies/2hosts-1switch.yaml"


def test_up_exec_down_two_hosts(isolated_dirs, tmp_path):
    state, pools = isolated_dirs
    r = cli("up", "2hosts-1switch", "--name", "life")
    assert "life is up: 2 host(s) ready in" in r.stderr
    try:
        st = json.loads(cli("status", "life", "--json").stdout)
        assert [h["state"] for h in st["hosts"]] == ["running", "running"]
        assert [h["pool"] for h in st["hosts"]] == ["ready", "ready"]
        r = cli("exec", "life", "--all", "--", "cxl", "list", "-M")
        blocks = r.stdout.split("=== ")[1:]
        assert len(blocks) == 2
        for b in blocks:
            mems = json.loads(b.split("\n", 1)[1])
            assert sorted(m["serial"] for m in mems) == [0x1000, 0x1001]
        # A failing command fails the whole exec, with each host's exit code.
        r = cli("exec", "life", "--all", "--", "test $(hostname) = host0", check=False)
        assert r.returncode == 1 and "=== host0 (exit 0)" in r.stdout and "=== host1 (exit 1)" in r.stdout
        assert "failed on 1 of 2 host(s): host1" in r.stderr
        # A second `up` of the same name refuses, with a hint.
        r = cli("up", "2hosts-1switch", "--name", "life", check=False)
        assert r.returncode == 1 and "testbed 'life' is up" in r.stderr and "down life" in r.stderr
        logs = Path(cli("logs", "export", "life", "--dest", str(tmp_path / "logs")).stdout.strip())
        assert (logs / "host1" / "dmesg.txt").read_text().count("CXL") > 0
        assert (logs / "host0" / "serial.log").exists()
        assert "life" in cli("list").stdout.split()
    finally:
        cli("down", "life")
    assert qemu_processes_under(state / "life") == []
    assert not (state / "life").exists() and not (pools / "life").exists()
    assert "was not running" in cli("down", "life").stderr  # idempotent


def test_rollback_after_a_host_fails_to_launch(isolated_dirs, tmp_path, monkeypatch):
    state, pools = isolated_dirs
    # host1's QEMU dies at start (a wrapper first on PATH fails for it and execs the
    # real QEMU for host0, which boots fine). Topology validation now refuses the
    # impossible sizes that used to make QEMU fail here.
    real = shutil.which("qemu-system-x86_64")
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    wrapper = wrappers / "qemu-system-x86_64"
    wrapper.write_text("#!/bin/sh\n"
                       'case "$*" in *"/host1,"*|*"/host1 "*|*"rb/host1"*) '
                       'echo "qemu-system-x86_64: planted failure for host1" >&2; exit 1 ;; esac\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o700)
    monkeypatch.setenv("PATH", f"{wrappers}:{os.environ['PATH']}")
    bad = TOPO
    r = cli("up", str(bad), "--name", "rb", check=False)
    assert r.returncode == 1
    assert "host1: QEMU exited" in r.stderr and "QEMU log" in r.stderr
    assert "roll back 'rb'" in r.stderr
    assert qemu_processes_under(state / "rb") == []
    assert not (state / "rb").exists() and not (pools / "rb").exists()
    assert "rb" not in cli("list").stdout.split()
