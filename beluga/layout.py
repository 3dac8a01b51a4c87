"""On-pool format (layout version 2): geometry and the binary records.

All records are little-endian and fixed-size. Who writes what matters for
CXL (non-coherent hosts must not share written cache lines) and for safety
(a client must not be able to corrupt the index):

* superblock           -- written once by ``format``; read-only afterwards
* service area         -- written only by the metadata service
* host slots           -- per client: a client-written line + request buffer,
                          a service-written line + response buffer
* segment table, index -- written only by the metadata service
* lookup table         -- open-addressing hash table key -> block, written only
                          by the service (each bucket seqlock-guarded), read by
                          clients directly: a get needs no round trip
* block headers        -- one per possible slot, in their own region, written
                          only by the client that holds the slot's reservation
* touch rings          -- per host slot, client-written: the blocks it read,
                          drained by the service into its LRU order
* segments             -- block data only, written by the same client; keeping
                          headers out of segments lets a block fill a whole
                          segment (a 2 MiB KV block in a 2 MiB segment)

See docs/store.md for the diagram.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property

from . import checksum as _checksum
from . import coherence as _coh
from . import rpc as _rpc
from .errors import CorruptPoolError, LayoutVersionError, NotAPoolError, PoolTooSmallError, ProtocolError

MAGIC = b"BELUGAKV"
LAYOUT_VERSION = 2

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

PAGE_BYTES = 4 * KiB
DAX_ALIGN_BYTES = 2 * MiB
"""devdax mappings must be 2 MiB multiples in length and offset."""

SUPERBLOCK_BYTES = PAGE_BYTES
SERVICE_AREA_BYTES = PAGE_BYTES
HOST_LINES_BYTES = PAGE_BYTES
"""Each host slot starts with one page holding its client line and service line."""
CLIENT_LINE_OFFSET = 0
SERVICE_LINE_OFFSET = 128
"""128 bytes apart: different cache lines (and not adjacent-line-prefetch pairs)."""
TOUCH_HEAD_OFFSET = 256
"""Client-written u64 in the host slot page: how many touches the client has posted in all."""
TOUCH_RING_ENTRIES = 2048
TOUCH_ENTRY_BYTES = 8
TOUCH_RING_BYTES = TOUCH_RING_ENTRIES * TOUCH_ENTRY_BYTES
"""Each host slot has a touch ring after its page (client-written): LRU touches of lease-free reads."""
TABLE_BUCKET_BYTES = 64
TABLE_LINE_OFFSET = 256
"""Offset of the table line (u64 table sequence) inside the service area."""

BLOCK_HEADER_BYTES = 128
INDEX_ENTRY_BYTES = 64
SEGMENT_ENTRY_BYTES = 64
"""Two 32-byte copies of the same record: a torn write can damage only one of them."""
SEGMENT_RECORD_BYTES = 32
KEY_BYTES = 32

MIN_SEGMENT_BYTES = 64 * KiB
MIN_RPC_BUFFER_BYTES = 4 * KiB
MAX_CLIENTS_LIMIT = 1024

# ---------------------------------------------------------------- superblock
#   magic 8s | version I | flags I | pool_size Q | segment_size Q | segment_count I |
#   max_clients I | rpc_buffer I | slot_granularity I | max_slots_per_segment I |
#   checksum_algo I | service_off Q | host_off Q | segtab_off Q | index_off Q |
#   headers_off Q | segments_off Q | table_off Q | table_buckets Q | uuid 16s | formatted_unix_ns Q | crc I
_SB = struct.Struct("<8sIIQQIIIIIIQQQQQQQQ16sQ")
_SB_CRC = struct.Struct("<I")
_SB_HEAD = struct.Struct("<8sI")  # magic + version: readable for every version


@dataclass(frozen=True)
class Geometry:
    """Where everything lives in a pool. Derived from a few format parameters."""

    pool_size_bytes: int
    segment_size_bytes: int
    segment_count: int
    max_clients: int
    rpc_buffer_bytes: int
    slot_granularity_bytes: int
    max_slots_per_segment: int
    checksum_algorithm: int
    service_offset: int
    host_offset: int
    segment_table_offset: int
    index_offset: int
    headers_offset: int
    segments_offset: int
    table_offset: int
    table_buckets: int
    """More than 5/4 of all possible slots: the table never fills (load factor <= 0.8)."""

    @property
    def host_slot_bytes(self) -> int:
        return HOST_LINES_BYTES + TOUCH_RING_BYTES + 2 * self.rpc_buffer_bytes

    @property
    def used_bytes(self) -> int:
        return self.segments_offset + self.segment_count * self.segment_size_bytes

    @property
    def max_block_bytes(self) -> int:
        """Largest block that fits in one segment (one slot spanning it)."""
        return self.segment_size_bytes

    def host_slot_offset(self, slot: int) -> int:
        return self.host_offset + slot * self.host_slot_bytes

    @cached_property
    def host_slot_offsets(self) -> tuple[int, ...]:
        """``host_slot_offset`` of every slot, computed once: the RPC words are polled in tight loops."""
        return tuple(self.host_slot_offset(s) for s in range(self.max_clients))

    def touch_ring_offset(self, slot: int) -> int:
        return self.host_slot_offset(slot) + HOST_LINES_BYTES

    def touch_head_offset(self, slot: int) -> int:
        return self.host_slot_offset(slot) + TOUCH_HEAD_OFFSET

    def request_offset(self, slot: int) -> int:
        return self.host_slot_offset(slot) + HOST_LINES_BYTES + TOUCH_RING_BYTES

    def response_offset(self, slot: int) -> int:
        return self.request_offset(slot) + self.rpc_buffer_bytes

    def segment_offset(self, segment: int) -> int:
        return self.segments_offset + segment * self.segment_size_bytes

    def segment_entry_offset(self, segment: int) -> int:
        return self.segment_table_offset + segment * SEGMENT_ENTRY_BYTES

    def index_entry_offset(self, segment: int, slot: int) -> int:
        return self.index_offset + (segment * self.max_slots_per_segment + slot) * INDEX_ENTRY_BYTES

    def header_offset(self, segment: int, slot: int) -> int:
        return self.headers_offset + (segment * self.max_slots_per_segment + slot) * BLOCK_HEADER_BYTES

    def bucket_offset(self, bucket: int) -> int:
        return self.table_offset + bucket * TABLE_BUCKET_BYTES

    @property
    def table_seq_offset(self) -> int:
        return self.service_offset + TABLE_LINE_OFFSET

    def block_where(self, segment: int, slot: int) -> int:
        """A block's global slot number (what the table and the touch rings store)."""
        return segment * self.max_slots_per_segment + slot

    def slot_layout(self, data_slot_bytes: int) -> "SlotLayout":
        return slot_layout(self.segment_size_bytes, data_slot_bytes)

    def data_slot_for(self, length_bytes: int) -> int:
        """Slot size class for a block: its length rounded up to the granularity."""
        g = self.slot_granularity_bytes
        return max(g, _round_up(length_bytes, g))


