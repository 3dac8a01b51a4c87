"""The metadata service: one pool's owner, composed of the parts that do the work.

``MetadataService`` claims the pool (the service area), recovers (client slots
here, blocks in ``BlockIndex.recover``), registers and reaps clients, dispatches
requests to the index (``beluga.index``: segments, blocks, leases, eviction, the
lookup table) and runs the loop: one thread polls the pool's request slots
(``beluga.cxlrpc.CxlServer``), the TCP sockets (``beluga.tcprpc.TcpServer``)
and the clock. It is the only writer of the service area and of the service
lines of host slots; the index is the only writer of the segment table, the
index entries and the lookup table. Every piece of state that must survive it
(segment ownership, reservations, committed entries, client slots) is written
to the pool *before* a request is answered, so a service restarted on any host
rebuilds everything by reading metadata only.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from . import layout as L
from . import rpc
from .cxlrpc import CxlServer, reduce_timer_slack
from .errors import CorruptPoolError, ProtocolError, ServiceBusyError
from .index import BlockIndex, Holder, RecoveryRefused, Reject
from .pool import Pool
from .tcprpc import TcpServer


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
    poll_unattended_sleep_s: float = 1e-2
    """With no client registered at all, idle sleeps grow to this: a claim is then granted within
    about this long, a TCP request still wakes the service at once, and a service nobody uses
    wakes 100 times a second instead of 1000 (each wake-up costs 20-40 us of CPU here, more in
    a TCG guest)."""
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
    """How often the serve loop looks at free host slots for claims, reads heartbeats and drains
    the touch rings (requests of registered clients are looked at on every pass)..."""
    claim_scan_idle_interval_s: float = 0.01
    """...and how often once no request came for ``poll_warm_s``: clients that only read (gets need
    no service) then leave it idle, and a scan of every slot each millisecond took 7-10 % of a
    core from them (two readers on two cores). A claim waits at most this long more; heartbeat
    timeouts are seconds; a touch ring (2048 entries) holds far more reads than come in 10 ms."""
    stall_threshold_s: float = 0.25
    """A gap this long between two passes of the serve loop is the service's own stall (a GC pause,
    a descheduled or stopped process, slow pool memory): client heartbeat deadlines move by the gap,
    so clients are never reaped for time in which the service could not watch them."""
    # Limits on TCP clients (see beluga/tcprpc.py and docs/store.md). Frames are capped at the
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


class Client(Holder):
    """A registered client's session: what the index knows (slot, epoch, leases, reservations) and
    what the service needs to talk to it and watch it."""

    __slots__ = ("nonce", "heartbeat", "seen_at", "handled_seq", "transport", "bad_seq", "bad_since")

    def __init__(self, slot, nonce, epoch, heartbeat, seen_at, handled_seq, transport):
        super().__init__(slot, epoch)
        self.nonce = nonce
        self.heartbeat = heartbeat
        self.seen_at = seen_at
        self.handled_seq = handled_seq
        self.transport = transport
        self.bad_seq = None
        self.bad_since = 0.0


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
        self.blocks = BlockIndex(self.buf, self.g, counters=self.counters,
                                 reservation_ttl_s=config.reservation_ttl_s, persist_high_water=self._persist_high_water)
        self.clients: dict[int, Client] = {}
        self._next_housekeeping = 0.0
        self._tcp_address = ""
        self.started_at = clock()
        self.recovery: dict[str, int | float] = {}
        self.cxl = CxlServer(self)
        self._claim_service()
        # Lease ids must never repeat across restarts: a release of a pre-restart lease
        # must not end a lease granted by this instance.
        self.blocks.next_lease = (self._restarts << 40) + 1
        self._recover()

    # ------------------------------------------------------------ service area
    def _read_area(self) -> L.ServiceArea:
        return L.read_service_area(self.buf, self.g)

    def _write_area(self) -> None:
        area = L.ServiceArea(self.nonce, self._area_heartbeat, os.getpid(), self._restarts, self.blocks.gen_high_water,
                             self._started_unix_ns, socket.gethostname(), self._tcp_address)
        L.write_service_area(self.buf, self.g, area)

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
        self.blocks.gen_high_water = area.generation_high_water
        self._started_unix_ns = time.time_ns()
        self._write_area()

    @property
    def tcp_address(self) -> str:
        """host:port that TCP clients find in the pool ("" without TCP)."""
        return self._tcp_address

    def set_tcp_address(self, address: str) -> None:
        self._tcp_address = address
        self._write_area()

    def release_pool(self) -> None:
        """Clean shutdown: mark the pool as having no service (clients fail fast, a successor needs no wait)."""
        if self._read_area().nonce == self.nonce:
            self.nonce = 0
            self._tcp_address = ""
            self._write_area()

    def _persist_high_water(self, value: int) -> None:
        self._write_area()  # the index set blocks.gen_high_water = value

    # The index's state, under the names tests and tools have always used.
    @property
    def index(self):
        """key -> (segment, slot) of every committed block, least recently used first."""
        return self.blocks.index

    @property
    def segments(self):
        return self.blocks.segments

    @property
    def leases(self):
        return self.blocks.leases

    @property
    def table(self):
        return self.blocks.table

    @property
    def _free_segments(self):
        return self.blocks.free_segments

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
            owner, resp_seq, epoch = L.read_service_line(self.buf, g, slot)
            if epoch >= L.MAX_EPOCH:
                raise self._refuse(f"client slot {slot}: service line: epoch {epoch} does not fit the 32-bit owner "
                                   f"epoch of segment and index records", checksummed=False)
            if owner:
                hb = L.read_heartbeat(self.buf, g, slot)
                # Liveness restarts now: a client gets a full timeout to show its heartbeat.
                self.clients[slot] = Client(slot, owner, epoch, hb, now, resp_seq, "resumed")
                self.blocks.follow_touches(slot)  # LRU order is soft state
        try:
            counts = self.blocks.recover(self.clients, now)
        except RecoveryRefused as exc:
            raise self._refuse(exc.what, checksummed=exc.checksummed) from None
        self.recovery = {**counts, "clients": len(self.clients), "duration_s": round(time.perf_counter() - t0, 6)}

    # ------------------------------------------------------------ the index's entry points
    def drain_touches(self) -> None:
        """Apply the reads clients posted in their touch rings to the LRU order."""
        self.blocks.drain_touches(self.clients)

    def evict(self, count: int) -> int:
        """Evict up to ``count`` least recently used blocks that no reader holds."""
        self.drain_touches()
        return self.blocks.evict(count)

    # ------------------------------------------------------------ clients
    def grant(self, slot: int, nonce: int, transport: str) -> Client:
        _, req_seq, hb = L.read_client_line(self.buf, self.g, slot)
        epoch = L.read_epoch(self.buf, self.g, slot) + 1
        # resp_seq = the client line's current req_seq: nothing is pending for the new owner.
        # The owner nonce is written last; the claimant waits for it.
        L.write_grant(self.buf, self.g, slot, resp_seq=req_seq, epoch=epoch)
        L.publish_owner(self.buf, self.g, slot, nonce)
        c = Client(slot, nonce, epoch, hb, self.clock(), req_seq, transport)
        self.clients[slot] = c
        self.blocks.follow_touches(slot)
        self.cxl.clients_changed()
        self.counters["clients_registered"] += 1
        return c

    def reap(self, slot: int, reason: str) -> None:
        """Forget a client: end its leases and reservations, drop its segments, free its slot."""
        c = self.clients.pop(slot)
        self.cxl.clients_changed()
        self.blocks.release_holder(c)
        # Clear the claim before releasing ownership, so nobody can claim a half-released slot.
        L.publish_claim(self.buf, self.g, slot, 0)
        L.publish_owner(self.buf, self.g, slot, 0)
        self.counters["clients_reaped"] += 1
        if reason:
            _log(f"client slot {slot} epoch {c.epoch} reaped: {reason}")

    def _free_client_slot(self) -> int | None:
        for slot in range(self.g.max_clients):
            if slot in self.clients:
                continue
            if L.read_claim(self.buf, self.g, slot) == 0 and L.read_owner(self.buf, self.g, slot) == 0:
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
                raise Reject(rpc.UNKNOWN_SESSION,
                              f"client slot {req.slot} with this nonce is not registered (heartbeat timed out "
                              f"or slot reclaimed); register again")
            self.drain_touches()  # reads posted before this request come first in LRU order
            self.blocks.release_leases(client, req.releases)
            handler = self._HANDLERS.get(req.op)
            if handler is None:
                raise Reject(rpc.BAD_REQUEST, f"unknown op {req.op} (known: {sorted(rpc.OP_NAMES)})")
            return rpc.encode_response(req.seq, rpc.OK, handler(self, client, req))
        except Reject as r:
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
            nonce, resume, _pid, _host = rpc.decode_hello(req.body)
        except ProtocolError as exc:
            raise Reject(rpc.BAD_REQUEST, str(exc)) from None
        if nonce == 0:
            raise Reject(rpc.BAD_REQUEST, "hello: nonce must not be 0")
        c = self.clients.get(resume)
        if c is None or c.nonce != nonce:
            slot = self._free_client_slot()
            if slot is None:
                raise Reject(rpc.NO_CLIENT_SLOT, f"no free client slot: all {self.g.max_clients} are in use "
                                                  f"(format the pool with more --max-clients)")
            c = self.grant(slot, nonce, "tcp")
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
                a = self.blocks.alloc_one(client, length, self.clock())
                out.append((rpc.OK, a.segment, a.slot, a.generation, a.header_offset, a.data_offset,
                            a.capacity_bytes))
            except Reject as r:
                self.counters["rejected_items"] += 1
                out.append((r.code, 0, 0, 0, 0, 0, 0))
                errors[i] = r.message
        return rpc.ALLOC_RESP.pack(out, errors)

    def _op_commit(self, client, req) -> bytes:
        rows, _, _ = rpc.COMMIT_REQ.unpack(req.body)
        out, errors = [], {}
        for i, (key, si, sl, gen, length, crc) in enumerate(rows):
            try:
                self.blocks.commit_one(client, key, si, sl, gen, length, crc)
                out.append((rpc.OK,))
            except Reject as r:
                self.counters["rejected_items"] += 1
                out.append((r.code,))
                errors[i] = r.message
        return rpc.STATUS_RESP.pack(out, errors)

    def _op_abort(self, client, req) -> bytes:
        rows, _, _ = rpc.ABORT_REQ.unpack(req.body)
        out, errors = [], {}
        for i, (si, sl, gen) in enumerate(rows):
            try:
                self.blocks.abort_one(client, si, sl, gen)
                out.append((rpc.OK,))
            except Reject as r:
                out.append((r.code,))
                errors[i] = r.message
        return rpc.STATUS_RESP.pack(out, errors)

    def _op_lookup(self, client, req) -> bytes:
        rows, _, _ = rpc.KEYS_REQ.unpack(req.body)
        lease = bool(req.flags & rpc.LOOKUP_LEASE)
        stop = bool(req.flags & rpc.LOOKUP_STOP_AT_MISS)
        expiry = self.clock() + self.cfg.lease_ttl_s if lease else None
        out = []
        for (key,) in rows:
            self.counters["lookups"] += 1
            row = self.blocks.lookup_one(client, key, lease_expiry=expiry)
            if row is None:
                self.counters["misses"] += 1
                if stop:
                    break
                out.append((rpc.MISS, 0, 0, 0, 0, 0, 0, 0, 0))
                continue
            self.counters["hits"] += 1
            out.append((rpc.OK, *row))
        return rpc.LOOKUP_RESP.pack(out)

    def _op_delete(self, client, req) -> bytes:
        rows, _, _ = rpc.KEYS_REQ.unpack(req.body)
        out = []
        for (key,) in rows:
            if self.blocks.delete(key):
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
            # The reader held a lease on this very generation, so the slot was not reused
            # under it: the committed bytes themselves are bad. Stop handing them out.
            if self.blocks.drop_if_current(key, gen):
                self.counters["corrupt_blocks_dropped"] += 1
                out.append((rpc.OK,))
            else:
                out.append((rpc.MISS,))
        return rpc.STATUS_RESP.pack(out)

    def _op_evict(self, client, req) -> bytes:
        try:
            count = rpc.decode_evict(req.body)
        except ProtocolError as exc:
            raise Reject(rpc.BAD_REQUEST, str(exc)) from None
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
        self.drain_touches()
        return {
            "pool": self.pool.path,
            "segment_count": self.g.segment_count,
            "segment_size_bytes": self.g.segment_size_bytes,
            **self.blocks.stats(),
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
        self.blocks.check_invariants(self.clients)

    # ------------------------------------------------------------ the loop
    def poll_pool(self, *, claims: bool = True) -> bool:
        """One pass of the pool transport (``CxlServer.poll``). True if it did work."""
        return self.cxl.poll(claims=claims)

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
        L.write_service_heartbeat(self.buf, self.g, self._area_heartbeat)
        for slot, c in list(self.clients.items()):
            if now - c.seen_at > self.cfg.heartbeat_timeout_s:
                self.reap(slot, f"heartbeat stopped for {now - c.seen_at:.1f}s "
                                f"(timeout {self.cfg.heartbeat_timeout_s}s)")
        self.blocks.expire(self.clients, now)

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
                    idle = t - last_work >= self.cfg.poll_warm_s
                    next_scan = t + (self.cfg.claim_scan_idle_interval_s if idle else self.cfg.claim_scan_interval_s)
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
                if idle_s < self.cfg.poll_warm_s:
                    cap = self.cfg.poll_warm_max_sleep_s
                else:
                    cap = self.cfg.poll_max_sleep_s if self.clients else self.cfg.poll_unattended_sleep_s
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
