"""Metadata service against an in-process client on a fake clock: commit protocol,
hostile requests, leases, eviction, reclamation and recovery."""
from __future__ import annotations

import dataclasses
import os
import struct

import pytest

from beluga import layout as L
from beluga import rpc
from beluga.errors import (
    BlockTooLargeError, CorruptPoolError, InvalidKeyError, PoolFullError, RequestRejectedError, ServiceBusyError,
    ServiceUnavailableError,
)
from beluga.keys import name_key
from beluga.pool import Pool
from beluga.report import pool_report
from beluga.service import MetadataService, ServiceConfig, ServiceThread

from beluga_store_support import LocalStore, written_back


def k(i) -> bytes:
    return name_key(f"key-{i}")


def alloc(c, length: int) -> rpc.Allocation:
    rows, errors, _ = rpc.ALLOC_RESP.unpack(c._call(rpc.OP_ALLOC, rpc.ALLOC_REQ.pack([(length,)])))
    assert rows[0][0] == rpc.OK, errors
    return rpc.Allocation(*rows[0][1:])


def write_block(c, a: rpc.Allocation, key: bytes, data: bytes, *, state=L.BLOCK_COMPLETE, crc=None) -> int:
    import zlib

    crc = zlib.crc32(data) if crc is None else crc
    c.buf[a.data_offset : a.data_offset + len(data)] = data
    c.buf[a.header_offset : a.header_offset + L.BLOCK_HEADER_BYTES] = L.BlockHeader(
        state, len(data), a.generation, crc, c.slot, key).encode()
    written_back(c.buf, a.data_offset, len(data))
    written_back(c.buf, a.header_offset, L.BLOCK_HEADER_BYTES)
    return crc


def commit(c, key, a, length, crc):
    rows, errors, _ = rpc.STATUS_RESP.unpack(
        c._call(rpc.OP_COMMIT, rpc.COMMIT_REQ.pack([(key, a.segment, a.slot, a.generation, length, crc)])))
    return rows[0][0], errors.get(0, "")


def snapshot(store: LocalStore) -> dict:
    """Everything a hostile request must not change: the index and every committed block's bytes."""
    svc = store.service
    out = {}
    for key, (si, sl) in svc.index.items():
        seg = svc.segments[si]
        off = store.pool.geometry.segment_offset(si) + seg.layout.data_offset(sl)
        out[key] = (si, sl, bytes(store.pool.buf[off : off + seg.blocks[sl].length]))
    return out


# ---------------------------------------------------------------- basic protocol
def test_put_is_invisible_until_committed(store):
    c = store.client()
    data = os.urandom(5000)
    a = alloc(c, len(data))
    crc = write_block(c, a, k(1), data)
    assert not c.contains(k(1)) and c.get(k(1)) is None  # written but not committed
    assert commit(c, k(1), a, len(data), crc) == (rpc.OK, "")
    assert c.get(k(1)) == data
    # A retried commit (answer lost) is idempotent.
    assert commit(c, k(1), a, len(data), crc)[0] == rpc.OK
    store.service.check_invariants()


def test_commit_of_an_incomplete_header_is_refused_and_frees_the_slot(store):
    c = store.client()
    data = b"x" * 100
    a = alloc(c, len(data))
    crc = write_block(c, a, k(1), data, state=L.BLOCK_WRITING)
    code, msg = commit(c, k(1), a, len(data), crc)
    assert code == rpc.BAD_HEADER and "state" in msg
    assert store.service.stats()["reserved"] == 0
    assert not c.contains(k(1))
    store.service.check_invariants()


