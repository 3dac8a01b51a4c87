"""The lease-free read path: find a block in the pool's lookup table and copy it out verified.

Two implementations with identical behaviour: the C module ``beluga._native``
(built by ``make setup``; copy and CRC in one pass, the table probe without
building Python objects) and the Python functions below (always there: the
guests have no compiler). ``BELUGA_NATIVE=1`` demands the C module (an
ImportError if it is missing), ``BELUGA_NATIVE=0`` forbids it; unset, the C
module is used when it imports, and under ``CI=true`` it is demanded too (a
test run must not pass on the fallback by accident).

``probe(buf, table_off, buckets, tseq_off, key)``
    Reads the table seqlock-style (layout.read_bucket) from the key's home
    bucket on: -> ``(generation, where, length, data_crc)`` on a hit, ``None``
    on a miss, ``False`` when the table cannot be read now (being rebuilt, a
    bucket that stays mid-write or damaged): the caller asks the service.
    A miss counts only if the table sequence did not move during the probe
    (the service moves it before relocating entries), else the probe repeats.

``probe_prefix(buf, table_off, buckets, tseq_off, keys, ring_off, head_off, head)``
    ``probe`` of each key in turn until the first miss, posting a touch
    (layout.post_touch) for each hit: -> ``(hits, new head, busy)``; busy
    means the key after the hits could not be probed (ask the service).

``copy_crc(dest, src)``
    Copy ``src`` into ``dest`` (same length) -> the CRC-32 of the copied bytes
    (a put: one pass over the data instead of a copy and a checksum).

``read_into(buf, dest, header_off, data_off, key, generation, length, data_crc)``
``read_bytes(buf, header_off, data_off, key, generation, length, data_crc)``
    Read the block header (it must be intact, COMPLETE and name exactly this
    key, generation, length and CRC), copy the data (into ``dest`` or a new
    bytes object) computing the CRC of the copy, compare it, and re-read the
    header: a writer reusing the slot rewrites the header before the data, so
    an unchanged header proves the copy saw none of its bytes (generations
    never repeat). -> READ_OK (read_bytes: the bytes), or the failed step.
"""
from __future__ import annotations

import os

from . import layout as L
from .checksum import CRC32, copy_and_checksum, crc32

READ_OK = 0
READ_HEADER = 1
"""The header does not describe this block (slot reused, block damaged, or not this key)."""
READ_CRC = 2
"""The copied bytes do not have the committed checksum."""
READ_MOVED = 3
"""The header changed while the bytes were copied: the slot was reused under the reader."""

BUCKET_SPINS = 1000
TABLE_RETRIES = 8


def py_probe(buf, table_off: int, buckets: int, tseq_off: int, key: bytes):
    if (len(key) != L.KEY_BYTES or buckets < 1 or table_off + buckets * L.TABLE_BUCKET_BYTES > len(buf)
            or tseq_off + 8 > len(buf)):
        raise ValueError("probe: key or table outside the pool")
    home = L.bucket_home(key, buckets)
    read_bucket = L.read_bucket
    size = L.TABLE_BUCKET_BYTES
    for _attempt in range(TABLE_RETRIES):
        seq = L.read_table_seq_at(buf, tseq_off)
        if seq & 1:
            return False  # the service is rebuilding the table
        i = home
        for _ in range(buckets):
            spins = 0
            while (r := read_bucket(buf, table_off + i * size)) is False:
                spins += 1
                if spins >= BUCKET_SPINS:
                    return False
            if r is None:
                if L.read_table_seq_at(buf, tseq_off) == seq:
                    return None
                break  # an entry may have moved past us: probe again
            if r[0] == key:
                return r[1:]
            i += 1
            if i == buckets:
                i = 0
        else:
            return False  # no empty bucket at all: not a table a service wrote
    return False


