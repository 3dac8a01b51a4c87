"""Cache-line flushes for pools that hardware does not keep coherent, and a sanitizer that checks them.

On a multi-host CXL pool without back-invalidate (CXL 2.0 switches), a store
can sit in one host's cache, invisible to the others, until it is written back,
and a host keeps reading its cached copy of a line until it drops it. So the
store writes back what it publishes before the word that makes it visible, and
invalidates what it is about to read (docs/coherence.md):

``writeback(buf, off, n, what=None)``
    Write back every 64-byte line that ``buf[off:off+n]`` touches (clwb, else
    clflushopt, else clflush). No fence: call ``fence()`` before the store that
    publishes.
``fence()``
    Order the writebacks before every later store (sfence; mfence with clflush).
``invalidate(buf, off, n, what=None)``
    Drop the lines (clflushopt or clflush, then mfence) so that the next read
    fetches what other hosts wrote back.
``note_read(buf, off, n, what)``, ``note_publish(buf, word_off, payload, what)``
    Checks only (no-ops unless a sanitized pool is open): a read of lines that
    another host wrote back since this host last invalidated them; a
    publication whose payload lines are dirty or not fenced yet.
``publish(buf, word_off, word_len, payload, what)``
    ``note_publish``, then write back the word and fence: the last step of a publication.

``can_flush()``, ``flush_method()``, ``status()`` say what this host does. The
instructions come from the C module ``beluga._native`` (``make setup``); where it
is missing (the guests), or ``BELUGA_NATIVE=0`` or ``BELUGA_FLUSH=none`` says to
act as if it were, the calls do nothing but count, and ``status()`` says that this
host cannot flush. ``BELUGA_FLUSH=clflush|clflushopt`` forces a weaker instruction.

**The sanitizer.** ``Pool.open(path, coherence="check")`` (or
``BELUGA_COHERENCE=check``) gives the pool a private cache: ``pool.buf`` is a
private copy of the pool that the store reads and writes as before (struct,
NumPy and the C module work unchanged), and only ``writeback`` copies its dirty
lines to the shared mapping, only ``invalidate`` refreshes lines from it. Each
open pool is one host. A side table (``<pool>.coherence`` beside a pool file,
``/dev/shm/beluga-coherence-<device>`` for a device, or ``BELUGA_COHERENCE_TABLE``)
stamps every line written back with (host, fence epoch); a host that fetches a
line stamped (H, e) has seen every writeback H fenced before e, so a later read
of a line that H wrote back before that, from a copy that differs, is stale.
Writebacks not yet ordered by what this host saw are races that the protocol
itself must handle (a seqlock re-check), and are not reported. Reports carry the
pool offset, the region it lies in, the record (``what``) and the Python stack;
``check`` raises ``CoherenceError``, ``check-collect`` keeps going; both append
them, one JSON object a line, to ``BELUGA_COHERENCE_REPORT`` when it is set.

Removing call sites (to prove that the sanitizer catches each):
``BELUGA_COHERENCE_REMOVE="invalidate:rpc response,writeback:*"`` (or
``removed(...)``) turns the named calls (op and ``what`` label) into no-ops;
``sites()`` lists the (op, what) pairs this process called.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import socket
import struct
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

from . import layout as L

LINE_BYTES = 64
MODES = ("off", "check", "check-collect")
ENV_MODE = "BELUGA_COHERENCE"
ENV_REPORT = "BELUGA_COHERENCE_REPORT"
ENV_TABLE = "BELUGA_COHERENCE_TABLE"
ENV_REMOVE = "BELUGA_COHERENCE_REMOVE"
ENV_FLUSH = "BELUGA_FLUSH"
ENV_SCOPE = "BELUGA_COHERENCE_SCOPE"
SCOPES = ("all", "metadata")

STALE_READ = "stale-read"
"""A read returned this host's cached copy of a line that another host had written back newer content to."""
NOT_WRITTEN_BACK = "not-written-back"
"""A publication while lines of its payload still held writes that were never written back."""
NOT_FENCED = "not-fenced"
"""A publication while payload lines were written back but no fence ordered them before it."""
LOST_WRITE = "lost-write"
"""An invalidate dropped writes that were never written back."""
CLOBBER = "clobber"
"""A writeback overwrote bytes that another host had written back since this host fetched the line."""


class CoherenceError(AssertionError):
    """The sanitizer found a missing flush. Not a BelugaError: the store's own handlers must not swallow it."""

    def __init__(self, report: "Report") -> None:
        super().__init__(report.text())
        self.report = report


