"""The client API over both real transports (pool slots and TCP), service in a thread."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from beluga.client import BelugaClient
from beluga.errors import InvalidKeyError, ServiceUnavailableError
from beluga.keys import PrefixContext, name_key, prefix_keys
from beluga.service import ServiceConfig, ServiceThread

from beluga_store_support import make_pool, no_hang

TRANSPORTS = ["cxl", "tcp"]


def cfg(**kw) -> ServiceConfig:
    base = dict(takeover_wait_s=0, tcp_host="127.0.0.1", heartbeat_timeout_s=2.0, lease_ttl_s=5.0)
    base.update(kw)
    return ServiceConfig(**base)


@pytest.fixture
def running(pool_path):
    make_pool(pool_path, size_bytes=16 << 20)
    threads = []

    def start(**kw) -> ServiceThread:
        t = ServiceThread(pool_path, cfg(**kw))
        threads.append(t)
        return t

    yield start
    # Every thread is stopped; a service thread that crashed during the test fails it here
    # (ServiceThread.stop re-raises what the thread died of) instead of passing silently.
    crashed = []
    for t in threads:
        if t._stop.is_set():
            continue  # the test stopped it itself (and saw what stop() raised)
        try:
            t.stop()
        except Exception as e:  # noqa: BLE001 - collected, reported below
            crashed.append(e)
    if crashed:
        raise AssertionError(f"{len(crashed)} service thread(s) crashed during the test") from crashed[0]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_api_roundtrip(running, pool_path, transport):
    svc = running()
    with BelugaClient(pool_path, transport=transport) as c:
        keys = prefix_keys(list(range(16 * 6)), context=PrefixContext(model="m"))
        blocks = [os.urandom(1000 * (i + 1)) for i in range(6)]
        c.put(keys[0], blocks[0])
        assert c.get(keys[0]) == blocks[0] and c.contains(keys[0])
        c.put_many(list(zip(keys[1:4], blocks[1:4])))
        assert c.lookup_prefix(keys) == 4
        assert c.get_many(keys) == blocks[:4] + [None, None]
        out = bytearray(10_000)
        assert c.get_into(keys[2], out) == len(blocks[2]) and out[: len(blocks[2])] == blocks[2]
        assert c.get_into(keys[5], out) is None
        with c.view(keys[3]) as v:
            assert bytes(v.data) == blocks[3]
        assert c.delete(keys[1]) and not c.delete(keys[1])
        assert c.lookup_prefix(keys) == 1
        c.put(keys[0], b"replaced")
        assert c.get(keys[0]) == b"replaced"
        c.put(keys[5], b"")  # empty blocks are blocks too
        assert c.get(keys[5]) == b"" and c.contains(keys[5])
        st = c.stats()
        assert st.client.hits >= 6 and st.client.misses >= 3 and st.client.corrupt_misses == 0
        assert st.service["blocks"] == 4 and st.service["reserved"] == 0  # keys 0, 2, 3, 5
        with pytest.raises(InvalidKeyError):
            c.contains(b"tiny")
    svc.service.check_invariants()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_block_data_travels_through_the_transport(running, pool_path, transport):
    running()
    with BelugaClient(pool_path, transport=transport) as c:
        sent = []
        call = c.channel.call

        def counting(message, seq, timeout_s):
            resp = call(message, seq, timeout_s)
            sent.append(len(message) + len(resp))
            return resp

        c.channel.call = counting
        data = os.urandom(200_000)
        c.put(name_key("big"), data)
        assert c.get(name_key("big")) == data
        with c.view(name_key("big")) as v:
            assert bytes(v.data[:100]) == data[:100]
        assert len(sent) == 3  # alloc, commit, the view's leased lookup (a get needs no round trip)
        assert sum(sent) < 2000  # metadata only: a few hundred bytes for 200 kB of data


def test_view_is_zero_copy_pool_memory(running, pool_path):
    running()
    with BelugaClient(pool_path) as c:
        c.put(name_key("v"), b"x" * 50_000)
        base = np.frombuffer(c.pool.buf, dtype=np.uint8).__array_interface__["data"][0]
        with c.view(name_key("v")) as v:
            arr = np.frombuffer(v.data, dtype=np.uint8)
            addr = arr.__array_interface__["data"][0]
            assert base <= addr < base + c.pool.geometry.pool_size_bytes
            assert addr - base == c._lookup([name_key("v")], 0)[0].data_offset
            del arr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_service_down_is_a_clear_bounded_error_and_clients_carry_on(running, pool_path, transport):
    svc = running()
    c = BelugaClient(pool_path, transport=transport, rpc_timeout_s=0.5, heartbeat_interval_s=0.1)
    c.put(name_key("before"), b"committed before the outage")
    svc.stop(clean=False)  # like a crash: the pool still says a service owns it
    said = {"cxl": r"metadata service did not answer request \d+ on client slot \d+ of .* within 0.5s "
                   r"\(is `beluga serve` running\? it may have died; retry once it is back\)",
            # the service closed the connection when it stopped: the client sees that before
            # sending and connects afresh, to nobody
            "tcp": r"cannot reach the metadata service at 127\.0\.0\.1:\d+: \[Errno 111\] Connection refused"}
    with no_hang("a put with the service gone"), pytest.raises(ServiceUnavailableError, match=said[transport]):
        c.put(name_key("during"), b"needs the service")  # an error, not a hang
    # Committed blocks stay readable: a get reads the pool's lookup table, not the service.
    assert c.get(name_key("before")) == b"committed before the outage"
    running()  # a new service instance recovers from the pool
    assert c.get(name_key("before")) == b"committed before the outage"
    c.put(name_key("after"), b"x")
    assert c.get(name_key("after")) == b"x"
    assert c.client_stats().rpc_timeouts == 1
    c.close()


def test_no_service_at_all_fails_fast(pool_path):
    make_pool(pool_path)
    with no_hang("a client with no service at all"):
        with pytest.raises(ServiceUnavailableError, match="no metadata service granted a client slot"):
            BelugaClient(pool_path, rpc_timeout_s=0.3)
        with pytest.raises(ServiceUnavailableError, match="no TCP address"):
            BelugaClient(pool_path, transport="tcp", rpc_timeout_s=0.3)
    # the failed claim was withdrawn: no client slot is left pinned
    from beluga.pool import Pool
    from beluga.report import pool_report

    with Pool.open(pool_path) as pool:
        assert pool_report(pool)["clients"] == []
        assert all(pool.buf[pool.geometry.host_slot_offset(s) : pool.geometry.host_slot_offset(s) + 8] == bytes(8)
                   for s in range(pool.geometry.max_clients))


def test_heartbeat_keeps_an_idle_client_alive(running, pool_path):
    running(heartbeat_timeout_s=0.5)
    with BelugaClient(pool_path, heartbeat_interval_s=0.05) as alive, \
            BelugaClient(pool_path, heartbeat_interval_s=None) as silent:
        alive.put(name_key("a"), b"a")
        silent.put(name_key("s"), b"s")
        # Past the heartbeat timeout: the silent client's slot is reaped, the other one's never.
        deadline = time.monotonic() + 30
        while silent.slot in [c["slot"] for c in alive.service_stats()["clients"]]:
            assert time.monotonic() < deadline, "the silent client was never reaped"
            time.sleep(0.05)
        assert alive.get(name_key("a")) == b"a"
        silent.put(name_key("s2"), b"s2")  # reaped meanwhile, re-registered transparently
        assert silent.get(name_key("s")) == b"s"
        assert alive.client_stats().reregistrations == 0
        assert silent.client_stats().reregistrations == 1


def test_many_clients_share_the_pool(running, pool_path):
    running()
    clients = [BelugaClient(pool_path, transport=TRANSPORTS[i % 2]) for i in range(5)]
    try:
        for i, c in enumerate(clients):
            c.put(name_key(f"c{i}"), bytes([i]) * 3000)
        for c in clients:
            assert [c.get(name_key(f"c{i}")) for i in range(5)] == [bytes([i]) * 3000 for i in range(5)]
        assert len({c.slot for c in clients}) == 5
    finally:
        for c in clients:
            c.close()
