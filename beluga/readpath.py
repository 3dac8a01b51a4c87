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

``copy_crc(dest, src, stream=False)``
    Copy ``src`` into ``dest`` (same length) -> the CRC-32 of the copied bytes
    (a put: one pass over the data instead of a copy and a checksum). With
    ``stream`` the C version writes a 64-byte aligned ``dest`` with non-temporal
    stores, then fences: a put's data goes to the pool's memory without each
    line being read in first (the writer never reads it back). A 256 KiB put's
    copy took 10-11 us instead of 14-15 (benchmarks.store.put_breakdown).

``read_into(buf, dest, header_off, data_off, key, generation, length, data_crc)``
``read_bytes(buf, header_off, data_off, key, generation, length, data_crc)``
    Read the block header (it must be intact, COMPLETE and name exactly this
    key, generation, length and CRC), copy the data (into ``dest`` or a new
    bytes object) computing the CRC of the copy, compare it, and re-read the
    header: a writer reusing the slot rewrites the header before the data, so
    an unchanged header proves the copy saw none of its bytes (generations
    never repeat). -> READ_OK (read_bytes: the bytes), or the failed step.

``reader(buf, geometry)`` -> a ``Reader`` (C) or ``PyReader``: a client's whole read in one call
    The pool's buffer and geometry are taken once; ``get(key)`` / ``get_into(key, dest)`` check
    the key, probe, read as above (retrying with the key's new entry when it changed under the
    read, at most READ_ATTEMPTS times), and post the touch into the client's ring
    (``set_ring``); ``lookup_prefix(keys)``, ``probe(key)``, ``post_touches(touches)`` and
    ``counts()`` complete it. See PyReader for what each returns.