@pytest.mark.parametrize("field", ["key", "length", "crc", "generation"])
def test_commit_must_match_the_block_header(store, field):
    c = store.client()
    c.put(k(0), b"keep me")
    before = snapshot(store)
    data = b"y" * 300
    a = alloc(c, len(data))
    crc = write_block(c, a, k(1), data)
    key, length, gen = k(1), len(data), a.generation
    if field == "key":
        key = k(2)
    elif field == "length":
        length = 200
    elif field == "crc":
        crc ^= 1
    elif field == "generation":
        gen += 1
    rows, errors, _ = rpc.STATUS_RESP.unpack(
        c._call(rpc.OP_COMMIT, rpc.COMMIT_REQ.pack([(key, a.segment, a.slot, gen, length, crc)])))
    if field == "generation":  # another generation is another (or no) reservation, not a header question
        assert rows[0][0] == rpc.NOT_RESERVED, errors
        assert (f"is reserved with generation {a.generation}, not reserved by you with generation {gen} "
                "(expired or reclaimed reservation?)") in errors[0]
    else:
        assert rows[0][0] == rpc.BAD_HEADER, errors
        assert f"block header of segment {a.segment} slot {a.slot} does not match the request ({field} header=" \
            in errors[0]
    assert snapshot(store) == before
    assert not c.contains(k(1)) and not c.contains(k(2))
    store.service.check_invariants()


def test_hostile_requests_cannot_touch_another_writers_blocks(store):
    a_client, b_client = store.client(), store.client()
    a_client.put(k(1), b"a's block" * 50)
    a_res = alloc(a_client, 100)  # a's in-flight reservation
    before = snapshot(store)
    g = store.pool.geometry
    si, sl = store.service.index[k(1)]
    evil = b"evil" * 25
    cases = [
        ((k(9), si, sl, 1, len(evil), 0), rpc.NOT_OWNER, "owned by"),  # a's committed slot
        ((k(9), a_res.segment, a_res.slot, a_res.generation, 100, 0), rpc.NOT_OWNER, "owned by"),
        ((k(9), g.segment_count + 5, 0, 1, 10, 0), rpc.BAD_REQUEST, "out of range"),
        ((k(9), si, 10_000, 1, 10, 0), rpc.BAD_REQUEST, "slot 10000 is out of range"),
        ((k(9), g.segment_count - 1, 0, 1, 10, 0), rpc.NOT_OWNER, "free"),
    ]
    for item, code, text in cases:
        rows, errors, _ = rpc.STATUS_RESP.unpack(b_client._call(rpc.OP_COMMIT, rpc.COMMIT_REQ.pack([item])))
        assert rows[0][0] == code, errors
        assert text in errors[0]
    # b may not abort a's reservation either, nor release a's leases
    rows, errors, _ = rpc.STATUS_RESP.unpack(
        b_client._call(rpc.OP_ABORT, rpc.ABORT_REQ.pack([(a_res.segment, a_res.slot, a_res.generation)])))
    assert rows[0][0] == rpc.NOT_RESERVED
    view = a_client.view(k(1))
    lease = view.lease
    b_client._releases.append(lease)
    b_client.contains(k(1))
    assert store.service.leases.get(lease) is not None
    view.release()
    assert snapshot(store) == before
    assert store.service.stats()["reserved"] == 1
    store.service.check_invariants()


def test_commit_beyond_the_slot_is_refused(store):
    c = store.client()
    a = alloc(c, 100)
    code, msg = commit(c, k(1), a, a.capacity_bytes + 1, 0)
    assert code == rpc.BAD_REQUEST and "exceeds the slot" in msg
    assert store.service.stats()["reserved"] == 0


