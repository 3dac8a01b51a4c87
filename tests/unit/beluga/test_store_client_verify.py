"""A reader racing a writer that reuses the slot: the client's checks around its copy.

The race is built deterministically: the checksum step of the reader (a hook around
the client's checksum functions) rewrites the block's header in the pool file, as a
writer that got the slot after eviction does first (header, then data). Whatever the
reader got then is not the committed block, and must come back as a counted miss.
"""
from __future__ import annotations

import os
import types

import pytest

import beluga.client as client_mod
from beluga import layout as L
from beluga import readpath

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))


def _reuse_slot(pool_path: str, loc) -> None:
    """What a writer reusing the slot writes first: its own header (state WRITING, the new
    generation and key), through its own mapping of the pool file, not the reader's."""
    hdr = L.BlockHeader(L.BLOCK_WRITING, loc.length_bytes, loc.generation + 1, 0, 0, OTHER_KEY).encode()
    with open(pool_path, "r+b") as f:
        f.seek(loc.header_offset)
        f.write(hdr)


@pytest.fixture
def reader(store, monkeypatch):
    """A writer's committed block and a reader whose lookups are recorded (to find the slot)."""
    w = store.client()
    data = os.urandom(5000)
    w.put(KEY, data)
    r = store.client()
    looked_up = []
    real_lookup = r._lookup

    def lookup(keys, flags):
        locs = real_lookup(keys, flags)
        looked_up.extend(locs)
        return locs

    monkeypatch.setattr(r, "_lookup", lookup)
    return r, data, looked_up


def test_view_without_a_race_is_a_hit(reader):
    r, data, _ = reader
    with r.view(KEY) as v:
        assert bytes(v.data) == data
    assert r.client_stats().corrupt_misses == 0


def test_slot_reused_while_a_view_is_checksummed_is_a_miss(reader, store, monkeypatch):
    """The view's checksum reads pool memory after the header was checked: the header is
    read again afterwards, and a reuse in between must turn the hit into a miss."""
    r, data, looked_up = reader
    real_checksum = client_mod.checksum
    calls = []

    def checksum_during_reuse(algo, buf):
        value = real_checksum(algo, buf)  # the old bytes: the writer has not reached the data yet
        _reuse_slot(store.path, looked_up[-1])
        calls.append(value)
        return value

    monkeypatch.setattr(client_mod, "checksum", checksum_during_reuse)
    assert r.view(KEY) is None
    assert len(calls) == 1, "the hook must have run inside view()'s verification"
    st = r.client_stats()
    assert (st.hits, st.misses, st.corrupt_misses) == (0, 1, 1)


def _python_read_path(monkeypatch, client) -> None:
    """Gets read through the client's beluga.readpath reader; its Python implementation is the one
    with steps to hook (the C one runs the same steps in one call, tested against it in
    test_store_readpath.py)."""
    monkeypatch.setattr(readpath, "read_into", readpath.py_read_into)
    monkeypatch.setattr(readpath, "read_bytes", readpath.py_read_bytes)
    py = readpath.reader(client.buf, client.g, cls=readpath.PyReader)
    py.set_ring(client.g.touch_ring_offset(client.slot), client.g.touch_head_offset(client.slot))
    monkeypatch.setattr(client, "_reader", py)


def test_slot_reused_while_get_into_copies_and_checksums_is_a_miss(reader, store, monkeypatch):
    """get_into checksums while it copies; the header is read after that, so a writer that
    took the slot during the copy (header first) is seen, even if the bytes are still old."""
    r, data, _ = reader
    loc = r._lookup([KEY], 0)[0]  # where the block is (gets find it in the pool's table)
    _python_read_path(monkeypatch, r)
    real = readpath.copy_and_checksum
    calls = []

    def copy_during_reuse(algo, dest, src):
        value = real(algo, dest, src)
        _reuse_slot(store.path, loc)
        calls.append(value)
        return value

    monkeypatch.setattr(readpath, "copy_and_checksum", copy_during_reuse)
    out = bytearray(len(data))
    assert r.get_into(KEY, out) is None
    assert out == data, "the copy itself happened (old bytes), yet it must not count as a hit"
    assert len(calls) == 1
    st = r.client_stats()
    assert (st.hits, st.misses, st.corrupt_misses) == (0, 1, 1)


def test_slot_reused_while_get_checksums_its_copy_is_a_miss(reader, store, monkeypatch):
    """get copies first, then checks the header, then the checksum of its copy, then the
    header again: a reuse seen by that last read is a miss too (the client never returns
    bytes from a slot that changed hands while it was reading)."""
    r, data, _ = reader
    loc = r._lookup([KEY], 0)[0]
    _python_read_path(monkeypatch, r)
    real_crc32 = readpath.crc32

    def checksum_during_reuse(buf, value=0):
        result = real_crc32(buf, value)
        _reuse_slot(store.path, loc)
        return result

    monkeypatch.setattr(readpath, "crc32", checksum_during_reuse)
    assert r.get(KEY) is None
    st = r.client_stats()
    assert (st.hits, st.misses, st.corrupt_misses) == (0, 1, 1)


# ---------------------------------------------------------------- damaged bytes, counts, messages

