"""The metadata service against one bad TCP client on loopback, while healthy clients keep working.

Every test runs a pool client and a TCP client next to the attacker: their
requests must succeed, they must not be reaped (no re-registration), and their
median latency must stay within 50x of their own median measured before the
attack in the same test (a ratio, no absolute times). The service runs as a
real `beluga serve` process (or a thread, where a stall is injected).
"""
from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beluga import rpc
from beluga.client import BelugaClient
from beluga.keys import name_key
from beluga.service import MetadataService, ServiceConfig, ServiceThread

from _tcp_attacker import closed_by_service, framed, read_frame
from beluga_store_support import make_pool, subprocess_env

ATTACKER = Path(__file__).with_name("_tcp_attacker.py")
FD_HOG = Path(__file__).with_name("_fd_hog_service.py")
RATIO = 50


class Healthy:
    """A pool client and a TCP client that read their own block over and over."""

    def __init__(self, pool_path: str) -> None:
        self.clients = {t: BelugaClient(pool_path, transport=t, rpc_timeout_s=2.0, heartbeat_interval_s=0.05)
                        for t in ("cxl", "tcp")}
        self.block = os.urandom(3000)
        for t, c in self.clients.items():
            c.put(name_key(f"healthy-{t}"), self.block)
        self.slots = {t: c.slot for t, c in self.clients.items()}
        self.p50s(5)  # warm up
        self.baseline = self.p50s(40)

    def p50s(self, rounds: int, *, while_=None, max_rounds: int = 20000) -> dict[str, float]:
        """Median seconds per read of each client, over at least ``rounds`` rounds (and while ``while_()``).

        A read here is a zero-copy view: it asks the service for a lease (a get would not ask
        the service at all, so it could not show that the service still answers)."""
        times: dict[str, list[float]] = {t: [] for t in self.clients}
        n = 0
        while n < rounds or (while_ is not None and while_() and n < max_rounds):
            for t, c in self.clients.items():
                t0 = time.perf_counter()
                with c.view(name_key(f"healthy-{t}")) as v:
                    got = bytes(v.data) if v is not None else None
                times[t].append(time.perf_counter() - t0)
                assert got == self.block, f"the {t} client lost its block"
            n += 1
        return {t: statistics.median(v) for t, v in times.items()}

    def assert_unharmed(self, during: dict[str, float]) -> None:
        for t, c in self.clients.items():
            st = c.client_stats()
            assert st.reregistrations == 0 and c.slot == self.slots[t], f"the {t} client was reaped"
            assert st.rpc_timeouts == 0, f"the {t} client timed out"
            assert during[t] < RATIO * self.baseline[t], (
                f"{t} client's median get went from {self.baseline[t] * 1e6:.0f} us to {during[t] * 1e6:.0f} us")

    def tcp_stats(self) -> dict:
        return self.clients["tcp"].service_stats()["tcp"]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


@pytest.fixture
def healthy():
    made = []

    def make(pool_path):
        h = Healthy(pool_path)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def _address(sp) -> tuple[str, int]:
    """The TCP address from the ready line of a `beluga serve` child."""
    info = json.loads((sp.tmp / f"ready-{sp.starts}.json").read_text())
    host, _, port = info["tcp_address"].rpartition(":")
    return host, int(port)


def _hello(nonce: int) -> bytes:
    return framed(rpc.encode_request(0, nonce, rpc.NO_SLOT, rpc.OP_HELLO,
                                     rpc.HELLO_REQ.pack(nonce, rpc.NO_SLOT, 0, b"attacker")))


def _register(sock: socket.socket, nonce: int) -> tuple[int, int]:
    sock.sendall(_hello(nonce))
    _, status, body = read_frame(sock)
    assert status == rpc.OK, body
    return rpc.HELLO_RESP.unpack(body)


