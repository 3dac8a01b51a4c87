"""The one place that decides how block data is checksummed.

The superblock records the algorithm id, so a later, faster algorithm can be
added as a new id without silently misreading pools formatted with the old one.
"""
from __future__ import annotations

import zlib

CRC32 = 1
"""zlib.crc32 over the block bytes; zero-copy on any buffer (bytes, memoryview of the mmap)."""

ALGORITHMS = {CRC32: "crc32"}


def checksum(algorithm: int, data) -> int:
    """Checksum of a buffer-protocol object as an unsigned 32-bit int."""
    if algorithm == CRC32:
        return zlib.crc32(data) & 0xFFFFFFFF
    raise ValueError(f"unknown checksum algorithm id {algorithm}; known: {sorted(ALGORITHMS)}")


def meta_crc(data) -> int:
    """CRC of a metadata record (superblock, index entry, header); always crc32."""
    return zlib.crc32(data) & 0xFFFFFFFF
