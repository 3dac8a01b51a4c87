"""The metadata service: segment assignment, the index, leases, eviction, recovery.

It is the only writer of the index, the segment table, the service area and
the service lines of host slots, and it is single-threaded: one loop polls
the pool's request slots, the TCP sockets and the clock. Every piece of state
that must survive it (segment ownership, reservations, committed entries,
client slots) is written to the pool *before* a request is answered, so a
service restarted on any host rebuilds everything by reading metadata only.
Leases and LRU order are soft state: after a restart leases are gone (readers
still verify every block) and LRU order is approximated by generation.
"""
from __future__ import annotations

import heapq
import json
import os
import socket
import struct
import sys
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass

from . import layout as L
from . import rpc
from .errors import CorruptPoolError, ProtocolError, ServiceBusyError
from .pool import Pool
from .table import LookupTable
from .tcpserver import TcpServer
from .transport import reduce_timer_slack

_QQQ = struct.Struct("<QQQ")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class ServiceConfig:
    heartbeat_timeout_s: float = 3.0
    """A client whose heartbeat counter does not move for this long is declared dead."""
    lease_ttl_s: float = 10.0
    """A reader's lease ends after this long even if it is never released."""
    reservation_ttl_s: float = 30.0
    """An allocated but never committed slot is reclaimed after this long (lost ALLOC answers)."""
    housekeeping_interval_s: float = 0.05
    poll_spin_s: float = 0.0005
    """After doing work, keep polling without sleeping this long: back-to-back requests stay fast."""
    poll_min_sleep_s: float = 5e-6
    poll_warm_max_sleep_s: float = 5e-5
    """While requests came recently (within ``poll_warm_s``), idle sleeps stay this short..."""
    poll_warm_s: float = 0.05
    poll_max_sleep_s: float = 1e-3
    """...and only a service idle for longer backs off to this (idle polling costs next to no CPU).
    Spinning briefly and then sleeping, rather than spinning for long, leaves the cores to the
    clients' copies when clients and the service share a few cores."""
    serve_cxl: bool = True
    tcp_host: str | None = None
    """Listen for TCP clients on this address (None: no TCP)."""
    tcp_port: int = 0
    advertise: str | None = None
    """host:port written to the pool for TCP clients to find (default: the bound address)."""
    takeover_wait_s: float = 1.0
    """How long to watch a previous service's heartbeat before taking its place."""
    force: bool = False
    bad_request_grace_s: float = 0.5
    """A pool request that stays unreadable (CRC) this long is answered as malformed."""
    claim_scan_interval_s: float = 0.001
    """How often the serve loop looks at free host slots for claims and reads heartbeats
    (requests of registered clients are looked at on every pass)."""
    stall_threshold_s: float = 0.25
    """A gap this long between two passes of the serve loop is the service's own stall (a GC pause,
    a descheduled or stopped process, slow pool memory): client heartbeat deadlines move by the gap,
    so clients are never reaped for time in which the service could not watch them."""
    # Limits on TCP clients (see beluga/tcpserver.py and docs/store.md). Frames are capped at the
    # pool's RPC buffer size (`beluga format --rpc-buffer`).
    tcp_max_connections: int = 64
    """Open TCP connections at most (lowered to what the file limit, RLIMIT_NOFILE, leaves room for)."""
    tcp_max_clients: int | None = None
    """Host slots TCP clients may hold at most (None: all but a quarter, at least one, kept for pool clients;
    none kept with a single slot or without the pool transport)."""
    tcp_hello_timeout_s: float = 5.0
    """A connection that has made no valid request (HELLO or a live session) this long is closed."""
    tcp_idle_timeout_s: float = 60.0
    """A connection that sent no complete frame this long is closed (clients reconnect when they next call)."""
    tcp_output_limit_bytes: int = 1 << 20
    """Answers waiting for a client that does not read them; past this the connection is closed."""
    tcp_accept_backoff_s: float = 0.1
    """After a failed accept (EMFILE, ...), accepting pauses this long; the service keeps serving."""
    tcp_frames_per_pass: int = 1
    """Frames answered per connection per loop pass: a pipelining client cannot starve the others."""