@dataclass(frozen=True)
class Report:
    kind: str
    offset: int
    region: str
    what: str
    detail: str
    lines: int
    pool: str
    pid: int
    host: str
    unix_ns: int
    stack: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stack"] = list(self.stack)
        return d

    def text(self) -> str:
        stack = "".join(self.stack).rstrip()
        return (f"coherence {self.kind} at pool offset {self.offset:#x} ({self.region}), {self.what}: {self.detail}"
                f" [{self.pool}, pid {self.pid} on {self.host}]" + (f"\n{stack}" if stack else ""))


# ---------------------------------------------------------------- flushes on this host

def _load_native():
    if os.environ.get(ENV_FLUSH, "").strip() == "none":
        return None, f"{ENV_FLUSH}=none"
    if os.environ.get("BELUGA_NATIVE", "").strip() == "0":
        return None, "BELUGA_NATIVE=0: acting as a host without the C module"
    try:
        from . import _native  # noqa: PLC0415 - optional, built by `make setup`
    except ImportError:
        return None, "the C module beluga._native is not built (`make setup`)"
    if not hasattr(_native, "writeback"):
        return None, "the C module beluga._native predates the flush functions (rebuild: `make setup`)"
    if _native.FLUSH_METHOD == "none":
        return None, "this CPU has none of clwb, clflushopt, clflush"
    return _native, ""


_native, _why_not = _load_native()
unflushed = {"writeback": 0, "invalidate": 0, "fence": 0}
"""Calls that could not flush on this host (no C module): what the store would have needed."""


def can_flush() -> bool:
    return _native is not None


def flush_method() -> str:
    """clwb, clflushopt, clflush, or none."""
    return _native.FLUSH_METHOD if _native is not None else "none"


def status() -> dict:
    """For the service's ready line and `beluga stat`: what this host does about non-coherent pools."""
    if _native is None:
        out = {"can_flush": False, "writeback": "none", "invalidate": "none", "fence": "none", "why": _why_not,
               "unflushed": dict(unflushed)}
    else:
        out = {"can_flush": True, "writeback": _native.FLUSH_METHOD, "invalidate": _native.INVALIDATE_METHOD,
               "fence": _native.FENCE_METHOD}
    out["sanitizer"] = env_mode()
    return out


def status_line() -> str:
    s = status()
    if s["can_flush"]:
        line = f"cache flushes: writeback {s['writeback']}, invalidate {s['invalidate']}, fence {s['fence']}"
    else:
        line = (f"cache flushes: none ({s['why']}): safe only on a coherent pool "
                f"(one host, or hardware coherence)")
    if s["sanitizer"] != "off":
        line += f"; coherence sanitizer {s['sanitizer']}"
    return line


_removed: set[tuple[str, str]] = set()
_seen: set[tuple[str, str]] = set()


def _parse_removed(text: str) -> set[tuple[str, str]]:
    out = set()
    for item in filter(None, (p.strip() for p in text.split(","))):
        op, _, what = item.partition(":")
        if op not in ("writeback", "invalidate", "fence") or not what:
            raise ValueError(f"{ENV_REMOVE}: {item!r}: expected OP:WHAT with OP writeback, invalidate or fence "
                             f"and WHAT a label or *")
        out.add((op, what))
    return out


_removed |= _parse_removed(os.environ.get(ENV_REMOVE, ""))


def _skip(op: str, what: str | None) -> bool:
    key = (op, what or "")
    _seen.add(key)
    return bool(_removed) and (key in _removed or (op, "*") in _removed)


@contextlib.contextmanager
def removed(*sites: tuple[str, str]) -> Iterator[None]:
    """Turn the calls with these (op, what) labels into no-ops meanwhile (tests proving the sanitizer)."""
    added = set(sites) - _removed
    _removed.update(added)
    try:
        yield
    finally:
        _removed.difference_update(added)


def sites() -> set[tuple[str, str]]:
    """The (op, what) pairs of the writeback/invalidate/fence calls made in this process so far."""
    return set(_seen)


ENV_SITES = "BELUGA_COHERENCE_SITES"
"""A file to which a process appends, as it exits, one JSON line: the (op, what) pairs it used."""