def _attacker(mode: str, address: tuple[str, int], n: int) -> subprocess.Popen:
    """An attacker process, connected and ready: it attacks once this returns."""
    proc = subprocess.Popen([sys.executable, str(ATTACKER), mode, address[0], str(address[1]), str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    line = proc.stdout.readline()
    assert json.loads(line) == {"ready": True}, line
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc


SERVE = ["--heartbeat-timeout", "1"]


def test_a_huge_length_prefix_is_refused_and_the_connection_closed(service_process, pool_path, healthy):
    sp = service_process(extra=SERVE)
    h = healthy(pool_path)
    # Once, the service kept reading such a "frame" and buffered 300 MiB of it.
    bad = _attacker("huge-frame", _address(sp), 32 << 20)
    deadline = time.monotonic() + 30
    during = h.p50s(40, while_=lambda: bad.poll() is None and time.monotonic() < deadline)
    out = json.loads(bad.communicate(timeout=30)[0].splitlines()[-1])
    assert out["error"] in ("ConnectionResetError", "BrokenPipeError"), f"the service took {out['sent']} bytes " \
        f"of a 4 GiB frame ({out['error']})"
    assert h.tcp_stats()["closed_oversize_frame"] == 1
    h.assert_unharmed(during)


def test_a_client_that_never_reads_is_cut_off_without_stalling_the_others(service_process, pool_path, healthy):
    sp = service_process(extra=SERVE + ["--tcp-output-limit", "256K"])
    h = healthy(pool_path)
    # STATS answers are large; the attacker asks for thousands of them and reads none. Once, the
    # service blocked in a send to it until every healthy client was reaped.
    bad = _attacker("never-read", _address(sp), 20000)
    deadline = time.monotonic() + 30
    during = h.p50s(40, while_=lambda: h.tcp_stats()["closed_output_overflow"] == 0 and time.monotonic() < deadline)
    assert h.tcp_stats()["closed_output_overflow"] == 1, "the service kept answering a client that never reads"
    out = bad.communicate("go\n", timeout=30)[0]
    assert json.loads(out.splitlines()[-1]) == {"closed_by_service": True}, out
    h.assert_unharmed(during)


def _low_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, hard))


def test_idle_connections_under_a_low_file_limit_do_not_end_the_service(service_process, pool_path, healthy):
    sp = service_process(extra=SERVE + ["--tcp-hello-timeout", "1"], preexec_fn=_low_file_limit)
    h = healthy(pool_path)
    # More idle connections than the service may open files: once, accept's EMFILE ended the service.
    idle = [socket.create_connection(_address(sp), timeout=5) for _ in range(35)]
    try:
        during = h.p50s(40)
        assert sp.proc.poll() is None, f"the service exited: {sp.log()}"
        # Those over the limit are refused at once, the others closed for saying nothing.
        assert all(closed_by_service(s, 10) for s in idle), "idle connections were left open"
        stats = h.tcp_stats()
        assert stats["max_connections"] < 32
        assert stats["refused_connection_limit"] + stats["closed_hello_timeout"] == 35, stats
        h.assert_unharmed(during)
        with BelugaClient(pool_path, transport="tcp", rpc_timeout_s=2.0) as late:
            assert late.get(name_key("healthy-tcp")) == h.block  # room again for a new client
    finally:
        for s in idle:
            s.close()


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while not path.exists():
        assert proc.poll() is None, f"the service exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"no {path.name} after {within_s}s: {log.read_text()}"
        time.sleep(0.01)


def test_accept_failing_for_want_of_descriptors_does_not_end_the_service(pool_path, tmp_path, healthy):
    make_pool(pool_path)
    log = tmp_path / "service.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(FD_HOG), pool_path, str(tmp_path)], stdout=fh,
                                stderr=subprocess.STDOUT, env=subprocess_env(), preexec_fn=_low_file_limit)
    h = None
    waiting = []
    try:
        _wait_for(tmp_path / "ready.json", proc, log)
        h = healthy(pool_path)
        (tmp_path / "hog").mkdir()  # the service process runs out of descriptors
        _wait_for(tmp_path / "hogged", proc, log)
        waiting = [socket.create_connection(h.clients["tcp"].channel._resolve(), timeout=5) for _ in range(3)]
        deadline = time.monotonic() + 20
        during = h.p50s(40, while_=lambda: h.tcp_stats()["accept_errors"] == 0 and time.monotonic() < deadline)
        assert proc.poll() is None, f"the service exited: {log.read_text()}"
        assert h.tcp_stats()["accept_errors"] >= 1
        h.assert_unharmed(during)
        assert "accepting a TCP connection failed" in log.read_text()
        (tmp_path / "release").mkdir()
        # Accepted once descriptors are back, then closed for saying nothing (hello timeout 1 s).
        assert all(closed_by_service(s, 10) for s in waiting), "the waiting connections were never served"
        with BelugaClient(pool_path, transport="tcp", rpc_timeout_s=2.0) as late:
            assert late.get(name_key("healthy-tcp")) == h.block
    finally:
        for s in waiting:
            s.close()
        if h is not None:
            h.close()
        proc.terminate()
        proc.wait(10)