@dataclass(frozen=True)
class SlotLayout:
    """How a segment of one slot size class is cut: equal data slots from its start."""

    data_slot_bytes: int
    slot_count: int

    def data_offset(self, slot: int) -> int:
        return slot * self.data_slot_bytes


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def slot_layout(segment_size_bytes: int, data_slot_bytes: int) -> SlotLayout:
    return SlotLayout(data_slot_bytes=data_slot_bytes, slot_count=segment_size_bytes // data_slot_bytes)


def parse_size(text: str | int) -> int:
    """'64M', '2MiB', '4096', '1G' -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number of bytes (expected e.g. 4096, 64K, 2M, 1G)") from None


def compute_geometry(
    pool_size_bytes: int,
    *,
    segment_size_bytes: int = 2 * MiB,
    max_clients: int = 32,
    rpc_buffer_bytes: int = 64 * KiB,
    slot_granularity_bytes: int = 4 * KiB,
    checksum_algorithm: int = _checksum.CRC32,
) -> Geometry:
    """Lay out a pool of ``pool_size_bytes``; raise with the reason if it cannot hold one segment."""
    if not _is_pow2(segment_size_bytes) or segment_size_bytes < MIN_SEGMENT_BYTES:
        raise ValueError(f"segment size {segment_size_bytes} must be a power of two >= {MIN_SEGMENT_BYTES}")
    if not _is_pow2(slot_granularity_bytes) or not 512 <= slot_granularity_bytes <= segment_size_bytes:
        raise ValueError(
            f"slot granularity {slot_granularity_bytes} must be a power of two between 512 and the segment "
            f"size ({segment_size_bytes})"
        )
    if not 1 <= max_clients <= MAX_CLIENTS_LIMIT:
        raise ValueError(f"max clients {max_clients} must be between 1 and {MAX_CLIENTS_LIMIT}")
    if rpc_buffer_bytes < MIN_RPC_BUFFER_BYTES or rpc_buffer_bytes % PAGE_BYTES:
        raise ValueError(f"rpc buffer {rpc_buffer_bytes} must be a multiple of {PAGE_BYTES} and >= {MIN_RPC_BUFFER_BYTES}")
    if checksum_algorithm not in _checksum.ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm {checksum_algorithm}")
    max_slots = segment_size_bytes // slot_granularity_bytes
    service_off = SUPERBLOCK_BYTES
    host_off = service_off + SERVICE_AREA_BYTES
    host_slot_bytes = HOST_LINES_BYTES + TOUCH_RING_BYTES + 2 * rpc_buffer_bytes
    fixed_end = host_off + max_clients * host_slot_bytes
    align = min(segment_size_bytes, DAX_ALIGN_BYTES)

    def place(count: int) -> tuple[int, int, int, int, int, int]:
        segtab = _round_up(fixed_end, PAGE_BYTES)
        index = _round_up(segtab + count * SEGMENT_ENTRY_BYTES, PAGE_BYTES)
        table = _round_up(index + count * max_slots * INDEX_ENTRY_BYTES, PAGE_BYTES)
        buckets = table_buckets_for(count * max_slots)
        headers = _round_up(table + buckets * TABLE_BUCKET_BYTES, PAGE_BYTES)
        segments = _round_up(headers + count * max_slots * BLOCK_HEADER_BYTES, align)
        return segtab, index, headers, segments, table, buckets

    def fits(count: int) -> bool:
        return place(count)[3] + count * segment_size_bytes <= pool_size_bytes

    # The largest count that fits (fits() is monotonic, the rounding makes the metadata
    # per segment uneven): a binary search.
    lo, hi = 0, max(0, (pool_size_bytes - fixed_end) // segment_size_bytes)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    count = lo
    if count < 1:
        need = place(1)[3] + segment_size_bytes
        raise PoolTooSmallError(
            f"pool of {pool_size_bytes} bytes is too small for its geometry: one {segment_size_bytes}-byte segment "
            f"plus metadata for {max_clients} clients with {rpc_buffer_bytes}-byte RPC buffers needs at least "
            f"{need} bytes"
        )
    segtab, index, headers, segments, table, buckets = place(count)
    return Geometry(
        pool_size_bytes=pool_size_bytes,
        segment_size_bytes=segment_size_bytes,
        segment_count=count,
        max_clients=max_clients,
        rpc_buffer_bytes=rpc_buffer_bytes,
        slot_granularity_bytes=slot_granularity_bytes,
        max_slots_per_segment=max_slots,
        checksum_algorithm=checksum_algorithm,
        service_offset=service_off,
        host_offset=host_off,
        segment_table_offset=segtab,
        index_offset=index,
        headers_offset=headers,
        segments_offset=segments,
        table_offset=table,
        table_buckets=buckets,
    )


def table_buckets_for(possible_slots: int) -> int:
    """Buckets for a table that can hold every possible slot at a load factor of at most 0.8."""
    return possible_slots + possible_slots // 4 + 1


@dataclass(frozen=True)
class Superblock:
    geometry: Geometry
    uuid: bytes
    formatted_unix_ns: int

    def encode(self) -> bytes:
        g = self.geometry
        body = _SB.pack(
            MAGIC, LAYOUT_VERSION, 0, g.pool_size_bytes, g.segment_size_bytes, g.segment_count, g.max_clients,
            g.rpc_buffer_bytes, g.slot_granularity_bytes, g.max_slots_per_segment, g.checksum_algorithm,
            g.service_offset, g.host_offset, g.segment_table_offset, g.index_offset, g.headers_offset,
            g.segments_offset, g.table_offset, g.table_buckets,
            self.uuid, self.formatted_unix_ns,
        )
        return body + _SB_CRC.pack(_checksum.meta_crc(body))


def write_superblock(buf, superblock: Superblock) -> None:
    """The superblock's one writer (``format_pool``, once); ``decode_superblock`` is its reader."""
    raw = superblock.encode()
    buf[: len(raw)] = raw


def decode_superblock(raw: bytes, *, where: str, actual_size_bytes: int) -> Superblock:
    """Validate and decode; the order of checks decides which error the user sees."""
    if len(raw) < _SB_HEAD.size:
        raise NotAPoolError(f"{where} is not a Beluga pool: only {len(raw)} bytes, a superblock needs {SUPERBLOCK_BYTES}")
    magic, version = _SB_HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise NotAPoolError(
            f"{where} is not a Beluga pool: first bytes are {magic!r}, expected magic {MAGIC!r} "
            f"(run `beluga format {where}` to make it one; nothing was written)"
        )
    if version != LAYOUT_VERSION:
        raise LayoutVersionError(
            f"{where} has pool layout version {version}, but this beluga reads only version {LAYOUT_VERSION}; "
            f"use a matching beluga, or reformat with `beluga format --force {where}` (destroys its contents)"
        )
    body = raw[: _SB.size]
    (stored_crc,) = _SB_CRC.unpack_from(raw, _SB.size)
    crc = _checksum.meta_crc(body)
    if crc != stored_crc:
        raise CorruptPoolError(
            f"{where}: superblock checksum mismatch (stored {stored_crc:#010x}, computed {crc:#010x}); "
            f"the pool header is corrupt, refusing to open it"
        )
    f = _SB.unpack(body)
    (_, _, _flags, pool_size, seg_size, seg_count, max_clients, rpc_buf, gran, max_slots, algo,
     svc_off, host_off, segtab_off, index_off, hdrs_off, segs_off, table_off, buckets, uuid, formatted) = f
    try:
        expect = compute_geometry(
            pool_size, segment_size_bytes=seg_size, max_clients=max_clients, rpc_buffer_bytes=rpc_buf,
            slot_granularity_bytes=gran, checksum_algorithm=algo,
        )
    except (ValueError, PoolTooSmallError) as exc:
        raise CorruptPoolError(f"{where}: superblock geometry is invalid: {exc}") from None
    recorded = Geometry(pool_size, seg_size, seg_count, max_clients, rpc_buf, gran, max_slots, algo,
                        svc_off, host_off, segtab_off, index_off, hdrs_off, segs_off, table_off, buckets)
    if recorded != expect:
        raise CorruptPoolError(
            f"{where}: superblock geometry is inconsistent (recorded {recorded}, but its parameters imply {expect})"
        )
    if actual_size_bytes < recorded.used_bytes:
        raise PoolTooSmallError(
            f"{where} is too small for its geometry: the superblock needs {recorded.used_bytes} bytes "
            f"({seg_count} segments of {seg_size}), but the pool has only {actual_size_bytes}"
        )
    return Superblock(geometry=recorded, uuid=uuid, formatted_unix_ns=formatted)


# ---------------------------------------------------------------- service area (service-written)
#   magic 4s | pad 4 | service_nonce Q | heartbeat Q | pid I | restarts I | gen_high_water Q |
#   started_unix_ns Q | host 64s | tcp_address 64s
SERVICE_MAGIC = b"BSVC"
SERVICE_AREA = struct.Struct("<4s4xQQIIQQ64s64s")
SA_HEARTBEAT = 16


# ---------------------------------------------------------------- cache-line flushes
# Non-coherent pools (docs/coherence.md): every accessor below that publishes writes back
# what it wrote and fences before the word that makes it visible; every accessor that
# consumes invalidates the lines first. They act only where the pool's flush policy is on
# (a devdax device, BELUGA_FLUSH_POLICY=on) or the pool is sanitized: else one flag test.
# The label (``what``) names the record; it is the handle by which the removal proof
# (tests/unit/beluga/test_store_coherence_sites.py) removes one kind of call.


def _wb(buf, off: int, n: int, what: str) -> None:
    if _coh.ACTIVE:
        _coh.pool_writeback(buf, off, n, what)


def _inv(buf, off: int, n: int, what: str) -> None:
    if _coh.ACTIVE:
        _coh.pool_invalidate(buf, off, n, what)


def _fence(buf, what: str) -> None:
    if _coh.ACTIVE:
        _coh.pool_fence(buf, what)


def _pub(buf, word_off: int, word_len: int, payload, what: str) -> None:
    if _coh.ACTIVE:
        _coh.pool_publish(buf, word_off, word_len, payload, what)


def answer_off_pool(buf) -> None:
    """An answer is about to leave the pool (a TCP response): fence the service records written
    back while handling its request (index entries, segment table, buckets) before it goes."""
    _fence(buf, "tcp response")


def claim_block_slot(buf, header_offset: int, data_offset: int, length: int) -> None:
    """A writer is about to write a block into a slot another host may have written last: fetch the
    header's lines and the data's last line (which it may write only in part), so that writing them
    back puts nothing of this host's stale copy over the other host's bytes. (Hardware would not
    need the header's: it is two whole lines. The sanitizer cannot tell a byte rewritten with its old
    value from one left stale, so it would report a clobber.)"""
    if _coh.ACTIVE:
        _coh.pool_invalidate(buf, header_offset, BLOCK_HEADER_BYTES, "block slot")
        if length % 64:
            _coh.pool_invalidate(buf, data_offset + length - length % 64, 64, "block slot")


def write_block_data_done(buf, offset: int, length: int) -> None:
    """A writer copied a block's data to ``offset`` (a put): write it back (the COMPLETE header
    that ``write_block_header(..., data=...)`` writes next publishes it, after a fence)."""
    _wb(buf, offset, length, "block data")


def fetch_block_data(buf, offset: int, length: int) -> None:
    """A reader is about to read a block's data (after its header): drop stale cached lines."""
    _inv(buf, offset, length, "block data")


@dataclass(frozen=True)
class ServiceArea:
    nonce: int
    heartbeat: int
    pid: int
    restarts: int
    generation_high_water: int
    started_unix_ns: int
    host: str
    tcp_address: str

    def encode(self) -> bytes:
        return SERVICE_AREA.pack(SERVICE_MAGIC, self.nonce, self.heartbeat, self.pid, self.restarts,
                                 self.generation_high_water, self.started_unix_ns,
                                 self.host.encode()[:64], self.tcp_address.encode()[:64])

    @classmethod
    def decode(cls, raw) -> "ServiceArea":
        magic, nonce, hb, pid, restarts, ghw, started, host, addr = SERVICE_AREA.unpack_from(raw)
        if magic != SERVICE_MAGIC:
            return cls(0, 0, 0, 0, 0, 0, "", "")
        return cls(nonce, hb, pid, restarts, ghw, started, host.rstrip(b"\0").decode(errors="replace"),
                   addr.rstrip(b"\0").decode(errors="replace"))


def read_service_area(buf, g: Geometry) -> ServiceArea:
    _inv(buf, g.service_offset, SERVICE_AREA.size, "service area")
    return ServiceArea.decode(buf[g.service_offset : g.service_offset + SERVICE_AREA.size])


def write_service_area(buf, g: Geometry, area: ServiceArea) -> None:
    raw = area.encode()
    buf[g.service_offset : g.service_offset + len(raw)] = raw
    _wb(buf, g.service_offset, len(raw), "service area")
    _fence(buf, "service area")


def write_service_heartbeat(buf, g: Geometry, value: int) -> None:
    """The service area's heartbeat word alone (the service's liveness, bumped every housekeeping pass)."""
    U64.pack_into(buf, g.service_offset + SA_HEARTBEAT, value & 0xFFFFFFFFFFFFFFFF)
    _wb(buf, g.service_offset + SA_HEARTBEAT, 8, "service area")
    _fence(buf, "service area")


# ---------------------------------------------------------------- host slot lines
#   client line (client-written): claim_nonce Q | req_seq Q | heartbeat Q | pid I | pad 4 | host 32s
CLIENT_LINE = struct.Struct("<QQQI4x32s")
CL_CLAIM = 0
CL_REQ_SEQ = 8
CL_HEARTBEAT = 16
#   service line (service-written): owner_nonce Q | resp_seq Q | epoch Q
SERVICE_LINE = struct.Struct("<QQQ")
SL_OWNER = 0
SL_RESP_SEQ = 8
SL_EPOCH = 16
MAX_EPOCH = (1 << 32) - 1
"""Epochs are stored in 32 bits in segment and index records; the next grant adds one."""
U64 = struct.Struct("<Q")
_CLIENT_INFO = struct.Struct("<QI4x32s")  # heartbeat | pid | pad | host: written with a claim
_GRANT = struct.Struct("<QQ")  # resp_seq | epoch: written before the owner word

# Publication points (what a non-coherent pool must write back, and what a reader must
# invalidate, in this order). Every one is a payload written by one call and a word that
# makes it visible written by a separate, later call; a consumer reads the visible word
# first and the payload after it, each through the accessor named here:
#
#   what              payload (written first)              visible word (written last)
#   ----------------  -----------------------------------  ------------------------------
#   claim             write_client_info                     publish_claim
#   grant             write_grant                           publish_owner
#   request           write_request                         publish_request_seq
#   response          write_response                        publish_response_seq
#   block             write_block_header(WRITING) + data    write_block_header(COMPLETE)
#   commit            block header COMPLETE (client)        write_index_entry(COMMITTED)
#   table bucket      write_bucket_body                     close_bucket (even sequence)
#   table relocation  publish_table_seq (before moving)     write_bucket ...
#   touch ring        write_touch_entry                     publish_touch_head
#
#   consumer          visible word (read first)             payload (read after)
#   ----------------  -----------------------------------  ------------------------------
#   service: claim    read_claim                            read_client_line
#   client: grant     read_owner                            read_epoch, read_request_seq
#   service: request  read_request_seq                      read_request
#   client: response  read_response_seq                     read_response
#   reader: bucket    read_bucket (sequence, body, sequence)
#   service: touches  read_touch_head                       read_touches


_U64_AT = U64.unpack_from
_CLAIM_AT = CLIENT_LINE_OFFSET + CL_CLAIM
_REQ_SEQ_AT = CLIENT_LINE_OFFSET + CL_REQ_SEQ
_HEARTBEAT_AT = CLIENT_LINE_OFFSET + CL_HEARTBEAT
_OWNER_AT = SERVICE_LINE_OFFSET + SL_OWNER
_RESP_SEQ_AT = SERVICE_LINE_OFFSET + SL_RESP_SEQ
_EPOCH_AT = SERVICE_LINE_OFFSET + SL_EPOCH


def _client_line(g: Geometry, slot: int) -> int:
    return g.host_slot_offsets[slot] + CLIENT_LINE_OFFSET


def _service_line(g: Geometry, slot: int) -> int:
    return g.host_slot_offsets[slot] + SERVICE_LINE_OFFSET


# client line (client-written, service-read)
def read_claim(buf, g: Geometry, slot: int) -> int:
    off = g.host_slot_offsets[slot] + _CLAIM_AT
    _inv(buf, off, 8, "client line")
    return _U64_AT(buf, off)[0]


def write_client_info(buf, g: Geometry, slot: int, *, pid: int, host: str) -> None:
    """A claimant's payload: heartbeat 0, pid and host name; ``publish_claim`` follows (the payload
    shares the claim word's line, so it is written back with the word)."""
    _CLIENT_INFO.pack_into(buf, _client_line(g, slot) + CL_HEARTBEAT, 0, pid, host.encode()[:32])


def publish_claim(buf, g: Geometry, slot: int, nonce: int) -> None:
    """The claim word: a nonce asks the service for the slot; 0 withdraws (or, by the service, clears) it."""
    off = _client_line(g, slot) + CL_CLAIM
    U64.pack_into(buf, off, nonce)
    _pub(buf, off, 8, ((off, CLIENT_LINE.size),), "claim")


def read_client_line(buf, g: Geometry, slot: int) -> tuple[int, int, int]:
    """-> (claim nonce, request seq, heartbeat)."""
    _inv(buf, _client_line(g, slot), CLIENT_LINE.size, "client line")
    claim, req_seq, heartbeat, _pid, _host = CLIENT_LINE.unpack_from(buf, _client_line(g, slot))
    return claim, req_seq, heartbeat


def read_client_info(buf, g: Geometry, slot: int) -> tuple[int, int, str]:
    """-> (heartbeat, pid, host) of the client line (reports)."""
    _inv(buf, _client_line(g, slot), CLIENT_LINE.size, "client line")
    _claim, _req_seq, heartbeat, pid, host = CLIENT_LINE.unpack_from(buf, _client_line(g, slot))
    return heartbeat, pid, host.rstrip(b"\0").decode(errors="replace")


def read_request_seq(buf, g: Geometry, slot: int) -> int:
    off = g.host_slot_offsets[slot] + _REQ_SEQ_AT
    _inv(buf, off, 8, "client line")
    return _U64_AT(buf, off)[0]


def publish_request_seq(buf, g: Geometry, slot: int, seq: int, length: int = 0) -> None:
    """Makes the request that ``write_request`` wrote (``length`` bytes) visible to the service."""
    _fence(buf, "request")
    off = g.host_slot_offsets[slot] + _REQ_SEQ_AT
    U64.pack_into(buf, off, seq)
    _pub(buf, off, 8, ((g.request_offset(slot), length),), "request")


def read_heartbeat(buf, g: Geometry, slot: int) -> int:
    off = g.host_slot_offsets[slot] + _HEARTBEAT_AT
    _inv(buf, off, 8, "client line")
    return _U64_AT(buf, off)[0]


def read_own_heartbeat(buf, g: Geometry, slot: int) -> int:
    """The client's own heartbeat counter (its one writer: nothing to invalidate)."""
    return _U64_AT(buf, g.host_slot_offsets[slot] + _HEARTBEAT_AT)[0]


def write_heartbeat(buf, g: Geometry, slot: int, value: int) -> None:
    off = _client_line(g, slot) + CL_HEARTBEAT
    U64.pack_into(buf, off, value & 0xFFFFFFFFFFFFFFFF)
    _wb(buf, off, 8, "heartbeat")
    _fence(buf, "heartbeat")


# service line (service-written, client-read)
def read_service_line(buf, g: Geometry, slot: int) -> tuple[int, int, int]:
    """-> (owner nonce, response seq, epoch)."""
    off = _service_line(g, slot)
    _inv(buf, off, SERVICE_LINE.size, "service line")
    return SERVICE_LINE.unpack_from(buf, off)


def read_owner(buf, g: Geometry, slot: int) -> int:
    off = g.host_slot_offsets[slot] + _OWNER_AT
    _inv(buf, off, 8, "service line")
    return _U64_AT(buf, off)[0]


def read_epoch(buf, g: Geometry, slot: int) -> int:
    off = g.host_slot_offsets[slot] + _EPOCH_AT
    _inv(buf, off, 8, "service line")
    return _U64_AT(buf, off)[0]


def write_grant(buf, g: Geometry, slot: int, *, resp_seq: int, epoch: int) -> None:
    """A grant's payload (``publish_owner`` follows): nothing pending, the new epoch (in the owner
    word's line: written back with it)."""
    _GRANT.pack_into(buf, _service_line(g, slot) + SL_RESP_SEQ, resp_seq, epoch)


def publish_owner(buf, g: Geometry, slot: int, nonce: int) -> None:
    """The owner word: the claimant with this nonce holds the slot; 0 releases it."""
    off = _service_line(g, slot) + SL_OWNER
    U64.pack_into(buf, off, nonce)
    _pub(buf, off, 8, ((off, SERVICE_LINE.size),), "grant")


def read_response_seq(buf, g: Geometry, slot: int) -> int:
    off = g.host_slot_offsets[slot] + _RESP_SEQ_AT
    _inv(buf, off, 8, "service line")
    return _U64_AT(buf, off)[0]


def publish_response_seq(buf, g: Geometry, slot: int, seq: int, length: int = 0) -> None:
    """Makes the response that ``write_response`` wrote (``length`` bytes) visible to the client. The
    fence also orders every service record written back while handling the request (index entries,
    segment-table entries, table buckets) before the answer."""
    _fence(buf, "response")
    off = g.host_slot_offsets[slot] + _RESP_SEQ_AT
    U64.pack_into(buf, off, seq)
    _pub(buf, off, 8, ((g.response_offset(slot), length),), "response")


# request and response buffers (RPC payload)
def write_request(buf, g: Geometry, slot: int, message: bytes) -> None:
    """The request payload (client-written); ``publish_request_seq`` follows."""
    off = g.request_offset(slot)
    buf[off : off + len(message)] = message
    _wb(buf, off, len(message), "request")


def read_request(buf, g: Geometry, slot: int) -> bytes:
    """The request in a slot's buffer, as long as its header says (ProtocolError if it is not one,
    or is longer than the buffer); the caller checks its CRC and seq (it may still be being written)."""
    off = g.request_offset(slot)
    _inv(buf, off, _rpc.REQUEST_HEADER.size, "request")
    length = _rpc.request_length(buf[off : off + _rpc.REQUEST_HEADER.size])
    if length > g.rpc_buffer_bytes:
        raise ProtocolError(f"request of {length} bytes exceeds the {g.rpc_buffer_bytes}-byte buffer")
    _inv(buf, off, length, "request")
    return bytes(buf[off : off + length])


def write_response(buf, g: Geometry, slot: int, message: bytes) -> None:
    """The response payload (service-written); ``publish_response_seq`` follows."""
    off = g.response_offset(slot)
    buf[off : off + len(message)] = message
    _wb(buf, off, len(message), "response")


def read_response(buf, g: Geometry, slot: int) -> bytes:
    """The response in a slot's buffer (at most the buffer's size: the decoder refuses a cut one)."""
    off = g.response_offset(slot)
    _inv(buf, off, _rpc.RESPONSE_HEADER.size, "response")
    length = _rpc.response_length(buf[off : off + _rpc.RESPONSE_HEADER.size])
    _inv(buf, off, min(length, g.rpc_buffer_bytes), "response")
    return bytes(buf[off : off + min(length, g.rpc_buffer_bytes)])


# ---------------------------------------------------------------- segment table (service-written)
SEG_FREE = 0
SEG_OPEN = 1
"""Owned by one writer, which may hold reservations in it."""
SEG_SEALED = 2
"""No owner; holds committed blocks, free slots can be handed to a new owner."""
SEG_STATE_NAMES = {SEG_FREE: "free", SEG_OPEN: "open", SEG_SEALED: "sealed"}
#   state B | pad B | owner_slot H | owner_epoch I | data_slot_bytes I | slot_count I | pad 8 | pad 4 | crc I
SEGMENT_ENTRY = struct.Struct("<BBHIII12xI")


@dataclass(frozen=True)
class SegmentEntry:
    state: int
    owner_slot: int
    owner_epoch: int
    data_slot_bytes: int
    slot_count: int

    def encode(self) -> bytes:
        return encode_segment_entry(self.state, self.owner_slot, self.owner_epoch, self.data_slot_bytes,
                                    self.slot_count)

    @classmethod
    def decode(cls, raw) -> "SegmentEntry | None":
        """None if the record is torn (service killed mid-write): the caller treats it as free."""
        state, _, owner, epoch, dslot, count, crc = SEGMENT_ENTRY.unpack_from(raw)
        if crc != _checksum.meta_crc(bytes(raw[: SEGMENT_RECORD_BYTES - 4])):
            return None
        return cls(state, owner, epoch, dslot, count)


FREE_SEGMENT = SegmentEntry(SEG_FREE, 0, 0, 0, 0)


def encode_segment_entry(state: int, owner_slot: int, owner_epoch: int, data_slot_bytes: int, slot_count: int) -> bytes:
    """``SegmentEntry(...).encode()`` without building the object."""
    body = SEGMENT_ENTRY.pack(state, 0, owner_slot, owner_epoch, data_slot_bytes, slot_count, 0)
    return body[:-4] + U32.pack(_checksum.meta_crc(body[:-4]))


def segment_entry_problem(g: Geometry, entry: SegmentEntry) -> str | None:
    """Why an intact segment-table record cannot have been written by the service, or None.

    A CRC only proves that a record was not torn, not that its fields are sane. The slot
    size decides how many index entries, headers and data slots of the segment are used and
    where they lie: within the granularity's bounds they stay inside this segment's own
    index, header and data regions; outside them they reach into other segments' (or past
    the pool's end).
    """
    if entry.state not in SEG_STATE_NAMES:
        known = ", ".join(f"{k} {v}" for k, v in SEG_STATE_NAMES.items())
        return f"state {entry.state} is unknown (known: {known})"
    if entry.state == SEG_FREE:
        return None
    d, gran, seg = entry.data_slot_bytes, g.slot_granularity_bytes, g.segment_size_bytes
    if d % gran or not gran <= d <= seg:
        return (f"data_slot_bytes {d} is not a multiple of the {gran}-byte slot granularity "
                f"between {gran} and the {seg}-byte segment size")
    if entry.slot_count != seg // d:
        return (f"slot_count {entry.slot_count} does not match data_slot_bytes {d} "
                f"(a {seg}-byte segment holds {seg // d} such slots)")
    return None


def index_entry_problem(entry: "IndexEntry", data_slot_bytes: int) -> str | None:
    """Why an intact index entry of a segment with this slot size cannot be the service's, or None."""
    if entry.state not in ENTRY_STATE_NAMES:
        known = ", ".join(f"{k} {v}" for k, v in ENTRY_STATE_NAMES.items())
        return f"state {entry.state} is unknown (known: {known})"
    if entry.generation >= MAX_GENERATION:
        return f"generation {entry.generation} is beyond 2^62, more allocations than any pool can have made"
    if entry.state != ENTRY_FREE and entry.length_bytes > data_slot_bytes:
        # A reader would be sent past its slot: into the next slot, segment or beyond the pool.
        return f"length_bytes {entry.length_bytes} exceeds the segment's {data_slot_bytes}-byte slots"
    return None


def write_segment_entry(buf, offset: int, entry: "SegmentEntry | bytes") -> None:
    """``entry``: the record, or its ``encode_segment_entry`` bytes (the service's hot path builds no object)."""
    # Copy A, then copy B: if the writer dies mid-way, one intact copy (old or new) remains.
    # Non-coherent: copy A is written back and fenced before copy B is written, so memory, too,
    # never holds both copies torn.
    raw = entry if type(entry) is bytes else entry.encode()
    buf[offset : offset + SEGMENT_RECORD_BYTES] = raw
    _wb(buf, offset, SEGMENT_RECORD_BYTES, "segment entry")
    _fence(buf, "segment entry")
    buf[offset + SEGMENT_RECORD_BYTES : offset + SEGMENT_ENTRY_BYTES] = raw
    _wb(buf, offset + SEGMENT_RECORD_BYTES, SEGMENT_RECORD_BYTES, "segment entry")


def read_segment_entry(buf, offset: int) -> SegmentEntry | None:
    """The first intact copy, or None if both are damaged; all zeros (never written) is free."""
    _inv(buf, offset, SEGMENT_ENTRY_BYTES, "segment entry")
    for off in (offset, offset + SEGMENT_RECORD_BYTES):
        raw = bytes(buf[off : off + SEGMENT_RECORD_BYTES])
        if raw == bytes(SEGMENT_RECORD_BYTES):
            return FREE_SEGMENT
        entry = SegmentEntry.decode(raw)
        if entry is not None:
            return entry
    return None
U32 = struct.Struct("<I")


# ---------------------------------------------------------------- index entries (service-written)
ENTRY_FREE = 0
ENTRY_RESERVED = 1
ENTRY_COMMITTED = 2
ENTRY_STATE_NAMES = {ENTRY_FREE: "free", ENTRY_RESERVED: "reserved", ENTRY_COMMITTED: "committed"}
MAX_GENERATION = 1 << 62
"""Generations count allocations from 1; no pool reaches this, and the service's u64 counters
(generation high-water = a generation + 65536) must not overflow past it."""
#   state B | pad B | owner_slot H | owner_epoch I | generation Q | length I | data_crc I | key 32s | pad 4 | crc I
INDEX_ENTRY = struct.Struct("<BBHIQII32s4xI")
_FREE_KEY = bytes(KEY_BYTES)


def encode_index_entry(state: int, owner_slot: int, owner_epoch: int, generation: int, length_bytes: int,
                       data_crc: int, key: bytes | None) -> bytes:
    """``IndexEntry(...).encode()`` without building the object (every ALLOC and COMMIT writes entries)."""
    body = INDEX_ENTRY.pack(state, 0, owner_slot, owner_epoch, generation, length_bytes, data_crc,
                            key or _FREE_KEY, 0)
    return body[:-4] + U32.pack(_checksum.meta_crc(memoryview(body)[:-4]))


@dataclass(frozen=True)
class IndexEntry:
    state: int
    owner_slot: int
    owner_epoch: int
    generation: int
    length_bytes: int
    data_crc: int
    key: bytes

    def encode(self) -> bytes:
        return encode_index_entry(self.state, self.owner_slot, self.owner_epoch, self.generation, self.length_bytes,
                                  self.data_crc, self.key)

    @classmethod
    def decode(cls, raw) -> "IndexEntry | None":
        """None if torn; an all-zero (never written) entry decodes as FREE."""
        state, _, owner, epoch, gen, length, dcrc, key, crc = INDEX_ENTRY.unpack_from(raw)
        if crc == 0 and state == 0 and gen == 0:
            return cls(ENTRY_FREE, 0, 0, 0, 0, 0, bytes(KEY_BYTES))
        if crc != _checksum.meta_crc(bytes(raw[: INDEX_ENTRY_BYTES - 4])):
            return None
        return cls(state, owner, epoch, gen, length, dcrc, key)


def write_index_entry(buf, g: Geometry, segment: int, slot: int, entry: "IndexEntry | bytes") -> None:
    """The entry's one writer (the service). Writing a COMMITTED entry is a block's commit point.
    ``entry``: the record, or its ``encode_index_entry`` bytes (the service's hot path builds no object)."""
    off = g.index_entry_offset(segment, slot)
    buf[off : off + INDEX_ENTRY_BYTES] = entry if type(entry) is bytes else entry.encode()
    _wb(buf, off, INDEX_ENTRY_BYTES, "index entry")  # the response's fence orders it before the answer


def read_index_entry(buf, g: Geometry, segment: int, slot: int) -> "IndexEntry | None":
    """None if torn (see ``IndexEntry.decode``)."""
    return read_index_entries(buf, g, segment, slot + 1)[slot]


def read_index_entries(buf, g: Geometry, segment: int, count: int) -> "list[IndexEntry | None]":
    """The first ``count`` entries of a segment in one read (recovery, reports)."""
    base = g.index_entry_offset(segment, 0)
    _inv(buf, base, count * INDEX_ENTRY_BYTES, "index entry")
    raw = bytes(buf[base : base + count * INDEX_ENTRY_BYTES])
    return [IndexEntry.decode(raw[i * INDEX_ENTRY_BYTES : (i + 1) * INDEX_ENTRY_BYTES]) for i in range(count)]


# ---------------------------------------------------------------- block headers (client-written)
BLOCK_MAGIC = 0x484B4C42  # "BLKH"
BLOCK_WRITING = 1
BLOCK_COMPLETE = 2
#   magic I | version H | state H | length Q | generation Q | data_crc I | writer_slot I | key 32s | pad 52 | crc I
BLOCK_HEADER = struct.Struct("<IHHQQII32s60xI")
assert BLOCK_HEADER.size == BLOCK_HEADER_BYTES


@dataclass(frozen=True)
class BlockHeader:
    state: int
    length_bytes: int
    generation: int
    data_crc: int
    writer_slot: int
    key: bytes

    def encode(self) -> bytes:
        return encode_block_header(self.state, self.length_bytes, self.generation, self.data_crc, self.writer_slot,
                                   self.key)

    @classmethod
    def decode(cls, raw) -> "BlockHeader | None":
        """None unless the header is intact (magic, version and its own crc)."""
        magic, version, state, length, gen, dcrc, writer, key, crc = BLOCK_HEADER.unpack_from(raw)
        if magic != BLOCK_MAGIC or version != LAYOUT_VERSION:
            return None
        if crc != _checksum.meta_crc(bytes(raw[: BLOCK_HEADER_BYTES - 4])):
            return None
        return cls(state, length, gen, dcrc, writer, key)


_HEADER_BODY_BYTES = BLOCK_HEADER_BYTES - 4


def encode_block_header(state: int, length_bytes: int, generation: int, data_crc: int, writer_slot: int,
                        key: bytes) -> bytes:
    """``BlockHeader(...).encode()`` without building the object (a put writes two per block)."""
    body = BLOCK_HEADER.pack(BLOCK_MAGIC, LAYOUT_VERSION, state, length_bytes, generation, data_crc, writer_slot,
                             key, 0)
    return body[:-4] + U32.pack(_checksum.meta_crc(memoryview(body)[:-4]))


def block_header_matches(raw: bytes, key: bytes, generation: int, length_bytes: int, data_crc: int) -> bool:
    """True if ``raw`` is an intact COMPLETE header of exactly this block (the reader's hot path).

    Same checks as ``BlockHeader.decode`` plus field comparisons, without building objects.
    """
    magic, version, state, length, gen, dcrc, _writer, hkey, crc = BLOCK_HEADER.unpack_from(raw)
    return (magic == BLOCK_MAGIC and version == LAYOUT_VERSION and state == BLOCK_COMPLETE
            and gen == generation and length == length_bytes and dcrc == data_crc and hkey == key
            and crc == _checksum.meta_crc(memoryview(raw)[:_HEADER_BODY_BYTES]))


def write_block_header(buf, offset: int, header: BlockHeader, data: tuple[int, int] | None = None) -> None:
    """The header's one writer (the client holding the slot's reservation). A put writes it
    WRITING, then the data, then COMPLETE: the COMPLETE header publishes the data.

    Non-coherent: the WRITING header is written back and fenced before the data is written (a reader
    that sees any new data then sees the header change); with ``data`` = (offset, length), the data's
    writeback (``write_block_data_done``) is fenced before the header is stored and the header is
    written back and fenced: the COMMIT request that follows may then name it."""
    if data is not None:
        _fence(buf, "block data")
    buf[offset : offset + BLOCK_HEADER_BYTES] = header.encode()
    if data is None:
        _wb(buf, offset, BLOCK_HEADER_BYTES, "block header")
        _fence(buf, "block header")
    else:
        _pub(buf, offset, BLOCK_HEADER_BYTES, (data,), "block header")


def read_header_bytes(buf, offset: int) -> bytes:
    """A block header as it is in the pool now (readers compare two reads, ``block_header_matches``)."""
    _inv(buf, offset, BLOCK_HEADER_BYTES, "block header")
    return bytes(buf[offset : offset + BLOCK_HEADER_BYTES])


def read_block_header(buf, offset: int) -> "BlockHeader | None":
    return BlockHeader.decode(read_header_bytes(buf, offset))


# ---------------------------------------------------------------- lookup table (service-written, client-read)
# An open-addressing (linear probing) hash table from key to block, so that a
# client finds a block by reading pool memory instead of asking the service.
# Each 64-byte bucket is written seqlock-style by the service (sequence word
# odd while the body is being written) and carries a CRC of its body; a reader
# reads the sequence word, the body and the sequence word again and accepts
# the body only if both words are the same even value and the CRC matches.
#   seq I | crc I | key 32s | generation Q | where Q | length I | data_crc I
# ``where`` = global slot (segment * max_slots + slot) | slot size class in
# granules << 40. generation 0 marks an empty bucket (generations start at 1).
# The table line in the service area holds a u64 table sequence: odd while the
# service rebuilds the whole table (recovery), and moved on by 2 before the
# service relocates entries (a deletion's backward shift), so that a reader
# whose probe ended in a miss can tell that an entry may have moved past it.
TABLE_BUCKET = struct.Struct("<II32sQQII")
assert TABLE_BUCKET.size == TABLE_BUCKET_BYTES
_BUCKET_BODY = struct.Struct("<32sQQII")
WHERE_SLOT_BITS = 40
_WHERE_SLOT_MASK = (1 << WHERE_SLOT_BITS) - 1


def bucket_home(key: bytes, buckets: int) -> int:
    """First bucket probed for a key: keys are SHA-256 digests, so their first 8 bytes are uniform."""
    return int.from_bytes(key[:8], "little") % buckets


def pack_where(g: Geometry, segment: int, slot: int, data_slot_bytes: int) -> int:
    return g.block_where(segment, slot) | (data_slot_bytes // g.slot_granularity_bytes) << WHERE_SLOT_BITS


def unpack_where(g: Geometry, where: int, length_bytes: int) -> tuple[int, int] | None:
    """(header offset, data offset) of a table entry's block, or None if ``where`` cannot be one of this pool's."""
    gslot = where & _WHERE_SLOT_MASK
    dslot = (where >> WHERE_SLOT_BITS) * g.slot_granularity_bytes
    seg, slot = divmod(gslot, g.max_slots_per_segment)
    if (seg >= g.segment_count or dslot == 0 or (slot + 1) * dslot > g.segment_size_bytes
            or length_bytes > dslot):
        return None
    return g.header_offset(seg, slot), g.segment_offset(seg) + slot * dslot


def write_bucket(buf, offset: int, key: bytes | None = None, generation: int = 0, where: int = 0,
                 length_bytes: int = 0, data_crc: int = 0, *, table_seq_offset: int | None = None) -> None:
    """The bucket's one writer (the service): sequence odd, body and CRC, sequence even. No key: empty.

    ``table_seq_offset``: the table sequence's last change must have reached memory before any bucket
    changes (a reader checks it around its probe); the sanitizer checks that it has."""
    if table_seq_offset is not None and _coh.ACTIVE:
        _coh.note_publish(buf, offset, ((table_seq_offset, 8),), "table seq")
    odd = open_bucket(buf, offset)
    write_bucket_body(buf, offset, key, generation, where, length_bytes, data_crc)
    close_bucket(buf, offset, odd)


def open_bucket(buf, offset: int) -> int:
    """Seqlock step 1: the bucket's sequence word becomes odd (readers keep off). -> that odd value."""
    (seq,) = U32.unpack_from(buf, offset)
    odd = (seq + 1 if seq % 2 == 0 else seq + 2) & 0xFFFFFFFF
    U32.pack_into(buf, offset, odd)
    _wb(buf, offset, 4, "table bucket")
    _fence(buf, "table bucket")
    return odd


def write_bucket_body(buf, offset: int, key: bytes | None, generation: int = 0, where: int = 0,
                      length_bytes: int = 0, data_crc: int = 0) -> None:
    """Seqlock step 2, the payload: CRC and body (no key: an empty bucket)."""
    if key is None:
        body = bytes(_BUCKET_BODY.size)
    else:
        body = _BUCKET_BODY.pack(key, generation, where, length_bytes, data_crc)
    buf[offset + 4 : offset + TABLE_BUCKET_BYTES] = U32.pack(_checksum.meta_crc(body) if key else 0) + body
    _wb(buf, offset, TABLE_BUCKET_BYTES, "table bucket")
    _fence(buf, "table bucket")


def close_bucket(buf, offset: int, odd: int) -> None:
    """Seqlock step 3, the publication: the sequence word becomes even again."""
    U32.pack_into(buf, offset, (odd + 1) & 0xFFFFFFFF)
    _wb(buf, offset, 4, "table bucket")
    _fence(buf, "table bucket")


def read_bucket(buf, offset: int):
    """The bucket's one reader: None if empty, False if being written or damaged (try again),
    else (key, generation, where, length, data_crc). ``beluga/_native.c`` reads it the same way."""
    if _coh.ACTIVE:
        _coh.pool_invalidate(buf, offset, TABLE_BUCKET_BYTES, "table bucket")
    (s1,) = U32.unpack_from(buf, offset)
    if s1 & 1:
        return False
    raw = bytes(buf[offset : offset + TABLE_BUCKET_BYTES])
    if U32.unpack_from(buf, offset)[0] != s1:
        return False
    _, crc, key, gen, where, length, dcrc = TABLE_BUCKET.unpack(raw)
    if gen == 0:
        return None
    if crc != _checksum.meta_crc(memoryview(raw)[8:]):
        return False
    return key, gen, where, length, dcrc


def read_table_seq(buf, g: Geometry) -> int:
    return read_table_seq_at(buf, g.table_seq_offset)


def read_table_seq_at(buf, offset: int) -> int:
    """``read_table_seq`` for a reader that cached the word's offset (the probe's signature)."""
    if _coh.ACTIVE:
        _coh.pool_invalidate(buf, offset, 8, "table seq")
    return U64.unpack_from(buf, offset)[0]


def write_table_seq(buf, g: Geometry, value: int) -> None:
    """Odd: the table is being rebuilt; moved on by 2: entries are about to be relocated."""
    U64.pack_into(buf, g.table_seq_offset, value & 0xFFFFFFFFFFFFFFFF)
    _wb(buf, g.table_seq_offset, 8, "table seq")
    _fence(buf, "table seq")


def clear_table(buf, g: Geometry) -> None:
    """Every bucket empty at once (a rebuild, with the table sequence odd meanwhile)."""
    buf[g.table_offset : g.table_offset + g.table_buckets * TABLE_BUCKET_BYTES] = bytes(
        g.table_buckets * TABLE_BUCKET_BYTES)
    _wb(buf, g.table_offset, g.table_buckets * TABLE_BUCKET_BYTES, "table bucket")
    _fence(buf, "table bucket")


# ---------------------------------------------------------------- touch rings (client-written)
# Lease-free reads tell the service what they read, for its LRU order: each
# entry is (global slot u32, generation's low 32 bits u32), written into the
# client's ring at head % entries before the head (u64 at TOUCH_HEAD_OFFSET of
# its host slot page) moves on. The service drains rings before it decides
# anything that depends on LRU order; a ring overrun loses only the oldest
# touches (LRU order is soft state).
TOUCH_ENTRY = struct.Struct("<II")


def read_touch_head_at(buf, head_offset: int) -> int:
    """The touch head at ``head_offset`` (a reader about to post; its client is the head's one writer)."""
    return U64.unpack_from(buf, head_offset)[0]


def read_touch_head(buf, g: Geometry, slot: int) -> int:
    """A client's touch head as the service reads it (another host's word: invalidated first)."""
    off = g.touch_head_offset(slot)
    _inv(buf, off, 8, "touch head")
    return U64.unpack_from(buf, off)[0]


def read_own_touch_head(buf, g: Geometry, slot: int) -> int:
    """The touch head as its client (the one writer) reads it."""
    return U64.unpack_from(buf, g.touch_head_offset(slot))[0]


def post_touches(buf, g: Geometry, slot: int, head: int, touches) -> int:
    """The ring's one writer (its client): entries first, then the head. -> the new head."""
    ring = g.touch_ring_offset(slot)
    first = head
    for where, generation in touches:
        write_touch_entry(buf, ring, head, where, generation)
        head += 1
    _publish_touches(buf, ring, g.touch_head_offset(slot), first, head)
    return head


def write_touch_entry(buf, ring_offset: int, index: int, where: int, generation: int) -> None:
    """A touch's payload: entry ``index`` (mod the ring) of the ring at ``ring_offset``."""
    off = ring_offset + (index % TOUCH_RING_ENTRIES) * TOUCH_ENTRY_BYTES
    TOUCH_ENTRY.pack_into(buf, off, where & 0xFFFFFFFF, generation & 0xFFFFFFFF)
    if _coh.ACTIVE:
        _coh.pool_writeback(buf, off, TOUCH_ENTRY_BYTES, "touch entry")


def publish_touch_head(buf, head_offset: int, head: int) -> None:
    """Makes the entries before ``head`` visible to the service."""
    U64.pack_into(buf, head_offset, head)
    _wb(buf, head_offset, 8, "touch head")
    _fence(buf, "touch head")


def _ring_spans(ring_offset: int, first: int, head: int):
    """The (offset, length) spans of ring entries first..head-1 (at most two: the ring wraps)."""
    if head - first >= TOUCH_RING_ENTRIES:
        return ((ring_offset, TOUCH_RING_BYTES),)
    a, b = first % TOUCH_RING_ENTRIES, head % TOUCH_RING_ENTRIES
    if head == first:
        return ()
    if a < b:
        return ((ring_offset + a * TOUCH_ENTRY_BYTES, (b - a) * TOUCH_ENTRY_BYTES),)
    return ((ring_offset + a * TOUCH_ENTRY_BYTES, TOUCH_RING_BYTES - a * TOUCH_ENTRY_BYTES),
            (ring_offset, b * TOUCH_ENTRY_BYTES)) if b else ((ring_offset + a * TOUCH_ENTRY_BYTES,
                                                             TOUCH_RING_BYTES - a * TOUCH_ENTRY_BYTES),)


def _publish_touches(buf, ring_offset: int, head_offset: int, first: int, head: int) -> None:
    if _coh.ACTIVE:
        _coh.pool_fence(buf, "touch entry")
    U64.pack_into(buf, head_offset, head)
    if _coh.ACTIVE:
        _coh.pool_publish(buf, head_offset, 8, _ring_spans(ring_offset, first, head), "touch head")


def post_touch(buf, ring_offset: int, head_offset: int, head: int, where: int, generation: int) -> int:
    """``post_touches`` of one touch, for a client that cached its ring's offsets (the get hot path)."""
    write_touch_entry(buf, ring_offset, head, where, generation)
    _publish_touches(buf, ring_offset, head_offset, head, head + 1)
    return head + 1


def read_touches(buf, g: Geometry, slot: int, tail: int) -> tuple[int, list[tuple[int, int]]]:
    """The ring's one reader (the service): -> (head, touches posted since ``tail``, at most a ring's worth)."""
    head = read_touch_head(buf, g, slot)
    if head == tail:
        return head, []
    if head < tail or head - tail > TOUCH_RING_ENTRIES:
        tail = max(0, head - TOUCH_RING_ENTRIES)  # overrun (or a reset head): keep the newest
    ring = g.touch_ring_offset(slot)
    for off, n in _ring_spans(ring, tail, head):
        _inv(buf, off, n, "touch entry")
    out = [TOUCH_ENTRY.unpack_from(buf, ring + (i % TOUCH_RING_ENTRIES) * TOUCH_ENTRY_BYTES) for i in range(tail, head)]
    return head, out


# ---------------------------------------------------------------- where an offset lies
def region_of(g: Geometry, off: int, *, line_bytes: int = 64) -> str:
    """The region of the layout that holds byte ``off`` (docs/store.md §1): the coherence
    sanitizer's reports name what a line holds with it."""
    if off < SUPERBLOCK_BYTES:
        return "superblock"
    if g.service_offset <= off < g.service_offset + SERVICE_AREA_BYTES:
        rel = off - g.service_offset
        if TABLE_LINE_OFFSET <= rel < TABLE_LINE_OFFSET + line_bytes:
            return "service area: table sequence line"
        return f"service area +{rel}"
    host_end = g.host_offset + g.max_clients * g.host_slot_bytes
    if g.host_offset <= off < host_end:
        slot, rel = divmod(off - g.host_offset, g.host_slot_bytes)
        name = f"host slot {slot}"
        if rel < HOST_LINES_BYTES:
            if CLIENT_LINE_OFFSET <= rel < CLIENT_LINE_OFFSET + line_bytes:
                return f"{name}: client line (claim, request seq, heartbeat)"
            if SERVICE_LINE_OFFSET <= rel < SERVICE_LINE_OFFSET + line_bytes:
                return f"{name}: service line (owner, response seq, epoch)"
            if TOUCH_HEAD_OFFSET <= rel < TOUCH_HEAD_OFFSET + line_bytes:
                return f"{name}: touch head"
            return f"{name}: host lines +{rel}"
        rel -= HOST_LINES_BYTES
        if rel < TOUCH_RING_BYTES:
            return f"{name}: touch ring entry {rel // TOUCH_ENTRY_BYTES}"
        rel -= TOUCH_RING_BYTES
        if rel < g.rpc_buffer_bytes:
            return f"{name}: request buffer +{rel}"
        return f"{name}: response buffer +{rel - g.rpc_buffer_bytes}"
    slots = g.segment_count * g.max_slots_per_segment
    regions = [
        (g.segment_table_offset, g.segment_count * SEGMENT_ENTRY_BYTES, SEGMENT_ENTRY_BYTES, "segment-table entry"),
        (g.index_offset, slots * INDEX_ENTRY_BYTES, INDEX_ENTRY_BYTES, "index entry"),
        (g.table_offset, g.table_buckets * TABLE_BUCKET_BYTES, TABLE_BUCKET_BYTES, "lookup-table bucket"),
        (g.headers_offset, slots * BLOCK_HEADER_BYTES, BLOCK_HEADER_BYTES, "block header"),
    ]
    for start, length, rec, name in regions:
        if start <= off < start + length:
            i, rel = divmod(off - start, rec)
            if name == "segment-table entry":
                return f"{name} of segment {i} (copy {'AB'[rel // SEGMENT_RECORD_BYTES]})"
            if name == "lookup-table bucket":
                return f"{name} {i}"
            seg, slot = divmod(i, g.max_slots_per_segment)
            return f"{name} of segment {seg} slot {slot}"
    if g.segments_offset <= off < g.used_bytes:
        seg, rel = divmod(off - g.segments_offset, g.segment_size_bytes)
        return f"block data: segment {seg} +{rel}"
    if off >= g.used_bytes:
        return "past the last segment"
    return "between regions"