def _save_sites() -> None:
    path = os.environ.get(ENV_SITES, "").strip()
    if path and _seen:
        line = (json.dumps(sorted(_seen)) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


if os.environ.get(ENV_SITES, "").strip():
    import atexit

    atexit.register(_save_sites)


def writeback(buf, off: int, n: int, what: str | None = None) -> None:
    if _skip("writeback", what):
        return
    if _models:
        hit = _find(buf, off, n)
        if hit is not None:
            with hit[0].lock:
                hit[0].writeback(hit[1], n, what)
            return
    if _native is not None:
        _native.writeback(buf, off, n)
    else:
        unflushed["writeback"] += 1


def invalidate(buf, off: int, n: int, what: str | None = None) -> None:
    if _skip("invalidate", what):
        return
    if _models:
        hit = _find(buf, off, n)
        if hit is not None:
            with hit[0].lock:
                hit[0].invalidate(hit[1], n, what)
            return
    if _native is not None:
        _native.invalidate(buf, off, n)
    else:
        unflushed["invalidate"] += 1


def fence(what: str | None = None) -> None:
    if _skip("fence", what):
        return
    for m in list(_models):
        with m.lock:
            m.fence()
    if _native is not None:
        _native.fence()
    else:
        unflushed["fence"] += 1


def note_read(buf, off: int, n: int, what: str) -> None:
    """Call right before reading ``buf[off:off+n]`` (after its invalidate): reports a stale read."""
    if _models:
        hit = _find(buf, off, n)
        if hit is not None:
            with hit[0].lock:
                hit[0].check_read(hit[1], n, what)


def note_publish(buf, word_off: int | None, payload: Iterable[tuple[int, int]], what: str) -> None:
    """Call when the word at ``word_off`` (None: the publication leaves the pool, e.g. a TCP answer)
    makes ``payload`` ((offset, length) pairs, relative to ``buf`` like ``word_off``) visible."""
    if _models:
        for off, n in payload:
            hit = _find(buf, off, n)
            if hit is not None:
                word = None
                if word_off is not None:
                    w = _find(buf, word_off, 1)
                    word = w[1] if w is not None and w[0] is hit[0] else None
                with hit[0].lock:
                    hit[0].check_publish(word, hit[1], n, what)


def publish(buf, word_off: int, word_len: int, payload: Iterable[tuple[int, int]], what: str) -> None:
    """The last step of a publication, after the word is stored: check, write the word back, fence."""
    note_publish(buf, word_off, payload, what)
    writeback(buf, word_off, word_len, what)
    fence(what)


# ---------------------------------------------------------------- the store's flush policy

ENV_POLICY = "BELUGA_FLUSH_POLICY"
POLICIES = ("auto", "on", "off")
ACTIVE = False
"""True while some open pool flushes (policy on on a host that can flush) or is sanitized: the
store's accessors (beluga/layout.py) test this one flag before calling ``pool_*`` below, so a
coherent pool (a plain file, policy off) pays one attribute read per publication."""
_flushing: list = []  # the mappings (Pool._mm) of open pools whose policy is on


def env_policy() -> str:
    policy = os.environ.get(ENV_POLICY, "").strip() or "auto"
    if policy not in POLICIES:
        raise ValueError(f"{ENV_POLICY}={policy!r}: expected one of {', '.join(POLICIES)}")
    return policy


def resolve_policy(policy: str | None, *, is_devdax: bool, sanitized: bool) -> str:
    """"on" or "off" for a pool: ``policy`` (or $BELUGA_FLUSH_POLICY) "auto" means on for a devdax
    device (the multi-host CXL case), off for a file (one host's page cache is coherent). A sanitized
    pool always flushes (through the model)."""
    p = policy if policy is not None else env_policy()
    if p not in POLICIES:
        raise ValueError(f"flush policy {p!r}: expected one of {', '.join(POLICIES)}")
    if sanitized:
        return "on"
    if p == "auto":
        return "on" if is_devdax else "off"
    return p


def _update_active() -> None:
    global ACTIVE
    ACTIVE = bool(_models) or (bool(_flushing) and _native is not None)


def register_flushing(mm) -> None:
    """A pool whose policy is on (not sanitized) was opened over ``mm``."""
    with _lock:
        _flushing.append(mm)
        _update_active()


def unregister_flushing(mm) -> None:
    with _lock:
        for i, o in enumerate(_flushing):
            if o is mm:
                del _flushing[i]
                break
        _update_active()


def flushes(buf) -> bool:
    """True if ``buf`` (a pool's ``buf``) belongs to a pool that flushes (policy on, or sanitized)."""
    if not ACTIVE:
        return False
    if _models and _find(buf, 0, 0) is not None:
        return True
    obj = buf.obj if type(buf) is memoryview else buf
    return any(obj is o for o in _flushing)


def sanitized(buf) -> bool:
    """True if ``buf`` is a sanitized pool's cache (code the model cannot follow, C, must not touch it)."""
    return bool(_models) and _find(buf, 0, 0) is not None


def _target(buf, off: int, n: int):
    """The model that holds ``buf[off:off+n]`` (with the pool offset), True for a flushing pool, else None."""
    if _models:
        hit = _find(buf, off, n)
        if hit is not None:
            return hit
    if _flushing:
        obj = buf.obj if type(buf) is memoryview else buf
        for o in _flushing:
            if obj is o:
                return True
    return None


def pool_writeback(buf, off: int, n: int, what: str) -> None:
    """``writeback`` for the store's accessors: only for a pool that flushes (policy or sanitizer)."""
    t = _target(buf, off, n)
    if t is None or _skip("writeback", what):
        return
    if t is True:
        _native.writeback(buf, off, n)
    else:
        with t[0].lock:
            t[0].writeback(t[1], n, what)


def pool_invalidate(buf, off: int, n: int, what: str) -> None:
    """``invalidate`` + ``note_read`` for the store's accessors: only for a pool that flushes."""
    t = _target(buf, off, n)
    if t is None:
        return
    if t is True:
        if not _skip("invalidate", what):
            _native.invalidate(buf, off, n)
        return
    with t[0].lock:
        if not _skip("invalidate", what):
            t[0].invalidate(t[1], n, what)
        t[0].check_read(t[1], n, what)


def pool_fence(buf, what: str) -> None:
    """``fence`` for the store's accessors (one fence orders all of this host's writebacks)."""
    if _target(buf, 0, 0) is None or _skip("fence", what):
        return
    for m in list(_models):
        with m.lock:
            m.fence()
    if _native is not None:
        _native.fence()


def pool_publish(buf, word_off: int, word_len: int, payload: Iterable[tuple[int, int]], what: str) -> None:
    """The word at ``word_off`` was just stored: check its payload was written back and fenced, write the
    word back, fence (the last step of a publication, for the store's accessors)."""
    t = _target(buf, word_off, word_len)
    if t is None:
        return
    if t is not True:
        note_publish(buf, word_off, payload, what)
    pool_writeback(buf, word_off, word_len, what)
    pool_fence(buf, what)


# ---------------------------------------------------------------- the sanitizer

def env_mode() -> str:
    mode = os.environ.get(ENV_MODE, "").strip() or "off"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


_models: list["_Model"] = []
_lock = threading.Lock()
_collected: list[Report] = []


def reports() -> list[Report]:
    """Reports collected in this process (mode check-collect; check raises them as well)."""
    return list(_collected)


def clear_reports() -> None:
    _collected.clear()


def _address(buf) -> tuple[int, int] | None:
    import numpy as np

    try:
        a = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError):
        return None
    return a.ctypes.data, a.nbytes


