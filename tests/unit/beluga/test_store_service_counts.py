"""What the service counts and what a reaped client leaves on the pool.

Found by `make mutate`: the counters behind `beluga stat` (and the scenarios'
expectations) could count backwards or twice, and a reaped client's slot could stay
owned on the pool, without any test noticing.
"""
from __future__ import annotations

import os

from beluga import rpc
from beluga.keys import name_key
from beluga.report import pool_report


def test_lookups_hits_and_misses_are_counted_once_each(store):
    c = store.client()
    c.put(name_key("a"), b"a" * 100)
    before = dict(store.service.counters)
    # The service counts the lookups it answers: views' leased lookups (gets read the pool's table).
    with c.view(name_key("a")) as v:
        assert bytes(v.data) == b"a" * 100
    assert c.view(name_key("b")) is None and c.view(name_key("c")) is None
    assert c._lookup([name_key("a")], 0)[0] is not None
    after = store.service.counters
    assert (after["lookups"] - before["lookups"], after["hits"] - before["hits"],
            after["misses"] - before["misses"]) == (4, 2, 2)


def test_a_reaped_client_is_counted_and_its_slot_is_free_on_the_pool(store):
    alive, dead = store.client(), store.client()
    data = os.urandom(500)
    dead.put(name_key("d"), data)
    slots = {c["slot"] for c in pool_report(store.pool)["clients"]}
    assert {alive.slot, dead.slot} <= slots
    gone = dead.slot
    store.clock.advance(store.config.heartbeat_timeout_s + 1)
    store.service.clients[alive.slot].seen_at = store.clock.now
    store.service.housekeeping(force=True)
    assert store.service.counters["clients_reaped"] == 1
    assert gone not in store.service.clients
    assert gone not in {c["slot"] for c in pool_report(store.pool)["clients"]}, "the slot is free for a new client"
    assert alive.slot in {c["slot"] for c in pool_report(store.pool)["clients"]}
    assert alive.get(name_key("d")) == data, "its committed blocks stay"
    store.service.check_invariants()


def test_leases_granted_are_counted(store):
    c = store.client()
    c.put(name_key("a"), b"a" * 10)
    before = store.service.counters["leases_granted"]
    views = [c.view(name_key("a")) for _ in range(3)]
    assert store.service.counters["leases_granted"] - before == 3
    for v in views:
        v.release()


def test_abort_frees_only_the_reservation_it_names(store):
    c = store.client()
    body = rpc.ALLOC_REQ.pack([(100,)])
    rows, _, _ = rpc.ALLOC_RESP.unpack(c._call(rpc.OP_ALLOC, body))
    a = rpc.Allocation(*rows[0][1:])
    assert store.service.stats()["reserved"] == 1
    rows, errors, _ = rpc.STATUS_RESP.unpack(
        c._call(rpc.OP_ABORT, rpc.ABORT_REQ.pack([(a.segment, a.slot, a.generation + 1)])))
    assert rows[0][0] == rpc.NOT_RESERVED and store.service.stats()["reserved"] == 1, "another generation: refused"
    rows, errors, _ = rpc.STATUS_RESP.unpack(
        c._call(rpc.OP_ABORT, rpc.ABORT_REQ.pack([(a.segment, a.slot, a.generation)])))
    assert rows[0][0] == rpc.OK and store.service.stats()["reserved"] == 0
    store.service.check_invariants()


def test_reaping_a_client_seals_only_its_own_open_segments(store):
    alive, dead = store.client(), store.client()
    # alive is mid-put (a reservation in flight): its open segment cannot change hands,
    # so dead's put opens a segment of its own
    rpc.ALLOC_RESP.unpack(alive._call(rpc.OP_ALLOC, rpc.ALLOC_REQ.pack([(100,)])))
    dead.put(name_key("d"), b"d" * 100)
    assert store.service.stats()["segments"]["open"] == 2
    store.service.reap(dead.slot, "test")
    assert store.service.stats()["segments"]["open"] == 1, "the live writer keeps its open segment"
    assert alive.get(name_key("d")) == b"d" * 100
    store.service.check_invariants()
