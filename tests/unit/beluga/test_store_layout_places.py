"""Where each record of a pool lives, the documented defaults, and the smallest pool.

Found by `make mutate`: the offsets of segment entries, index entries and headers
were only ever checked at the last slot, and an all-zero index entry's decoding not
at all, so a wrong stride or a free entry read as torn passed every layout test.
"""
from __future__ import annotations

import pytest

from beluga import layout as L
from beluga.errors import PoolTooSmallError


@pytest.fixture(scope="module")
def g() -> L.Geometry:
    return L.compute_geometry(64 * L.MiB, segment_size_bytes=256 * L.KiB, slot_granularity_bytes=32 * L.KiB,
                              max_clients=4, rpc_buffer_bytes=16 * L.KiB)


def test_records_are_packed_one_after_another_from_their_region_start(g):
    slots = g.max_slots_per_segment
    assert g.segment_entry_offset(0) == g.segment_table_offset
    assert g.index_entry_offset(0, 0) == g.index_offset
    assert g.header_offset(0, 0) == g.headers_offset
    assert g.segment_offset(0) == g.segments_offset and g.host_slot_offset(0) == g.host_offset
    for s in range(g.segment_count - 1):
        assert g.segment_entry_offset(s + 1) - g.segment_entry_offset(s) == L.SEGMENT_ENTRY_BYTES
        assert g.segment_offset(s + 1) - g.segment_offset(s) == g.segment_size_bytes
        # the last slot of one segment is followed by the first slot of the next
        assert g.index_entry_offset(s + 1, 0) - g.index_entry_offset(s, slots - 1) == L.INDEX_ENTRY_BYTES
        assert g.header_offset(s + 1, 0) - g.header_offset(s, slots - 1) == L.BLOCK_HEADER_BYTES
    for slot in range(slots - 1):
        assert g.index_entry_offset(1, slot + 1) - g.index_entry_offset(1, slot) == L.INDEX_ENTRY_BYTES
        assert g.header_offset(1, slot + 1) - g.header_offset(1, slot) == L.BLOCK_HEADER_BYTES


def test_every_record_has_a_place_of_its_own(g):
    spans = []
    for s in range(g.segment_count):
        spans.append((g.segment_entry_offset(s), L.SEGMENT_ENTRY_BYTES))
        spans.append((g.segment_offset(s), g.segment_size_bytes))
        for slot in range(g.max_slots_per_segment):
            spans.append((g.index_entry_offset(s, slot), L.INDEX_ENTRY_BYTES))
            spans.append((g.header_offset(s, slot), L.BLOCK_HEADER_BYTES))
    spans.append((g.table_offset, g.table_buckets * L.TABLE_BUCKET_BYTES))
    for c in range(g.max_clients):
        spans.append((g.host_slot_offset(c), L.HOST_LINES_BYTES))
        spans.append((g.touch_ring_offset(c), L.TOUCH_RING_BYTES))
        spans.append((g.request_offset(c), g.rpc_buffer_bytes))
        spans.append((g.response_offset(c), g.rpc_buffer_bytes))
    spans.sort()
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b, f"record at {a:#x} ({n} bytes) overlaps the one at {b:#x}"
    assert spans[0][0] >= L.SUPERBLOCK_BYTES + L.SERVICE_AREA_BYTES and spans[-1][0] + spans[-1][1] <= g.pool_size_bytes
    # the touch ring, the request and the response buffers
    assert g.host_slot_bytes == L.HOST_LINES_BYTES + L.TOUCH_RING_BYTES + 2 * g.rpc_buffer_bytes


def test_the_defaults_are_the_documented_ones():
    """docs/store.md: 2 MiB segments, 4 KiB granularity, 32 clients, 64 KiB RPC buffers:
    a 1 GiB pool has 477 segments (layout version 2: the lookup table and touch rings take the rest)."""
    g = L.compute_geometry(1 << 30)
    assert (g.segment_size_bytes, g.slot_granularity_bytes, g.max_clients, g.rpc_buffer_bytes) == (
        2 * L.MiB, 4 * L.KiB, 32, 64 * L.KiB)
    assert g.segment_count == 477 and g.max_slots_per_segment == 512


@pytest.mark.parametrize("seg, clients, rpc", [(256 * L.KiB, 8, 16 * L.KiB), (2 * L.MiB, 32, 64 * L.KiB),
                                               (64 * L.KiB, 1, 4 * L.KiB)])
def test_the_size_named_in_the_error_is_the_smallest_pool_that_works(seg, clients, rpc):
    kw = dict(segment_size_bytes=seg, max_clients=clients, rpc_buffer_bytes=rpc)
    with pytest.raises(PoolTooSmallError) as e:
        L.compute_geometry(seg, **kw)
    need = int(str(e.value).split("needs at least ")[1].split()[0])
    assert L.compute_geometry(need, **kw).segment_count == 1
    with pytest.raises(PoolTooSmallError):
        L.compute_geometry(need - 1, **kw)


def test_an_all_zero_index_entry_is_free_and_a_torn_free_one_is_torn():
    assert L.IndexEntry.decode(bytes(L.INDEX_ENTRY_BYTES)) == L.IndexEntry(L.ENTRY_FREE, 0, 0, 0, 0, 0, bytes(32))
    freed = bytearray(L.IndexEntry(L.ENTRY_FREE, 0, 0, 0, 0, 0, bytes(range(32))).encode())
    assert L.IndexEntry.decode(bytes(freed)).key == bytes(range(32))
    freed[30] ^= 1  # state and generation still 0, the rest torn
    assert L.IndexEntry.decode(bytes(freed)) is None


def test_a_header_matches_only_its_own_complete_block():
    key, other = bytes(range(32)), bytes(range(1, 33))
    raw = L.BlockHeader(L.BLOCK_COMPLETE, 100, 7, 0xDEADBEEF, 3, key).encode()
    assert L.block_header_matches(raw, key, 7, 100, 0xDEADBEEF)
    for args in ((other, 7, 100, 0xDEADBEEF), (key, 8, 100, 0xDEADBEEF), (key, 7, 101, 0xDEADBEEF),
                 (key, 7, 100, 0xDEADBEEE)):
        assert not L.block_header_matches(raw, *args), args
    writing = L.BlockHeader(L.BLOCK_WRITING, 100, 7, 0xDEADBEEF, 3, key).encode()
    assert not L.block_header_matches(writing, key, 7, 100, 0xDEADBEEF), "a header still being written"
    torn = bytearray(raw)
    torn[60] ^= 1
    assert not L.block_header_matches(bytes(torn), key, 7, 100, 0xDEADBEEF), "a header whose own CRC fails"
