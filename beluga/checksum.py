"""The one place that decides how block data is checksummed.

The superblock records the algorithm id, so a later algorithm can be added as
a new id without silently misreading pools formatted with the old one.

There is one algorithm, CRC-32 (the zlib/gzip polynomial), and two ways to
compute it that give identical values:

* ``isal`` (Intel ISA-L, PCLMULQDQ folding), when the ``isal`` package is
  installed: ~40-60 GB/s on a modern x86 core, i.e. several times faster than
  a memcpy from DRAM, so verifying a block costs a fraction of copying it;
* ``zlib`` from the standard library (~4 GB/s): always there, e.g. in the
  guests, which have no pip packages.

Because the values are the same, pools, blocks and commits written with one
implementation verify with the other, and the on-pool format is unchanged.
``BELUGA_CRC_IMPL=zlib`` forces the standard library (tests, comparisons).
"""
from __future__ import annotations

import os
import zlib

CRC32 = 1
"""CRC-32 (zlib polynomial) over the block bytes; zero-copy on any buffer (bytes, memoryview of the mmap)."""

ALGORITHMS = {CRC32: "crc32"}

CHUNK_BYTES = 256 * 1024
"""Copy-and-checksum works in chunks this large: small enough that a chunk is
still in the core's L2 cache when it is checksummed right after being copied,
large enough that the per-chunk Python overhead (~1 us) stays negligible."""


def _select_crc32():
    if os.environ.get("BELUGA_CRC_IMPL", "").lower() != "zlib":
        try:
            from isal.isal_zlib import crc32 as fast  # noqa: PLC0415 - optional accelerator

            probe = b"beluga crc32 probe" * 7
            if fast(probe) == zlib.crc32(probe) and fast(probe[5:], 12345) == zlib.crc32(probe[5:], 12345):
                return fast, "isal"
        except Exception:  # not installed, or a broken build: the standard library always works
            pass
    return zlib.crc32, "zlib"


crc32, IMPLEMENTATION = _select_crc32()
"""``crc32(data, value=0)``: the fastest CRC-32 available here, and its name ("isal" or "zlib")."""


def checksum(algorithm: int, data) -> int:
    """Checksum of a buffer-protocol object as an unsigned 32-bit int."""
    if algorithm == CRC32:
        return crc32(data) & 0xFFFFFFFF
    raise ValueError(f"unknown checksum algorithm id {algorithm}; known: {sorted(ALGORITHMS)}")


def copy_and_checksum(algorithm: int, dest: memoryview, src: memoryview) -> int:
    """Copy ``src`` into ``dest`` (same length, byte views) and return the checksum of what *dest* holds.

    The checksum is computed over the destination, chunk by chunk right after
    each chunk is copied, while it is still in cache: the result describes the
    bytes the caller got, whatever happens to ``src`` meanwhile, at the cost of
    about one pass over memory instead of two.
    """
    if algorithm != CRC32:
        raise ValueError(f"unknown checksum algorithm id {algorithm}; known: {sorted(ALGORITHMS)}")
    n = src.nbytes
    if n <= CHUNK_BYTES:
        dest[:n] = src
        return crc32(dest[:n]) & 0xFFFFFFFF
    value = 0
    step = CHUNK_BYTES
    for at in range(0, n, step):
        end = at + step if at + step < n else n
        d = dest[at:end]
        d[:] = src[at:end]
        value = crc32(d, value)
    return value & 0xFFFFFFFF


def meta_crc(data, value: int = 0) -> int:
    """CRC of a metadata record (superblock, index entry, header, RPC message); always CRC-32.

    ``value`` continues a running CRC, so a record can be checksummed in pieces without joining them.
    """
    return crc32(data, value) & 0xFFFFFFFF