def test_malformed_and_unauthenticated_requests(store):
    c = store.client()
    svc = store.service
    seq, status, body = rpc.decode_response(svc.handle(b"garbage" * 10))
    assert status == rpc.BAD_REQUEST and b"malformed" in body
    good = rpc.encode_request(1, c._nonce, c.slot, rpc.OP_NOP)
    torn = bytearray(good)
    torn[-1] ^= 1
    assert rpc.decode_response(svc.handle(bytes(torn)))[1] == rpc.BAD_REQUEST
    seq, status, body = rpc.decode_response(svc.handle(rpc.encode_request(1, 12345, c.slot, rpc.OP_NOP)))
    assert status == rpc.UNKNOWN_SESSION and b"not registered" in body
    seq, status, body = rpc.decode_response(svc.handle(rpc.encode_request(2, c._nonce, c.slot, 99)))
    assert status == rpc.BAD_REQUEST and b"unknown op 99" in body
    seq, status, body = rpc.decode_response(
        svc.handle(rpc.encode_request(3, c._nonce, c.slot, rpc.OP_COMMIT, struct.pack("<I", 1000))))
    assert status == rpc.BAD_REQUEST and b"commit" in body
    store.service.check_invariants()


def test_bad_input_from_the_client_api(store):
    c = store.client()
    with pytest.raises(InvalidKeyError, match="exactly 32 bytes"):
        c.put(b"short", b"x")
    with pytest.raises(InvalidKeyError):
        c.get(b"x" * 33)
    too_big = store.pool.geometry.max_block_bytes + 1
    with pytest.raises(BlockTooLargeError, match=f"{too_big} bytes.*larger than a segment"):
        c.put(k(1), bytes(too_big))
    # The service enforces the same limit for clients that skip the check.
    rows, errors, _ = rpc.ALLOC_RESP.unpack(c._call(rpc.OP_ALLOC, rpc.ALLOC_REQ.pack([(too_big,)])))
    assert rows[0][0] == rpc.TOO_LARGE and "larger than a segment" in errors[0]
    c.put(k(2), bytes(store.pool.geometry.max_block_bytes))  # exactly the limit is fine
    assert len(c.get(k(2))) == store.pool.geometry.max_block_bytes
    assert store.service.stats()["reserved"] == 0


# ---------------------------------------------------------------- reader verification
def test_corrupted_block_is_a_counted_reported_miss(store):
    c = store.client()
    data = os.urandom(3000)
    c.put(k(1), data)
    si, sl = store.service.index[k(1)]
    seg = store.service.segments[si]
    off = store.pool.geometry.segment_offset(si) + seg.layout.data_offset(sl)
    store.pool.buf[off + 100] ^= 0xFF
    written_back(store.pool.buf, off + 100, 1)
    assert c.get(k(1)) is None
    st = c.client_stats()
    assert st.corrupt_misses == 1 and st.misses == 1
    svc = store.service.stats()["counters"]
    assert svc["corrupt_reports"] == 1 and svc["corrupt_blocks_dropped"] == 1
    assert not c.contains(k(1))  # nobody is handed the bad bytes again
    store.service.check_invariants()


def test_reused_slot_generation_mismatch_is_a_miss(store):
    c = store.client()
    readers = {1: lambda key: c.get(key), 2: lambda key: c.view(key), 3: lambda key: c.get_into(key, bytearray(600))}
    for i, read in readers.items():
        c.put(k(i), b"a" * 500)
        loc = c._lookup([k(i)], 0)[0]
        # Another writer rewrote the slot with a new generation (e.g. a zombie writer).
        c.buf[loc.header_offset : loc.header_offset + L.BLOCK_HEADER_BYTES] = L.BlockHeader(
            L.BLOCK_COMPLETE, 500, loc.generation + 1, loc.data_crc, 0, k(i)).encode()
        written_back(c.buf, loc.header_offset, L.BLOCK_HEADER_BYTES)
        assert read(k(i)) is None
        assert c.client_stats().corrupt_misses == i
        assert not c.contains(k(i))  # reported and dropped: the committed bytes are not what was committed


# ---------------------------------------------------------------- leases, eviction, capacity
def fill(store, c, length=3000):
    """Put blocks until the pool is full; returns the keys in put order."""
    keys = []
    i = 0
    while store.service.stats()["slots_free"] > 0 or store.service._free_segments:
        c.put(k(i), bytes([i % 256]) * length)
        keys.append(k(i))
        i += 1
    return keys