"""
from __future__ import annotations

import os
import threading

from . import coherence as _coh
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
READ_ATTEMPTS = 4
"""Reads of one key in one get: a failure whose table entry changed meanwhile is retried."""


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


def py_copy_crc(dest, src, stream: bool = False) -> int:
    """``copy_crc`` in Python (``stream`` is a hint for the C version's stores; plain stores here)."""
    dest, src = memoryview(dest).cast("B"), memoryview(src).cast("B")
    if dest.nbytes != src.nbytes:
        raise ValueError("copy_crc: destination and source differ in length")
    dest[:] = src
    return crc32(src) & 0xFFFFFFFF


_header = L.read_header_bytes


def _check_span(buf, header_off: int, data_off: int, length: int) -> None:
    if header_off < 0 or data_off < 0 or header_off + L.BLOCK_HEADER_BYTES > len(buf) or data_off + length > len(buf):
        raise ValueError("read: block outside the pool")


def _checked_header(what: str, buf, header_off: int, data_off: int, key: bytes, generation: int, length: int,
                    data_crc: int, dest_bytes: int | None = None):
    """The part of both reads before the copy: the arguments, then the block's header (its bytes,
    to compare after the copy), or None when it is not the block asked for."""
    if len(key) != L.KEY_BYTES:
        raise ValueError(f"{what}: key must be 32 bytes")
    if dest_bytes is not None and length > dest_bytes:
        raise ValueError(f"{what}: destination smaller than the block")
    _check_span(buf, header_off, data_off, length)
    h1 = _header(buf, header_off)
    if not L.block_header_matches(h1, key, generation, length, data_crc):
        return None
    if _coh.ACTIVE:
        L.fetch_block_data(buf, data_off, length)
    return h1


def py_read_into(buf, dest, header_off: int, data_off: int, key: bytes, generation: int, length: int,
                 data_crc: int) -> int:
    dest = memoryview(dest).cast("B")
    h1 = _checked_header("read_into", buf, header_off, data_off, key, generation, length, data_crc, dest.nbytes)
    if h1 is None:
        return READ_HEADER
    crc = copy_and_checksum(CRC32, dest[:length], memoryview(buf)[data_off : data_off + length])
    if crc != data_crc:
        return READ_CRC
    if _header(buf, header_off) != h1:
        return READ_MOVED
    return READ_OK


def py_read_bytes(buf, header_off: int, data_off: int, key: bytes, generation: int, length: int,
                  data_crc: int):
    h1 = _checked_header("read_bytes", buf, header_off, data_off, key, generation, length, data_crc)
    if h1 is None:
        return READ_HEADER
    data = bytes(buf[data_off : data_off + length])
    if crc32(data) & 0xFFFFFFFF != data_crc:
        return READ_CRC
    if _header(buf, header_off) != h1:
        return READ_MOVED
    return data


class PyReader:
    """A client's reads of one pool, in Python (``_native.Reader`` is the same in C).

    ``get(key)`` -> the verified bytes, ``None`` (a miss), ``False`` (the table cannot answer
    now, or its entry is not one this pool could hold: ask the service), or ``(status,
    generation)`` of a block that failed verification (READ_*; the caller reports it).
    ``get_into(key, dest)`` is the same with the block's length for the bytes, and raises
    ValueError (nothing copied) if ``dest`` is smaller than the block. Hits and misses are
    counted (``counts()``), failures and ``False`` are the caller's to count. Keys must be
    32-byte ``bytes`` (else ValueError). Every hit is posted into the ring given by
    ``set_ring(ring_off, head_off)`` (``set_ring(None)``: between sessions, no ring). The head
    lives in the pool, its client its one writer: posts are taken under a lock here, under
    the GIL in C.
    """

    def __init__(self, buf, table_off: int, buckets: int, tseq_off: int, granularity: int, max_slots: int,
                 segments: int, segment_size: int, headers_off: int, segments_off: int) -> None:
        if (buckets < 1 or table_off + buckets * L.TABLE_BUCKET_BYTES > len(buf) or tseq_off + 8 > len(buf)):
            raise ValueError("probe: key or table outside the pool")
        if granularity == 0 or max_slots == 0 or headers_off > len(buf) or segments_off > len(buf):
            raise ValueError("Reader: geometry outside the pool")
        self._buf = buf
        self._table = (table_off, buckets, tseq_off)
        self._geo = (granularity, max_slots, segments, segment_size, headers_off, segments_off)
        self._ring = None
        self._lock = threading.Lock()
        self._counts = {"gets": 0, "hits": 0, "misses": 0, "get_bytes": 0}

    def _place(self, where: int, length: int):
        gran, max_slots, segments, segment_size, headers_off, segments_off = self._geo
        gslot = where & ((1 << L.WHERE_SLOT_BITS) - 1)
        dslot = (where >> L.WHERE_SLOT_BITS) * gran
        seg, slot = divmod(gslot, max_slots)
        if seg >= segments or dslot == 0 or (slot + 1) * dslot > segment_size or length > dslot:
            return None
        hoff = headers_off + gslot * L.BLOCK_HEADER_BYTES
        doff = segments_off + seg * segment_size + slot * dslot
        if hoff + L.BLOCK_HEADER_BYTES > len(self._buf) or doff + length > len(self._buf):
            return None
        return hoff, doff

    def _post(self, where: int, generation: int) -> None:
        ring = self._ring
        if ring is not None:
            buf = self._buf
            with self._lock:
                head = L.read_touch_head_at(buf, ring[1])
                L.post_touch(buf, ring[0], ring[1], head, where, generation)

    @staticmethod
    def _key(key) -> None:
        if type(key) is not bytes or len(key) != L.KEY_BYTES:
            raise ValueError("Reader: key must be 32 bytes")

    def _read(self, key, dest, hit=None, st=READ_OK):
        """The read loop; ``hit`` and ``st``: a first attempt already made (get's inlined one)."""
        self._key(key)
        buf = self._buf
        for _ in range(READ_ATTEMPTS - (hit is not None)):
            prev = hit
            hit = py_probe(buf, *self._table, key)
            if hit is None or hit is False:
                if hit is None:
                    self._counts["gets"] += 1
                    self._counts["misses"] += 1
                return hit
            if prev is not None and hit == prev:
                break  # same entry, same failure: the committed bytes themselves are bad
            gen, where, length, crc = hit
            place = self._place(where, length)
            if place is None:
                return False  # not an entry this pool could have: let the service answer
            if dest is None:
                got = py_read_bytes(buf, place[0], place[1], key, gen, length, crc)
                st = got if isinstance(got, int) else READ_OK
            else:
                if length > dest.nbytes:
                    raise ValueError(f"block for key {key.hex()[:16]}... has {length} bytes, "
                                     f"the destination only {dest.nbytes}")
                st = got = py_read_into(buf, dest, place[0], place[1], key, gen, length, crc)
            if st == READ_OK:
                self._post(where, gen)
                counts = self._counts
                counts["gets"] += 1
                counts["hits"] += 1
                counts["get_bytes"] += length
                return got if dest is None else length
        return st, hit[0]

    def get(self, key):
        # The first attempt of _read(key, None) inlined: the guests' hot path.
        if type(key) is not bytes or len(key) != L.KEY_BYTES:
            return self._read(key, None)  # raises
        buf = self._buf
        hit = py_probe(buf, *self._table, key)
        if not hit:  # None (a miss) or False (ask the service)
            if hit is None:
                self._counts["gets"] += 1
                self._counts["misses"] += 1
            return hit
        gen, where, length, crc = hit
        place = self._place(where, length)
        if place is None:
            return False
        got = py_read_bytes(buf, place[0], place[1], key, gen, length, crc)
        if type(got) is not bytes:
            return self._read(key, None, hit, got)  # the rest of the attempts
        self._post(where, gen)
        counts = self._counts
        counts["gets"] += 1
        counts["hits"] += 1
        counts["get_bytes"] += length
        return got

    def get_into(self, key, dest):
        dest = memoryview(dest).cast("B")
        if dest.readonly:
            raise BufferError("get_into: the destination is read-only")
        return self._read(key, dest)

    def probe(self, key):
        self._key(key)
        return py_probe(self._buf, *self._table, key)

    def lookup_prefix(self, keys) -> tuple[int, bool]:
        for key in keys:
            self._key(key)
        n = 0
        for key in keys:
            hit = py_probe(self._buf, *self._table, key)
            if hit is None or hit is False:
                return n, hit is False
            self._post(hit[1], hit[0])
            n += 1
        return n, False

    def post_touches(self, touches) -> None:
        for where, generation in touches:
            self._post(where, generation)

    def set_ring(self, ring_off: int | None = None, head_off: int = 0) -> None:
        if ring_off is None:
            self._ring = None
            return
        if ring_off + L.TOUCH_RING_BYTES > len(self._buf) or head_off + 8 > len(self._buf) or head_off % 8:
            raise ValueError("set_ring: touch ring outside the pool")
        self._ring = (ring_off, head_off)

    def set_flush(self, on: bool) -> None:
        """Nothing to do: this reader reads through ``layout``, whose accessors flush for a pool that does."""

    def counts(self) -> dict:
        return dict(self._counts)


def reader(buf, g: L.Geometry, cls=None):
    """The read path in use here (C or Python; ``cls`` chooses) for a client of the pool ``buf`` with geometry ``g``.

    A pool whose flush policy is on has its reader invalidate what it reads and write back the
    touches it posts (docs/coherence.md): the C Reader in C (``set_flush``), the Python one through
    ``layout``. A sanitized pool always gets the Python reader: the model follows only the flush calls."""
    flush = _coh.flushes(buf)
    if cls is None and flush and _coh.sanitized(buf):
        cls = PyReader
    r = (cls or _Reader)(buf, g.table_offset, g.table_buckets, g.table_seq_offset, g.slot_granularity_bytes,
                   g.max_slots_per_segment, g.segment_count, g.segment_size_bytes, g.headers_offset,
                   g.segments_offset)
    if flush:
        r.set_flush(True)
    return r


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
                    _native.Reader, "native")
    return py_probe, py_probe_prefix, py_copy_crc, py_read_into, py_read_bytes, PyReader, "python"


probe, probe_prefix, copy_crc, read_into, read_bytes, _Reader, IMPLEMENTATION = _select()
"""The read path in use here, and its name ("native" or "python")."""
