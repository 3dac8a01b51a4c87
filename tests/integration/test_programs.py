"""A user's program on real guests: `up --share` brings it in, testbed.programs runs it in
the background on both hosts of 2hosts-1switch and joins, `cp` copies in and out, and the
example program (scenarios/examples/dax-records) survives its writer's host crashing."""
import os
import time

import pytest

from testbed import faults, lifecycle, provision
from testbed.scenario import programs

from .conftest import REPO, cli

EXAMPLE = REPO / "scenarios/examples/dax-records"
RECORD_BYTES = 4096


@pytest.fixture(scope="module")
def bed(isolated_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("guest-out")
    cli("up", "2hosts-1switch", "--name", "progs", "--share", f"{EXAMPLE}:/mnt/dax-records",
        "--share", f"{out}:/mnt/out:rw")
    try:
        yield lifecycle.find("progs"), out
    finally:
        cli("down", "progs")


def wait_for(cond, what, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_background_on_both_hosts_then_join(bed, tmp_path):
    tb, _ = bed
    h = programs.run_program(tb, ["host0", "host1"], None,
                             'echo "$BELUGA_HOST $BELUGA_HOST_INDEX/$BELUGA_HOST_COUNT $BELUGA_DAX $GREETING"; '
                             'test -c "$BELUGA_DAX" && exit $((40 + BELUGA_HOST_INDEX))',
                             {"GREETING": "it's me"}, 120, True, tmp_path)
    res = h.join()
    dax = {n: r.dax for n, r in tb.pool.hosts.items()}
    for i, n in enumerate(["host0", "host1"]):
        assert res[n].exit_code == 40 + i, res[n].stderr_tail
        assert res[n].stdout_path.read_text() == f"{n} {i}/2 {dax[n]} it's me\n"


def test_a_timeout_or_an_exit_leaves_nothing_running_in_the_guest(bed, tmp_path):
    tb, _ = bed
    r = programs.run_program(tb, ["host1"], ["sh", "-c", "sleep 1000 & sleep 1001"], None, {}, 3, False,
                             tmp_path).join()["host1"]
    assert r.timed_out and r.exit_code is None and "killed the program's process group" in r.stderr_tail
    # A program that exits while what it started in the background holds its output:
    # its exit code counts, and what it left is killed.
    r = programs.run_program(tb, ["host1"], None, "sleep 1002 & echo done; exit 5", {}, 120, False,
                             tmp_path / "linger").join()["host1"]
    assert (r.exit_code, r.timed_out, r.stdout_tail) == (5, False, "done\n"), r.stderr_tail
    left = programs.run_program(tb, ["host1"], None, "grep -l '^sleep$' /proc/[0-9]*/comm; true", {}, 60, False,
                                tmp_path / "check").join()["host1"]
    assert left.exit_code == 0 and left.stdout_tail == ""


def test_shares_are_read_only_unless_rw(bed, tmp_path):
    tb, out = bed
    res = programs.run_program(tb, ["host0", "host1"], None,
                               "head -1 /mnt/dax-records/records.py; touch /mnt/dax-records/x; "
                               "echo hello > /mnt/out/$BELUGA_HOST", {}, 60, False, tmp_path).join()
    for n, r in res.items():
        assert r.stdout_tail == "#!/usr/bin/env python3\n"
        assert "Read-only file system" in r.stderr_tail
        assert (out / n).read_text() == "hello\n"
    assert not (EXAMPLE / "x").exists()
    assert "/mnt/dax-records (read-only, tag share0)" in cli("status", "progs").stdout


def test_cp_into_every_host_and_back_out(bed, tmp_path):
    src = tmp_path / "tool.sh"
    src.write_text("#!/bin/sh\necho tool on $(hostname)\n")
    src.chmod(0o755)
    assert cli("cp", "progs", "--all", str(src), ":/tmp/").stdout.split() == ["host0:/tmp/tool.sh", "host1:/tmp/tool.sh"]
    r = cli("exec", "progs", "--all", "--", "/tmp/tool.sh > /tmp/tool.out")
    assert r.returncode == 0
    cli("cp", "progs", "--all", ":/tmp/tool.out", str(tmp_path / "outs"))
    assert [(tmp_path / "outs" / n / "tool.out").read_text() for n in ("host0", "host1")] == \
        ["tool on host0\n", "tool on host1\n"]
    r = cli("cp", "progs", "host1:/tmp/nope", str(tmp_path), check=False)
    assert r.returncode == 1 and "host1:/tmp/nope: no such file or folder" in r.stderr
    # A folder with a link in it: over the real SFTP server the link lands as a link, and comes back as one.
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("A")
    (tree / "ln").symlink_to("a")
    cli("cp", "progs", "-r", str(tree), "host0:/tmp/")
    assert cli("exec", "progs", "host0", "--", "readlink /tmp/tree/ln; cat /tmp/tree/ln").stdout.split() == ["a", "A"]
    cli("cp", "progs", "-r", str(tree), "host0:/tmp/")  # again: the link is replaced, as the file is
    back = tmp_path / "back"
    back.mkdir()
    for _ in range(2):  # twice into the same folder: the second copy replaces the link the first made
        cli("cp", "progs", "-r", "host0:/tmp/tree", str(back))
    assert os.readlink(back / "tree" / "ln") == "a" and (back / "tree" / "a").read_text() == "A"


def test_example_readers_check_every_record_when_the_writer_host_crashes(bed, tmp_path):
    """Runs last in this module: it kills host0."""
    tb, _ = bed
    prog = ["python3", "/mnt/dax-records/records.py"]
    assert programs.run_program(tb, ["host0"], [*prog, "reset"], None, {}, 60, False,
                                tmp_path / "reset").join()["host0"].ok
    reader = programs.run_program(tb, ["host1"], [*prog, "read", "--writer", "0", "--idle-s", "5",
                                                  "--progress-every", "10", "--report", "/tmp/records.json"],
                                  None, {}, 300, True, tmp_path / "read")
    writer = programs.run_program(tb, ["host0"], [*prog, "write", "--records", "2000", "--interval-s", "0.02",
                                                  "--progress-every", "10"], None, {}, 300, True, tmp_path / "write")
    seen = tmp_path / "read" / "host1.stdout"
    wait_for(lambda: seen.exists() and "verified 20\n" in seen.read_text(), "host1 to check 20 records")
    faults.kill_host(tb.host("host0"))
    w = writer.join(timeout_s=60)["host0"]
    assert w.exit_code is None and "host0 died while the program ran" in w.stderr_tail
    r = reader.join(timeout_s=120)["host1"]
    assert r.exit_code == 0, r.stderr_tail
    last = r.stdout_tail.splitlines()[-1]
    assert "all check (the writer stopped: no progress for 5 s" in last and "of 2000 committed)" in last
    cli("cp", "progs", "host1:/tmp/records.json", str(tmp_path))
    assert (tmp_path / "records.json").read_text().count('"mismatches": []') == 1

    # One flipped bit in a committed record, in the backing file: the reader catches it.
    slot0 = tb.topology.pool_size_bytes - 2 * (16 << 20)  # the slots fill the end of the pool
    off = slot0 + RECORD_BYTES + 3 * RECORD_BYTES + 100  # slot 0, record 3, inside its payload
    loc = provision.locate(tb.topology, tb.pool_files, off)
    faults.flip_bits(loc.file, loc.file_offset)
    r = programs.run_program(tb, ["host1"], [*prog, "read", "--writer", "0", "--once"], None, {}, 120, False,
                             tmp_path / "check").join()["host1"]
    assert r.exit_code == 1
    assert f"MISMATCH record 3 of host 0 at pool offset {slot0 + RECORD_BYTES * 4:#x}" in r.stdout_tail