def test_full_pool_evicts_least_recently_used(store):
    c = store.client()
    keys = fill(store, c)
    assert store.service.counters["evictions"] == 0
    assert c.get(keys[0]) == bytes([0]) * 3000  # keys[0] is now recently used; keys[1] is the LRU
    c.put(k("new"), b"n" * 3000)
    assert c.contains(k("new")) and c.contains(keys[0]) and not c.contains(keys[1])
    assert store.service.counters["evictions"] == 1
    store.service.check_invariants()


def test_leased_blocks_are_never_evicted_and_expired_leases_are_reclaimed(store):
    c = store.client()
    keys = fill(store, c)
    views = [c.view(key) for key in keys]  # hold everything
    assert all(v is not None for v in views)
    before = snapshot(store)
    with pytest.raises(PoolFullError, match="leased by readers"):
        c.put(k("new"), b"n" * 3000)
    assert snapshot(store) == before and store.service.stats()["reserved"] == 0
    # The reader never releases (killed): its leases expire.
    store.clock.advance(store.config.lease_ttl_s + 1)
    store.service.housekeeping(force=True)
    assert store.service.stats()["leases"] == 0
    c.put(k("new"), b"n" * 3000)
    assert c.contains(k("new"))
    store.service.check_invariants()


def test_delete_under_a_lease_keeps_bytes_until_release(store):
    c = store.client()
    data = os.urandom(2000)
    c.put(k(1), data)
    v = c.view(k(1))
    assert c.delete(k(1)) and not c.contains(k(1))
    assert store.service.stats()["zombies"] == 1
    assert bytes(v.data) == data  # the reader still sees its bytes
    v.release()
    c.flush_releases()
    st = store.service.stats()
    assert st["zombies"] == 0 and st["blocks"] == 0
    assert not c.delete(k(1))
    store.service.check_invariants()


def test_overwrite_replaces_and_frees_the_old_slot(store):
    c = store.client()
    c.put(k(1), b"old" * 100)
    used = store.service.stats()["slots_total"] - store.service.stats()["slots_free"]
    c.put(k(1), b"new" * 100)
    assert c.get(k(1)) == b"new" * 100
    assert store.service.stats()["slots_total"] - store.service.stats()["slots_free"] == used
    store.service.check_invariants()


def test_large_block_evicts_a_whole_segment_of_small_ones(store):
    c = store.client()
    keys = fill(store, c, length=1000)
    big = store.pool.geometry.max_block_bytes
    c.put(k("big"), b"B" * big)
    assert c.get(k("big")) == b"B" * big
    assert store.service.counters["segment_evictions"] == 1
    lost = [key for key in keys if not c.contains(key)]
    # Exactly one segment's worth of the oldest-used small blocks went.
    slots_per_seg = store.pool.geometry.slot_layout(4096).slot_count
    assert len(lost) == slots_per_seg and set(lost) == set(keys[:slots_per_seg])
    store.service.check_invariants()


def test_evicting_the_last_block_of_a_segment_keeps_it_for_the_evicting_writer(store):
    """A sealed segment whose only block is evicted for a writer stays that writer's: another
    writer's ALLOC must not take it as a free segment and wipe the first one's reservation."""
    a, b = store.client(), store.client()
    seg_bytes = store.pool.geometry.segment_size_bytes  # one block fills a segment
    keys = fill(store, a, length=seg_bytes)
    pending = alloc(a, seg_bytes)  # evicts the LRU block, the only one in its segment
    assert not a.contains(keys[0])
    b.put(k("small"), b"s" * 100)  # the pool is full: B evicts too, it must not reopen A's segment
    crc = write_block(a, pending, k("new"), b"n" * seg_bytes)
    assert commit(a, k("new"), pending, seg_bytes, crc) == (rpc.OK, "")
    assert a.get(k("new")) == b"n" * seg_bytes and b.get(k("small")) == b"s" * 100
    store.service.check_invariants()


