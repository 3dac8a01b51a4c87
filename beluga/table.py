"""The service's side of the pool's lookup table (key -> block), which clients read without a round trip.

Open addressing with linear probing over ``Geometry.table_buckets`` buckets
(sized so that the load factor stays at or below 0.8 even if every possible
slot held a block; the last bucket wraps round to the first). Only the service writes it, one bucket at
a time through ``layout.write_bucket`` (seqlock and CRC); clients read it
through ``beluga.readpath.probe``. Deletion shifts later entries of the same
run back (no tombstones, so probes stay short however long the service runs);
before it relocates anything it moves the table sequence on, so a reader
whose probe ended at an empty bucket while an entry moved knows to probe
again. A relocated entry is written at its new bucket before its old bucket
is overwritten: a reader finds it at one place or the other.

The service keeps a copy of which key sits in which bucket, so it never
needs to read the table back; after a restart ``rebuild`` writes the whole
table from the recovered index (the table sequence is odd meanwhile, and
readers ask the service instead).
"""
from __future__ import annotations

from . import layout as L


class LookupTable:
    def __init__(self, buf, geometry: L.Geometry) -> None:
        self.buf = buf
        self.g = geometry
        self.n = geometry.table_buckets
        self.slots: list[tuple | None] = [None] * geometry.table_buckets
        """Per bucket, what the service last wrote there: (key, generation, where, length, crc) or None."""
        self.where: dict[bytes, int] = {}
        self.relocations = 0

    def _bucket(self, i: int) -> int:
        return self.g.bucket_offset(i)

    def publish(self, key: bytes, generation: int, segment: int, slot: int, data_slot_bytes: int,
                length_bytes: int, data_crc: int) -> None:
        """Make ``key`` point at this committed block (replacing what it pointed at, in place)."""
        i = self.where.get(key)
        if i is None:
            n = self.n
            i = home = L.bucket_home(key, n)
            while self.slots[i] is not None:
                i = (i + 1) % n
                if i == home:  # cannot happen (more buckets than slots): a key the index lost track of
                    raise RuntimeError(f"lookup table full ({n} buckets): keys were dropped from the index "
                                       f"without being withdrawn")
            self.where[key] = i
        rec = (key, generation, L.pack_where(self.g, segment, slot, data_slot_bytes), length_bytes, data_crc)
        self.slots[i] = rec
        L.write_bucket(self.buf, self._bucket(i), *rec, table_seq_offset=self.g.table_seq_offset)

    def withdraw(self, key: bytes) -> None:
        """Remove ``key`` (no-op if absent), shifting the rest of its run back over the hole."""
        i = self.where.pop(key, None)
        if i is None:
            return
        n = self.n
        moved_seq = False
        j = i
        while True:
            j = (j + 1) % n
            other = self.slots[j]
            if other is None:
                break
            home = L.bucket_home(other[0], n)
            # ``other`` may fill the hole at i only if i lies on its probe path (home .. j, cyclically).
            if (j - home) % n >= (j - i) % n:
                if not moved_seq:
                    L.write_table_seq(self.buf, self.g, L.read_table_seq(self.buf, self.g) + 2)
                    moved_seq = True
                L.write_bucket(self.buf, self._bucket(i), *other, table_seq_offset=self.g.table_seq_offset)
                self.slots[i] = other
                self.where[other[0]] = i
                self.relocations += 1
                i = j
        self.slots[i] = None
        L.write_bucket(self.buf, self._bucket(i), table_seq_offset=self.g.table_seq_offset)

    def rebuild(self, entries) -> None:
        """Write the whole table from ``entries`` (key, generation, segment, slot, data_slot_bytes, length, crc)."""
        seq = L.read_table_seq(self.buf, self.g)
        odd = seq + 1 if seq % 2 == 0 else seq + 2
        L.write_table_seq(self.buf, self.g, odd)
        L.clear_table(self.buf, self.g)
        self.slots = [None] * self.g.table_buckets
        self.where = {}
        for e in entries:
            self.publish(*e)
        L.write_table_seq(self.buf, self.g, odd + 1)