def _find(buf, off: int, n: int):
    """(model, pool offset) of ``buf[off]`` when ``buf`` is (part of) a sanitized pool's cache."""
    if type(buf) is memoryview:  # the store passes pool.buf itself: no address needed
        for m in _models:
            if buf.obj is m.cache and buf.nbytes == m.pool_size:
                if off < 0 or n < 0 or off + n > m.pool_size:
                    raise ValueError(f"coherence: range {off}+{n} is outside the {m.pool_size}-byte pool {m.pool_path}")
                return m, off
    where = _address(buf)
    if where is None:
        return None
    addr, size = where
    for m in _models:
        if m.base <= addr < m.base + m.pool_size:
            if off < 0 or n < 0 or off + n > size:
                raise ValueError(f"coherence: range {off}+{n} is outside the {size}-byte buffer")
            return m, addr - m.base + off
    return None


_TABLE = struct.Struct("<8sIIIQ16s")  # magic, version, next host id, openers, lines (whole pool), pool uuid
_TABLE_MAGIC = b"BLGCOH01"
_TABLE_HEAD = 4096
_HOST_SHIFT = 52
_EPOCH_MASK = (1 << _HOST_SHIFT) - 1
_MAX_HOSTS = 1 << (64 - _HOST_SHIFT)


def table_path(pool_path: str, is_devdax: bool) -> str:
    explicit = os.environ.get(ENV_TABLE, "").strip()
    if explicit:
        return explicit
    if is_devdax:
        return f"/dev/shm/beluga-coherence-{os.path.basename(pool_path)}"
    return pool_path + ".coherence"