def test_writer_reaped_between_alloc_and_commit_puts_again(store):
    """A session that ends mid-put (heartbeat missed under load) takes its reservation with it:
    the put allocates again under the new session instead of committing a dead reservation."""
    c = store.client()
    c.put(k("before"), b"b" * 5000)
    inner = c.channel.call
    reaped = []

    def call(message, seq, timeout_s):
        resp = inner(message, seq, timeout_s)
        if rpc.decode_request(message).op == rpc.OP_ALLOC and not reaped:
            store.service.reap(c.slot, "test: heartbeat missed")
            reaped.append(True)
        return resp

    c.channel.call = call
    c.put(k(1), b"x" * 5000)
    assert reaped and c.client_stats().reregistrations == 1
    assert c.get(k(1)) == b"x" * 5000 and c.get(k("before")) == b"b" * 5000
    assert store.service.stats()["reserved"] == 0
    store.service.check_invariants()


def test_admin_evict_skips_leased(store):
    c = store.client()
    for i in range(5):
        c.put(k(i), b"z" * 10)
    v = c.view(k(0))
    assert c.evict(3) == 3
    assert [c.contains(k(i)) for i in range(5)] == [True, False, False, False, True]
    v.release()


# ---------------------------------------------------------------- dead clients
def test_dead_writer_loses_reservations_and_segments(store):
    w = store.client()
    r = store.client()
    a = alloc(w, 5000)
    write_block(w, a, k(1), b"half")  # killed mid-put
    assert store.service.stats()["reserved"] == 1
    # r keeps its heartbeat; w's stops. Heartbeats are pool counters the service polls.
    for _ in range(4):
        store.clock.advance(1.0)
        hb = store.pool.geometry.host_slot_offset(r.slot) + L.CL_HEARTBEAT
        struct.pack_into("<Q", store.pool.buf, hb, struct.unpack_from("<Q", store.pool.buf, hb)[0] + 1)
        written_back(store.pool.buf, hb, 8)
        store.service.poll_pool()
        store.service.housekeeping(force=True)
    st = store.service.stats()
    assert st["reserved"] == 0 and st["segments"]["open"] == 0
    assert [c["slot"] for c in st["clients"]] == [r.slot]
    assert st["counters"]["reservations_reclaimed"] == 1
    assert not r.contains(k(1))
    # the dead writer's next call re-registers transparently under a new session
    w.put(k(2), b"back")
    assert w.client_stats().reregistrations == 1
    store.service.check_invariants()


def test_dead_reader_does_not_pin_space(store):
    w, r = store.client(), store.client()
    w.put(k(1), b"q" * 100)
    v = r.view(k(1))
    assert store.service.stats()["leases"] == 1
    store.clock.advance(store.config.heartbeat_timeout_s + 1)
    w.contains(k(1))  # w is alive; keep it by resetting its seen time below
    store.service.clients[w.slot].seen_at = store.clock.now
    store.service.housekeeping(force=True)
    assert store.service.stats()["leases"] == 0
    assert w.delete(k(1)) and store.service.stats()["zombies"] == 0
    v.data.release()


def test_uncommitted_reservation_expires(store):
    c = store.client()
    alloc(c, 100)
    store.clock.advance(store.config.reservation_ttl_s + 1)
    store.service.clients[c.slot].seen_at = store.clock.now
    store.service.housekeeping(force=True)
    assert store.service.stats()["reserved"] == 0
    assert store.service.counters["reservations_expired"] == 1


def test_client_reregisters_after_being_reaped(store):
    c = store.client()
    store.service.reap(c.slot, "test")
    assert c.delete(k(1)) is False  # re-registered under a new session and answered
    assert c.client_stats().reregistrations == 1