class _Reject(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Block:
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


class _Segment:
    __slots__ = ("index", "state", "owner", "layout", "blocks", "free")

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = L.SEG_FREE
        self.owner: tuple[int, int] | None = None
        self.layout: L.SlotLayout | None = None
        self.blocks: dict[int, _Block] = {}
        self.free: list[int] = []  # heap of free slot numbers: lowest first keeps layouts compact

    def reserved_count(self) -> int:
        return sum(1 for b in self.blocks.values() if b.state == L.ENTRY_RESERVED)


class _Client:
    __slots__ = ("slot", "nonce", "epoch", "heartbeat", "seen_at", "handled_seq", "leases", "reservations",
                 "transport", "bad_seq", "bad_since")

    def __init__(self, slot, nonce, epoch, heartbeat, seen_at, handled_seq, transport):
        self.slot = slot
        self.nonce = nonce
        self.epoch = epoch
        self.heartbeat = heartbeat
        self.seen_at = seen_at
        self.handled_seq = handled_seq
        self.leases: set[int] = set()
        self.reservations: set[tuple[int, int]] = set()
        self.transport = transport
        self.bad_seq = None
        self.bad_since = 0.0

    @property
    def ident(self) -> tuple[int, int]:
        return (self.slot, self.epoch)


def _log(msg: str) -> None:
    print(f"beluga-service: {msg}", file=sys.stderr, flush=True)


class MetadataService:
    """Owns the pool's metadata. Construct it (claims the pool and recovers), then ``serve()``."""

    def __init__(self, pool: Pool, config: ServiceConfig = ServiceConfig(), *, clock=time.monotonic) -> None:
        self.pool = pool
        self.g = pool.geometry
        self.cfg = config
        self.clock = clock
        self.buf = pool.buf
        self.counters: dict[str, int] = {
            "requests": 0, "allocs": 0, "commits": 0, "rejected_items": 0, "lookups": 0, "hits": 0, "misses": 0,
            "deletes": 0, "evictions": 0, "segment_evictions": 0, "leases_granted": 0, "leases_expired": 0,
            "reservations_expired": 0, "reservations_reclaimed": 0, "clients_registered": 0,
            "clients_reaped": 0, "corrupt_reports": 0, "corrupt_blocks_dropped": 0, "bad_requests": 0,
            "stalls_forgiven": 0,
        }
        self._tcp: TcpServer | None = None
        self._ops_count: dict[str, int] = {}
        self.segments = [_Segment(i) for i in range(self.g.segment_count)]
        self._free_segments: list[int] = []
        self._by_class: dict[int, list[_Segment]] = {}
        self._layouts: dict[int, L.SlotLayout] = {}
        self.index: "OrderedDict[bytes, tuple[int, int]]" = OrderedDict()  # oldest first (LRU order)
        self.leases: dict[int, tuple[int, int, int, float]] = {}  # id -> (client slot, segment, slot, expiry)
        self.clients: dict[int, _Client] = {}
        self._next_lease = 1
        self._touch = 0
        self._next_gen = 1
        self._gen_high_water = 0
        self._next_housekeeping = 0.0
        self._tcp_address = ""
        self.started_at = clock()
        self.recovery: dict[str, int | float] = {}
        self._pool_clients: tuple | None = None  # registered clients that use pool slots; rebuilt on change
        self._clients_total = -1
        self._req_seq_at = [self.g.host_slot_offset(s) + L.CLIENT_LINE_OFFSET + L.CL_REQ_SEQ
                            for s in range(self.g.max_clients)]
        self.table = LookupTable(self.buf, self.g)
        self._touch_tail: dict[int, int] = {}  # client slot -> touches of its ring already applied
        self._claim_service()
        # Lease ids must never repeat across restarts: a release of a pre-restart lease
        # must not end a lease granted by this instance.
        self._next_lease = (self._restarts << 40) + 1
        self._recover()

    # ------------------------------------------------------------ service area
    def _read_area(self) -> L.ServiceArea:
        return L.ServiceArea.decode(self.buf[self.g.service_offset : self.g.service_offset + L.SERVICE_AREA.size])

    def _write_area(self) -> None:
        area = L.ServiceArea(self.nonce, self._area_heartbeat, os.getpid(), self._restarts, self._gen_high_water,
                             self._started_unix_ns, socket.gethostname(), self._tcp_address)
        raw = area.encode()
        self.buf[self.g.service_offset : self.g.service_offset + len(raw)] = raw

    def _claim_service(self) -> None:
        area = self._read_area()
        if area.nonce and not self.cfg.force and self.cfg.takeover_wait_s > 0:
            # The previous service may have been killed (heartbeat frozen) or may be alive.
            time.sleep(self.cfg.takeover_wait_s)
            later = self._read_area()
            if later.nonce and later.heartbeat != area.heartbeat:
                raise ServiceBusyError(
                    f"another metadata service (pid {later.pid} on {later.host or '?'}) is alive on "
                    f"{self.pool.path}: its heartbeat moved within {self.cfg.takeover_wait_s}s; stop it first "
                    f"or pass --force"
                )
            area = later
        self.nonce = int.from_bytes(os.urandom(8), "little") | 1
        self._area_heartbeat = area.heartbeat + 1
        self._restarts = area.restarts + 1
        self._gen_high_water = area.generation_high_water
        self._started_unix_ns = time.time_ns()
        self._write_area()

    def set_tcp_address(self, address: str) -> None:
        self._tcp_address = address
        self._write_area()

    def release_pool(self) -> None:
        """Clean shutdown: mark the pool as having no service (clients fail fast, a successor needs no wait)."""
        if self._read_area().nonce == self.nonce:
            self.nonce = 0
            self._tcp_address = ""
            self._write_area()

    # ------------------------------------------------------------ persistence helpers
    def _layout(self, data_slot_bytes: int) -> L.SlotLayout:
        lay = self._layouts.get(data_slot_bytes)
        if lay is None:
            lay = self._layouts[data_slot_bytes] = self.g.slot_layout(data_slot_bytes)
        return lay

    def _persist_segment(self, seg: _Segment) -> None:
        owner_slot, owner_epoch = seg.owner or (0, 0)
        entry = L.SegmentEntry(seg.state, owner_slot, owner_epoch,
                               seg.layout.data_slot_bytes if seg.layout else 0,
                               seg.layout.slot_count if seg.layout else 0)
        L.write_segment_entry(self.buf, self.g.segment_entry_offset(seg.index), entry)

    def _persist_entry(self, seg: int, slot: int, blk: _Block | None, free_generation: int = 0) -> None:
        if blk is None:
            raw = L.encode_index_entry(L.ENTRY_FREE, 0, 0, free_generation, 0, 0, None)
        else:
            owner_slot, owner_epoch = blk.owner
            raw = L.encode_index_entry(blk.state, owner_slot, owner_epoch, blk.generation, blk.length, blk.crc,
                                       blk.key)
        off = self.g.index_entry_offset(seg, slot)
        self.buf[off : off + L.INDEX_ENTRY_BYTES] = raw

    def _new_generation(self) -> int:
        gen = self._next_gen
        self._next_gen += 1
        if gen >= self._gen_high_water:
            # Persist a bound before handing generations out, so a restarted
            # service never reuses one even if the entry that held it was torn.
            self._gen_high_water = gen + 65536
            self._write_area()
        return gen

    # ------------------------------------------------------------ recovery
    def _refuse(self, what: str, *, checksummed: bool = True) -> CorruptPoolError:
        """A record the service cannot have written (intact, if it has a CRC): stop, hand the pool back."""
        self.release_pool()
        path = self.pool.path
        torn = "Its checksum is valid, so it is no record torn by a crash: the" if checksummed else "The"
        return CorruptPoolError(
            f"{path}: {what}. {torn} metadata was damaged or crafted, and recovery refuses to act on it "
            f"(it would read or overwrite other records). `beluga stat {path}` shows the pool; "
            f"`beluga format --force {path}` starts it over (its blocks are lost)")

    def _recover(self) -> None:
        t0 = time.perf_counter()
        now = self.clock()
        g = self.g
        for slot in range(g.max_clients):
            base = g.host_slot_offset(slot)
            owner, resp_seq, epoch = _QQQ.unpack_from(self.buf, base + L.SERVICE_LINE_OFFSET)
            if epoch >= L.MAX_EPOCH:
                raise self._refuse(f"client slot {slot}: service line: epoch {epoch} does not fit the 32-bit owner "
                                   f"epoch of segment and index records", checksummed=False)
            if owner:
                _, req_seq, hb = _QQQ.unpack_from(self.buf, base + L.CLIENT_LINE_OFFSET)
                # Liveness restarts now: a client gets a full timeout to show its heartbeat.
                self.clients[slot] = _Client(slot, owner, epoch, hb, now, resp_seq, "resumed")
                self._touch_tail[slot] = L.read_touch_head(self.buf, g, slot)  # LRU order is soft state
        if self._gen_high_water >= L.MAX_GENERATION:
            raise self._refuse(f"service area: generation_high_water {self._gen_high_water} is beyond 2^62, "
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
                raise self._refuse(f"segment {si}: segment-table entry: {problem}")
            if entry is None or entry.state == L.SEG_FREE:
                seg.state = L.SEG_FREE
                if entry is None:
                    torn += 1
                self._free_segments.append(si)
                continue
            lay = self._layout(entry.data_slot_bytes)
            seg.state = entry.state
            seg.layout = lay
            seg.owner = (entry.owner_slot, entry.owner_epoch) if entry.state == L.SEG_OPEN else None
            self._by_class.setdefault(lay.data_slot_bytes, []).append(seg)
            base = g.index_entry_offset(si, 0)
            raw = self.buf[base : base + lay.slot_count * L.INDEX_ENTRY_BYTES]
            for sl in range(lay.slot_count):
                e = L.IndexEntry.decode(raw[sl * L.INDEX_ENTRY_BYTES : (sl + 1) * L.INDEX_ENTRY_BYTES])
                if e is None:
                    torn += 1  # a write cut short: never acknowledged, so it is as if it never happened
                    repairs.append((si, sl, 0))
                    seg.free.append(sl)
                    continue
                problem = L.index_entry_problem(e, lay.data_slot_bytes)
                if problem:
                    raise self._refuse(f"segment {si} slot {sl}: index entry: {problem}")
                max_gen = max(max_gen, e.generation)
                if e.state == L.ENTRY_COMMITTED:
                    blk = _Block(L.ENTRY_COMMITTED, e.key, e.generation, e.length_bytes, e.data_crc,
                                 (e.owner_slot, e.owner_epoch))
                    seg.blocks[sl] = blk
                    committed += 1
                elif e.state == L.ENTRY_RESERVED:
                    owner = self.clients.get(e.owner_slot)
                    if owner is not None and owner.epoch == e.owner_epoch:
                        blk = _Block(L.ENTRY_RESERVED, None, e.generation, e.length_bytes, 0,
                                     (e.owner_slot, e.owner_epoch), now + self.cfg.reservation_ttl_s)
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
                owner = self.clients.get(seg.owner[0]) if seg.owner else None
                if owner is None or owner.epoch != seg.owner[1]:
                    self._seal(seg)
            elif seg.state != L.SEG_FREE and not seg.blocks:
                self._seal(seg)
        heapq.heapify(self._free_segments)
        self._rebuild_table()
        self._next_gen = max(max_gen, self._gen_high_water) + 1
        self._gen_high_water = self._next_gen
        self._new_generation()  # persists a fresh high-water mark
        self.recovery = {
            "committed_blocks": committed, "reservations": reserved, "torn_records": torn,
            "duplicate_keys": dup, "clients": len(self.clients),
            "duration_s": round(time.perf_counter() - t0, 6),
        }

    # ------------------------------------------------------------ the lookup table clients read
    def _publish(self, key: bytes, si: int, sl: int, blk: _Block) -> None:
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

    def _drain_touches(self) -> None:
        """Apply the reads clients posted in their touch rings to the LRU order (oldest first per client)."""
        g = self.g
        for slot in self.clients:
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
    def _open(self, seg: _Segment, data_slot_bytes: int, owner: tuple[int, int]) -> None:
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

    def _set_owner(self, seg: _Segment, owner: tuple[int, int]) -> None:
        seg.state = L.SEG_OPEN
        seg.owner = owner
        self._persist_segment(seg)

    def _seal(self, seg: _Segment) -> None:
        """Drop ownership; a segment with nothing in it goes back to the free pool."""
        if not seg.blocks:
            if seg.layout is not None:
                self._by_class[seg.layout.data_slot_bytes].remove(seg)
            seg.state = L.SEG_FREE
            seg.owner = None
            seg.layout = None
            seg.free = []
            self._persist_segment(seg)
            heapq.heappush(self._free_segments, seg.index)
        else:
            seg.state = L.SEG_SEALED
            seg.owner = None
            self._persist_segment(seg)

    def _maybe_seal(self, seg: _Segment) -> None:
        # Ownership is only worth keeping while the owner can still write there.
        if seg.state == L.SEG_OPEN and not seg.free and seg.reserved_count() == 0:
            self._seal(seg)

    def _free_slot(self, seg: _Segment, slot: int) -> None:
        blk = seg.blocks.pop(slot)
        self._persist_entry(seg.index, slot, None, blk.generation)
        heapq.heappush(seg.free, slot)
        if seg.state == L.SEG_SEALED and not seg.blocks:
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

    def _transferable(self, seg: _Segment, owner: tuple[int, int]) -> bool:
        if seg.state == L.SEG_SEALED:
            return True
        if seg.state == L.SEG_OPEN:
            return seg.owner == owner or seg.reserved_count() == 0
        return False

    # ------------------------------------------------------------ allocation and eviction
    def _segment_for(self, client: _Client, data_slot_bytes: int) -> _Segment:
        me = client.ident
        same_class = self._by_class.get(data_slot_bytes, [])
        for seg in same_class:
            if seg.owner == me and seg.free:
                return seg
        for seg in same_class:
            if seg.free and self._transferable(seg, me):
                self._set_owner(seg, me)
                return seg
        if self._free_segments:
            seg = self.segments[heapq.heappop(self._free_segments)]
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
        raise _Reject(
            rpc.POOL_FULL,
            f"pool full: no free {data_slot_bytes}-byte slot and nothing evictable "
            f"({leased} blocks leased by readers, {reserved} reservations in flight, "
            f"{len(self.segments)} segments)",
        )

    def _alloc_one(self, client: _Client, length: int) -> rpc.Allocation:
        if length > self.g.max_block_bytes:
            raise _Reject(rpc.TOO_LARGE, f"block of {length} bytes is larger than a segment can hold "
                                         f"({self.g.max_block_bytes} bytes in a {self.g.segment_size_bytes}-byte segment)")
        dslot = self.g.data_slot_for(length)
        seg = self._segment_for(client, dslot)
        slot = heapq.heappop(seg.free)
        blk = _Block(L.ENTRY_RESERVED, None, self._new_generation(), length, 0, client.ident,
                     self.clock() + self.cfg.reservation_ttl_s)
        seg.blocks[slot] = blk
        client.reservations.add((seg.index, slot))
        self._persist_entry(seg.index, slot, blk)
        base = self.g.segment_offset(seg.index)
        self.counters["allocs"] += 1
        return rpc.Allocation(seg.index, slot, blk.generation, self.g.header_offset(seg.index, slot),
                              base + seg.layout.data_offset(slot), seg.layout.data_slot_bytes)

    def _locate(self, seg_index: int, slot: int, who: str) -> tuple[_Segment, L.SlotLayout]:
        if not 0 <= seg_index < len(self.segments):
            raise _Reject(rpc.BAD_REQUEST, f"{who}: segment {seg_index} is out of range (pool has "
                                           f"{len(self.segments)} segments)")
        seg = self.segments[seg_index]
        if seg.state == L.SEG_FREE or seg.layout is None:
            raise _Reject(rpc.NOT_OWNER, f"{who}: segment {seg_index} is free, not owned by you")
        if not 0 <= slot < seg.layout.slot_count:
            raise _Reject(rpc.BAD_REQUEST, f"{who}: slot {slot} is out of range (segment {seg_index} has "
                                           f"{seg.layout.slot_count} slots)")
        return seg, seg.layout

    def _commit_one(self, client: _Client, key: bytes, si: int, sl: int, gen: int, length: int, crc: int) -> None:
        seg, lay = self._locate(si, sl, "commit")
        blk = seg.blocks.get(sl)
        me = client.ident
        if (blk is not None and blk.state == L.ENTRY_COMMITTED and blk.owner == me and blk.generation == gen
                and blk.key == key and self.index.get(key) == (si, sl)):
            return  # a retried commit whose first answer was lost
        if seg.owner != me:
            owner = f"client slot {seg.owner[0]} epoch {seg.owner[1]}" if seg.owner else "no client (sealed)"
            raise _Reject(rpc.NOT_OWNER, f"commit: segment {si} is owned by {owner}, not by you "
                                         f"(slot {me[0]} epoch {me[1]})")
        if blk is None or blk.state != L.ENTRY_RESERVED or blk.owner != me or blk.generation != gen:
            what = "free" if blk is None else ("committed" if blk.state == L.ENTRY_COMMITTED else
                                               f"reserved with generation {blk.generation}")
            raise _Reject(rpc.NOT_RESERVED, f"commit: slot {sl} of segment {si} is {what}, not reserved by you "
                                            f"with generation {gen} (expired or reclaimed reservation?)")
        try:
            if length > lay.data_slot_bytes:
                raise _Reject(rpc.BAD_REQUEST, f"commit: length {length} exceeds the slot's "
                                               f"{lay.data_slot_bytes} bytes")
            hoff = self.g.header_offset(si, sl)
            raw = bytes(self.buf[hoff : hoff + L.BLOCK_HEADER_BYTES])  # one snapshot: the client may write on
            if not L.block_header_matches(raw, key, gen, length, crc):  # else: say what differs
                self._reject_header(raw, si, sl, (L.BLOCK_COMPLETE, length, gen, crc, key))
        except _Reject:
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
        self._maybe_seal(seg)

    @staticmethod
    def _reject_header(raw: bytes, si: int, sl: int, expect: tuple) -> None:
        """A commit whose block header is not the COMPLETE header of exactly this block: say why."""
        hdr = L.BlockHeader.decode(raw)
        if hdr is None:
            raise _Reject(rpc.BAD_HEADER, f"commit: block header of segment {si} slot {sl} is missing or "
                                          f"damaged (write the header before committing)")
        got = (hdr.state, hdr.length_bytes, hdr.generation, hdr.data_crc, hdr.key)
        names = ("state", "length", "generation", "crc", "key")
        diffs = ", ".join(f"{n} header={a!r:.20} request={b!r:.20}" for n, a, b in zip(names, got, expect) if a != b)
        raise _Reject(rpc.BAD_HEADER, f"commit: block header of segment {si} slot {sl} does not match "
                                      f"the request ({diffs})")

    def _abort_one(self, client: _Client, si: int, sl: int, gen: int) -> None:
        seg, _ = self._locate(si, sl, "abort")
        blk = seg.blocks.get(sl)
        if blk is None or blk.state != L.ENTRY_RESERVED or blk.owner != client.ident or blk.generation != gen:
            raise _Reject(rpc.NOT_RESERVED, f"abort: slot {sl} of segment {si} is not reserved by you "
                                            f"with generation {gen}")
        client.reservations.discard((si, sl))
        self._free_slot(seg, sl)
        self._maybe_seal(seg)

    def _drop_lease(self, lease_id: int) -> None:
        entry = self.leases.pop(lease_id, None)
        if entry is None:
            return
        cslot, si, sl, _ = entry
        c = self.clients.get(cslot)
        if c is not None:
            c.leases.discard(lease_id)
        seg = self.segments[si]
        blk = seg.blocks.get(sl)
        if blk is None:
            return
        blk.leases -= 1
        if blk.leases == 0 and blk.zombie:
            self._free_slot(seg, sl)

    def evict(self, count: int) -> int:
        """Evict up to ``count`` least recently used blocks that no reader holds."""
        self._drain_touches()
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

    # ------------------------------------------------------------ clients
    def _grant(self, slot: int, nonce: int, transport: str) -> _Client:
        base = self.g.host_slot_offset(slot)
        _, req_seq, hb = _QQQ.unpack_from(self.buf, base + L.CLIENT_LINE_OFFSET)
        _, _, epoch = _QQQ.unpack_from(self.buf, base + L.SERVICE_LINE_OFFSET)
        epoch += 1
        # resp_seq = the client line's current req_seq: nothing is pending for the new owner.
        # The owner nonce is written last; the claimant waits for it.
        struct.pack_into("<QQ", self.buf, base + L.SERVICE_LINE_OFFSET + L.SL_RESP_SEQ, req_seq, epoch)
        struct.pack_into("<Q", self.buf, base + L.SERVICE_LINE_OFFSET + L.SL_OWNER, nonce)
        c = _Client(slot, nonce, epoch, hb, self.clock(), req_seq, transport)
        self.clients[slot] = c
        self._touch_tail[slot] = L.read_touch_head(self.buf, self.g, slot)
        self._pool_clients = None
        self.counters["clients_registered"] += 1
        return c

    def reap(self, slot: int, reason: str) -> None:
        """Forget a client: end its leases and reservations, drop its segments, free its slot."""
        c = self.clients.pop(slot)
        self._pool_clients = None
        for lid in list(c.leases):
            self._drop_lease(lid)
        for si, sl in list(c.reservations):
            seg = self.segments[si]
            if sl in seg.blocks and seg.blocks[sl].state == L.ENTRY_RESERVED:
                self._free_slot(seg, sl)
                self.counters["reservations_reclaimed"] += 1
        for seg in self.segments:
            if seg.state == L.SEG_OPEN and seg.owner == c.ident:
                self._seal(seg)
        base = self.g.host_slot_offset(slot)
        # Clear the claim before releasing ownership, so nobody can claim a half-released slot.
        struct.pack_into("<Q", self.buf, base + L.CLIENT_LINE_OFFSET + L.CL_CLAIM, 0)
        struct.pack_into("<Q", self.buf, base + L.SERVICE_LINE_OFFSET + L.SL_OWNER, 0)
        self.counters["clients_reaped"] += 1
        if reason:
            _log(f"client slot {slot} epoch {c.epoch} reaped: {reason}")

    def _free_client_slot(self) -> int | None:
        for slot in range(self.g.max_clients):
            if slot in self.clients:
                continue
            base = self.g.host_slot_offset(slot)
            claim = struct.unpack_from("<Q", self.buf, base + L.CLIENT_LINE_OFFSET + L.CL_CLAIM)[0]
            owner = struct.unpack_from("<Q", self.buf, base + L.SERVICE_LINE_OFFSET + L.SL_OWNER)[0]
            if claim == 0 and owner == 0:
                return slot
        return None

    # ------------------------------------------------------------ request dispatch
    def handle(self, raw, *, pool_slot: int | None = None) -> bytes:
        """Answer one encoded request (from any transport) with one encoded response."""
        try:
            req = rpc.decode_request(raw)
        except ProtocolError as exc:
            self.counters["bad_requests"] += 1
            return rpc.encode_response(0, rpc.BAD_REQUEST, f"malformed request: {exc}".encode())
        return self.dispatch(req, pool_slot=pool_slot)

    def dispatch(self, req: rpc.Request, *, pool_slot: int | None = None) -> bytes:
        self.counters["requests"] += 1
        name = rpc.OP_NAMES.get(req.op, f"op{req.op}")
        self._ops_count[name] = self._ops_count.get(name, 0) + 1
        try:
            if req.op == rpc.OP_HELLO:
                return rpc.encode_response(req.seq, rpc.OK, self._op_hello(req))
            client = self.clients.get(req.slot)
            if (pool_slot is not None and req.slot != pool_slot) or client is None or client.nonce != req.nonce:
                raise _Reject(rpc.UNKNOWN_SESSION,
                              f"client slot {req.slot} with this nonce is not registered (heartbeat timed out "
                              f"or slot reclaimed); register again")
            self._drain_touches()  # reads posted before this request come first in LRU order
            for lid in req.releases:
                entry = self.leases.get(lid)
                if entry is not None and entry[0] == client.slot:  # only your own leases
                    self._drop_lease(lid)
            handler = self._HANDLERS.get(req.op)
            if handler is None:
                raise _Reject(rpc.BAD_REQUEST, f"unknown op {req.op} (known: {sorted(rpc.OP_NAMES)})")
            return rpc.encode_response(req.seq, rpc.OK, handler(self, client, req))
        except _Reject as r:
            self.counters["bad_requests"] += r.code in (rpc.BAD_REQUEST,)
            return rpc.encode_response(req.seq, r.code, r.message.encode())
        except ProtocolError as exc:
            self.counters["bad_requests"] += 1
            return rpc.encode_response(req.seq, rpc.BAD_REQUEST, f"malformed {name} body: {exc}".encode())
        except Exception as exc:  # keep serving others; report the failure to this client
            _log(f"internal error in {name}: {traceback.format_exc()}")
            return rpc.encode_response(req.seq, rpc.INTERNAL, f"{type(exc).__name__}: {exc}".encode())

    def _op_hello(self, req: rpc.Request) -> bytes:
        try:
            nonce, resume, _pid, _host = rpc.HELLO_REQ.unpack_from(req.body)
        except struct.error:
            raise _Reject(rpc.BAD_REQUEST, "hello: body is not nonce/slot/pid/host") from None
        if nonce == 0:
            raise _Reject(rpc.BAD_REQUEST, "hello: nonce must not be 0")
        c = self.clients.get(resume)
        if c is None or c.nonce != nonce:
            slot = self._free_client_slot()
            if slot is None:
                raise _Reject(rpc.NO_CLIENT_SLOT, f"no free client slot: all {self.g.max_clients} are in use "
                                                  f"(format the pool with more --max-clients)")
            c = self._grant(slot, nonce, "tcp")
        return rpc.HELLO_RESP.pack(c.slot, c.epoch)

    def _op_nop(self, client, req) -> bytes:
        return b""

    def _op_bye(self, client, req) -> bytes:
        self.reap(client.slot, "")
        return b""

    def _op_alloc(self, client, req) -> bytes:
        rows, _, _ = rpc.ALLOC_REQ.unpack(req.body)
        out, errors = [], {}
        for i, (length,) in enumerate(rows):
            try:
                a = self._alloc_one(client, length)
                out.append((rpc.OK, a.segment, a.slot, a.generation, a.header_offset, a.data_offset,
                            a.capacity_bytes))
            except _Reject as r:
                self.counters["rejected_items"] += 1
                out.append((r.code, 0, 0, 0, 0, 0, 0))
                errors[i] = r.message
        return rpc.ALLOC_RESP.pack(out, errors)

    def _op_commit(self, client, req) -> bytes:
        rows, _, _ = rpc.COMMIT_REQ.unpack(req.body)
        out, errors = [], {}
        for i, (key, si, sl, gen, length, crc) in enumerate(rows):
            try:
                self._commit_one(client, key, si, sl, gen, length, crc)
                out.append((rpc.OK,))
            except _Reject as r:
                self.counters["rejected_items"] += 1
                out.append((r.code,))
                errors[i] = r.message
        return rpc.STATUS_RESP.pack(out, errors)

    def _op_abort(self, client, req) -> bytes:
        rows, _, _ = rpc.ABORT_REQ.unpack(req.body)
        out, errors = [], {}
        for i, (si, sl, gen) in enumerate(rows):
            try:
                self._abort_one(client, si, sl, gen)
                out.append((rpc.OK,))
            except _Reject as r:
                out.append((r.code,))
                errors[i] = r.message
        return rpc.STATUS_RESP.pack(out, errors)

    def _op_lookup(self, client, req) -> bytes:
        rows, _, _ = rpc.KEYS_REQ.unpack(req.body)
        lease = bool(req.flags & rpc.LOOKUP_LEASE)
        stop = bool(req.flags & rpc.LOOKUP_STOP_AT_MISS)
        expiry = self.clock() + self.cfg.lease_ttl_s
        out = []
        for (key,) in rows:
            self.counters["lookups"] += 1
            where = self.index.get(key)
            if where is None:
                self.counters["misses"] += 1
                if stop:
                    break
                out.append((rpc.MISS, 0, 0, 0, 0, 0, 0, 0, 0))
                continue
            self.counters["hits"] += 1
            si, sl = where
            seg = self.segments[si]
            blk = seg.blocks[sl]
            self.index.move_to_end(key)
            self._touch += 1
            blk.touch = self._touch
            lid = 0
            if lease:
                lid = self._next_lease
                self._next_lease += 1
                self.leases[lid] = (client.slot, si, sl, expiry)
                client.leases.add(lid)
                blk.leases += 1
                self.counters["leases_granted"] += 1
            base = self.g.segment_offset(si)
            out.append((rpc.OK, si, sl, blk.generation, self.g.header_offset(si, sl),
                        base + seg.layout.data_offset(sl), blk.length, blk.crc, lid))
        return rpc.LOOKUP_RESP.pack(out)

    def _op_delete(self, client, req) -> bytes:
        rows, _, _ = rpc.KEYS_REQ.unpack(req.body)
        out = []
        for (key,) in rows:
            if key in self.index:
                self._unindex(key)
                self.counters["deletes"] += 1
                out.append((rpc.OK,))
            else:
                out.append((rpc.MISS,))
        return rpc.STATUS_RESP.pack(out)

    def _op_report(self, client, req) -> bytes:
        rows, _, _ = rpc.REPORT_REQ.unpack(req.body)
        out = []
        for key, gen in rows:
            self.counters["corrupt_reports"] += 1
            where = self.index.get(key)
            if where is not None and self.segments[where[0]].blocks[where[1]].generation == gen:
                # The reader held a lease on this very generation, so the slot was not reused
                # under it: the committed bytes themselves are bad. Stop handing them out.
                self._unindex(key)
                self.counters["corrupt_blocks_dropped"] += 1
                out.append((rpc.OK,))
            else:
                out.append((rpc.MISS,))
        return rpc.STATUS_RESP.pack(out)

    def _op_evict(self, client, req) -> bytes:
        try:
            (count,) = rpc.EVICT_REQ.unpack_from(req.body)
        except struct.error:
            raise _Reject(rpc.BAD_REQUEST, "evict: body must be a u32 count") from None
        return rpc.EVICT_RESP.pack(self.evict(count))

    def _op_stats(self, client, req) -> bytes:
        return json.dumps(self.stats()).encode()

    _HANDLERS = {
        rpc.OP_NOP: _op_nop, rpc.OP_BYE: _op_bye, rpc.OP_ALLOC: _op_alloc, rpc.OP_COMMIT: _op_commit,
        rpc.OP_ABORT: _op_abort, rpc.OP_LOOKUP: _op_lookup, rpc.OP_DELETE: _op_delete, rpc.OP_REPORT: _op_report,
        rpc.OP_EVICT: _op_evict, rpc.OP_STATS: _op_stats,
    }

    # ------------------------------------------------------------ stats and invariants
    def stats(self) -> dict:
        self._drain_touches()
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
            "pool": self.pool.path,
            "segment_count": self.g.segment_count,
            "segment_size_bytes": self.g.segment_size_bytes,
            "segments": seg_states,
            "slots_total": slots_total,
            "slots_free": slots_free,
            "blocks": len(self.index),
            "committed_bytes": committed_bytes,
            "reserved": reserved,
            "zombies": zombies,
            "leases": len(self.leases),
            "clients": [{"slot": c.slot, "epoch": c.epoch, "transport": c.transport,
                         "leases": len(c.leases), "reservations": len(c.reservations)}
                        for c in self.clients.values()],
            "counters": dict(self.counters),
            "ops": dict(self._ops_count),
            "recovery": dict(self.recovery),
            "uptime_s": round(self.clock() - self.started_at, 3),
            "pid": os.getpid(),
            "restarts": self._restarts,
            "tcp": self._tcp.stats() if self._tcp is not None else None,
        }

    def check_invariants(self) -> None:
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
                assert not seg.blocks and seg.index in self._free_segments, seg.index
                continue
            assert seg.index not in self._free_segments, seg.index
            assert set(seg.free).isdisjoint(seg.blocks), seg.index
            assert len(seg.free) + len(seg.blocks) == seg.layout.slot_count, seg.index
            for sl, blk in seg.blocks.items():
                e = L.IndexEntry.decode(self.buf[self.g.index_entry_offset(seg.index, sl):
                                                 self.g.index_entry_offset(seg.index, sl) + L.INDEX_ENTRY_BYTES])
                if blk.state == L.ENTRY_COMMITTED and not blk.zombie:
                    assert (seg.index, sl) in seen, (seg.index, sl)
                    assert e is not None and e.state == L.ENTRY_COMMITTED and e.key == blk.key
                elif blk.state == L.ENTRY_RESERVED:
                    assert e is not None and e.state == L.ENTRY_RESERVED
                    assert (seg.index, sl) in self.clients[blk.owner[0]].reservations
                if blk.zombie:
                    assert blk.leases > 0
        leased: dict[tuple[int, int], int] = {}
        for cslot, si, sl, _ in self.leases.values():
            leased[(si, sl)] = leased.get((si, sl), 0) + 1
        for seg in self.segments:
            for sl, blk in seg.blocks.items():
                assert blk.leases == leased.get((seg.index, sl), 0), (seg.index, sl)

    # ------------------------------------------------------------ the loop
    def poll_pool(self, *, claims: bool = True) -> bool:
        """One pass over the host slots. True if it did work.

        Requests of registered clients are checked on every pass (one 8-byte read
        per client); with ``claims`` every slot is also checked for a new claim
        and every client's heartbeat counter is read. The serve loop asks for
        that part only every ``claim_scan_interval_s``: registration and liveness
        are not latency-critical, and skipping the free slots keeps a pass short.
        """
        worked = self._poll_claims_and_heartbeats() if claims else False
        if self.cfg.serve_cxl:
            buf = self.buf
            req_at = self._req_seq_at
            pool_clients = self._pool_clients
            if pool_clients is None or len(self.clients) != self._clients_total:
                # TCP clients never post requests in the pool: skip them on every pass.
                pool_clients = self._pool_clients = tuple(c for c in self.clients.values() if c.transport != "tcp")
                self._clients_total = len(self.clients)
            for c in pool_clients:
                req_seq = _U64.unpack_from(buf, req_at[c.slot])[0]
                if req_seq != c.handled_seq:
                    worked |= self._serve_pool_request(c, req_seq, self.clock())
        return worked

    def _poll_claims_and_heartbeats(self) -> bool:
        now = self.clock()
        worked = False
        g = self.g
        buf = self.buf
        for slot in range(g.max_clients):
            base = g.host_slot_offset(slot)
            claim, _req_seq, hb = _QQQ.unpack_from(buf, base)
            c = self.clients.get(slot)
            if c is None:
                if claim and self.cfg.serve_cxl:
                    owner = struct.unpack_from("<Q", buf, base + L.SERVICE_LINE_OFFSET)[0]
                    if owner == 0:
                        self._grant(slot, claim, "cxl")
                        worked = True
                continue
            if hb != c.heartbeat:
                c.heartbeat = hb
                c.seen_at = now
        self._drain_touches()
        return worked

    def _serve_pool_request(self, c: _Client, req_seq: int, now: float) -> bool:
        g = self.g
        roff = g.request_offset(c.slot)
        try:
            length = rpc.request_length(self.buf[roff : roff + rpc.REQUEST_HEADER.size])
            if length > g.rpc_buffer_bytes:
                raise ProtocolError(f"request of {length} bytes exceeds the {g.rpc_buffer_bytes}-byte buffer")
            req = rpc.decode_request(self.buf[roff : roff + length])
            if req.seq != req_seq:
                raise ProtocolError(f"request buffer holds seq {req.seq}, the slot announced {req_seq}")
        except (ProtocolError, struct.error) as exc:
            # Probably the client is rewriting the buffer right now; give it a moment.
            if c.bad_seq != req_seq:
                c.bad_seq, c.bad_since = req_seq, now
                return False
            if now - c.bad_since < self.cfg.bad_request_grace_s:
                return False
            self.counters["bad_requests"] += 1
            resp = rpc.encode_response(req_seq, rpc.BAD_REQUEST, f"malformed request: {exc}".encode())
        else:
            resp = self.dispatch(req, pool_slot=c.slot)
        if len(resp) > g.rpc_buffer_bytes:
            resp = rpc.encode_response(req_seq, rpc.INTERNAL, b"response larger than the slot's buffer; "
                                                              b"send fewer items per request")
        poff = g.response_offset(c.slot)
        self.buf[poff : poff + len(resp)] = resp
        struct.pack_into("<Q", self.buf, g.host_slot_offset(c.slot) + L.SERVICE_LINE_OFFSET + L.SL_RESP_SEQ, req_seq)
        c.handled_seq = req_seq
        return True

    def housekeeping(self, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.cfg.housekeeping_interval_s
        area = self._read_area()
        if area.nonce != self.nonce:
            raise ServiceBusyError(f"another metadata service (pid {area.pid} on {area.host or '?'}) took over "
                                   f"{self.pool.path}; this one stops")
        self._area_heartbeat += 1
        struct.pack_into("<Q", self.buf, self.g.service_offset + L.SA_HEARTBEAT, self._area_heartbeat)
        for slot, c in list(self.clients.items()):
            if now - c.seen_at > self.cfg.heartbeat_timeout_s:
                self.reap(slot, f"heartbeat stopped for {now - c.seen_at:.1f}s "
                                f"(timeout {self.cfg.heartbeat_timeout_s}s)")
        expired = [lid for lid, (_, _, _, exp) in self.leases.items() if exp <= now]
        for lid in expired:
            self._drop_lease(lid)
        self.counters["leases_expired"] += len(expired)
        for c in self.clients.values():
            for si, sl in list(c.reservations):
                blk = self.segments[si].blocks.get(sl)
                if blk is not None and blk.state == L.ENTRY_RESERVED and blk.deadline <= now:
                    c.reservations.discard((si, sl))
                    self._free_slot(self.segments[si], sl)
                    self._maybe_seal(self.segments[si])
                    self.counters["reservations_expired"] += 1

    def serve(self, stop: threading.Event | None = None, *, on_ready=None) -> None:
        """Run until ``stop`` is set. Pool requests are polled with a short, growing backoff."""
        stop = stop or threading.Event()
        tcp = None
        try:
            if self.cfg.tcp_host is not None:
                tcp = self._tcp = TcpServer(self, self.cfg.tcp_host, self.cfg.tcp_port, log=_log)
                host, port = tcp.address
                self.set_tcp_address(self.cfg.advertise or f"{host}:{port}")
            if on_ready is not None:
                on_ready(self)
            sleep_s = self.cfg.poll_min_sleep_s
            last_work = time.monotonic()
            next_scan = 0.0
            last_pass = self.clock()
            reduce_timer_slack()
            while not stop.is_set():
                t = time.monotonic()
                scan = t >= next_scan
                if scan:
                    next_scan = t + self.cfg.claim_scan_interval_s
                worked = self.poll_pool(claims=scan)
                if tcp is not None:
                    worked |= tcp.poll(0)
                now = self.clock()
                if now - last_pass > self.cfg.stall_threshold_s:
                    self._forgive_stall(now - last_pass)
                self.housekeeping()
                last_pass = self.clock()
                if worked:
                    sleep_s = self.cfg.poll_min_sleep_s
                    last_work = time.monotonic()
                    continue
                idle_s = time.monotonic() - last_work
                if idle_s < self.cfg.poll_spin_s:
                    os.sched_yield()  # hot: the next request is probably microseconds away
                    continue
                # Idle: back off so that several processes on few cores do not starve each other.
                if tcp is not None and sleep_s >= 1e-3:
                    # Long idle: block in epoll (TCP requests wake us at once). Its timeout has
                    # millisecond resolution, so shorter sleeps use time.sleep below instead
                    # (TCP sockets are checked without blocking on every pass anyway).
                    if tcp.poll(sleep_s):
                        sleep_s = self.cfg.poll_min_sleep_s
                        continue
                else:
                    time.sleep(sleep_s)
                cap = self.cfg.poll_warm_max_sleep_s if idle_s < self.cfg.poll_warm_s else self.cfg.poll_max_sleep_s
                sleep_s = min(sleep_s * 2, cap)
        finally:
            if tcp is not None:
                tcp.close()

    def _forgive_stall(self, gap_s: float) -> None:
        """The loop did not run for ``gap_s``: that time must not count against any client's heartbeat.

        A stalled service cannot see heartbeats, so without this every client would look dead
        the moment the loop resumes (a blocking send to a client that never read once made the
        service reap every healthy client)."""
        now = self.clock()
        for c in self.clients.values():
            c.seen_at = min(c.seen_at + gap_s, now)
        self.counters["stalls_forgiven"] += 1
        _log(f"service loop stalled for {gap_s:.2f}s; client heartbeat deadlines moved by as much")


class ServiceThread:
    """Run a service in a background thread of this process (tests, embedding)."""

    def __init__(self, pool_path: str, config: ServiceConfig = ServiceConfig()) -> None:
        self.pool = Pool.open(pool_path)
        self.service = MetadataService(self.pool, config)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="beluga-service", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        try:
            self.service.serve(self._stop, on_ready=lambda _s: self._ready.set())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            self._ready.set()

    def stop(self, *, clean: bool = True) -> None:
        self._stop.set()
        self._thread.join(10)
        if clean:
            self.service.release_pool()
        self.pool.close()
        if self.error is not None:
            raise self.error
