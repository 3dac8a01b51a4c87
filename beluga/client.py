"""The Beluga client: one API over every transport.

Data path: ``put`` asks the service for a slot (ALLOC), writes the block
header (state WRITING), the data and then the header again (state COMPLETE,
with the data checksum) straight into pool memory, and asks the service to
COMMIT it; only then does any reader see it. ``get`` finds the key in the
pool's lookup table (written only by the service; read seqlock-style, no
round trip), reads header and data straight from pool memory, verifies key,
generation, length and checksum, and re-reads the header to make sure the
slot was not reused during the copy (beluga/readpath.py). Any mismatch is a
counted, reported miss, never a torn block. The read is posted into the
client's touch ring for the service's LRU order. Zero-copy views still ask
the service (LOOKUP with a lease); lease releases ride on the next request.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, fields
from typing import Iterable, Sequence

from . import layout as L
from . import readpath, rpc
from .checksum import CRC32, checksum, copy_and_checksum
from .errors import (
    BelugaError, BlockTooLargeError, PoolFullError, ProtocolError, RequestRejectedError, ServiceUnavailableError,
    SessionExpiredError,
)
from .keys import check_key
from .pool import Pool
from .cxlrpc import CxlChannel
from .tcprpc import TcpChannel


_SESSION_BOUND_OPS = (rpc.OP_COMMIT, rpc.OP_ABORT)
"""Requests about reservations, which end with the session: sent again under a new session they
would name slots that are no longer (or never were) that session's. The caller learns
SessionExpiredError instead, and a put allocates again."""


@dataclass(frozen=True)
class ClientStats:
    puts: int = 0
    put_bytes: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    corrupt_misses: int = 0
    """Lookups that hit but whose bytes failed verification (torn, reused or damaged): returned as misses."""
    get_bytes: int = 0
    deletes: int = 0
    rpc_calls: int = 0
    rpc_timeouts: int = 0
    reregistrations: int = 0


@dataclass(frozen=True)
class StoreStats:
    client: ClientStats
    service: dict


class BlockView:
    """A verified, zero-copy view of a block in pool memory, held under a lease.

    Use as a context manager; the lease is released on exit. The bytes stay
    valid while the lease lasts (the service's lease TTL); do not write to them.
    """

    def __init__(self, client: "BelugaClient", key: bytes, data: memoryview, lease: int, generation: int) -> None:
        self._client = client
        self.key = key
        self.data = data
        self.lease = lease
        self.generation = generation

    def __enter__(self) -> "BlockView":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.lease:
            self._client.queue_release(self.lease)
            self.lease = 0
        try:
            self.data.release()
        except BufferError:
            pass  # a zero-copy consumer (numpy/torch) still references it; it goes with that object


class BelugaClient:
    """Client of one pool.

    pool:        path of the pool (file or /dev/daxX.Y) or an open Pool
    transport:   "cxl" (request slots in the pool), "tcp", or a channel object
    address:     host:port for TCP (default: the address the service wrote into the pool)
    rpc_timeout_s: every service call raises ServiceUnavailableError after this long
    heartbeat_interval_s: how often the background thread proves this client alive (None: no thread)
    """

    def __init__(
        self,
        pool: str | os.PathLike | Pool,
        *,
        transport="cxl",
        address: str | None = None,
        rpc_timeout_s: float = 3.0,
        heartbeat_interval_s: float | None = 0.25,
    ) -> None:
        self.pool = pool if isinstance(pool, Pool) else Pool.open(pool)
        self._own_pool = not isinstance(pool, Pool)
        self.g = self.pool.geometry
        self.buf = self.pool.buf
        self._algo = self.g.checksum_algorithm
        if transport == "cxl":
            self.channel = CxlChannel(self.pool)
        elif transport == "tcp":
            self.channel = TcpChannel(self.pool, address)
        elif isinstance(transport, str):
            raise ValueError(f"transport must be 'cxl' or 'tcp' (or a channel object), got {transport!r}")
        else:
            self.channel = transport
        self.transport_name = getattr(self.channel, "name", type(self.channel).__name__)
        self.rpc_timeout_s = rpc_timeout_s
        self._lock = threading.RLock()
        self._releases: list[int] = []
        self._counts = {f.name: 0 for f in fields(ClientStats)}
        self._nonce = int.from_bytes(os.urandom(8), "little") | 1
        self._slot: int | None = None
        self._epoch = 0
        self._seq = 0
        self._closed = False
        budget = self.channel.max_message_bytes() - 64 - 8 * rpc.MAX_RELEASES_PER_REQUEST
        self._max_alloc = min(rpc.ALLOC_REQ.max_items(budget, with_messages=False),
                              rpc.ALLOC_RESP.max_items(budget, with_messages=True))
        self._max_commit = min(rpc.COMMIT_REQ.max_items(budget, with_messages=False),
                               rpc.STATUS_RESP.max_items(budget, with_messages=True))
        self._max_keys = min(rpc.KEYS_REQ.max_items(budget, with_messages=False),
                             rpc.LOOKUP_RESP.max_items(budget, with_messages=False))
        self._reader = readpath.reader(self.buf, self.g)  # gets, lookups and touch posting: one call each
        self._touch_seen = 0  # our touch head when the service last drained it (at our last request)
        with self._lock:
            self._register()
        self._hb_stop = threading.Event()
        self._hb_thread = None
        if heartbeat_interval_s:
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, args=(heartbeat_interval_s,),
                                               name="beluga-heartbeat", daemon=True)
            self._hb_thread.start()

    # ------------------------------------------------------------ session
    def _register(self) -> None:
        slot, epoch, seq = self.channel.register(self._nonce, pid=os.getpid(), host=socket.gethostname(),
                                                 timeout_s=self.rpc_timeout_s, resume_slot=self._slot)
        if self._slot is not None and slot != self._slot:
            self._releases.clear()  # leases of the old session died with it
        self._slot, self._epoch, self._seq = slot, epoch, seq
        # The service starts draining our touch ring where its head is now.
        self._touch_seen = L.read_own_touch_head(self.pool.buf, self.g, slot)
        self._reader.set_ring(self.g.touch_ring_offset(slot), self.g.touch_head_offset(slot))

    def _drop_session(self) -> None:
        """Forget our slot (the next call registers again); no touches go into a ring no longer ours."""
        self._slot = None
        self._reader.set_ring(None)

    @property
    def slot(self) -> int | None:
        return self._slot

    def _heartbeat_loop(self, interval_s: float) -> None:
        while not self._hb_stop.wait(interval_s):
            try:
                self.channel.heartbeat()
            except Exception:  # the pool mapping went away during close
                return

    def _call(self, op: int, body: bytes = b"", *, flags: int = 0) -> bytes:
        """One request/response; re-registers once if the service forgot this client."""
        with self._lock:
            if self._closed:
                raise BelugaError("client is closed")
            for attempt in (0, 1):
                if self._slot is None:
                    self._register()
                releases = self._releases[: rpc.MAX_RELEASES_PER_REQUEST]
                self._seq = (self._seq + 1) & 0xFFFFFFFFFFFFFFFF or 1
                msg = rpc.encode_request(self._seq, self._nonce, self._slot, op, body, flags=flags, releases=releases)
                touched = L.read_own_touch_head(self.pool.buf, self.g, self._slot)  # every request drains the rings first
                self._counts["rpc_calls"] += 1
                try:
                    raw = self.channel.call(msg, self._seq, self.rpc_timeout_s)
                except ServiceUnavailableError:
                    self._counts["rpc_timeouts"] += 1
                    raise
                except SessionExpiredError:
                    status, resp = rpc.UNKNOWN_SESSION, b"slot reclaimed"
                else:
                    seq, status, resp = rpc.decode_response(raw)
                    if seq != self._seq and status != rpc.BAD_REQUEST:
                        raise ProtocolError(f"response for request {seq} arrived while waiting for {self._seq}")
                if status == rpc.UNKNOWN_SESSION and attempt == 0 and op not in _SESSION_BOUND_OPS:
                    # Our heartbeat was missed (paused process, service restarted without our slot):
                    # take a new slot and try once more. The old session's leases are gone.
                    self._counts["reregistrations"] += 1
                    self._drop_session()
                    self._releases.clear()
                    self.channel.close()
                    continue
                del self._releases[: len(releases)]
                self._touch_seen = touched
                if status == rpc.OK:
                    return resp
                message = resp.decode("utf-8", errors="replace")
                if status == rpc.UNKNOWN_SESSION:
                    raise SessionExpiredError(message)
                if status == rpc.POOL_FULL:
                    raise PoolFullError(message)
                if status == rpc.TOO_LARGE:
                    raise BlockTooLargeError(message)
                raise RequestRejectedError(status, f"{rpc.OP_NAMES.get(op, op)} rejected "
                                                   f"({rpc.STATUS_NAMES.get(status, status)}): {message}")
            raise AssertionError("unreachable")

    def queue_release(self, lease: int) -> None:
        """Release a lease with the next request (BlockView.release)."""
        with self._lock:
            self._releases.append(lease)

    def flush_releases(self) -> None:
        """Send pending lease releases now instead of with the next request (and make sure the
        service has applied the reads this client posted for its LRU order)."""
        while self._releases or (self._slot is not None
                                 and self._touch_seen != L.read_own_touch_head(self.pool.buf, self.g, self._slot)):
            self._call(rpc.OP_NOP)

    def close(self) -> None:
        """Say goodbye (the service frees our slot and leases at once), stop the heartbeat, unmap."""
        if self._closed:
            return
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(2)
        try:
            if self._slot is not None:
                self._call(rpc.OP_BYE)
        except BelugaError:
            pass  # service gone: it will reap us when our heartbeat stops
        self._closed = True
        self.channel.close()
        self._reader = None  # its hold on the mapping goes with it (after any read still running)
        if self._own_pool:
            self.pool.close()

    def __enter__(self) -> "BelugaClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ put
    def put(self, key: bytes, data) -> None:
        """Store ``data`` (any contiguous buffer) under ``key``; visible to readers once this returns."""
        self.put_many([(key, data)])

    def put_many(self, items: Iterable[tuple[bytes, object]]) -> None:
        """Store several blocks with one ALLOC and one COMMIT per batch."""
        prepared = []
        for key, data in items:
            mv = memoryview(data)
            if not mv.contiguous:
                raise ValueError(f"block data for key {bytes(key).hex()[:16]}... must be a contiguous buffer")
            prepared.append((check_key(key), mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv))
        for item in prepared:
            if item[1].nbytes > self.g.max_block_bytes:
                raise BlockTooLargeError(
                    f"block of {item[1].nbytes} bytes for key {item[0].hex()[:16]}... is larger than a segment "
                    f"can hold ({self.g.max_block_bytes} bytes in a {self.g.segment_size_bytes}-byte segment)")
        step = min(self._max_alloc, self._max_commit)
        for i in range(0, len(prepared), step):
            self._put_batch(prepared[i : i + step])

    def _put_batch(self, batch: list[tuple[bytes, memoryview]]) -> None:
        for attempt in (0, 1):
            try:
                return self._put_batch_once(batch)
            except SessionExpiredError:
                if attempt:
                    raise
                # Reservations belong to a session; a new session must allocate again.
                with self._lock:
                    self._counts["reregistrations"] += 1
                    self._drop_session()
                    self.channel.close()

    def _put_batch_once(self, batch: list[tuple[bytes, memoryview]]) -> None:
        body = rpc.ALLOC_REQ.pack([(mv.nbytes,) for _, mv in batch])
        rows, errors, _ = rpc.ALLOC_RESP.unpack(self._call(rpc.OP_ALLOC, body))
        allocs = [rpc.Allocation(*r[1:]) if r[0] == rpc.OK else None for r in rows]
        failed = [i for i, r in enumerate(rows) if r[0] != rpc.OK]
        if failed:
            self._abort([a for a in allocs if a is not None])
            i = failed[0]
            code = rows[i][0]
            message = f"put of key {batch[i][0].hex()[:16]}... failed: {errors.get(i, rpc.STATUS_NAMES.get(code))}"
            raise (PoolFullError(message) if code == rpc.POOL_FULL else BlockTooLargeError(message)
                   if code == rpc.TOO_LARGE else RequestRejectedError(code, message))
        algo = self.g.checksum_algorithm
        commits = []
        buf = self.buf
        for (key, mv), a in zip(batch, allocs):
            n = mv.nbytes
            L.claim_block_slot(buf, a.header_offset, a.data_offset, n)
            L.write_block_header(buf, a.header_offset, L.BlockHeader(L.BLOCK_WRITING, n, a.generation, 0, self._slot, key))
            if algo == CRC32:
                crc = readpath.copy_crc(buf[a.data_offset : a.data_offset + n], mv, True)  # one pass, streamed
            else:
                buf[a.data_offset : a.data_offset + n] = mv
                crc = checksum(algo, mv)
            L.write_block_data_done(buf, a.data_offset, n)
            # Publication: the COMPLETE header (its data CRC) is written only after the data.
            L.write_block_header(buf, a.header_offset,
                                 L.BlockHeader(L.BLOCK_COMPLETE, n, a.generation, crc, self._slot, key),
                                 data=(a.data_offset, n))
            commits.append((key, a.segment, a.slot, a.generation, n, crc))
        rows, errors, _ = rpc.STATUS_RESP.unpack(self._call(rpc.OP_COMMIT, rpc.COMMIT_REQ.pack(commits)))
        bad = [(i, r[0]) for i, r in enumerate(rows) if r[0] != rpc.OK]
        failed = {i for i, _ in bad}
        self._counts["puts"] += len(batch) - len(bad)
        self._counts["put_bytes"] += sum(mv.nbytes for i, (_, mv) in enumerate(batch) if i not in failed)
        if bad:
            i, code = bad[0]
            raise RequestRejectedError(code, f"commit of key {batch[i][0].hex()[:16]}... rejected "
                                             f"({rpc.STATUS_NAMES.get(code, code)}): {errors.get(i, '')} "
                                             f"[{len(bad)} of {len(batch)} in the batch failed]")

    def _abort(self, allocs: list[rpc.Allocation]) -> None:
        if allocs:
            try:
                self._call(rpc.OP_ABORT, rpc.ABORT_REQ.pack([(a.segment, a.slot, a.generation) for a in allocs]))
            except BelugaError:
                pass  # the reservation TTL reclaims them anyway

    # ------------------------------------------------------------ lookups
    def locate(self, key: bytes) -> rpc.Location | None:
        """Where the service says the committed block of ``key`` lives (a LOOKUP round trip, no lease),
        or None: for tools that look at the bytes in place (the guests' fault scan)."""
        return self._lookup([check_key(key)], 0)[0]

    def ping(self) -> None:
        """One round trip that does nothing (NOP): measures the transport."""
        self._call(rpc.OP_NOP)

    def _lookup(self, keys: Sequence[bytes], flags: int) -> list[rpc.Location | None]:
        out: list[rpc.Location | None] = []
        for i in range(0, len(keys), self._max_keys):
            chunk = keys[i : i + self._max_keys]
            rows, _, _ = rpc.LOOKUP_RESP.unpack(self._call(rpc.OP_LOOKUP, rpc.KEYS_REQ.pack([(k,) for k in chunk]),
                                                           flags=flags))
            out.extend(rpc.Location(*r[1:]) if r[0] == rpc.OK else None for r in rows)
            if flags & rpc.LOOKUP_STOP_AT_MISS and len(rows) < len(chunk):
                break
        return out

    def _find(self, key: bytes):
        """The table's entry for ``key`` -> (generation, where, length, crc), None (miss) or False (ask the service)."""
        return self._reader.probe(key)

    def contains(self, key: bytes) -> bool:
        key = check_key(key)
        hit = self._reader.probe(key)
        if hit is False:
            return self._lookup([key], 0)[0] is not None
        if hit is not None:
            self._reader.post_touches([(hit[1], hit[0])])  # a lookup counts as a use, as it always did
        return hit is not None

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are stored (vLLM's prefix-hit count); stops at the first miss."""
        # Keys that are all 32-byte bytes objects go as they are (the reader checks them);
        # anything else is checked and converted first (InvalidKeyError names the problem).
        ks = keys if type(keys) in (list, tuple) else list(keys)
        try:
            n, busy = self._reader.lookup_prefix(ks)  # every hit is posted as a touch, as a LOOKUP always touched
        except ValueError:
            ks = [check_key(k) for k in ks]
            n, busy = self._reader.lookup_prefix(ks)
        if busy:  # the table cannot answer now: the service does, for the rest
            n += len(self._lookup(ks[n:], rpc.LOOKUP_STOP_AT_MISS))
        return n

    def _report_bad(self, key: bytes, generation: int) -> None:
        self._counts["corrupt_misses"] += 1
        self._counts["misses"] += 1
        try:
            self._call(rpc.OP_REPORT, rpc.REPORT_REQ.pack([(key, generation)]))
        except BelugaError:
            pass  # counting it locally is what matters; the report is advisory

    def _verify(self, key: bytes, loc: rpc.Location, data, crc: int | None = None) -> bool:
        """True if ``data`` (already copied or a view) is exactly the committed block ``loc``.

        ``crc`` is the checksum of ``data`` when the caller computed it while copying.
        The header is read after the bytes were copied: a writer reusing the slot
        rewrites the header before the data, so if the copy saw any of its data the
        header already says so. It is read again after the checksum (which, for a
        zero-copy view, reads pool memory): unchanged means nothing moved meanwhile.
        """
        buf = self.buf
        h = loc.header_offset
        raw = L.read_header_bytes(buf, h)
        if not L.block_header_matches(raw, key, loc.generation, loc.length_bytes, loc.data_crc):
            return False
        if crc is None:
            crc = checksum(self._algo, data)
        if crc != loc.data_crc:
            return False
        return L.read_header_bytes(buf, h) == raw

    def _corrupt(self, key: bytes, loc: rpc.Location) -> None:
        self._counts["corrupt_misses"] += 1
        self._counts["misses"] += 1
        try:
            self._call(rpc.OP_REPORT, rpc.REPORT_REQ.pack([(key, loc.generation)]))
        except BelugaError:
            pass  # counting it locally is what matters; the report is advisory

    def get(self, key: bytes) -> bytes | None:
        """The block's bytes, or None on a miss (absent, or present but failing verification)."""
        try:
            got = self._reader.get(key)  # one call: probe, header, copy with CRC, header again, touch
        except ValueError:
            key = check_key(key)  # InvalidKeyError names the problem; a bytes-like key is converted
            got = self._reader.get(key)
        if got is None or type(got) is bytes:
            return got  # counted by the reader
        return self._read_failed(check_key(key), got, None)

    def _read_failed(self, key: bytes, got, dest):
        """A read the table could not answer (``False``: the service does) or whose block failed
        verification (``(status, generation)``: a reported miss)."""
        if got is False:
            return (self._get_many_rpc([key]) if dest is None else self._get_many_into_rpc([key], [dest]))[0]
        self._counts["gets"] += 1
        self._report_bad(key, got[1])
        return None

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The blocks' bytes (None for each miss), without a round trip (from the pool's lookup table)."""
        ks = [check_key(k) for k in keys]
        out: list[bytes | None] = []
        read = self._reader.get
        for i, key in enumerate(ks):
            got = read(key)
            if got is False:  # the table cannot answer now: the service does, for the rest
                out.extend(self._get_many_rpc(ks[i:]))
                break
            out.append(got if got is None or type(got) is bytes else self._read_failed(key, got, None))
        return out

    def _get_many_rpc(self, ks: list[bytes]) -> list[bytes | None]:
        """get_many through the service (LOOKUP with leases): while the table is being rebuilt."""
        locs = self._lookup(ks, rpc.LOOKUP_LEASE)
        out: list[bytes | None] = []
        buf = self.buf
        counts = self._counts
        for key, loc in zip(ks, locs):
            counts["gets"] += 1
            if loc is None:
                counts["misses"] += 1
                out.append(None)
                continue
            L.fetch_block_data(buf, loc.data_offset, loc.length_bytes)
            data = bytes(buf[loc.data_offset : loc.data_offset + loc.length_bytes])
            self.queue_release(loc.lease)
            if not self._verify(key, loc, data):
                self._corrupt(key, loc)
                out.append(None)
                continue
            counts["hits"] += 1
            counts["get_bytes"] += loc.length_bytes
            out.append(data)
        return out

    def get_into(self, key: bytes, out) -> int | None:
        """Copy the block into a caller's writable buffer; -> its length, or None on a miss."""
        try:
            got = self._reader.get_into(key, out)  # one call, as get
        except (ValueError, TypeError, BufferError):  # get_many_into says what is wrong with the key or buffer
            return self.get_many_into([key], [out])[0]
        if got is None or type(got) is int:
            return got  # counted by the reader
        return self._read_failed(check_key(key), got, memoryview(out).cast("B"))

    def get_many_into(self, keys: Sequence[bytes], outs: Sequence) -> list[int | None]:
        """Copy each block into the matching writable buffer (one lookup round trip per batch).

        -> per key, the block's length, or None on a miss. Raises ValueError if a
        buffer is read-only (before the lookup) or smaller than its block (nothing is
        copied into that buffer; earlier ones in the batch are filled).
        """
        if len(keys) != len(outs):
            raise ValueError(f"{len(keys)} keys but {len(outs)} output buffers")
        ks = [check_key(k) for k in keys]
        dests = []
        for o in outs:
            dest = memoryview(o).cast("B")
            if dest.readonly:
                raise ValueError("get_into needs a writable buffer")
            dests.append(dest)
        result: list[int | None] = []
        read = self._reader.get_into
        for i, (key, dest) in enumerate(zip(ks, dests)):
            got = read(key, dest)
            if got is False:  # the table cannot answer now: the service does, for the rest
                result.extend(self._get_many_into_rpc(ks[i:], dests[i:]))
                break
            result.append(got if got is None or type(got) is int else self._read_failed(key, got, dest))
        return result

    def _get_many_into_rpc(self, ks: list[bytes], dests: list[memoryview]) -> list[int | None]:
        locs = self._lookup(ks, rpc.LOOKUP_LEASE)
        for loc in locs:
            if loc is not None:
                self.queue_release(loc.lease)
        result: list[int | None] = []
        buf = self.buf
        counts = self._counts
        for key, loc, dest in zip(ks, locs, dests):
            counts["gets"] += 1
            if loc is None:
                counts["misses"] += 1
                result.append(None)
                continue
            n = loc.length_bytes
            if n > dest.nbytes:
                raise ValueError(f"block for key {key.hex()[:16]}... has {n} bytes, "
                                 f"the destination only {dest.nbytes}")
            # Checksum while copying: each chunk is checksummed right after it lands, still in cache.
            L.fetch_block_data(buf, loc.data_offset, n)
            crc = copy_and_checksum(self._algo, dest, buf[loc.data_offset : loc.data_offset + n])
            if not self._verify(key, loc, None, crc):
                self._corrupt(key, loc)
                result.append(None)
                continue
            counts["hits"] += 1
            counts["get_bytes"] += n
            result.append(n)
        return result

    def view(self, key: bytes) -> BlockView | None:
        """Zero-copy: a verified view of the block in pool memory under a lease, or None on a miss."""
        key = check_key(key)
        loc = self._lookup([key], rpc.LOOKUP_LEASE)[0]
        self._counts["gets"] += 1
        if loc is None:
            self._counts["misses"] += 1
            return None
        L.fetch_block_data(self.buf, loc.data_offset, loc.length_bytes)
        data = self.buf[loc.data_offset : loc.data_offset + loc.length_bytes]
        if not self._verify(key, loc, data):
            self.queue_release(loc.lease)
            self._corrupt(key, loc)
            return None
        self._counts["hits"] += 1
        self._counts["get_bytes"] += loc.length_bytes
        return BlockView(self, key, data, loc.lease, loc.generation)

    # ------------------------------------------------------------ delete, evict, stats
    def delete(self, key: bytes) -> bool:
        """True if the key was stored. Readers holding it keep their bytes until their lease ends."""
        return self.delete_many([key])[0]

    def delete_many(self, keys: Sequence[bytes]) -> list[bool]:
        ks = [check_key(k) for k in keys]
        out = []
        for i in range(0, len(ks), self._max_keys):
            rows, _, _ = rpc.STATUS_RESP.unpack(
                self._call(rpc.OP_DELETE, rpc.KEYS_REQ.pack([(k,) for k in ks[i : i + self._max_keys]])))
            out.extend(r[0] == rpc.OK for r in rows)
        self._counts["deletes"] += sum(out)
        return out

    def evict(self, count: int) -> int:
        """Ask the service to evict up to ``count`` LRU blocks no reader holds (debugging, tests)."""
        return rpc.EVICT_RESP.unpack(self._call(rpc.OP_EVICT, rpc.EVICT_REQ.pack(count)))[0]

    def service_stats(self) -> dict:
        import json

        return json.loads(self._call(rpc.OP_STATS).decode())

    def client_stats(self) -> ClientStats:
        counts = dict(self._counts)
        if self._reader is not None:
            for name, value in self._reader.counts().items():  # the reads it answered itself
                counts[name] += value
        return ClientStats(**counts)

    def stats(self) -> StoreStats:
        return StoreStats(client=self.client_stats(), service=self.service_stats())


def local_client(service, **kwargs) -> BelugaClient:
    """A client wired straight to an in-process service (no thread, no polling): tests."""
    kwargs.setdefault("heartbeat_interval_s", None)
    return BelugaClient(service.pool, transport=LocalChannel(service), **kwargs)


class LocalChannel:
    """Hands requests straight to a MetadataService object in this process (tests; no transport)."""

    name = "local"

    def __init__(self, service) -> None:
        self.service = service
        self.pool = service.pool
        self.slot: int | None = None

    def register(self, nonce: int, *, pid: int, host: str, timeout_s: float, resume_slot: int | None = None) -> tuple[int, int, int]:
        body = rpc.HELLO_REQ.pack(nonce, rpc.NO_SLOT if resume_slot is None else resume_slot, pid, host.encode()[:32])
        seq, status, resp = rpc.decode_response(
            self.service.handle(rpc.encode_request(0, nonce, rpc.NO_SLOT, rpc.OP_HELLO, body)))
        if status != rpc.OK:
            raise ServiceUnavailableError(f"registration refused: {resp.decode(errors='replace')}")
        slot, epoch = rpc.HELLO_RESP.unpack(resp)
        self.slot = slot
        return slot, epoch, 0

    def max_message_bytes(self) -> int:
        return self.pool.geometry.rpc_buffer_bytes

    def call(self, message: bytes, seq: int, timeout_s: float) -> bytes:
        return self.service.handle(message)

    def heartbeat(self) -> bool:
        return True

    def close(self) -> None:
        self.slot = None