# ---------------------------------------------------------------- recovery
def test_restart_recovers_the_committed_index_from_metadata(store):
    c = store.client()
    blobs = {k(i): os.urandom(100 + 997 * i) for i in range(40)}
    c.put_many(list(blobs.items()))
    c.delete(k(3))
    pending = alloc(c, 1000)  # an in-flight reservation survives for its (still live) owner
    store.restart()
    rec = store.service.recovery
    assert rec["committed_blocks"] == 39 and rec["reservations"] == 1
    for key, data in blobs.items():
        assert c.get(key) == (None if key == k(3) else data)
    crc = write_block(c, pending, k("late"), b"late")
    assert commit(c, k("late"), pending, 4, crc) == (rpc.OK, "")
    assert c.get(k("late")) == b"late"
    store.service.check_invariants()


def test_recovery_touches_only_metadata(store, monkeypatch):
    c = store.client()
    c.put_many([(k(i), os.urandom(20000)) for i in range(20)])
    g = store.pool.geometry
    # Poison all block data: recovery must not read (or care about) it.
    for si in range(g.segment_count):
        start = g.segment_offset(si)
        store.pool.buf[start : start + g.segment_size_bytes] = b"\xa5" * g.segment_size_bytes
        written_back(store.pool.buf, start, g.segment_size_bytes)
    # ...and the block headers too: the index alone is the authority.
    store.pool.buf[g.headers_offset : g.segments_offset] = bytes(g.segments_offset - g.headers_offset)
    written_back(store.pool.buf, g.headers_offset, g.segments_offset - g.headers_offset)
    store.restart()
    assert store.service.recovery["committed_blocks"] == 20
    assert len(store.service.index) == 20


def test_torn_index_entry_and_duplicate_keys_on_recovery(store):
    c = store.client()
    c.put(k(1), b"one")
    c.put(k(2), b"two")
    g = store.pool.geometry
    si, sl = store.service.index[k(1)]
    off = g.index_entry_offset(si, sl)
    store.pool.buf[off + 20] ^= 0xFF  # service killed mid-write of this entry (never acknowledged)
    written_back(store.pool.buf, off + 20, 1)
    # Simulate a crash between committing a replacement of k(2) and freeing the old copy.
    old_si, old_sl = store.service.index[k(2)]
    c.put(k(2), b"two v2")
    stale = L.IndexEntry(L.ENTRY_COMMITTED, c.slot, c._epoch, 1, 3, 0, k(2))
    store.pool.buf[g.index_entry_offset(old_si, old_sl) : g.index_entry_offset(old_si, old_sl) + 64] = stale.encode()
    written_back(store.pool.buf, g.index_entry_offset(old_si, old_sl), 64)
    store.restart()
    assert store.service.recovery["torn_records"] == 1
    assert store.service.recovery["duplicate_keys"] == 1
    assert c.get(k(2)) == b"two v2"
    assert not c.contains(k(1))
    store.service.check_invariants()
    # The newer copy won; the stale duplicate's slot is free again, on the pool too.
    assert store.service.index[k(2)] != (old_si, old_sl)
    entry = L.IndexEntry.decode(store.pool.buf[g.index_entry_offset(old_si, old_sl):][:L.INDEX_ENTRY_BYTES])
    assert entry.state == L.ENTRY_FREE


def test_recovery_of_dead_clients_state(store):
    w = store.client()
    w.put(k(1), b"keep")
    alloc(w, 100)
    store.restart()
    # w never heartbeats again after the restart: reaped, reservation freed, block kept.
    store.clock.advance(store.config.heartbeat_timeout_s + 1)
    store.service.housekeeping(force=True)
    st = store.service.stats()
    assert st["reserved"] == 0 and st["clients"] == [] and st["blocks"] == 1
    report = pool_report(store.pool)
    assert report["reserved"] == 0 and report["blocks"] == 1 and report["clients"] == []


SEG = 256 * 1024  # the test pools' segment size (beluga_store_support.SMALL); granularity 4 KiB
SLOT_SIZE_PROBLEM = ("data_slot_bytes {} is not a multiple of the 4096-byte slot granularity between 4096 and the "
                     "262144-byte segment size")


