"""The example user program (scenarios/examples/dax-records/records.py) on a plain file
standing in for the dax device: real writer and reader processes, as on two hosts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = Path(__file__).resolve().parents[2] / "scenarios/examples/dax-records/records.py"
POOL = 64 << 20  # 2 hosts: two 16 MiB slots at the end, host 0 from 32 MiB, host 1 from 48 MiB
SLOT0 = 32 << 20


@pytest.fixture
def pool(tmp_path):
    f = tmp_path / "pool.raw"
    with open(f, "wb") as fh:
        fh.truncate(POOL)
    return f


def env(pool, index):
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BELUGA_DAX": str(pool),
            "BELUGA_POOL_SIZE": str(POOL), "BELUGA_HOST_INDEX": str(index), "BELUGA_HOST_COUNT": "2",
            "BELUGA_HOST": f"host{index}"}


def start(pool, index, *args):
    return subprocess.Popen([sys.executable, str(PROGRAM), *args], env=env(pool, index), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(pool, index, *args):
    return subprocess.run([sys.executable, str(PROGRAM), *args], env=env(pool, index), text=True,
                          capture_output=True, timeout=120)


def test_a_reader_checks_every_record_while_the_writer_publishes(pool, tmp_path):
    assert run(pool, 0, "reset").returncode == 0
    reader = start(pool, 1, "read", "--writer", "0", "--report", str(tmp_path / "report.json"))
    w = run(pool, 0, "write", "--records", "300", "--interval-s", "0.001")
    out, err = reader.communicate(timeout=120)
    assert w.returncode == 0 and w.stdout.endswith("wrote 300 records\n")
    assert reader.returncode == 0, err
    assert out.endswith("verified 300 records from host 0, all check (the writer finished)\n")
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["verified"], report["writer_finished"], report["mismatches"]) == (300, True, [])
    # Only the writer's slot was written: not the start of the pool (the Beluga store's
    # records live there), not host 1's own slot.
    with open(pool, "rb") as f:
        assert f.read(SLOT0) == bytes(SLOT0)
        f.seek(SLOT0 + (16 << 20))
        assert f.read(1 << 20) == bytes(1 << 20)
        f.seek(SLOT0)
        assert f.read(8) == b"RECORDS1"


def test_a_killed_writer_leaves_committed_records_that_still_check(pool):
    run(pool, 0, "reset")
    reader = start(pool, 1, "read", "--writer", "0", "--idle-s", "1")
    writer = start(pool, 0, "write", "--records", "1000", "--interval-s", "0.01", "--progress-every", "10")
    w = run(pool, 1, "wait", "--writer", "0", "--committed", "10")
    assert w.returncode == 0 and w.stdout.startswith("host 0 has committed ")
    writer.kill()  # as a host crash: mid-stream, no goodbye
    writer.wait()
    out, _ = reader.communicate(timeout=120)
    assert reader.returncode == 0
    last = out.splitlines()[-1]
    assert "all check (the writer stopped: no progress for 1 s" in last and "of 1000 committed)" in last


def test_a_flipped_bit_in_a_committed_record_is_caught(pool):
    run(pool, 0, "reset")
    assert run(pool, 0, "write", "--records", "20").returncode == 0
    off = SLOT0 + 4096 + 7 * 4096 + 100  # record 7, inside its payload
    with open(pool, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ 0x10]))
    r = run(pool, 1, "read", "--writer", "0", "--once")
    assert r.returncode == 1
    assert f"MISMATCH record 7 of host 0 at pool offset {SLOT0 + 4096 + 7 * 4096:#x}: CRC-32" in r.stdout
    assert "verified 20 records from host 0, 1 DO NOT CHECK" in r.stdout


def test_setup_mistakes_exit_2_and_a_silent_writer_3(pool):
    r = subprocess.run([sys.executable, str(PROGRAM), "read"], env={"PATH": "/usr/bin:/bin"}, text=True,
                       capture_output=True)
    assert r.returncode == 2 and "BELUGA_DAX is not set: run me on a beluga-testbed host" in r.stderr
    r = run(pool, 1, "read", "--writer", "0", "--start-timeout-s", "0.2")
    assert r.returncode == 3 and "host 0 published nothing within 0.2 s" in r.stderr
    r = run(pool, 1, "wait", "--writer", "0", "--committed", "1", "--timeout-s", "0.2")
    assert r.returncode == 3 and "host 0 did not commit 1 records within 0.2 s (no records header)" in r.stderr
    r = run(pool, 0, "write", "--records", "5000")
    assert r.returncode == 2 and "do not fit in a slot of 16777216 bytes (at most 4095)" in r.stderr


def test_the_walkthrough_shows_the_scenario_as_it_is():
    """docs/your-software.md quotes the example scenario (step labels left out): the two stay in step."""
    import yaml
    root = PROGRAM.parents[3]
    doc = (root / "docs/your-software.md").read_text()
    quoted = yaml.safe_load(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    real = yaml.safe_load((root / "scenarios/examples/dax-records.yaml").read_text())
    unlabelled = [{k: v for k, v in s.items() if k != "name"} for s in real["steps"]]
    assert quoted["steps"] == unlabelled
    for key in ("topology", "shares", "roles"):
        assert quoted[key] == real[key], key
    assert all(e in real["expect"] for e in quoted["expect"])
