"""The service's index and segment state machine: which block is where, and who may write where.

Segments (free, open, sealed), their slot size classes and free-slot heaps, the
blocks in them (reserved, committed, zombie), the key index in LRU order, the
generations, leases and reservations, allocation, commit, abort, eviction and
recovery. It is the only writer of the segment table, the index entries and
(through ``LookupTable``) the lookup table, and it touches the pool only through
the accessors of ``beluga.layout`` on the buffer it is handed. It has no clock
or socket of its own and answers no requests: ``beluga.service`` feeds it
requests and the time, and turns a ``Reject`` into a response.

Every transition is written to the pool before the method that makes it returns,
so the caller can answer the request that caused it: a service restarted on any
host rebuilds this state from the pool alone (``recover``). Leases and LRU order
are soft state: after a restart leases are gone (readers still verify every block)
and LRU order is approximated by generation.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

from . import layout as L
from . import rpc
from .table import LookupTable


class Reject(Exception):
    """A request item the index refuses: ``code`` is the RPC status, ``message`` says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RecoveryRefused(Exception):
    """A record the service cannot have written: ``what`` names it; ``checksummed`` says whether its CRC was valid."""

    def __init__(self, what: str, *, checksummed: bool = True) -> None:
        super().__init__(what)
        self.what = what
        self.checksummed = checksummed


class Holder:
    """A registered client as the index sees it: its slot and epoch, and what it holds."""

    __slots__ = ("slot", "epoch", "leases", "reservations")

    def __init__(self, slot: int, epoch: int) -> None:
        self.slot = slot
        self.epoch = epoch
        self.leases: set[int] = set()
        self.reservations: set[tuple[int, int]] = set()

    @property
    def ident(self) -> tuple[int, int]:
        return (self.slot, self.epoch)


class Block:
    __slots__ = ("state", "key", "generation", "length", "crc", "owner", "deadline", "leases", "zombie", "touch")

    def __init__(self, state, key, generation, length, crc, owner, deadline=None):
        self.state = state
        self.key = key
        self.generation = generation
        self.length = length
        self.crc = crc
        self.owner = owner  # (client slot, epoch) that reserved / wrote it
        self.deadline = deadline  # reservation expiry (service clock)
        self.leases = 0
        self.zombie = False  # removed from the index but still leased: freed when the last lease ends
        self.touch = 0


class Segment:
    __slots__ = ("index", "state", "owner", "layout", "blocks", "free")

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = L.SEG_FREE
        self.owner: tuple[int, int] | None = None
        self.layout: L.SlotLayout | None = None
        self.blocks: dict[int, Block] = {}
        self.free: list[int] = []  # heap of free slot numbers: lowest first keeps layouts compact

    def reserved_count(self) -> int:
        return sum(1 for b in self.blocks.values() if b.state == L.ENTRY_RESERVED)