@pytest.mark.parametrize("state, data_slot_bytes, slot_count, problem", [
    (L.SEG_SEALED, 1, SEG, SLOT_SIZE_PROBLEM.format(1)),  # was: struct.error out of the constructor
    (L.SEG_SEALED, 512, SEG // 512, SLOT_SIZE_PROBLEM.format(512)),  # was: 8 segments' index entries read as one
    (L.SEG_OPEN, 3000, SEG // 3000, SLOT_SIZE_PROBLEM.format(3000)),
    (L.SEG_SEALED, 0, 0, SLOT_SIZE_PROBLEM.format(0)),
    (L.SEG_SEALED, 2 * SEG, 0, SLOT_SIZE_PROBLEM.format(2 * SEG)),
    (L.SEG_SEALED, 8192, 33, "slot_count 33 does not match data_slot_bytes 8192 (a 262144-byte segment holds 32 "
                             "such slots)"),
    (7, 4096, 64, "state 7 is unknown (known: 0 free, 1 open, 2 sealed)"),
])
def test_recovery_refuses_a_crafted_segment_entry_and_writes_nothing(store, state, data_slot_bytes, slot_count,
                                                                     problem):
    """A segment-table record with a valid CRC but impossible fields stops start-up with a
    CorruptPoolError naming the segment, the field and its value; no other record is touched."""
    c = store.client()
    c.put_many([(k(i), bytes([i]) * 4000) for i in range(150)])  # 4 KiB slots: segments 0, 1 and 2
    g = store.pool.geometry
    assert {si for si, _ in store.service.index.values()} == {0, 1, 2}
    L.write_segment_entry(store.pool.buf, g.segment_entry_offset(1),
                          L.SegmentEntry(state, 0, 0, data_slot_bytes, slot_count))
    store.pool.buf[g.index_entry_offset(0, 5) + 20] ^= 0xFF  # a torn entry before it: not freed either
    written_back(store.pool.buf, g.index_entry_offset(0, 5) + 20, 1)
    metadata = bytes(store.pool.buf[g.segment_table_offset : g.segments_offset])
    with pytest.raises(CorruptPoolError) as exc:
        store.restart()
    assert str(exc.value).startswith(f"{store.path}: segment 1: segment-table entry: {problem}. Its checksum is valid")
    assert f"beluga format --force {store.path}" in str(exc.value)
    assert bytes(store.pool.buf[g.segment_table_offset : g.segments_offset]) == metadata
    # The pool is handed back (no successor waits for a takeover) and `beluga stat` names the record.
    report = pool_report(store.pool)
    assert report["service"]["running"] is False
    assert report["invalid_records"] == [f"segment 1: {problem}"]


@pytest.mark.parametrize("field, value, problem", [
    ("state", 9, "state 9 is unknown (known: 0 free, 1 reserved, 2 committed)"),
    ("length_bytes", 4097, "length_bytes 4097 exceeds the segment's 4096-byte slots"),
    ("generation", 2**64 - 1, f"generation {2**64 - 1} is beyond 2^62, more allocations than any pool can have "
                              f"made"),  # was: struct.error persisting the next high-water mark
])
def test_recovery_refuses_a_crafted_index_entry(store, field, value, problem):
    c = store.client()
    c.put_many([(k(i), bytes([i]) * 4000) for i in range(3)])
    si, sl = store.service.index[k(1)]
    g = store.pool.geometry
    off = g.index_entry_offset(si, sl)
    e = L.IndexEntry.decode(store.pool.buf[off : off + L.INDEX_ENTRY_BYTES])
    store.pool.buf[off : off + L.INDEX_ENTRY_BYTES] = dataclasses.replace(e, **{field: value}).encode()
    written_back(store.pool.buf, off, L.INDEX_ENTRY_BYTES)
    with pytest.raises(CorruptPoolError) as exc:
        store.restart()
    assert str(exc.value).startswith(f"{store.path}: segment {si} slot {sl}: index entry: {problem}. ")
    assert pool_report(store.pool)["invalid_records"] == [f"segment {si} slot {sl}: {problem}"]


def test_recovery_refuses_a_client_epoch_beyond_32_bits(store):
    c = store.client()
    off = store.pool.geometry.host_slot_offset(c.slot) + L.SERVICE_LINE_OFFSET + L.SL_EPOCH
    struct.pack_into("<Q", store.pool.buf, off, 2**32)  # was: struct.error writing its segments' owner epoch
    written_back(store.pool.buf, off, 8)
    with pytest.raises(CorruptPoolError, match=rf"^{store.path}: client slot {c.slot}: service line: epoch "
                                               rf"{2**32} does not fit the 32-bit owner epoch") as exc:
        store.restart()
    assert "epoch of segment and index records. The metadata was damaged or crafted" in str(exc.value)


def test_recovery_refuses_a_generation_high_water_mark_beyond_any_pool(store):
    store.client().put(k(1), b"one")
    g = store.pool.geometry
    area = L.ServiceArea.decode(store.pool.buf[g.service_offset : g.service_offset + L.SERVICE_AREA.size])
    raw = dataclasses.replace(area, generation_high_water=2**64 - 1).encode()
    store.pool.buf[g.service_offset : g.service_offset + len(raw)] = raw
    written_back(store.pool.buf, g.service_offset, len(raw))
    with pytest.raises(CorruptPoolError, match=rf"^{store.path}: service area: generation_high_water "
                                               rf"{2**64 - 1} is beyond 2\^62"):
        store.restart()


def test_second_live_service_is_refused(pool_path):
    from beluga_store_support import make_pool

    make_pool(pool_path)
    t = ServiceThread(pool_path, ServiceConfig(takeover_wait_s=0))
    try:
        with Pool.open(pool_path) as pool:
            with pytest.raises(ServiceBusyError, match="another metadata service.*is alive"):
                MetadataService(pool, ServiceConfig(takeover_wait_s=0.3))
    finally:
        t.stop()
    with Pool.open(pool_path) as pool:  # after a clean stop the pool is free at once
        assert pool_report(pool)["service"]["running"] is False
        MetadataService(pool, ServiceConfig(takeover_wait_s=0.3)).release_pool()


def test_session_expired_error_is_clear(store):
    c = store.client()
    # If re-registration itself fails (no free slot) the caller learns why.
    others = [store.client() for _ in range(store.pool.geometry.max_clients - 1)]
    store.service.reap(c.slot, "test")
    store.client()  # takes the freed slot
    with pytest.raises(ServiceUnavailableError, match="no free client slot"):
        c.delete(k(1))
    assert others


def test_rejected_commit_raises_with_details_and_frees_the_slot(store):
    if store.pool.coherence is not None:
        pytest.skip("the client's pool buffer is swapped for a wrapper, which the coherence sanitizer cannot map "
                    "to the pool (its writes are never written back)")
    c = store.client()

    class Scribble:
        """Pool memory where every header write is damaged in flight (a buggy writer)."""

        def __init__(self, buf):
            self.buf = buf

        def __getitem__(self, index):
            return self.buf[index]

        def __setitem__(self, index, data):
            data = bytearray(data)
            if len(data) == L.BLOCK_HEADER_BYTES:
                data[40] ^= 1  # a byte of the key
            self.buf[index] = data
            written_back(self.buf, index.start, len(data))

    c.buf = Scribble(store.pool.buf)
    with pytest.raises(RequestRejectedError) as exc:
        c.put(k(1), b"y" * 10)
    c.buf = store.pool.buf
    assert exc.value.code == rpc.BAD_HEADER
    assert "block header of segment" in str(exc.value) and "damaged" in str(exc.value)
    assert store.service.stats()["reserved"] == 0 and not c.contains(k(1))
    c.put(k(1), b"y" * 10)
    assert c.get(k(1)) == b"y" * 10
