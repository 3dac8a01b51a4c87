"""The `beluga` command line, as scenario steps will drive it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from beluga import layout as L
from beluga.cli import main, random_bytes

from beluga_store_support import ServiceProcess, subprocess_env


def run(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beluga.cli", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)


def test_format_stat_serve_put_get_delete(pool_path, tmp_path):
    out = run("format", pool_path, "--size", "8M", "--segment-size", "256K", "--max-clients", "8",
              "--rpc-buffer", "16K", "--json")
    assert out.returncode == 0, out.stderr
    fmt = json.loads(out.stdout)
    assert fmt["segment_count"] >= 20 and fmt["layout_version"] == L.LAYOUT_VERSION and fmt["devdax"] is False
    again = run("format", pool_path)
    assert again.returncode == 2 and "already a Beluga pool" in again.stderr

    st = json.loads(run("stat", pool_path, "--json").stdout)
    assert st["service"]["running"] is False and st["blocks"] == 0
    assert st["geometry"]["segment_count"] == fmt["segment_count"]

    svc = ServiceProcess(pool_path, tmp_path, transport="both")
    ready = svc.start()
    assert ready["event"] == "ready" and ready["tcp_address"].startswith("127.0.0.1:")
    flushes = ready["coherence"]  # what this host does on a pool that hardware does not keep coherent
    assert flushes["can_flush"] is (flushes["writeback"] in ("clwb", "clflushopt", "clflush"))
    try:
        put = run("put", pool_path, "--name", "blk", "--random-bytes", "100K", "--seed", "7", "--json")
        assert put.returncode == 0, put.stderr
        assert json.loads(put.stdout)["length_bytes"] == 100 * 1024
        for transport in ("cxl", "tcp"):
            got = run("get", pool_path, "--name", "blk", "--expect-random-bytes", "100K", "--seed", "7",
                      "--transport", transport, "--json")
            assert got.returncode == 0, got.stderr
            assert json.loads(got.stdout) == {**json.loads(got.stdout), "hit": True, "matches": True}
        wrong = run("get", pool_path, "--name", "blk", "--expect-random-bytes", "100K", "--seed", "8")
        assert wrong.returncode == 1 and "DOES NOT MATCH" in wrong.stdout
        out_file = tmp_path / "blk.bin"
        assert run("get", pool_path, "--name", "blk", "--out", out_file).returncode == 0
        assert out_file.read_bytes() == random_bytes(100 * 1024, "7")
        text = run("put", pool_path, "--key", "ab" * 32, "--data", "hello")
        assert text.returncode == 0
        assert run("get", pool_path, "--key", "ab" * 32, "--expect-data", "hello").returncode == 0
        st = json.loads(run("stat", pool_path, "--json", "--service").stdout)
        assert st["blocks"] == 2 and st["service"]["running"] is True
        assert st["service_stats"]["counters"]["commits"] == 2
        human = run("stat", pool_path)
        assert "2 committed" in human.stdout and "running" in human.stdout
        assert "  cache flushes: " in human.stdout and st["coherence"] == flushes
        assert run("delete", pool_path, "--name", "blk").returncode == 0
        assert run("delete", pool_path, "--name", "blk").returncode == 1
        miss = run("get", pool_path, "--name", "blk", "--json")
        assert miss.returncode == 1 and json.loads(miss.stdout)["hit"] is False
    finally:
        svc.stop()
    assert json.loads(run("stat", pool_path, "--json").stdout)["service"]["running"] is False


@pytest.mark.parametrize("argv, message", [
    (["put", "{pool}", "--key", "abc", "--data", "x"], "not hex"),
    (["put", "{pool}", "--key", "ab" * 31, "--data", "x"], "exactly 32 bytes"),
    (["stat", "{pool}"], "not a Beluga pool"),
    (["format", "{pool}", "--size", "100K"], "too small for its geometry"),
    (["format", "{pool}", "--size", "8M", "--segment-size", "100K"], "power of two"),
])
def test_cli_errors_are_clear(pool_path, capsys, argv, message):
    if argv[0] in ("stat", "put"):
        with open(pool_path, "wb") as fh:
            fh.write(b"not a pool" * 1000)
    rc = main([a.format(pool=pool_path) for a in argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_a_second_live_service(pool_path, tmp_path):
    assert main(["format", pool_path, "--size", "8M", "--segment-size", "256K", "--max-clients", "4",
                 "--rpc-buffer", "8K"]) == 0
    svc = ServiceProcess(pool_path, tmp_path, transport="cxl")
    svc.start()
    try:
        second = run("serve", pool_path, "--takeover-wait", "0.5")
        assert second.returncode == 2 and "another metadata service" in second.stderr
    finally:
        svc.stop()


def test_size_argument_errors(capsys):
    with pytest.raises(SystemExit):
        main(["format", "/dev/shm/x", "--size", "lots"])
    assert "not a number of bytes" in capsys.readouterr().err


def test_serve_and_stat_on_a_crafted_segment_entry(pool_path):
    """`beluga serve` on metadata it cannot have written ends with the reason, not a traceback."""
    from beluga import layout as L
    from beluga.pool import Pool

    assert main(["format", pool_path, "--size", "8M", "--segment-size", "256K", "--max-clients", "4",
                 "--rpc-buffer", "8K"]) == 0
    with Pool.open(pool_path) as pool:
        L.write_segment_entry(pool.buf, pool.geometry.segment_entry_offset(2),
                              L.SegmentEntry(L.SEG_SEALED, 0, 0, 1, 256 * 1024))
    served = run("serve", pool_path, "--takeover-wait", "0")
    problem = ("segment 2: segment-table entry: data_slot_bytes 1 is not a multiple of the 4096-byte slot "
               "granularity between 4096 and the 262144-byte segment size")
    assert served.returncode == 2 and f"{pool_path}: {problem}" in served.stderr, served.stderr
    assert "Traceback" not in served.stderr
    stat = run("stat", pool_path)
    assert stat.returncode == 0 and "invalid record (the service refuses to start on it): segment 2: " in stat.stdout