def test_hello_floods_cannot_take_the_slots_pool_clients_need(service_process, pool_path, healthy):
    service_process(extra=["--heartbeat-timeout", "3"])  # 8 client slots
    h = healthy(pool_path)
    address = h.clients["tcp"].channel._resolve()
    answers = []
    socks = []
    try:
        for i in range(40):  # HELLOs with made-up nonces that will never show a heartbeat
            s = socket.create_connection(address, timeout=5)
            socks.append(s)
            s.sendall(_hello(0x1000 + i))
            answers.append(read_frame(s))
        # Once, the flood took every slot and a pool client could not register at all.
        with BelugaClient(pool_path, transport="cxl", rpc_timeout_s=2.0) as newcomer:
            newcomer.put(name_key("newcomer"), b"n" * 100)
            assert newcomer.get(name_key("newcomer")) == b"n" * 100
        granted = sum(1 for _, status, _ in answers if status == rpc.OK)
        refused = [body.decode() for _, status, body in answers if status == rpc.NO_CLIENT_SLOT]
        assert granted + len(refused) == 40
        assert refused and "--tcp-max-clients" in refused[0], refused[:1]
        during = h.p50s(40)
        h.assert_unharmed(during)
    finally:
        for s in socks:
            s.close()


def test_a_stalled_service_does_not_reap_the_clients_it_could_not_watch(pool_path, healthy, monkeypatch):
    make_pool(pool_path)
    svc = ServiceThread(pool_path, ServiceConfig(takeover_wait_s=0, tcp_host="127.0.0.1", heartbeat_timeout_s=0.5))
    try:
        h = healthy(pool_path)
        stats = MetadataService._HANDLERS[rpc.OP_STATS]

        def stalling_stats(service, client, req):
            # The service's own stall (here 3x the heartbeat timeout), as a blocking send to a
            # client that never read once caused: clients kept beating, but nobody watched.
            time.sleep(1.5)
            return stats(service, client, req)

        monkeypatch.setitem(MetadataService._HANDLERS, rpc.OP_STATS, stalling_stats)
        bad = socket.create_connection(h.clients["tcp"].channel._resolve(), timeout=10)
        slot, _ = _register(bad, 0xBAD)
        req = rpc.encode_request(1, 0xBAD, slot, rpc.OP_STATS)
        bad.sendall(framed(req))
        assert read_frame(bad)[1] == rpc.OK  # the stall is over
        monkeypatch.setitem(MetadataService._HANDLERS, rpc.OP_STATS, stats)
        during = h.p50s(40)
        h.assert_unharmed(during)
        assert svc.service.counters["stalls_forgiven"] >= 1
        bad.close()
    finally:
        svc.stop()


def test_an_idle_tcp_client_whose_connection_was_closed_carries_on(pool_path):
    make_pool(pool_path)
    svc = ServiceThread(pool_path, ServiceConfig(takeover_wait_s=0, tcp_host="127.0.0.1", tcp_idle_timeout_s=0.2))
    try:
        with BelugaClient(pool_path, transport="tcp", rpc_timeout_s=2.0) as c:
            c.put(name_key("idle"), b"i" * 100)
            deadline = time.monotonic() + 10
            while svc.service.stats()["tcp"]["closed_idle"] == 0:
                assert time.monotonic() < deadline, "the idle connection was never closed"
                time.sleep(0.02)
            assert c.get(name_key("idle")) == b"i" * 100  # reconnects, same session
            assert c.client_stats().reregistrations == 0 and c.client_stats().rpc_timeouts == 0
    finally:
        svc.stop()


def test_without_the_pool_transport_tcp_clients_may_use_every_slot(pool_path):
    make_pool(pool_path)  # 8 client slots
    svc = ServiceThread(pool_path, ServiceConfig(takeover_wait_s=0, tcp_host="127.0.0.1", serve_cxl=False))
    clients = []
    try:
        for i in range(8):  # nobody to keep slots for
            clients.append(BelugaClient(pool_path, transport="tcp", rpc_timeout_s=2.0))
            clients[-1].put(name_key(f"c{i}"), b"c")
        assert svc.service.stats()["tcp"]["max_tcp_clients"] == 8
    finally:
        for c in clients:
            c.close()
        svc.stop()


def test_a_malformed_frame_gets_a_notice_and_the_connection_closed(pool_path):
    make_pool(pool_path)
    svc = ServiceThread(pool_path, ServiceConfig(takeover_wait_s=0, tcp_host="127.0.0.1"))
    try:
        with BelugaClient(pool_path, transport="tcp", rpc_timeout_s=2.0) as c:
            bad = socket.create_connection(c.channel._resolve(), timeout=5)
            bad.sendall(framed(b"garbage" * 10))
            seq, status, body = read_frame(bad)
            assert (seq, status) == (0, rpc.CLOSING) and b"malformed request" in body, body
            assert closed_by_service(bad, 10)
            bad.close()
            c.put(name_key("ok"), b"ok")
            assert c.get(name_key("ok")) == b"ok"
        assert svc.service.stats()["tcp"]["closed_malformed_frame"] == 1
    finally:
        svc.stop()