SMALL_LINES = 8
"""Ranges of up to this many lines are checked line by line in Python (NumPy's per-call cost is higher)."""
_UNWRITTEN = "published while this payload line holds writes not written back: other hosts read the old bytes"
_UNFENCED = "published before a fence ordered this payload line's writeback: the word may reach memory first"


def _stale_detail(host: int) -> str:
    return (f"this host's cached copy is stale: host {host} wrote back newer content, and this host has seen a "
            f"later publication of it, but did not invalidate the line since")


class _Model:
    """One host's private, non-coherent cache over one shared pool mapping."""

    def __init__(self, shared: mmap.mmap, size: int, *, pool_path: str, is_devdax: bool, geometry: L.Geometry,
                 uuid: bytes, mode: str, report_path: str | None, scope: str) -> None:
        import numpy as np

        if size % LINE_BYTES:
            raise ValueError(f"coherence: pool {pool_path} is {size} bytes, not a whole number of 64-byte lines")
        self.np = np
        self.pool_size = size
        self.scope = scope
        if scope == "metadata":
            # Only what lies before the block data is modelled; a device splits its mapping in 2 MiB units.
            unit = L.DAX_ALIGN_BYTES if is_devdax else mmap.PAGESIZE
            limit = min(size, -(-geometry.segments_offset // unit) * unit)
        else:
            limit = size
        self.size = limit  # the modelled bytes: [0, limit)
        self.lines = limit // LINE_BYTES
        self.pool_path = pool_path
        self.geometry = geometry
        self.mode = mode
        self.report_path = report_path
        self.hostname = socket.gethostname()
        if limit == size:
            self.cache = mmap.mmap(-1, size)
        else:
            # One buffer for the store: private pages over [0, limit), the shared pool after it.
            fd = os.open(pool_path, os.O_RDWR)
            try:
                self.cache = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            _private_over(_address(self.cache)[0], limit)
        self.shared = shared
        self._shared = np.frombuffer(shared, dtype=np.uint64, count=limit // 8).reshape(self.lines, 8)
        self._cache = np.frombuffer(self.cache, dtype=np.uint64, count=limit // 8).reshape(self.lines, 8)
        self.base = self._cache.ctypes.data
        self._cache[:] = self._shared
        self._clean = self._cache.copy()  # each line as last fetched or written back: differs = dirty
        self.table_file = table_path(pool_path, is_devdax)
        self._table_mm, self.host = self._open_table(uuid)
        self._stamps = np.frombuffer(self._table_mm, dtype=np.uint64, offset=_TABLE_HEAD, count=self.lines)
        self._mine = self._stamps.copy()  # the stamp of the copy this host holds
        self._seen = np.zeros(_MAX_HOSTS, dtype=np.uint64)  # per host: the last fence epoch known complete
        self.epoch = 1
        self.lock = threading.Lock()  # a client's heartbeat thread flushes too; one host, one model state
        self.buf = memoryview(self.cache)
        # Byte and stamp views for ranges of a few lines, where NumPy's per-call cost dominates.
        self._views = [memoryview(self.cache)[:limit], memoryview(shared)[:limit], memoryview(self._clean).cast("B"),
                       memoryview(self._table_mm)[_TABLE_HEAD: _TABLE_HEAD + self.lines * 8].cast("Q"),
                       memoryview(self._mine).cast("B").cast("Q")]
        self._cmv, self._smv, self._lmv, self._stq, self._mq = self._views

    def _open_table(self, uuid: bytes):
        """Map the side table (whole-pool size whatever the scope: tmpfs keeps it sparse), take a host id."""
        lines = self.pool_size // LINE_BYTES
        want = _TABLE_HEAD + lines * 8
        while True:
            fd = os.open(self.table_file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(self.table_file).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    continue  # the last user removed it while this one waited for the lock
                head = os.pread(fd, _TABLE.size, 0)
                ok = False
                if len(head) == _TABLE.size:
                    magic, version, _, _, old_lines, old_uuid = _TABLE.unpack(head)
                    ok = magic == _TABLE_MAGIC and version == 1 and old_lines == lines and old_uuid == uuid
                if not ok or os.fstat(fd).st_size != want:
                    os.ftruncate(fd, 0)  # a new or reformatted pool: no line written back yet
                    os.ftruncate(fd, want)
                    os.pwrite(fd, _TABLE.pack(_TABLE_MAGIC, 1, 1, 0, lines, uuid), 0)
                _, _, host, openers, _, _ = _TABLE.unpack(os.pread(fd, _TABLE.size, 0))
                nxt = host + 1 if host + 1 < _MAX_HOSTS else 1
                os.pwrite(fd, _TABLE.pack(_TABLE_MAGIC, 1, nxt, openers + 1, lines, uuid), 0)
                mm = mmap.mmap(fd, want, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                return mm, host
            finally:
                # Explicitly: the mmap object keeps a dup of fd, and with it the lock, otherwise.
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _leave_table(self) -> None:
        """One opener fewer; the last one removes the table (a process killed with -9 leaves it)."""
        try:
            fd = os.open(self.table_file, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            head = os.pread(fd, _TABLE.size, 0)
            if len(head) != _TABLE.size:
                return
            magic, version, host, openers, lines, uuid = _TABLE.unpack(head)
            if magic != _TABLE_MAGIC or os.stat(self.table_file).st_ino != os.fstat(fd).st_ino:
                return
            if openers <= 1:
                os.unlink(self.table_file)
            else:
                os.pwrite(fd, _TABLE.pack(magic, version, host, openers - 1, lines, uuid), 0)
        except FileNotFoundError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def close(self) -> None:
        with _lock:
            if self in _models:
                _models.remove(self)
            _update_active()
        for v in (self.buf, *self._views):
            try:
                v.release()
            except BufferError:
                pass  # a caller still holds a view (a zero-copy block): freed with it
        del self._views, self._cmv, self._smv, self._lmv, self._stq, self._mq
        del self._shared, self._cache, self._clean, self._stamps, self._mine
        for mm in (self._table_mm, self.cache):
            try:
                mm.close()
            except BufferError:
                pass  # a caller still holds a view of the cache: unmapped with the last one
        self._leave_table()

    # -- the model

    def _span(self, off: int, n: int) -> slice:
        if off < 0 or n < 0 or off + n > self.pool_size:
            raise ValueError(f"coherence: range {off}+{n} is outside the {self.pool_size}-byte pool {self.pool_path}")
        start = min(off // LINE_BYTES, self.lines)  # past the modelled part (scope metadata): nothing to do
        return slice(start, min((off + n + LINE_BYTES - 1) // LINE_BYTES, self.lines))

    def stamp(self) -> int:
        return (self.host << _HOST_SHIFT) | self.epoch

    def writeback(self, off: int, n: int, what: str | None) -> None:
        np = self.np
        s = self._span(off, n)
        if s.stop - s.start <= SMALL_LINES:
            return self._writeback_small(s, what)
        c, clean = self._cache[s], self._clean[s]
        mask = (c != clean).any(axis=1)
        # A block's data is dirty throughout: then slices (views) instead of gathers and scatters.
        dirty = slice(None) if mask.all() else np.flatnonzero(mask)
        if not isinstance(dirty, slice) and not dirty.size:
            return
        sh = self._shared[s]
        c_d, sh_d, clean_d = c[dirty], sh[dirty], clean[dirty]
        # Bytes (8 at a time) this host did not write, that another host changed since this one
        # fetched the line: writing the whole line back puts the stale copy over them. Where this
        # host wrote the word itself, overwriting is the write (a block rewritten line by line).
        theirs = sh_d != clean_d
        theirs = theirs & (c_d != sh_d) & (c_d == clean_d) if theirs.any() else None
        sh[dirty] = c_d
        stamp = self.stamp()
        self._stamps[s][dirty] = stamp
        self._mine[s][dirty] = stamp
        clean[dirty] = c_d
        if theirs is not None and theirs.any():
            row, word = np.argwhere(theirs)[0]
            line = s.start + int(np.arange(s.stop - s.start)[dirty][row])
            self._report(CLOBBER, line * LINE_BYTES + int(word) * 8, what,
                         "this writeback overwrote bytes another host wrote back since this host fetched the line",
                         int(theirs.any(axis=1).sum()))

    def _writeback_small(self, s: slice, what: str | None) -> None:
        cmv, smv, lmv = self._cmv, self._smv, self._lmv
        stamp = self.stamp()
        clobbered = []
        for line in range(s.start, s.stop):
            a, b = line * LINE_BYTES, (line + 1) * LINE_BYTES
            mine = cmv[a:b]
            if mine == lmv[a:b]:
                continue  # clean: nothing to write back
            theirs, clean = bytes(smv[a:b]), bytes(lmv[a:b])
            if theirs != clean:
                new = bytes(mine)
                clobbered += [a + i for i in range(LINE_BYTES)
                              if theirs[i] != clean[i] and new[i] != theirs[i] and new[i] == clean[i]]
            smv[a:b] = mine
            self._stq[line] = stamp
            self._mq[line] = stamp
            lmv[a:b] = mine
        if clobbered:
            self._report(CLOBBER, clobbered[0], what,
                         "this writeback overwrote bytes another host wrote back since this host fetched the line",
                         len({c // LINE_BYTES for c in clobbered}))

    def invalidate(self, off: int, n: int, what: str | None) -> None:
        np = self.np
        s = self._span(off, n)
        if s.stop - s.start <= SMALL_LINES:
            return self._invalidate_small(s, what)
        c, clean, sh = self._cache[s], self._clean[s], self._shared[s]
        dirty = (c != clean).any(axis=1)
        for _ in range(8):  # a writeback on another host may be copying these lines right now
            before = self._stamps[s].copy()
            c[:] = sh
            if (before == self._stamps[s]).all() and (c == sh).all():
                break
        clean[:] = c
        self._mine[s] = before
        self._acquire(before)
        if dirty.any():
            line = s.start + int(np.flatnonzero(dirty)[0])
            self._report(LOST_WRITE, line * LINE_BYTES, what,
                         "invalidated a line whose writes were never written back (they are lost)", int(dirty.sum()))

    def _invalidate_small(self, s: slice, what: str | None) -> None:
        cmv, smv, lmv, stq = self._cmv, self._smv, self._lmv, self._stq
        lost = []
        for line in range(s.start, s.stop):
            a, b = line * LINE_BYTES, (line + 1) * LINE_BYTES
            if cmv[a:b] != lmv[a:b]:
                lost.append(line)
            for _ in range(8):  # a writeback on another host may be copying this line right now
                before = stq[line]
                cmv[a:b] = smv[a:b]
                if stq[line] == before and cmv[a:b] == smv[a:b]:
                    break
            lmv[a:b] = cmv[a:b]
            self._mq[line] = before
            if before:
                host, epoch = before >> _HOST_SHIFT, before & _EPOCH_MASK
                if epoch - 1 > self._seen[host]:
                    self._seen[host] = epoch - 1
        if lost:
            self._report(LOST_WRITE, lost[0] * LINE_BYTES, what,
                         "invalidated a line whose writes were never written back (they are lost)", len(lost))

    def _acquire(self, stamps) -> None:
        """Fetching a line stamped (H, e) shows that H's writebacks before its fence e are complete."""
        np = self.np
        stamps = stamps[stamps != 0]
        if not stamps.size:
            return
        hosts = stamps >> np.uint64(_HOST_SHIFT)
        epochs = stamps & np.uint64(_EPOCH_MASK)
        first = hosts[0]
        if (hosts == first).all():
            e = epochs.max() - np.uint64(1)
            if e > self._seen[first]:
                self._seen[first] = e
        else:
            np.maximum.at(self._seen, hosts.astype(np.intp), epochs - np.uint64(1))

    def fence(self) -> None:
        self.epoch += 1

    def check_read(self, off: int, n: int, what: str) -> None:
        np = self.np
        s = self._span(off, n)
        if s.stop - s.start <= SMALL_LINES:
            stq, mq = self._stq, self._mq
            for line in range(s.start, s.stop):
                st = stq[line]
                if st == mq[line]:
                    continue
                host = st >> _HOST_SHIFT
                if host == self.host or st & _EPOCH_MASK > self._seen[host]:
                    continue
                a, b = line * LINE_BYTES, (line + 1) * LINE_BYTES
                if self._cmv[a:b] != self._smv[a:b]:
                    self._report(STALE_READ, max(off, a), what, _stale_detail(host), 1)
                    return
            return
        now = self._stamps[s]
        differ = np.flatnonzero(now != self._mine[s])
        if not differ.size:
            return
        st = now[differ]
        hosts = (st >> np.uint64(_HOST_SHIFT)).astype(np.intp)
        known = (hosts != self.host) & ((st & np.uint64(_EPOCH_MASK)) <= self._seen[hosts])
        idx = differ[known] + s.start
        if not idx.size:
            return
        stale = idx[(self._cache[idx] != self._shared[idx]).any(axis=1)]
        if stale.size:
            line = int(stale[0])
            start = max(off, line * LINE_BYTES)
            host = int(self._stamps[line]) >> _HOST_SHIFT
            self._report(STALE_READ, start, what, _stale_detail(host), int(stale.size))

    def check_publish(self, word_off: int | None, off: int, n: int, what: str) -> None:
        np = self.np
        s = self._span(off, n)
        if s.stop - s.start <= SMALL_LINES:
            word_line = -1 if word_off is None else word_off // LINE_BYTES
            stamp = self.stamp()
            dirty, pending = [], []
            for line in range(s.start, s.stop):
                if line == word_line:
                    continue
                a, b = line * LINE_BYTES, (line + 1) * LINE_BYTES
                if self._cmv[a:b] != self._lmv[a:b]:
                    dirty.append(line)
                elif self._mq[line] == stamp:
                    pending.append(line)
            if dirty:
                self._report(NOT_WRITTEN_BACK, max(off, dirty[0] * LINE_BYTES), what, _UNWRITTEN, len(dirty))
            elif pending:
                self._report(NOT_FENCED, max(off, pending[0] * LINE_BYTES), what, _UNFENCED, len(pending))
            return
        lines = np.arange(s.start, s.stop)
        if word_off is not None:
            lines = lines[lines != word_off // LINE_BYTES]  # written back with the word itself, in one piece
        if not lines.size:
            return
        dirty = lines[(self._cache[lines] != self._clean[lines]).any(axis=1)]
        if dirty.size:
            line = int(dirty[0])
            self._report(NOT_WRITTEN_BACK, max(off, line * LINE_BYTES), what, _UNWRITTEN, int(dirty.size))
            return
        pending = lines[self._mine[lines] == np.uint64(self.stamp())]
        if pending.size:
            line = int(pending[0])
            self._report(NOT_FENCED, max(off, line * LINE_BYTES), what, _UNFENCED, int(pending.size))

    def _report(self, kind: str, offset: int, what: str | None, detail: str, lines: int) -> None:
        stack = tuple(f for f in traceback.format_stack()[-16:] if f"{os.sep}coherence.py" not in f)[-12:]
        rep = Report(kind=kind, offset=offset, region=describe(self.geometry, offset), what=what or "-",
                     detail=detail + (f" ({lines} lines)" if lines > 1 else ""), lines=lines, pool=self.pool_path,
                     pid=os.getpid(), host=self.hostname, unix_ns=time.time_ns(), stack=stack)
        _collected.append(rep)
        if self.report_path:
            line = (json.dumps(rep.as_dict(), sort_keys=True) + "\n").encode()
            fd = os.open(self.report_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)  # one write of one line: processes appending never interleave
            finally:
                os.close(fd)
        if self.mode == "check":
            raise CoherenceError(rep)


def attach(shared: mmap.mmap, size: int, *, pool_path: str, is_devdax: bool, geometry: L.Geometry, uuid: bytes,
           mode: str, report_path: str | None = None, scope: str | None = None) -> _Model:
    """A private cache over ``shared`` (see the module docstring); ``.buf`` is what the store uses.

    ``scope`` (default $BELUGA_COHERENCE_SCOPE, else "all"): "metadata" models only the
    regions before the block data (the rest of ``.buf`` is the shared pool itself), for
    hosts that cannot hold two private copies of the whole pool (the testbed's guests)."""
    if mode not in MODES or mode == "off":
        raise ValueError(f"coherence mode {mode!r}: expected check or check-collect")
    scope = scope or os.environ.get(ENV_SCOPE, "").strip() or "all"
    if scope not in SCOPES:
        raise ValueError(f"{ENV_SCOPE}={scope!r}: expected one of {', '.join(SCOPES)}")
    m = _Model(shared, size, pool_path=pool_path, is_devdax=is_devdax, geometry=geometry, uuid=uuid, mode=mode,
               report_path=report_path if report_path is not None else (os.environ.get(ENV_REPORT) or None),
               scope=scope)
    with _lock:
        _models.append(m)
        _update_active()
    return m


_MAP_FIXED = 0x10  # Linux; Python's mmap module does not export it


def _private_over(addr: int, length: int) -> None:
    """Replace [addr, addr+length) of a mapping by private zero pages (mmap MAP_FIXED)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    got = libc.mmap(addr, length, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
    if got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"coherence: cannot map private pages over the pool's metadata: {os.strerror(err)}")


def read_reports(path: str) -> list[dict]:
    """The reports in a report file, oldest first (a torn last line, from a process killed mid-write, is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        return []
    return sorted(out, key=lambda r: r.get("unix_ns", 0))


# ---------------------------------------------------------------- where an offset lies

def describe(g: L.Geometry, off: int) -> str:
    """The region of the pool layout that holds byte ``off`` (docs/store.md §1), for reports."""
    return L.region_of(g, off, line_bytes=LINE_BYTES)
