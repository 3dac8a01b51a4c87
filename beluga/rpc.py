"""Wire format shared by every transport (pool slots, TCP, in-process).

A message is a fixed header followed by piggybacked lease releases (requests
only) and an op-specific body. The header carries a CRC over the whole message
because the pool transport can observe a request buffer while its client is
rewriting it (after a timeout); a CRC mismatch means "not ready yet", never
"process garbage".
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from .checksum import meta_crc
from .errors import ProtocolError

REQUEST_MAGIC = 0x31515242  # "BRQ1"
RESPONSE_MAGIC = 0x31535242  # "BRS1"
#   magic I | seq Q | nonce Q | slot I | op H | flags H | n_release I | body_len I | crc I
REQUEST_HEADER = struct.Struct("<IQQIHHIII")
#   magic I | seq Q | status H | pad H | body_len I | crc I
RESPONSE_HEADER = struct.Struct("<IQHHII")
NO_SLOT = 0xFFFFFFFF

# ---- ops
OP_NOP = 0
OP_HELLO = 1
OP_BYE = 2
OP_ALLOC = 3
OP_COMMIT = 4
OP_ABORT = 5
OP_LOOKUP = 6
OP_DELETE = 7
OP_STATS = 8
OP_REPORT = 9
OP_EVICT = 10
OP_NAMES = {
    OP_NOP: "nop", OP_HELLO: "hello", OP_BYE: "bye", OP_ALLOC: "alloc", OP_COMMIT: "commit", OP_ABORT: "abort",
    OP_LOOKUP: "lookup", OP_DELETE: "delete", OP_STATS: "stats", OP_REPORT: "report", OP_EVICT: "evict",
}

# ---- lookup flags
LOOKUP_LEASE = 1
"""Take a lease so the block cannot be evicted or reused while the caller reads it."""
LOOKUP_STOP_AT_MISS = 2
"""Answer only the leading hits (lookup_prefix)."""

# ---- statuses (whole response and per item)
OK = 0
MISS = 1
BAD_REQUEST = 2
NOT_OWNER = 3
NOT_RESERVED = 4
BAD_HEADER = 5
TOO_LARGE = 6
POOL_FULL = 7
UNKNOWN_SESSION = 8
BAD_KEY = 9
NO_CLIENT_SLOT = 10
INTERNAL = 11
CLOSING = 12
"""TCP only, with seq 0: the service is closing this connection (limit reached, oversize frame); the body says why."""
STATUS_NAMES = {
    OK: "ok", MISS: "miss", BAD_REQUEST: "bad request", NOT_OWNER: "segment not owned", NOT_RESERVED: "not reserved",
    BAD_HEADER: "block header mismatch", TOO_LARGE: "block too large", POOL_FULL: "pool full",
    UNKNOWN_SESSION: "unknown session", BAD_KEY: "bad key", NO_CLIENT_SLOT: "no free client slot",
    INTERNAL: "internal error", CLOSING: "connection closed by the service",
}
MAX_MESSAGE_BYTES = 200
MAX_RELEASES_PER_REQUEST = 256

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ZERO_CRC = bytes(4)
_NO_ERRORS = bytes(4)  # an empty error list: count 0


class Request(NamedTuple):
    seq: int
    nonce: int
    slot: int
    op: int
    flags: int
    releases: tuple[int, ...]
    body: bytes


def encode_request(seq: int, nonce: int, slot: int, op: int, body: bytes = b"", *, flags: int = 0,
                   releases=()) -> bytes:
    n_rel = len(releases)
    head = REQUEST_HEADER.pack(REQUEST_MAGIC, seq, nonce, slot, op, flags, n_rel, len(body), 0)
    if n_rel:
        rest = struct.pack(f"<{n_rel}Q", *releases) + body
    else:
        rest = body
    # The crc covers the header with its crc field zeroed (as packed above), then the rest.
    crc = meta_crc(rest, meta_crc(head))
    return b"".join((head[:-4], _U32.pack(crc), rest))


def request_length(raw) -> int:
    """Total length of the request whose header starts ``raw``; ProtocolError if it is not one."""
    magic, _, _, _, _, _, n_rel, body_len, _ = REQUEST_HEADER.unpack_from(raw)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"request magic {magic:#x}, expected {REQUEST_MAGIC:#x}")
    return REQUEST_HEADER.size + 8 * n_rel + body_len


def _checked_frame(raw, header_size: int, total: int, crc: int, kind: str) -> bytes:
    """The frame's `total` bytes, once they are all there and match the crc that ends the
    header (computed over the header with that field as zeros, then the rest)."""
    if total > len(raw):
        raise ProtocolError(f"{kind} says {total} bytes but only {len(raw)} are there")
    data = raw if type(raw) is bytes and len(raw) == total else bytes(raw[:total])
    view = memoryview(data)
    check = meta_crc(view[header_size:], meta_crc(_ZERO_CRC, meta_crc(view[: header_size - 4])))
    if check != crc:
        raise ProtocolError(f"{kind} crc mismatch (stored {crc:#010x}, computed {check:#010x})")
    return data


def decode_request(raw) -> Request:
    if len(raw) < REQUEST_HEADER.size:
        raise ProtocolError(f"request of {len(raw)} bytes is shorter than its {REQUEST_HEADER.size}-byte header")
    magic, seq, nonce, slot, op, flags, n_rel, body_len, crc = REQUEST_HEADER.unpack_from(raw)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"request magic {magic:#x}, expected {REQUEST_MAGIC:#x}")
    data = _checked_frame(raw, REQUEST_HEADER.size, REQUEST_HEADER.size + 8 * n_rel + body_len, crc, "request")
    if n_rel:
        releases = struct.unpack_from(f"<{n_rel}Q", data, REQUEST_HEADER.size)
        body = data[REQUEST_HEADER.size + 8 * n_rel :]
    else:
        releases = ()
        body = data[REQUEST_HEADER.size :]
    return Request(seq, nonce, slot, op, flags, releases, body)


def encode_response(seq: int, status: int, body: bytes = b"") -> bytes:
    head = RESPONSE_HEADER.pack(RESPONSE_MAGIC, seq, status, 0, len(body), 0)
    crc = meta_crc(body, meta_crc(head))
    return b"".join((head[:-4], _U32.pack(crc), body))


def response_length(raw) -> int:
    magic, _, _, _, body_len, _ = RESPONSE_HEADER.unpack_from(raw)
    if magic != RESPONSE_MAGIC:
        raise ProtocolError(f"response magic {magic:#x}, expected {RESPONSE_MAGIC:#x}")
    return RESPONSE_HEADER.size + body_len


def decode_response(raw) -> tuple[int, int, bytes]:
    """-> (seq, status, body)."""
    if len(raw) < RESPONSE_HEADER.size:
        raise ProtocolError(f"response of {len(raw)} bytes is shorter than its header")
    magic, seq, status, _, body_len, crc = RESPONSE_HEADER.unpack_from(raw)
    if magic != RESPONSE_MAGIC:
        raise ProtocolError(f"response magic {magic:#x}, expected {RESPONSE_MAGIC:#x}")
    data = _checked_frame(raw, RESPONSE_HEADER.size, RESPONSE_HEADER.size + body_len, crc, "response")
    return seq, status, data[RESPONSE_HEADER.size :]


# ---------------------------------------------------------------- item records
class Records:
    """A counted array of fixed-size structs, followed by per-item error messages."""

    def __init__(self, fmt: str) -> None:
        self.item = struct.Struct(fmt)

    def pack(self, rows, errors: dict[int, str] | None = None) -> bytes:
        pack = self.item.pack
        parts = [_U32.pack(len(rows))]
        parts.extend([pack(*r) for r in rows])
        parts.append(pack_errors(errors) if errors else _NO_ERRORS)
        return b"".join(parts)

    def unpack(self, body: bytes, offset: int = 0) -> tuple[list[tuple], dict[int, str], int]:
        try:
            (n,) = _U32.unpack_from(body, offset)
            offset += 4
            end = offset + n * self.item.size
            if end > len(body):
                raise ProtocolError(f"{n} records of {self.item.size} bytes do not fit in a {len(body)}-byte body")
            rows = list(self.item.iter_unpack(memoryview(body)[offset:end])) if n else []
            errors, offset = unpack_errors(body, end)
        except struct.error as exc:
            raise ProtocolError(f"truncated record list: {exc}") from None
        return rows, errors, offset

    def max_items(self, budget_bytes: int, *, with_messages: bool) -> int:
        per = self.item.size + (8 + MAX_MESSAGE_BYTES if with_messages else 0)
        return max(1, (budget_bytes - 16) // per)


def pack_errors(errors: dict[int, str]) -> bytes:
    parts = [_U32.pack(len(errors))]
    for idx, msg in errors.items():
        raw = msg.encode("utf-8")[:MAX_MESSAGE_BYTES]
        parts.append(struct.pack("<IH", idx, len(raw)) + raw)
    return b"".join(parts)


def unpack_errors(body: bytes, offset: int) -> tuple[dict[int, str], int]:
    if offset == len(body):
        return {}, offset
    (n,) = _U32.unpack_from(body, offset)
    offset += 4
    out: dict[int, str] = {}
    for _ in range(n):
        idx, ln = struct.unpack_from("<IH", body, offset)
        offset += 6
        out[idx] = body[offset : offset + ln].decode("utf-8", errors="replace")
        offset += ln
    return out, offset


# request items
ALLOC_REQ = Records("<Q")  # length_bytes
COMMIT_REQ = Records("<32sIIQQI")  # key, segment, slot, generation, length, data_crc
ABORT_REQ = Records("<IIQ")  # segment, slot, generation
KEYS_REQ = Records("<32s")  # lookup / delete
REPORT_REQ = Records("<32sQ")  # key, generation

# response items
ALLOC_RESP = Records("<HIIQQQQ")  # status, segment, slot, generation, header_off, data_off, capacity
STATUS_RESP = Records("<H")  # commit / abort / delete / report
LOOKUP_RESP = Records("<HIIQQQQIQ")  # status, segment, slot, generation, header_off, data_off, length, crc, lease

HELLO_REQ = struct.Struct("<QIi32s")  # nonce, resume_slot, pid, host
HELLO_RESP = struct.Struct("<IQ")  # slot, epoch
EVICT_REQ = struct.Struct("<I")
EVICT_RESP = struct.Struct("<I")


def decode_hello(body: bytes) -> tuple[int, int, int, bytes]:
    """-> (nonce, resume slot, pid, host) of a HELLO body; ProtocolError if it is not one."""
    try:
        return HELLO_REQ.unpack_from(body)
    except struct.error:
        raise ProtocolError("hello: body is not nonce/slot/pid/host") from None


def decode_evict(body: bytes) -> int:
    """-> the count of an EVICT body; ProtocolError if it is not one."""
    try:
        return EVICT_REQ.unpack_from(body)[0]
    except struct.error:
        raise ProtocolError("evict: body must be a u32 count") from None


def response_status(raw) -> int | None:
    """The status of an encoded response (None if it is shorter than a response header)."""
    if len(raw) < RESPONSE_HEADER.size:
        return None
    return RESPONSE_HEADER.unpack_from(raw)[2]


# TCP framing: every message is prefixed with its length.
FRAME_PREFIX = struct.Struct("<I")


def frame(message: bytes) -> bytes:
    return FRAME_PREFIX.pack(len(message)) + message


def frame_length(raw) -> int:
    """The length a frame prefix at the start of ``raw`` (at least 4 bytes) announces."""
    return FRAME_PREFIX.unpack_from(raw)[0]


class Allocation(NamedTuple):
    segment: int
    slot: int
    generation: int
    header_offset: int
    data_offset: int
    capacity_bytes: int


class Location(NamedTuple):
    """Where a committed block lives, as returned by a lookup."""

    segment: int
    slot: int
    generation: int
    header_offset: int
    data_offset: int
    length_bytes: int
    data_crc: int
    lease: int
