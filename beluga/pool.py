"""One pool = one shared mapping of a file (host) or a devdax device (guest).

A devdax character device reports st_size 0, so its size comes from sysfs;
read()/write() on it fail with EINVAL, so every access goes through mmap, and
the mapping's length and offset must be multiples of 2 MiB. Files get the same
treatment so that the host exercises the guest code path.
"""
from __future__ import annotations

import mmap
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from . import layout as L
from .errors import BelugaError, CorruptPoolError, LayoutVersionError, NotAPoolError, PoolTooSmallError

DEFAULT_SYSFS = "/sys"


@dataclass(frozen=True)
class DeviceInfo:
    path: str
    size_bytes: int
    is_devdax: bool


def device_info(path: str | os.PathLike, *, sysfs_root: str = DEFAULT_SYSFS) -> DeviceInfo:
    """Size of a pool file or devdax device, without opening it for writing."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise NotAPoolError(f"{p} does not exist (expected a pool file or a /dev/daxX.Y device)") from None
    if stat.S_ISREG(st.st_mode):
        return DeviceInfo(p, st.st_size, False)
    if stat.S_ISCHR(st.st_mode):
        return DeviceInfo(p, devdax_size(p, st, sysfs_root=sysfs_root), True)
    raise NotAPoolError(f"{p} is neither a regular file nor a devdax character device")


def devdax_size(path: str, st: os.stat_result | None = None, *, sysfs_root: str = DEFAULT_SYSFS) -> int:
    """Read the size of /dev/daxX.Y from sysfs (st_size is 0 for character devices)."""
    name = os.path.basename(path)
    candidates = [Path(sysfs_root, "bus", "dax", "devices", name, "size")]
    if st is not None:
        # Also reachable by major:minor, which works if the node was renamed.
        candidates.append(Path(sysfs_root, "dev", "char", f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", "size"))
    for c in candidates:
        try:
            return int(c.read_text().strip())
        except (OSError, ValueError):
            continue
    raise NotAPoolError(
        f"{path} is a character device but no devdax size was found in "
        f"{' or '.join(str(c) for c in candidates)} (expected a device-dax node like /dev/dax0.0)"
    )


def _map_length(info: DeviceInfo) -> int:
    if info.is_devdax:
        # Only whole 2 MiB units can be mapped; a device is always a multiple of its alignment.
        return info.size_bytes - info.size_bytes % L.DAX_ALIGN_BYTES
    return info.size_bytes


def _probe_superblock(info: DeviceInfo) -> bytes:
    """Read the superblock through a read-only mapping: opening never writes a byte."""
    if info.size_bytes < L.SUPERBLOCK_BYTES:
        raise NotAPoolError(
            f"{info.path} is not a Beluga pool: it has {info.size_bytes} bytes, less than one "
            f"{L.SUPERBLOCK_BYTES}-byte superblock"
        )
    length = L.DAX_ALIGN_BYTES if info.is_devdax else L.SUPERBLOCK_BYTES
    fd = os.open(info.path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=0)
    finally:
        os.close(fd)
    try:
        return mm[: L.SUPERBLOCK_BYTES]
    finally:
        mm.close()


class Pool:
    """An open, validated pool mapping. ``buf`` is a writable memoryview of all of it."""

    def __init__(self, info: DeviceInfo, superblock: L.Superblock, *, coherence: str | None = None,
                 coherence_report: str | None = None, flush: str | None = None) -> None:
        self.info = info
        self.superblock = superblock
        self.geometry: L.Geometry = superblock.geometry
        fd = os.open(info.path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, _map_length(info), flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        finally:
            os.close(fd)
        self.buf = memoryview(self._mm)
        self.closed = False
        # The coherence sanitizer (beluga/coherence.py): `buf` becomes this process's
        # private, non-coherent cache of the pool; only flushes move lines to/from `_mm`.
        self.coherence = None
        mode = coherence if coherence is not None else _coherence_env()
        if mode != "off":
            from .coherence import attach

            try:
                self.coherence = attach(self._mm, _map_length(info), pool_path=info.path, is_devdax=info.is_devdax,
                                        geometry=self.geometry, uuid=superblock.uuid, mode=mode,
                                        report_path=coherence_report)
            except BaseException:
                self.buf.release()
                self._mm.close()
                raise
            self.buf = self.coherence.buf
        # The flush policy (docs/coherence.md): whether the store writes back what it publishes and
        # invalidates what it reads. On for a devdax device (a multi-host CXL pool need not be
        # coherent), off for a file (one host's page cache is); always on under the sanitizer.
        from . import coherence as _coh

        self.flush_policy = _coh.resolve_policy(flush, is_devdax=info.is_devdax,
                                                sanitized=self.coherence is not None)
        self._flushing = self.flush_policy == "on" and self.coherence is None
        if self._flushing:
            _coh.register_flushing(self._mm)

    def flush_status(self) -> str:
        """One line for ready lines and `beluga stat`: the policy in force and what it does here."""
        from . import coherence as _coh

        if self.coherence is not None:
            return f"flush policy on (coherence sanitizer {self.coherence.mode})"
        if self.flush_policy == "off":
            why = "devdax device, forced off" if self.info.is_devdax else "a file: one host's page cache is coherent"
            return f"flush policy off ({why})"
        if not _coh.can_flush():
            return "flush policy on, but this host cannot flush (see cache flushes): unsafe on a non-coherent pool"
        return f"flush policy on ({_coh.flush_method()})"

    @property
    def path(self) -> str:
        return self.info.path

    @classmethod
    def open(cls, path: str | os.PathLike, *, sysfs_root: str = DEFAULT_SYSFS, coherence: str | None = None,
             coherence_report: str | None = None, flush: str | None = None) -> "Pool":
        """``coherence``: "off", "check" or "check-collect" (default: $BELUGA_COHERENCE, else off);
        ``coherence_report``: the sanitizer's report file (default: $BELUGA_COHERENCE_REPORT);
        ``flush``: the flush policy, "auto", "on" or "off" (default: $BELUGA_FLUSH_POLICY, else auto:
        on for a devdax device, off for a file; a sanitized pool always flushes)."""
        info = device_info(path, sysfs_root=sysfs_root)
        raw = _probe_superblock(info)
        sb = L.decode_superblock(raw, where=info.path, actual_size_bytes=_map_length(info))
        return cls(info, sb, coherence=coherence, coherence_report=coherence_report, flush=flush)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._flushing:
            from . import coherence as _coh

            _coh.unregister_flushing(self._mm)
        if self.coherence is not None:
            self.coherence.close()
        try:
            self.buf.release()
            self._mm.close()
        except BufferError:
            # A caller still holds a zero-copy view (numpy/torch); the mapping is
            # unmapped when the last view goes away instead.
            pass

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data) -> None:
        self.buf[offset : offset + len(data)] = data

    def view(self, offset: int, length: int) -> memoryview:
        return self.buf[offset : offset + length]

    def flush(self) -> None:
        _sync(self._mm, self.info.is_devdax)


@dataclass(frozen=True)
class FormatResult:
    path: str
    geometry: L.Geometry
    is_devdax: bool


def format_pool(
    path: str | os.PathLike,
    *,
    size_bytes: int | None = None,
    force: bool = False,
    sysfs_root: str = DEFAULT_SYSFS,
    segment_size_bytes: int = 2 * L.MiB,
    max_clients: int = 32,
    rpc_buffer_bytes: int = 64 * L.KiB,
    slot_granularity_bytes: int = 4 * L.KiB,
) -> FormatResult:
    """Initialize a pool. Creates/resizes a regular file when ``size_bytes`` is given.

    An existing valid pool is only reformatted with ``force`` (it may be in use).
    Block data is not touched: only metadata regions are zeroed, then the
    superblock is written last so that a crash mid-format leaves no valid pool.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        if size_bytes is None:
            raise BelugaError(f"{p} does not exist; give a size to create it (e.g. `beluga format --size 256M {p}`)")
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, size_bytes)
        finally:
            os.close(fd)
    info = device_info(p, sysfs_root=sysfs_root)
    if not force and info.size_bytes >= L.SUPERBLOCK_BYTES:
        try:
            L.decode_superblock(_probe_superblock(info), where=p, actual_size_bytes=_map_length(info))
        except (NotAPoolError, LayoutVersionError, CorruptPoolError, PoolTooSmallError):
            pass
        else:
            raise BelugaError(f"{p} is already a Beluga pool; pass --force (force=True) to reformat it and lose its contents")
    if size_bytes is not None and size_bytes != info.size_bytes:
        if info.is_devdax:
            raise BelugaError(f"{p} is a devdax device of {info.size_bytes} bytes; its size cannot be set to {size_bytes}")
        fd = os.open(p, os.O_RDWR)
        try:
            os.ftruncate(fd, size_bytes)
        finally:
            os.close(fd)
        info = device_info(p, sysfs_root=sysfs_root)
    geometry = L.compute_geometry(
        _map_length(info), segment_size_bytes=segment_size_bytes, max_clients=max_clients,
        rpc_buffer_bytes=rpc_buffer_bytes, slot_granularity_bytes=slot_granularity_bytes,
    )
    fd = os.open(p, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, _map_length(info), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        mm[: L.SUPERBLOCK_BYTES] = bytes(L.SUPERBLOCK_BYTES)
        _zero(mm, L.SUPERBLOCK_BYTES, geometry.segments_offset)
        _sync(mm, info.is_devdax)
        sb = L.Superblock(geometry=geometry, uuid=os.urandom(16), formatted_unix_ns=time.time_ns())
        L.write_superblock(mm, sb)
        _sync(mm, info.is_devdax)
    finally:
        mm.close()
    return FormatResult(path=p, geometry=geometry, is_devdax=info.is_devdax)


def _coherence_env() -> str:
    from .coherence import env_mode

    return env_mode()


def _sync(mm: mmap.mmap, is_devdax: bool) -> None:
    # msync() on a devdax mapping fails with EINVAL; there is no page cache in
    # between to write back: stores reach the device directly.
    if not is_devdax:
        mm.flush()


def _zero(mm: mmap.mmap, start: int, end: int) -> None:
    chunk = bytes(min(L.MiB, max(0, end - start)))
    pos = start
    while pos < end:
        n = min(len(chunk), end - pos)
        mm[pos : pos + n] = chunk[:n]
        pos += n
