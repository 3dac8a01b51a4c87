"""Pool layout: geometry, format/open, refusing what is not a (compatible, intact) pool."""
from __future__ import annotations

import hashlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from beluga import layout as L
from beluga.errors import BelugaError, CorruptPoolError, LayoutVersionError, NotAPoolError, PoolTooSmallError
from beluga.pool import DeviceInfo, Pool, _map_length, device_info, devdax_size, format_pool

from beluga_store_support import make_pool


def _digest(path: str) -> tuple[str, int]:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest(), os.stat(path).st_mtime_ns


@given(
    pool_mib=st.integers(min_value=1, max_value=4096),
    seg_shift=st.integers(min_value=16, max_value=23),
    clients=st.integers(min_value=1, max_value=64),
    rpc_pages=st.integers(min_value=1, max_value=32),
    gran_shift=st.integers(min_value=9, max_value=14),
)
@settings(max_examples=200, deadline=None)
def test_geometry_regions_are_ordered_aligned_and_inside_the_pool(pool_mib, seg_shift, clients, rpc_pages, gran_shift):
    seg = 1 << seg_shift
    gran = 1 << gran_shift
    if gran > seg:
        return
    size = pool_mib * L.MiB
    try:
        g = L.compute_geometry(size, segment_size_bytes=seg, max_clients=clients, rpc_buffer_bytes=rpc_pages * 4096,
                               slot_granularity_bytes=gran)
    except PoolTooSmallError as exc:
        assert str(size) in str(exc)
        return
    assert g.segment_count >= 1
    assert L.SUPERBLOCK_BYTES <= g.service_offset < g.host_offset
    assert g.host_offset + clients * g.host_slot_bytes <= g.segment_table_offset
    assert g.segment_table_offset + g.segment_count * L.SEGMENT_ENTRY_BYTES <= g.index_offset
    assert g.index_offset + g.segment_count * g.max_slots_per_segment * L.INDEX_ENTRY_BYTES <= g.table_offset
    assert g.table_buckets * 4 >= g.segment_count * g.max_slots_per_segment * 5  # load factor <= 0.8, always
    assert g.table_offset + g.table_buckets * L.TABLE_BUCKET_BYTES <= g.headers_offset
    assert g.headers_offset + g.segment_count * g.max_slots_per_segment * L.BLOCK_HEADER_BYTES <= g.segments_offset
    assert g.segments_offset % min(seg, L.DAX_ALIGN_BYTES) == 0
    assert g.used_bytes <= size
    # One more segment would not have fitted: the geometry does not waste a segment's worth of pool.
    leftover = size - g.used_bytes
    table_per_segment = (g.max_slots_per_segment * 5 // 4 + 2) * L.TABLE_BUCKET_BYTES
    assert leftover < (seg + L.SEGMENT_ENTRY_BYTES + g.max_slots_per_segment * (L.INDEX_ENTRY_BYTES + L.BLOCK_HEADER_BYTES)
                       + table_per_segment + 4 * L.PAGE_BYTES + min(seg, L.DAX_ALIGN_BYTES))
    assert g.max_block_bytes == seg  # a block may fill a whole segment


@given(seg_shift=st.integers(min_value=16, max_value=22), gran_shift=st.integers(min_value=9, max_value=13),
       mult=st.integers(min_value=1, max_value=4096))
@settings(max_examples=200, deadline=None)
def test_slots_and_headers_fit_and_never_overlap(seg_shift, gran_shift, mult):
    seg, gran = 1 << seg_shift, 1 << gran_shift
    if gran > seg:
        return
    g = L.compute_geometry(64 * L.MiB, segment_size_bytes=seg, slot_granularity_bytes=gran, max_clients=2,
                           rpc_buffer_bytes=4096)
    dslot = mult * gran
    lay = g.slot_layout(dslot)
    if dslot > g.max_block_bytes:
        assert lay.slot_count == 0
        return
    assert 1 <= lay.slot_count <= g.max_slots_per_segment
    assert lay.data_offset(0) == 0 and lay.data_offset(1) % gran == 0
    assert lay.data_offset(lay.slot_count - 1) + dslot <= seg < lay.data_offset(lay.slot_count - 1) + 2 * dslot
    last = g.segment_count - 1
    # Headers and index entries of the last possible slot stay inside their regions.
    assert g.header_offset(last, g.max_slots_per_segment - 1) + L.BLOCK_HEADER_BYTES <= g.segments_offset
    assert g.index_entry_offset(last, g.max_slots_per_segment - 1) + L.INDEX_ENTRY_BYTES <= g.headers_offset
    assert g.segment_offset(last) + seg <= g.pool_size_bytes


def test_format_then_open_roundtrip(pool_path):
    res = make_pool(pool_path)
    with Pool.open(pool_path) as pool:
        assert pool.geometry == res.geometry
        assert pool.geometry.segment_count == res.geometry.segment_count > 1
        assert not pool.info.is_devdax
        assert len(pool.superblock.uuid) == 16


def test_format_refuses_existing_pool_without_force(pool_path):
    make_pool(pool_path)
    before = _digest(pool_path)
    with pytest.raises(BelugaError, match="already a Beluga pool.*--force"):
        format_pool(pool_path)
    assert _digest(pool_path) == before
    res = format_pool(pool_path, force=True, segment_size_bytes=128 * 1024, max_clients=4, rpc_buffer_bytes=8192)
    with Pool.open(pool_path) as pool:
        assert pool.geometry.segment_size_bytes == 128 * 1024 == res.geometry.segment_size_bytes


def test_format_needs_a_size_for_a_new_file(pool_path):
    with pytest.raises(BelugaError, match="does not exist; give a size"):
        format_pool(pool_path)
    assert not os.path.exists(pool_path)


@pytest.mark.parametrize("content", [b"", b"short", os.urandom(L.SUPERBLOCK_BYTES * 3), bytes(1 << 20)],
                         ids=["empty", "short", "random", "zeros"])
def test_open_refuses_what_is_not_a_pool_without_writing(pool_path, content):
    with open(pool_path, "wb") as fh:
        fh.write(content)
    before = _digest(pool_path)
    with pytest.raises(NotAPoolError, match=r"not a Beluga pool") as exc:
        Pool.open(pool_path)
    assert pool_path in str(exc.value)
    assert _digest(pool_path) == before


def test_open_missing_path_and_directory(tmp_path):
    with pytest.raises(NotAPoolError, match="does not exist"):
        Pool.open(tmp_path / "nope")
    with pytest.raises(NotAPoolError, match="neither a regular file nor a devdax"):
        Pool.open(tmp_path)


def _patch_superblock(path: str, offset: int, fmt: str, value, *, fix_crc: bool) -> None:
    with open(path, "r+b") as fh:
        raw = bytearray(fh.read(L.SUPERBLOCK_BYTES))
        struct.pack_into(fmt, raw, offset, value)
        if fix_crc:
            body_len = L._SB.size
            struct.pack_into("<I", raw, body_len, L._checksum.meta_crc(bytes(raw[:body_len])))
        fh.seek(0)
        fh.write(raw)


def test_other_layout_version_fails_with_clear_message(pool_path):
    make_pool(pool_path)
    _patch_superblock(pool_path, 8, "<I", L.LAYOUT_VERSION + 1, fix_crc=True)
    before = _digest(pool_path)
    with pytest.raises(LayoutVersionError) as exc:
        Pool.open(pool_path)
    msg = str(exc.value)
    assert f"version {L.LAYOUT_VERSION + 1}" in msg and f"version {L.LAYOUT_VERSION}" in msg and "format" in msg
    assert _digest(pool_path) == before


def test_corrupt_superblock_is_refused(pool_path):
    make_pool(pool_path)
    _patch_superblock(pool_path, 24, "<Q", 12345, fix_crc=False)  # segment size, crc left stale
    with pytest.raises(CorruptPoolError, match="superblock checksum mismatch"):
        Pool.open(pool_path)


def test_inconsistent_geometry_is_refused_even_with_valid_crc(pool_path):
    make_pool(pool_path)
    _patch_superblock(pool_path, 32, "<I", 9999, fix_crc=True)  # segment count
    with pytest.raises(CorruptPoolError, match="geometry is inconsistent"):
        Pool.open(pool_path)


def test_pool_too_small_for_its_geometry(pool_path):
    with pytest.raises(PoolTooSmallError, match=r"too small for its geometry.*needs at least \d+ bytes"):
        format_pool(pool_path, size_bytes=512 * 1024, segment_size_bytes=256 * 1024, max_clients=8,
                    rpc_buffer_bytes=16 * 1024)
    make_pool(pool_path)
    os.truncate(pool_path, 4 << 20)  # lose half the pool after formatting
    with pytest.raises(PoolTooSmallError, match=r"too small for its geometry.*has only 4194304"):
        Pool.open(pool_path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(segment_size_bytes=300 * 1024), "power of two"),
    (dict(segment_size_bytes=32 * 1024), "power of two >= 65536"),
    (dict(slot_granularity_bytes=3000), "granularity"),
    (dict(slot_granularity_bytes=512 * 1024), "granularity"),
    (dict(max_clients=0), "max clients"),
    (dict(rpc_buffer_bytes=5000), "rpc buffer"),
])
def test_bad_format_parameters(pool_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_pool(pool_path, **kwargs)


def test_devdax_size_comes_from_sysfs(tmp_path):
    size_file = tmp_path / "bus" / "dax" / "devices" / "dax3.1" / "size"
    size_file.parent.mkdir(parents=True)
    size_file.write_text(f"{(256 << 20) + 4096}\n")
    assert devdax_size("/dev/dax3.1", sysfs_root=str(tmp_path)) == (256 << 20) + 4096
    with pytest.raises(NotAPoolError, match="no devdax size was found"):
        devdax_size("/dev/dax9.9", sysfs_root=str(tmp_path))
    # Mappings of a devdax device cover whole 2 MiB units only.
    info = DeviceInfo("/dev/dax3.1", (256 << 20) + 4096, True)
    assert _map_length(info) == 256 << 20
    assert _map_length(DeviceInfo("/x", 12345, False)) == 12345


def test_device_info_of_a_character_device_needs_sysfs(tmp_path):
    # /dev/null is a character device with no dax entry: refused with a clear message, not mapped.
    with pytest.raises(NotAPoolError, match="character device but no devdax size"):
        device_info("/dev/null", sysfs_root=str(tmp_path))


def test_parse_size():
    assert L.parse_size("64M") == 64 << 20
    assert L.parse_size("2MiB") == 2 << 20
    assert L.parse_size("4096") == 4096
    assert L.parse_size("1g") == 1 << 30
    with pytest.raises(ValueError, match="not a number of bytes"):
        L.parse_size("lots")


def test_records_roundtrip_and_detect_tearing():
    e = L.IndexEntry(L.ENTRY_COMMITTED, 3, 7, 99, 1234, 0xDEADBEEF, bytes(range(32)))
    raw = bytearray(e.encode())
    assert len(raw) == L.INDEX_ENTRY_BYTES
    assert L.IndexEntry.decode(raw) == e
    raw[10] ^= 1
    assert L.IndexEntry.decode(raw) is None
    h = L.BlockHeader(L.BLOCK_COMPLETE, 10, 5, 42, 1, bytes(32))
    raw = bytearray(h.encode())
    assert len(raw) == L.BLOCK_HEADER_BYTES and L.BlockHeader.decode(raw) == h
    raw[20] ^= 0xFF
    assert L.BlockHeader.decode(raw) is None
    buf = bytearray(L.SEGMENT_ENTRY_BYTES)
    assert L.read_segment_entry(buf, 0) == L.FREE_SEGMENT
    s = L.SegmentEntry(L.SEG_OPEN, 2, 3, 8192, 30)
    L.write_segment_entry(buf, 0, s)
    assert L.read_segment_entry(buf, 0) == s
    buf[5] ^= 1  # tear copy A: copy B still answers
    assert L.read_segment_entry(buf, 0) == s
    buf[L.SEGMENT_RECORD_BYTES + 5] ^= 1
    assert L.read_segment_entry(buf, 0) is None
