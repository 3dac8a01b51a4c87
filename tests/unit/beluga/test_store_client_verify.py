"""A reader racing a writer that reuses the slot: the client's checks around its copy.

The race is built deterministically: the checksum step of the reader (a hook around
the client's checksum functions) rewrites the block's header in the pool file, as a
writer that got the slot after eviction does first (header, then data). Whatever the
reader got then is not the committed block, and must come back as a counted miss.
"""
from __future__ import annotations

import os

import pytest

import beluga.client as client_mod
from beluga import layout as L

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


def test_slot_reused_while_get_into_copies_and_checksums_is_a_miss(reader, store, monkeypatch):
    """get_into checksums while it copies; the header is read after that, so a writer that
    took the slot during the copy (header first) is seen, even if the bytes are still old."""
    r, data, looked_up = reader
    real = client_mod.copy_and_checksum
    calls = []

    def copy_during_reuse(algo, dest, src):
        value = real(algo, dest, src)
        _reuse_slot(store.path, looked_up[-1])
        calls.append(value)
        return value

    monkeypatch.setattr(client_mod, "copy_and_checksum", copy_during_reuse)
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
    r, data, looked_up = reader
    real_checksum = client_mod.checksum

    def checksum_during_reuse(algo, buf):
        value = real_checksum(algo, buf)
        _reuse_slot(store.path, looked_up[-1])
        return value

    monkeypatch.setattr(client_mod, "checksum", checksum_during_reuse)
    assert r.get(KEY) is None
    st = r.client_stats()
    assert (st.hits, st.misses, st.corrupt_misses) == (0, 1, 1)