def py_probe_prefix(buf, table_off: int, buckets: int, tseq_off: int, keys, ring_off: int, head_off: int,
                    head: int):
    if ring_off + L.TOUCH_RING_BYTES > len(buf) or head_off + 8 > len(buf):
        raise ValueError("probe_prefix: touch ring outside the pool")
    if any(type(key) is not bytes or len(key) != L.KEY_BYTES for key in keys):
        raise ValueError("probe_prefix: every key must be 32 bytes")
    n = 0
    for key in keys:
        hit = py_probe(buf, table_off, buckets, tseq_off, key)
        if hit is None or hit is False:
            return n, head, hit is False
        head = L.post_touch(buf, ring_off, head_off, head, hit[1], hit[0])
        n += 1
    return n, head, False


def py_copy_crc(dest, src) -> int:
    dest, src = memoryview(dest).cast("B"), memoryview(src).cast("B")
    if dest.nbytes != src.nbytes:
        raise ValueError("copy_crc: destination and source differ in length")
    dest[:] = src
    return crc32(src) & 0xFFFFFFFF


_header = L.read_header_bytes


def _check_span(buf, header_off: int, data_off: int, length: int) -> None:
    if header_off < 0 or data_off < 0 or header_off + L.BLOCK_HEADER_BYTES > len(buf) or data_off + length > len(buf):
        raise ValueError("read: block outside the pool")


def py_read_into(buf, dest, header_off: int, data_off: int, key: bytes, generation: int, length: int,
                 data_crc: int) -> int:
    if len(key) != L.KEY_BYTES:
        raise ValueError("read_into: key must be 32 bytes")
    dest = memoryview(dest).cast("B")
    if length > dest.nbytes:
        raise ValueError("read_into: destination smaller than the block")
    _check_span(buf, header_off, data_off, length)
    h1 = _header(buf, header_off)
    if not L.block_header_matches(h1, key, generation, length, data_crc):
        return READ_HEADER
    crc = copy_and_checksum(CRC32, dest[:length], memoryview(buf)[data_off : data_off + length])
    if crc != data_crc:
        return READ_CRC
    if _header(buf, header_off) != h1:
        return READ_MOVED
    return READ_OK


def py_read_bytes(buf, header_off: int, data_off: int, key: bytes, generation: int, length: int,
                  data_crc: int):
    if len(key) != L.KEY_BYTES:
        raise ValueError("read_bytes: key must be 32 bytes")
    _check_span(buf, header_off, data_off, length)
    h1 = _header(buf, header_off)
    if not L.block_header_matches(h1, key, generation, length, data_crc):
        return READ_HEADER
    data = bytes(buf[data_off : data_off + length])
    if crc32(data) & 0xFFFFFFFF != data_crc:
        return READ_CRC
    if _header(buf, header_off) != h1:
        return READ_MOVED
    return data


def _select():
    want = os.environ.get("BELUGA_NATIVE", "").strip()
    if want not in ("", "0", "1"):
        raise ValueError(f"BELUGA_NATIVE={want!r}: expected 0 (Python read path), 1 (C read path) or unset (C if built)")
    if want != "0":
        try:
            from . import _native  # noqa: PLC0415 - optional, built by `make setup`
        except ImportError as exc:
            if want == "1" or os.environ.get("CI") == "true":
                why = "BELUGA_NATIVE=1" if want == "1" else "CI=true (and BELUGA_NATIVE unset)"
                raise ImportError(
                    f"{why} but the C read path is not built ({exc}); run `make setup` "
                    f"(or `python -m beluga.native_build`), or set BELUGA_NATIVE=0 for the Python path") from exc
        else:
            return (_native.probe, _native.probe_prefix, _native.copy_crc, _native.read_into, _native.read_bytes,
                    "native")
    return py_probe, py_probe_prefix, py_copy_crc, py_read_into, py_read_bytes, "python"


probe, probe_prefix, copy_crc, read_into, read_bytes, IMPLEMENTATION = _select()
"""The read path in use here, and its name ("native" or "python")."""