@pytest.mark.parametrize("read", ["get", "get_into", "view"])
def test_bytes_damaged_after_the_commit_are_a_counted_miss(store, read):
    """The header is intact and unchanged; only the checksum can tell."""
    w = store.client()
    data = os.urandom(3000)
    w.put(KEY, data)
    r = store.client()
    loc = r._lookup([KEY], 0)[0]
    with open(store.path, "r+b") as f:  # a bit flips in pool memory
        f.seek(loc.data_offset + 1234)
        byte = f.read(1)
        f.seek(loc.data_offset + 1234)
        f.write(bytes([byte[0] ^ 0x10]))
    assert r.get(OTHER_KEY) is None  # a plain miss first: the damaged block's miss adds to it
    got = {"get": lambda: r.get(KEY), "get_into": lambda: r.get_into(KEY, bytearray(3000)),
           "view": lambda: r.view(KEY)}[read]()
    assert got is None
    st = r.client_stats()
    assert (st.hits, st.misses, st.corrupt_misses) == (0, 2, 1)


def test_the_client_counts_what_it_did(store):
    c = store.client()
    blocks = {bytes([i]) * 32: os.urandom(1000 * (i + 1)) for i in range(3)}
    for k, v in blocks.items():
        c.put(k, v)
    c.put_many([(bytes([9]) * 32, b"x" * 10), (bytes([8]) * 32, b"y" * 20)])
    k0, k1, k2 = blocks
    assert c.get_into(k1, bytearray(5000)) == 2000
    with c.view(k2) as v:
        assert bytes(v.data) == blocks[k2]
    assert c.get(k0) == blocks[k0]
    assert c.get(bytes([7]) * 32) is None
    assert c.view(bytes([6]) * 32) is None
    assert c.get_into(bytes([5]) * 32, bytearray(10)) is None
    assert c.delete(k0) and not c.delete(k0)
    st = c.client_stats()
    assert (st.puts, st.put_bytes) == (5, 6000 + 30)
    assert (st.gets, st.hits, st.misses, st.corrupt_misses, st.get_bytes) == (6, 3, 3, 0, 6000)
    assert st.deletes == 1


def test_a_block_too_large_names_its_key_and_the_limit(store):
    c = store.client()
    seg = c.g.segment_size_bytes
    with pytest.raises(client_mod.BlockTooLargeError) as e:
        c.put(KEY, bytes(seg + 1))
    assert str(e.value) == (f"block of {seg + 1} bytes for key {KEY.hex()[:16]}... is larger than a segment can hold "
                            f"({seg} bytes in a {seg}-byte segment)")
    assert c.client_stats().puts == 0


def test_a_rejected_commit_names_its_key(store, monkeypatch):
    """A writer whose header disagrees with its commit (here: the header names another
    key) is refused by the service; the error says which key, and nothing is stored."""
    c = store.client()
    real = L.BlockHeader

    def header_of_another_key(state, length, generation, crc, slot, key):
        return real(state, length, generation, crc, slot, bytes(32))

    monkeypatch.setattr(client_mod, "L", types.SimpleNamespace(**{**vars(L), "BlockHeader": header_of_another_key}))
    with pytest.raises(client_mod.RequestRejectedError) as e:
        c.put_many([(KEY, b"a" * 100), (OTHER_KEY, b"b" * 100)])
    msg = str(e.value)
    assert msg.startswith(f"commit of key {KEY.hex()[:16]}... rejected (") and msg.endswith("[2 of 2 in the batch failed]")
    monkeypatch.undo()
    assert c.get(KEY) is None and c.client_stats().puts == 0


def test_any_contiguous_buffer_is_stored_as_its_bytes(store):
    import array

    c = store.client()
    floats = array.array("d", [1.5, -2.25, 3e10])
    matrix = memoryview(bytearray(range(24))).cast("B", (4, 6))
    c.put(KEY, floats)
    c.put(OTHER_KEY, matrix)
    assert c.get(KEY) == floats.tobytes() and c.get(OTHER_KEY) == bytes(range(24))


def test_a_batch_that_does_not_fit_fails_whole_and_gives_back_what_it_reserved(store):
    """One ALLOC of the batch fails (pool full, every block leased): the error names that
    block's key, and the reservations the other blocks got are aborted at once."""
    c = store.client()
    held = []
    i = 0
    while True:  # fill the pool, holding every block so that nothing can be evicted
        key = i.to_bytes(32, "big")
        try:
            c.put(key, bytes(60_000))
        except client_mod.PoolFullError:
            break
        held.append(c.view(key))
        i += 1
    for v in held[-3:]:  # a little room: blocks of that size fit again, a segment-sized one does not
        v.release()
    c.delete_many([v.key for v in held[-3:]])
    c.flush_releases()
    small, large = bytes(range(100, 132)), bytes(range(200, 232))
    with pytest.raises(client_mod.PoolFullError) as e:
        c.put_many([(small, bytes(60_000)), (large, bytes(c.g.segment_size_bytes))])
    assert str(e.value).startswith(f"put of key {large.hex()[:16]}... failed: ")
    assert store.service.stats()["reserved"] == 0, "the small block's reservation was aborted"
    assert c.get(small) is None
    for v in held[:-3]:
        v.release()


def test_get_many_past_one_request_returns_every_block_after_a_miss(store):
    """Keys go to the service in chunks of what one request holds; a miss in the first
    chunk must not end the lookup (only lookup_prefix stops at the first miss)."""
    c = store.client()
    n = c._max_keys + 5
    keys = [(1000 + i).to_bytes(32, "big") for i in range(n)]
    c.put_many([(k, k[-2:]) for k in keys])
    assert c.get_many([KEY] + keys) == [None] + [k[-2:] for k in keys]
    assert c.lookup_prefix(keys + [KEY] + keys) == n


def test_a_strided_buffer_is_refused_naming_its_key(store):
    c = store.client()
    with pytest.raises(ValueError) as e:
        c.put(KEY, memoryview(bytearray(100))[::2])
    assert str(e.value) == f"block data for key {KEY.hex()[:16]}... must be a contiguous buffer"
