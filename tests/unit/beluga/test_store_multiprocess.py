"""Processes standing in for hosts on one /dev/shm pool, killed with SIGKILL at random points.

After the chaos: no reader ever saw a torn or wrong block, every acknowledged
put that was not deleted is still there byte for byte, and once the dead
clients' heartbeats have timed out no space is leaked (no reservation, no
lease, no owned segment, every used slot is an indexed block).
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beluga import layout as L
from beluga.client import BelugaClient
from beluga.errors import ServiceUnavailableError
from beluga.keys import name_key
from beluga.pool import Pool
from beluga.report import pool_report

from beluga_store_support import ServiceProcess, make_pool, no_hang, spawn_worker, subprocess_env

sys.path.insert(0, str(Path(__file__).parent))
from _store_worker import expected  # noqa: E402

HB = ["--heartbeat-timeout", "1.0", "--lease-ttl", "2", "--reservation-ttl", "4"]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def service_stats(pool: str) -> dict:
    with BelugaClient(pool, rpc_timeout_s=5.0, heartbeat_interval_s=None) as c:
        return c.service_stats()


def settled(pool: str, expect_clients: int = 0):
    """Stats once only our own probe client is registered, else None."""
    st = service_stats(pool)
    others = [c for c in st["clients"] if c["leases"] or c["reservations"]]
    return st if len(st["clients"]) <= 1 + expect_clients and not others else None


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.fixture
def reaper():
    """Every worker and service process a test starts, killed when it ends, passed or not."""
    started: list = []
    yield started
    for p in started:
        if isinstance(p, ServiceProcess):
            p.kill()
        else:
            kill(p)


def parse_writer_logs(logdir: Path) -> tuple[set[bytes], set[bytes]]:
    acked, deleting = set(), set()
    for p in logdir.glob("*.writer.log"):
        for line in p.read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == "ACK":
                acked.add(bytes.fromhex(parts[1]))
            elif parts and parts[0] == "DELETING":
                deleting.add(bytes.fromhex(parts[1]))
    return acked, deleting


def test_chaos_kill_writers_readers_and_service(pool_path, tmp_path, reaper):
    rng = random.Random(1234)
    make_pool(pool_path, size_bytes=128 << 20, max_clients=16)  # roomy: nothing is evicted, so nothing may vanish
    svc = ServiceProcess(pool_path, tmp_path, transport="both", extra=HB)
    reaper.append(svc)
    svc.start()
    stop = tmp_path / "stop"
    logdir = tmp_path
    workers: dict[str, tuple[list, subprocess.Popen]] = {}
    spawned = 0

    def spawn(name: str, kind: str) -> None:
        nonlocal spawned
        spawned += 1
        transport = "cxl" if spawned % 3 else "tcp"
        log = logdir / f"{name}-{spawned}.{kind}.log"
        if kind == "writer":
            args = ["writer", pool_path, log, transport, stop, name]
        else:
            args = ["reader", pool_path, log, transport, stop, logdir]
        workers[name] = (args, spawn_worker(*args, log=logdir / f"{name}-{spawned}.stderr"))
        reaper.append(workers[name][1])

    for i in range(3):
        spawn(f"w{i}", "writer")
    for i in range(2):
        spawn(f"r{i}", "reader")
    kills = {"writer": 0, "reader": 0, "service": 0}
    deadline = time.monotonic() + 14
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.3, 1.0))
        victim = rng.choice(["service"] + list(workers))
        if victim == "service":
            svc.kill()
            kills["service"] += 1
            time.sleep(rng.uniform(0.1, 0.8))  # clients see the outage
            svc.start()  # a new process: could be any host, it only needs the pool
        else:
            kind = "writer" if victim.startswith("w") else "reader"
            kill(workers[victim][1])
            kills[kind] += 1
            spawn(victim, kind)
    # Leave some clients dead mid-operation, stop the rest cleanly.
    for name in ("w0", "r0"):
        kill(workers[name][1])
    stop.write_text("stop")
    for name, (_, proc) in workers.items():
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            kill(proc)
    assert kills["service"] >= 1 and kills["writer"] + kills["reader"] >= 3, kills

    reader_logs = "".join(p.read_text() for p in logdir.glob("*.reader.log"))
    assert "TORN" not in reader_logs
    hits = sum(int(x.split("=")[1]) for x in reader_logs.split() if x.startswith("hits="))
    assert hits > 0, "readers never read anything: the test proved nothing"
    acked, deleting = parse_writer_logs(logdir)
    assert len(acked) > 20

    # Dead clients are reaped once their heartbeats time out: nothing leaks.
    st = wait_for(lambda: settled(pool_path), 15, "dead clients to be reaped")
    assert st["reserved"] == 0 and st["leases"] == 0 and st["zombies"] == 0
    assert st["counters"]["evictions"] == 0
    with BelugaClient(pool_path, rpc_timeout_s=5.0) as c:
        must_exist = sorted(acked - deleting)
        got = c.get_many(must_exist)
        lost = [k.hex() for k, data in zip(must_exist, got) if data is None]
        wrong = [k.hex() for k, data in zip(must_exist, got) if data is not None and data != expected(k)]
        assert not lost, f"{len(lost)} acknowledged blocks lost, e.g. {lost[:3]}"
        assert not wrong, f"{len(wrong)} blocks with wrong bytes, e.g. {wrong[:3]}"
        assert c.client_stats().corrupt_misses == 0
    # Offline view of the pool's own metadata agrees: only indexed blocks use space.
    svc.stop()
    with Pool.open(pool_path) as pool:
        rep = pool_report(pool)
    assert rep["reserved"] == 0 and rep["torn_records"] == 0
    assert rep["segments"]["open"] == 0
    assert rep["blocks"] == rep["distinct_keys"] == st["blocks"]
    assert rep["blocks"] >= len(acked - deleting)
    # A last restart (recovery from metadata only) finds exactly the same index.
    svc.start()
    st2 = service_stats(pool_path)
    assert st2["recovery"]["committed_blocks"] == rep["blocks"]
    svc.stop()
    (tmp_path / "kills.json").write_text(json.dumps(kills))


def test_writer_killed_mid_put_leaves_nothing_visible_and_space_is_reclaimed(service_process, pool_path, tmp_path,
                                                                            reaper):
    service_process(extra=HB)
    ready = tmp_path / "stalled"
    proc = spawn_worker("stall", pool_path, ready, log=tmp_path / "stall.log")
    reaper.append(proc)
    wait_for(ready.exists, 20, "the writer to stall mid-put")
    seg, slot = map(int, ready.read_text().split())
    with BelugaClient(pool_path) as c:
        assert c.get(name_key("stalled")) is None and not c.contains(name_key("stalled"))
        assert c.service_stats()["reserved"] == 1
    kill(proc)
    st = wait_for(lambda: settled(pool_path), 15, "the dead writer to be reaped")
    assert st["reserved"] == 0 and st["segments"]["open"] == 0
    assert st["counters"]["reservations_reclaimed"] == 1
    with Pool.open(pool_path) as pool:
        rep = pool_report(pool)
        assert rep["reserved"] == 0 and rep["blocks"] == 0
        off = pool.geometry.index_entry_offset(seg, slot)
        entry = L.IndexEntry.decode(pool.buf[off : off + L.INDEX_ENTRY_BYTES])
        assert entry is not None and entry.state == L.ENTRY_FREE  # the half-written slot is free again
    # the slot is reusable: a new put lands, is visible and intact
    with BelugaClient(pool_path) as c:
        c.put(name_key("after"), expected(name_key("stalled")))
        assert c.get(name_key("after")) == expected(name_key("stalled"))


def test_reader_killed_holding_a_lease_does_not_pin_space(service_process, pool_path, tmp_path, reaper):
    service_process(extra=["--heartbeat-timeout", "1.0", "--lease-ttl", "600"])  # only death ends this lease
    key = name_key("held")
    with BelugaClient(pool_path) as c:
        c.put(key, b"h" * 10_000)
    ready = tmp_path / "held"
    proc = spawn_worker("hold", pool_path, key.hex(), ready, log=tmp_path / "hold.log")
    reaper.append(proc)
    wait_for(ready.exists, 20, "the reader to take its lease")
    assert ready.read_text() == "held"
    with BelugaClient(pool_path) as c:
        assert c.service_stats()["leases"] == 1
        assert c.evict(1) == 0  # leased: not evictable
        assert c.delete(key)
        assert c.service_stats()["zombies"] == 1  # deleted but its bytes still held
    kill(proc)
    st = wait_for(lambda: (lambda s: s if s["leases"] == 0 and s["zombies"] == 0 else None)(service_stats(pool_path)),
                  15, "the dead reader's lease to be reclaimed")
    assert st["counters"]["clients_reaped"] >= 1
    assert st["blocks"] == 0 and st["segments"]["open"] == 0 and st["segments"]["sealed"] == 0


def test_service_killed_clients_get_clear_errors_and_a_new_service_recovers(pool_path, tmp_path, reaper):
    make_pool(pool_path)
    svc = ServiceProcess(pool_path, tmp_path, transport="both", extra=HB)
    reaper.append(svc)
    svc.start()
    c_pool = BelugaClient(pool_path, transport="cxl", rpc_timeout_s=0.5, heartbeat_interval_s=0.1)
    c_tcp = BelugaClient(pool_path, transport="tcp", rpc_timeout_s=0.5, heartbeat_interval_s=0.1)
    blocks = {name_key(f"b{i}"): expected(name_key(f"b{i}")) for i in range(30)}
    c_pool.put_many(list(blocks.items())[:15])
    c_tcp.put_many(list(blocks.items())[15:])
    svc.kill()
    for c in (c_pool, c_tcp):
        with no_hang(f"a {c.transport_name} put with the service killed"), \
                pytest.raises(ServiceUnavailableError) as exc:
            c.put(name_key("during"), b"needs the service")
        assert "metadata service" in str(exc.value)
        assert c.get(name_key("b0")) == blocks[name_key("b0")]  # reads need no service
    # The CLI says the same, with exit status 2 instead of hanging.
    out = subprocess.run([sys.executable, "-m", "beluga.cli", "get", pool_path, "--name", "b0", "--timeout", "0.5"],
                         capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert out.returncode == 2 and "metadata service" in out.stderr
    info = svc.start()  # "another host": a fresh process that knows only the pool
    assert info["recovery"]["committed_blocks"] == 30
    for c in (c_pool, c_tcp):
        assert c.get_many(list(blocks)) == list(blocks.values())
        c.put(name_key(f"after-{c.transport_name}"), b"ok")
    c_pool.close()
    c_tcp.close()
    svc.stop()


def test_writers_switching_size_classes_over_a_full_pool_only_ever_see_pool_full(service_process, pool_path,
                                                                                  tmp_path):
    """Several writer processes keep a small pool full while moving between size classes, from
    4 KiB blocks to blocks that fill a whole segment: ownership of segments moves between them
    and blocks and whole segments are evicted under their feet. Every put succeeds or raises
    PoolFullError; none is refused as "segment not owned" (or anything else)."""
    # SMALL pool: 256 KiB segments. A generous heartbeat timeout: no writer is reaped on a loaded machine.
    service_process(extra=["--heartbeat-timeout", "10"])
    seg = 256 * 1024
    sizes = ",".join(str(n) for n in (4096, 40_000, 130_000, seg))
    logdir = tmp_path / "writers"
    logdir.mkdir()
    procs = [spawn_worker("switch", pool_path, logdir / f"{i}.log", i, 120, sizes, log=logdir / f"{i}.stderr")
             for i in range(4)]
    for proc in procs:
        proc.wait(240)
    logs = {p.name: p.read_text() for p in sorted(logdir.glob("*.log"))}
    errors = [line for text in logs.values() for line in text.splitlines() if not line.startswith("DONE")]
    assert not errors, f"{len(errors)} puts failed otherwise than with PoolFullError, e.g. {errors[:3]}"
    done = [line for text in logs.values() for line in text.splitlines() if line.startswith("DONE")]
    assert len(done) == 4, {name: text[-300:] for name, text in logs.items()} | {
        p.name: p.read_text()[-2000:] for p in logdir.glob("*.stderr")}
    stored = sum(int(line.split()[1].split("=")[1]) for line in done)
    st = service_stats(pool_path)
    # The pool really was full: blocks were evicted (whole segments too, most runs).
    assert st["counters"]["evictions"] > 0, st["counters"]
    assert stored > 4 * 120 // 2, done