class BlockIndex:
    """The state machine over one pool's buffer. ``counters`` is the service's counter dict (shared)."""

    def __init__(self, buf, geometry: L.Geometry, *, counters: dict[str, int], reservation_ttl_s: float,
                 persist_high_water) -> None:
        self.buf = buf
        self.g = geometry
        self.counters = counters
        self.reservation_ttl_s = reservation_ttl_s
        self.persist_high_water = persist_high_water
        """Called with a new generation high-water mark, which must be in the pool before it returns."""
        self.segments = [Segment(i) for i in range(geometry.segment_count)]
        self.free_segments: list[int] = []
        self._by_class: dict[int, list[Segment]] = {}
        self._layouts: dict[int, L.SlotLayout] = {}
        self.index: "OrderedDict[bytes, tuple[int, int]]" = OrderedDict()  # oldest first (LRU order)
        self.leases: dict[int, tuple[int, int, int, float]] = {}  # id -> (client slot, segment, slot, expiry)
        self.next_lease = 1
        self._touch = 0
        self._next_gen = 1
        self.gen_high_water = 0
        self.table = LookupTable(buf, geometry)
        self._touch_tail: dict[int, int] = {}  # client slot -> touches of its ring already applied

    # ------------------------------------------------------------ persistence helpers
    def _layout(self, data_slot_bytes: int) -> L.SlotLayout:
        lay = self._layouts.get(data_slot_bytes)
        if lay is None:
            lay = self._layouts[data_slot_bytes] = self.g.slot_layout(data_slot_bytes)
        return lay

    def _persist_segment(self, seg: Segment) -> None:
        owner_slot, owner_epoch = seg.owner or (0, 0)
        lay = seg.layout
        raw = L.encode_segment_entry(seg.state, owner_slot, owner_epoch, lay.data_slot_bytes if lay else 0,
                                     lay.slot_count if lay else 0)
        L.write_segment_entry(self.buf, self.g.segment_entry_offset(seg.index), raw)

    def _persist_entry(self, seg: int, slot: int, blk: Block | None, free_generation: int = 0) -> None:
        if blk is None:
            raw = L.encode_index_entry(L.ENTRY_FREE, 0, 0, free_generation, 0, 0, None)
        else:
            owner_slot, owner_epoch = blk.owner
            raw = L.encode_index_entry(blk.state, owner_slot, owner_epoch, blk.generation, blk.length, blk.crc,
                                       blk.key)
        L.write_index_entry(self.buf, self.g, seg, slot, raw)

    def _new_generation(self) -> int:
        gen = self._next_gen
        self._next_gen += 1
        if gen >= self.gen_high_water:
            # Persist a bound before handing generations out, so a restarted
            # service never reuses one even if the entry that held it was torn.
            self.gen_high_water = gen + 65536
            self.persist_high_water(self.gen_high_water)
        return gen

    # ------------------------------------------------------------ recovery
    def recover(self, holders: dict[int, Holder], now: float) -> dict[str, int]:
        """Rebuild everything from the segment table and index entries (metadata only).

        ``holders``: the clients that own host slots (their reservations are kept and added to
        them). Raises RecoveryRefused, before writing anything, on a record the service cannot
        have written. -> counts for the service's recovery report."""
        g = self.g
        if self.gen_high_water >= L.MAX_GENERATION:
            raise RecoveryRefused(f"service area: generation_high_water {self.gen_high_water} is beyond 2^62, "
                                  f"more allocations than any pool can have made", checksummed=False)
        max_gen = 0
        committed = reserved = torn = dup = 0
        # Entries to free, written only once every record has been read and found valid:
        # a refused pool is left exactly as it was.
        repairs: list[tuple[int, int, int]] = []
        for si, seg in enumerate(self.segments):
            entry = L.read_segment_entry(self.buf, g.segment_entry_offset(si))
            problem = L.segment_entry_problem(g, entry) if entry is not None else None
            if problem:
                raise RecoveryRefused(f"segment {si}: segment-table entry: {problem}")
            if entry is None or entry.state == L.SEG_FREE:
                seg.state = L.SEG_FREE
                if entry is None:
                    torn += 1
                self.free_segments.append(si)
                continue
            lay = self._layout(entry.data_slot_bytes)
            seg.state = entry.state
            seg.layout = lay
            seg.owner = (entry.owner_slot, entry.owner_epoch) if entry.state == L.SEG_OPEN else None
            self._by_class.setdefault(lay.data_slot_bytes, []).append(seg)
            for sl, e in enumerate(L.read_index_entries(self.buf, g, si, lay.slot_count)):
                if e is None:
                    torn += 1  # a write cut short: never acknowledged, so it is as if it never happened
                    repairs.append((si, sl, 0))
                    seg.free.append(sl)
                    continue
                problem = L.index_entry_problem(e, lay.data_slot_bytes)
                if problem:
                    raise RecoveryRefused(f"segment {si} slot {sl}: index entry: {problem}")
                max_gen = max(max_gen, e.generation)
                if e.state == L.ENTRY_COMMITTED:
                    blk = Block(L.ENTRY_COMMITTED, e.key, e.generation, e.length_bytes, e.data_crc,
                                (e.owner_slot, e.owner_epoch))
                    seg.blocks[sl] = blk
                    committed += 1
                elif e.state == L.ENTRY_RESERVED:
                    owner = holders.get(e.owner_slot)
                    if owner is not None and owner.epoch == e.owner_epoch:
                        blk = Block(L.ENTRY_RESERVED, None, e.generation, e.length_bytes, 0,
                                    (e.owner_slot, e.owner_epoch), now + self.reservation_ttl_s)
                        seg.blocks[sl] = blk
                        owner.reservations.add((si, sl))
                        reserved += 1
                    else:
                        repairs.append((si, sl, e.generation))
                        seg.free.append(sl)
                else:
                    seg.free.append(sl)
            heapq.heapify(seg.free)
        for si, sl, gen in repairs:
            self._persist_entry(si, sl, None, gen)
        # Rebuild the index; LRU order is soft state, approximated by generation.
        order = []
        for seg in self.segments:
            for sl, blk in seg.blocks.items():
                if blk.state == L.ENTRY_COMMITTED:
                    order.append((blk.generation, seg.index, sl))
        order.sort()
        for gen, si, sl in order:
            blk = self.segments[si].blocks[sl]
            old = self.index.get(blk.key)
            if old is not None:
                # Crash between committing a replacement and freeing the old copy: the newer wins.
                dup += 1
                self._free_slot(self.segments[old[0]], old[1])
            self.index[blk.key] = (si, sl)
            self._touch += 1
            blk.touch = self._touch
        for seg in self.segments:
            if seg.state == L.SEG_OPEN:
                owner = holders.get(seg.owner[0]) if seg.owner else None
                if owner is None or owner.epoch != seg.owner[1]:
                    self._seal(seg)
            elif seg.state != L.SEG_FREE and not seg.blocks:
                self._seal(seg)
        heapq.heapify(self.free_segments)
        self._rebuild_table()
        self._next_gen = max(max_gen, self.gen_high_water) + 1
        self.gen_high_water = self._next_gen
        self._new_generation()  # persists a fresh high-water mark
        return {"committed_blocks": committed, "reservations": reserved, "torn_records": torn,
                "duplicate_keys": dup}

    # ------------------------------------------------------------ the lookup table clients read
    def _publish(self, key: bytes, si: int, sl: int, blk: Block) -> None:
        self.table.publish(key, blk.generation, si, sl, self.segments[si].layout.data_slot_bytes, blk.length,
                           blk.crc)

    def _rebuild_table(self) -> None:
        """Recovery: the table is written from the recovered index (never trusted from before)."""
        entries = []
        for key, (si, sl) in self.index.items():
            blk = self.segments[si].blocks[sl]
            entries.append((key, blk.generation, si, sl, self.segments[si].layout.data_slot_bytes, blk.length,
                            blk.crc))
        self.table.rebuild(entries)

    # ------------------------------------------------------------ touch rings (LRU order of lease-free reads)
    def follow_touches(self, slot: int) -> None:
        """A client now owns ``slot``: its touch ring is drained from where its head is now."""
        self._touch_tail[slot] = L.read_touch_head(self.buf, self.g, slot)

    def drain_touches(self, slots) -> None:
        """Apply the reads clients posted in their touch rings to the LRU order (oldest first per client)."""
        g = self.g
        for slot in slots:
            tail = self._touch_tail.get(slot, 0)
            head = L.read_touch_head(self.buf, g, slot)
            if head == tail:
                continue
            head, touches = L.read_touches(self.buf, g, slot, tail)
            self._touch_tail[slot] = head
            for where, gen_lo in touches:
                si, sl = divmod(where, g.max_slots_per_segment)
                if si >= len(self.segments):
                    continue  # a client's scribble: ignore
                blk = self.segments[si].blocks.get(sl)
                if (blk is None or blk.state != L.ENTRY_COMMITTED or blk.zombie
                        or blk.generation & 0xFFFFFFFF != gen_lo or self.index.get(blk.key) != (si, sl)):
                    continue  # evicted, replaced or reused since it was read
                self.index.move_to_end(blk.key)
                self._touch += 1
                blk.touch = self._touch

    # ------------------------------------------------------------ segment/slot state changes
    def _open(self, seg: Segment, data_slot_bytes: int, owner: tuple[int, int]) -> None:
        lay = self._layout(data_slot_bytes)
        seg.state = L.SEG_OPEN
        seg.owner = owner
        seg.layout = lay
        seg.blocks = {}
        seg.free = list(range(lay.slot_count))
        for sl in range(lay.slot_count):
            # Entries left over from the segment's previous class could alias these slots.
            self._persist_entry(seg.index, sl, None)
        self._by_class.setdefault(data_slot_bytes, []).append(seg)
        self._persist_segment(seg)

    def _set_owner(self, seg: Segment, owner: tuple[int, int]) -> None:
        seg.state = L.SEG_OPEN
        seg.owner = owner
        self._persist_segment(seg)

    def _seal(self, seg: Segment) -> None:
        """Drop ownership; a segment with nothing in it goes back to the free pool."""
        if not seg.blocks:
            if seg.layout is not None:
                self._by_class[seg.layout.data_slot_bytes].remove(seg)
            seg.state = L.SEG_FREE
            seg.owner = None
            seg.layout = None
            seg.free = []
            self._persist_segment(seg)
            heapq.heappush(self.free_segments, seg.index)
        else:
            seg.state = L.SEG_SEALED
            seg.owner = None
            self._persist_segment(seg)

    def _free_slot(self, seg: Segment, slot: int) -> None:
        blk = seg.blocks.pop(slot)
        self._persist_entry(seg.index, slot, None, blk.generation)
        heapq.heappush(seg.free, slot)
        if not seg.blocks:
            # Empty (no block, no reservation), sealed or still a writer's: back to the free pool, where
            # any size class can have it before a live block is evicted for space.
            self._seal(seg)

    def _unindex(self, key: bytes, *, withdraw: bool = True) -> None:
        """Make a committed block invisible; its slot is reused only once no reader holds it.

        ``withdraw=False``: the caller overwrites the key's table entry itself (a replacement)."""
        si, sl = self.index.pop(key)
        if withdraw:
            self.table.withdraw(key)
        seg = self.segments[si]
        blk = seg.blocks[sl]
        if blk.leases:
            blk.zombie = True
            self._persist_entry(si, sl, None, blk.generation)  # invisible after a restart too
        else:
            self._free_slot(seg, sl)

    def _transferable(self, seg: Segment, owner: tuple[int, int]) -> bool:
        if seg.state == L.SEG_SEALED:
            return True
        if seg.state == L.SEG_OPEN:
            return seg.owner == owner or seg.reserved_count() == 0
        return False

    # ------------------------------------------------------------ allocation and eviction
    def _segment_for(self, client: Holder, data_slot_bytes: int) -> Segment:
        me = client.ident
        # One pass: a segment of this client's with a free slot, else the first one it may take over.
        takeover = None
        for seg in self._by_class.get(data_slot_bytes, ()):
            if seg.free:
                if seg.owner == me:
                    return seg
                if takeover is None and self._transferable(seg, me):
                    takeover = seg
        if takeover is not None:
            self._set_owner(takeover, me)
            return takeover
        if self.free_segments:
            seg = self.segments[heapq.heappop(self.free_segments)]
            self._open(seg, data_slot_bytes, me)
            return seg
        # Evict the least recently used block of this size class that nobody holds.
        for key, (si, sl) in self.index.items():
            seg = self.segments[si]
            if seg.layout.data_slot_bytes != data_slot_bytes or seg.blocks[sl].leases:
                continue
            if not self._transferable(seg, me):
                continue
            # The slot goes straight to this client: the segment keeps its class and never
            # passes through "free". (Through _unindex, a sealed segment whose last block this
            # was went back on the free list while this client took it, so the next ALLOC of
            # any client reopened it and wiped this client's reservation.)
            del self.index[key]
            self.table.withdraw(key)  # readers stop finding it before its slot is handed out
            blk = seg.blocks.pop(sl)
            self._persist_entry(si, sl, None, blk.generation)
            heapq.heappush(seg.free, sl)
            self.counters["evictions"] += 1
            if seg.owner != me:
                self._set_owner(seg, me)
            return seg
        # Otherwise free a whole segment of another class: the one used least recently.
        best, best_touch = None, None
        for seg in self.segments:
            if seg.state == L.SEG_FREE or not self._transferable(seg, me):
                continue
            if any(b.state != L.ENTRY_COMMITTED or b.leases or b.zombie for b in seg.blocks.values()):
                continue
            newest = max((b.touch for b in seg.blocks.values()), default=-1)
            if best is None or newest < best_touch:
                best, best_touch = seg, newest
        if best is not None:
            for sl, blk in list(best.blocks.items()):
                if self.index.pop(blk.key, None) is not None:
                    self.table.withdraw(blk.key)
                self.counters["evictions"] += 1
                best.blocks.pop(sl)
                self._persist_entry(best.index, sl, None, blk.generation)
            self.counters["segment_evictions"] += 1
            self._by_class[best.layout.data_slot_bytes].remove(best)
            self._open(best, data_slot_bytes, me)
            return best
        leased = sum(1 for s in self.segments for b in s.blocks.values() if b.leases)
        reserved = sum(s.reserved_count() for s in self.segments)
        raise Reject(
            rpc.POOL_FULL,
            f"pool full: no free {data_slot_bytes}-byte slot and nothing evictable "
            f"({leased} blocks leased by readers, {reserved} reservations in flight, "
            f"{len(self.segments)} segments)",
        )

    def alloc_one(self, client: Holder, length: int, now: float) -> rpc.Allocation:
        if length > self.g.max_block_bytes:
            raise Reject(rpc.TOO_LARGE, f"block of {length} bytes is larger than a segment can hold "
                                        f"({self.g.max_block_bytes} bytes in a {self.g.segment_size_bytes}-byte segment)")
        dslot = self.g.data_slot_for(length)
        seg = self._segment_for(client, dslot)
        slot = heapq.heappop(seg.free)
        blk = Block(L.ENTRY_RESERVED, None, self._new_generation(), length, 0, client.ident,
                    now + self.reservation_ttl_s)
        seg.blocks[slot] = blk
        client.reservations.add((seg.index, slot))
        self._persist_entry(seg.index, slot, blk)
        base = self.g.segment_offset(seg.index)
        self.counters["allocs"] += 1
        return rpc.Allocation(seg.index, slot, blk.generation, self.g.header_offset(seg.index, slot),
                              base + seg.layout.data_offset(slot), seg.layout.data_slot_bytes)

    def _locate(self, seg_index: int, slot: int, who: str) -> tuple[Segment, L.SlotLayout]:
        if not 0 <= seg_index < len(self.segments):
            raise Reject(rpc.BAD_REQUEST, f"{who}: segment {seg_index} is out of range (pool has "
                                          f"{len(self.segments)} segments)")
        seg = self.segments[seg_index]
        if seg.state == L.SEG_FREE or seg.layout is None:
            raise Reject(rpc.NOT_OWNER, f"{who}: segment {seg_index} is free, not owned by you")
        if not 0 <= slot < seg.layout.slot_count:
            raise Reject(rpc.BAD_REQUEST, f"{who}: slot {slot} is out of range (segment {seg_index} has "
                                          f"{seg.layout.slot_count} slots)")
        return seg, seg.layout

    def commit_one(self, client: Holder, key: bytes, si: int, sl: int, gen: int, length: int, crc: int) -> None:
        seg, lay = self._locate(si, sl, "commit")
        blk = seg.blocks.get(sl)
        me = client.ident
        if (blk is not None and blk.state == L.ENTRY_COMMITTED and blk.owner == me and blk.generation == gen
                and blk.key == key and self.index.get(key) == (si, sl)):
            return  # a retried commit whose first answer was lost
        if seg.owner != me:
            owner = f"client slot {seg.owner[0]} epoch {seg.owner[1]}" if seg.owner else "no client (sealed)"
            raise Reject(rpc.NOT_OWNER, f"commit: segment {si} is owned by {owner}, not by you "
                                        f"(slot {me[0]} epoch {me[1]})")
        if blk is None or blk.state != L.ENTRY_RESERVED or blk.owner != me or blk.generation != gen:
            what = "free" if blk is None else ("committed" if blk.state == L.ENTRY_COMMITTED else
                                               f"reserved with generation {blk.generation}")
            raise Reject(rpc.NOT_RESERVED, f"commit: slot {sl} of segment {si} is {what}, not reserved by you "
                                           f"with generation {gen} (expired or reclaimed reservation?)")
        try:
            if length > lay.data_slot_bytes:
                raise Reject(rpc.BAD_REQUEST, f"commit: length {length} exceeds the slot's "
                                              f"{lay.data_slot_bytes} bytes")
            raw = L.read_header_bytes(self.buf, self.g.header_offset(si, sl))  # one snapshot: the client may write on
            if not L.block_header_matches(raw, key, gen, length, crc):  # else: say what differs
                _reject_header(raw, si, sl, (L.BLOCK_COMPLETE, length, gen, crc, key))
        except Reject:
            # A failed commit must not leak the slot: the reservation ends here.
            client.reservations.discard((si, sl))
            self._free_slot(seg, sl)
            raise
        blk.state = L.ENTRY_COMMITTED
        blk.key = key
        blk.length = length
        blk.crc = crc
        blk.deadline = None
        client.reservations.discard((si, sl))
        self._persist_entry(si, sl, blk)  # the commit point
        if key in self.index:
            self._unindex(key, withdraw=False)  # replaced: the old copy goes once no reader holds it
        self.index[key] = (si, sl)
        self._publish(key, si, sl, blk)  # readers find it from now on
        self._touch += 1
        blk.touch = self._touch
        self.counters["commits"] += 1
        # A full segment stays its writer's: a slot freed there later (a replaced or deleted block) is
        # that writer's next ALLOC without the segment changing hands twice (two segment-table writes).
        # Another writer may still take it over while it has no reservation in it (_transferable).

    def abort_one(self, client: Holder, si: int, sl: int, gen: int) -> None:
        seg, _ = self._locate(si, sl, "abort")
        blk = seg.blocks.get(sl)
        if blk is None or blk.state != L.ENTRY_RESERVED or blk.owner != client.ident or blk.generation != gen:
            raise Reject(rpc.NOT_RESERVED, f"abort: slot {sl} of segment {si} is not reserved by you "
                                           f"with generation {gen}")
        client.reservations.discard((si, sl))
        self._free_slot(seg, sl)

    # ------------------------------------------------------------ lookups, leases, deletion
    def lookup_one(self, client: Holder, key: bytes, *, lease_expiry: float | None) -> tuple | None:
        """A committed block's LOOKUP row (a use, for the LRU order), under a lease if ``lease_expiry``; None: miss."""
        where = self.index.get(key)
        if where is None:
            return None
        si, sl = where
        seg = self.segments[si]
        blk = seg.blocks[sl]
        self.index.move_to_end(key)
        self._touch += 1
        blk.touch = self._touch
        lid = 0
        if lease_expiry is not None:
            lid = self.next_lease
            self.next_lease += 1
            self.leases[lid] = (client.slot, si, sl, lease_expiry)
            client.leases.add(lid)
            blk.leases += 1
            self.counters["leases_granted"] += 1
        base = self.g.segment_offset(si)
        return (si, sl, blk.generation, self.g.header_offset(si, sl), base + seg.layout.data_offset(sl),
                blk.length, blk.crc, lid)

    def release_leases(self, client: Holder, lease_ids) -> None:
        for lid in lease_ids:
            entry = self.leases.get(lid)
            if entry is not None and entry[0] == client.slot:  # only your own leases
                self.drop_lease(lid, client)

    def drop_lease(self, lease_id: int, holder: Holder | None) -> None:
        """End a lease; ``holder`` is the client that holds it, if it is still registered."""
        entry = self.leases.pop(lease_id, None)
        if entry is None:
            return
        cslot, si, sl, _ = entry
        if holder is not None:
            holder.leases.discard(lease_id)
        seg = self.segments[si]
        blk = seg.blocks.get(sl)
        if blk is None:
            return
        blk.leases -= 1
        if blk.leases == 0 and blk.zombie:
            self._free_slot(seg, sl)

    def delete(self, key: bytes) -> bool:
        if key not in self.index:
            return False
        self._unindex(key)
        return True

    def drop_if_current(self, key: bytes, generation: int) -> bool:
        """A reader found this generation's bytes bad: stop handing them out (if it is still the committed one)."""
        where = self.index.get(key)
        if where is None or self.segments[where[0]].blocks[where[1]].generation != generation:
            return False
        self._unindex(key)
        return True

    def evict(self, count: int) -> int:
        """Evict up to ``count`` least recently used blocks that no reader holds (touch rings drained first)."""
        victims = []
        for key, (si, sl) in self.index.items():
            if len(victims) >= count:
                break
            if not self.segments[si].blocks[sl].leases:
                victims.append(key)
        for key in victims:
            self._unindex(key)
            self.counters["evictions"] += 1
        return len(victims)

    # ------------------------------------------------------------ time and departures
    def expire(self, holders: dict[int, Holder], now: float) -> None:
        """End leases past their TTL and reservations past theirs."""
        expired = [lid for lid, (_, _, _, exp) in self.leases.items() if exp <= now]
        for lid in expired:
            self.drop_lease(lid, holders.get(self.leases[lid][0]))
        self.counters["leases_expired"] += len(expired)
        for c in holders.values():
            for si, sl in list(c.reservations):
                blk = self.segments[si].blocks.get(sl)
                if blk is not None and blk.state == L.ENTRY_RESERVED and blk.deadline <= now:
                    c.reservations.discard((si, sl))
                    self._free_slot(self.segments[si], sl)
                    self.counters["reservations_expired"] += 1

    def release_holder(self, c: Holder) -> None:
        """A client is gone: end its leases and reservations, seal (or free) the segments it owned."""
        for lid in list(c.leases):
            self.drop_lease(lid, c)
        for si, sl in list(c.reservations):
            seg = self.segments[si]
            if sl in seg.blocks and seg.blocks[sl].state == L.ENTRY_RESERVED:
                self._free_slot(seg, sl)
                self.counters["reservations_reclaimed"] += 1
        for seg in self.segments:
            if seg.state == L.SEG_OPEN and seg.owner == c.ident:
                self._seal(seg)

    # ------------------------------------------------------------ stats and invariants
    def stats(self) -> dict:
        seg_states = {name: 0 for name in L.SEG_STATE_NAMES.values()}
        reserved = zombies = committed_bytes = slots_total = slots_free = 0
        for seg in self.segments:
            seg_states[L.SEG_STATE_NAMES[seg.state]] += 1
            if seg.layout:
                slots_total += seg.layout.slot_count
                slots_free += len(seg.free)
            for b in seg.blocks.values():
                if b.state == L.ENTRY_RESERVED:
                    reserved += 1
                elif b.zombie:
                    zombies += 1
                else:
                    committed_bytes += b.length
        return {
            "segments": seg_states,
            "slots_total": slots_total,
            "slots_free": slots_free,
            "blocks": len(self.index),
            "committed_bytes": committed_bytes,
            "reserved": reserved,
            "zombies": zombies,
            "leases": len(self.leases),
        }

    def check_invariants(self, holders: dict[int, Holder]) -> None:
        """Cross-check in-memory state against itself and the pool (tests call this)."""
        seen = set()
        assert set(self.table.where) == set(self.index), "lookup table and index disagree"
        for key, (si, sl) in self.index.items():
            blk = self.segments[si].blocks[sl]
            assert blk.state == L.ENTRY_COMMITTED and blk.key == key and not blk.zombie, (key.hex(), si, sl)
            seen.add((si, sl))
            rec = L.read_bucket(self.buf, self.g.bucket_offset(self.table.where[key]))
            assert rec and rec[:2] == (key, blk.generation) and rec[3:] == (blk.length, blk.crc), (key.hex(), rec)
        for seg in self.segments:
            if seg.state == L.SEG_FREE:
                assert not seg.blocks and seg.index in self.free_segments, seg.index
                continue
            assert seg.index not in self.free_segments, seg.index
            assert set(seg.free).isdisjoint(seg.blocks), seg.index
            assert len(seg.free) + len(seg.blocks) == seg.layout.slot_count, seg.index
            for sl, blk in seg.blocks.items():
                e = L.read_index_entry(self.buf, self.g, seg.index, sl)
                if blk.state == L.ENTRY_COMMITTED and not blk.zombie:
                    assert (seg.index, sl) in seen, (seg.index, sl)
                    assert e is not None and e.state == L.ENTRY_COMMITTED and e.key == blk.key
                elif blk.state == L.ENTRY_RESERVED:
                    assert e is not None and e.state == L.ENTRY_RESERVED
                    assert (seg.index, sl) in holders[blk.owner[0]].reservations
                if blk.zombie:
                    assert blk.leases > 0
        leased: dict[tuple[int, int], int] = {}
        for cslot, si, sl, _ in self.leases.values():
            leased[(si, sl)] = leased.get((si, sl), 0) + 1
        for seg in self.segments:
            for sl, blk in seg.blocks.items():
                assert blk.leases == leased.get((seg.index, sl), 0), (seg.index, sl)


def _reject_header(raw: bytes, si: int, sl: int, expect: tuple) -> None:
    """A commit whose block header is not the COMPLETE header of exactly this block: say why."""
    hdr = L.BlockHeader.decode(raw)
    if hdr is None:
        raise Reject(rpc.BAD_HEADER, f"commit: block header of segment {si} slot {sl} is missing or "
                                     f"damaged (write the header before committing)")
    got = (hdr.state, hdr.length_bytes, hdr.generation, hdr.data_crc, hdr.key)
    names = ("state", "length", "generation", "crc", "key")
    diffs = ", ".join(f"{n} header={a!r:.20} request={b!r:.20}" for n, a, b in zip(names, got, expect) if a != b)
    raise Reject(rpc.BAD_HEADER, f"commit: block header of segment {si} slot {sl} does not match "
                                 f"the request ({diffs})")
