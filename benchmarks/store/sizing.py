"""How much `beluga bench` stores: a working set per block size that fits its pool.

The working set should be larger than the CPU caches (3 x L3 by default), but
the L3 size a machine reports is no bound on anything: some report 300 MiB
(DESIGN), and 3 x 300 MiB for each of three block sizes does not fit the
default 1 GiB pool. A working set larger than its pool is evicted while it is
being written, and every measurement after that reads misses. So the default is
capped to what the pool holds; a working set asked for explicitly that does
not fit is refused with the pool size it needs.
"""
from __future__ import annotations

from dataclasses import dataclass

from beluga import layout as L

MiB = L.MiB
MIN_WORKING_SET_BYTES = 96 * MiB
L3_FACTOR = 3
MIN_BLOCKS = 16
"""Every block size gets at least this many blocks, whatever the working set."""
POOL_MAX_CLIENTS = 32
MIN_MEMCPY_BYTES = 256 * MiB
MAX_MEMCPY_BYTES = 1024 * MiB
"""A memcpy buffer past any real cache; two per copying process, so never sized from L3 alone."""
HEADROOM_FRACTION = 0.05
"""Segments kept free beyond the writers' open ones: slack for the put measurements' replacements."""


class WorkingSetError(ValueError):
    """The working set asked for does not fit the pool (the message says what would)."""


def segment_bytes_for(max_block_bytes: int) -> int:
    """The bench pool's segment size: 2 MiB, doubled until the largest block fits in one segment."""
    seg = 2 * MiB
    while seg < max_block_bytes:
        seg *= 2
    return seg


def bench_geometry(pool_size_bytes: int, max_block_bytes: int) -> L.Geometry:
    return L.compute_geometry(pool_size_bytes, segment_size_bytes=segment_bytes_for(max_block_bytes),
                              max_clients=POOL_MAX_CLIENTS)


def block_counts(sizes: list[int], per_size_bytes: int) -> dict[int, int]:
    return {s: max(MIN_BLOCKS, -(-per_size_bytes // s)) for s in sizes}


@dataclass(frozen=True)
class WorkingSetPlan:
    per_size_bytes: int
    """The working set of each block size (block count x block size, rounded up to whole blocks)."""
    wanted_bytes: int
    """What was asked for, or max(96 MiB, 3 x L3) by default."""
    blocks: dict[int, int]
    pool_size_bytes: int
    segment_size_bytes: int
    segment_count: int
    segments_needed: int
    """Segments the working set occupies, plus those kept free for writers (the headroom)."""
    capped: str
    """Why the working set is smaller than wanted ('' when it is not)."""

    @property
    def total_bytes(self) -> int:
        return sum(s * n for s, n in self.blocks.items())

    def describe(self) -> str:
        line = (f"working set {self.per_size_bytes / MiB:.0f} MiB per block size ({len(self.blocks)} sizes, "
                f"{self.total_bytes / MiB:.0f} MiB of blocks) in a {self.pool_size_bytes / MiB:.0f} MiB pool "
                f"({self.segments_needed} of its {self.segment_count} segments of "
                f"{self.segment_size_bytes / MiB:g} MiB)")
        return f"{line}; {self.capped}" if self.capped else line


def segments_needed(g: L.Geometry, blocks: dict[int, int], writers: int) -> int:
    """Segments that ``blocks`` occupy once written by ``writers`` processes, with headroom.

    Blocks of one size share segments of their slot class; each writer may hold one more,
    partly written, per class, and a few spare segments take the put measurements'
    replacements (a replacement is written before the block it replaces is freed).
    """
    used = 0
    for size, count in blocks.items():
        per_segment = g.segment_size_bytes // g.data_slot_for(size)
        used += -(-count // per_segment) + writers
    return used + max(1, int(g.segment_count * HEADROOM_FRACTION))


def pool_size_for(sizes: list[int], per_size_bytes: int, writers: int, start_bytes: int) -> int:
    """The smallest pool size (in MiB steps, from ``start_bytes``) that holds this working set."""
    blocks = block_counts(sizes, per_size_bytes)
    size = max(start_bytes, 64 * MiB)
    while True:
        try:
            g = bench_geometry(size, max(sizes))
            missing = segments_needed(g, blocks, writers) - g.segment_count
        except L.PoolTooSmallError:
            missing = 1
        if missing <= 0:
            return size
        seg = segment_bytes_for(max(sizes))
        size = -(-(size + max(1, int(missing * 1.05)) * seg) // MiB) * MiB


def plan_working_set(sizes: list[int], pool_size_bytes: int, *, l3_bytes: int, requested_bytes: int = 0,
                     writers: int = 1) -> WorkingSetPlan:
    """The working set per block size for a pool of ``pool_size_bytes``.

    ``requested_bytes`` (``--working-set``) is used as given or refused with WorkingSetError
    naming the pool size it needs; the default, max(96 MiB, 3 x ``l3_bytes``), is capped to
    the largest working set the pool holds (in MiB steps).
    """
    if not sizes:
        raise WorkingSetError("no block sizes to benchmark")
    g = bench_geometry(pool_size_bytes, max(sizes))
    wanted = requested_bytes or max(MIN_WORKING_SET_BYTES, L3_FACTOR * l3_bytes)

    def fits(per_size: int) -> bool:
        return segments_needed(g, block_counts(sizes, per_size), writers) <= g.segment_count

    def plan(per_size: int, capped: str) -> WorkingSetPlan:
        blocks = block_counts(sizes, per_size)
        return WorkingSetPlan(per_size, wanted, blocks, pool_size_bytes, g.segment_size_bytes, g.segment_count,
                              segments_needed(g, blocks, writers), capped)

    sizes_text = ",".join(f"{s}" for s in sizes)
    if fits(wanted):
        return plan(wanted, "")
    if requested_bytes:
        need = pool_size_for(sizes, requested_bytes, writers, pool_size_bytes)
        raise WorkingSetError(
            f"--working-set {requested_bytes / MiB:.0f} MiB per block size (sizes {sizes_text} bytes, "
            f"{writers} writers) does not fit a {pool_size_bytes / MiB:.0f} MiB pool "
            f"({g.segment_count} segments of {g.segment_size_bytes / MiB:g} MiB): use --pool-size "
            f"{need // MiB}M or more, or a smaller --working-set")
    lo, hi = 0, wanted // MiB  # fits(lo * MiB) holds, fits(hi * MiB) does not
    if not fits(0):
        need = pool_size_for(sizes, 0, writers, pool_size_bytes)
        raise WorkingSetError(
            f"a {pool_size_bytes / MiB:.0f} MiB pool cannot hold even {MIN_BLOCKS} blocks of each size "
            f"({sizes_text} bytes) for {writers} writers: use --pool-size {need // MiB}M or more")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * MiB) else (lo, mid)
    why = (f"--working-set default max(96 MiB, {L3_FACTOR} x L3 {l3_bytes / MiB:.0f} MiB) = "
           f"{wanted / MiB:.0f} MiB per block size does not fit the pool: capped to what it holds "
           f"(--pool-size to raise it)")
    return plan(lo * MiB, why)


def memcpy_buffer_bytes(l3_bytes: int, requested_bytes: int = 0) -> tuple[int, str]:
    """-> (memcpy baseline buffer size, why it is smaller than 8 x L3 or '')."""
    if requested_bytes:
        return requested_bytes, ""
    wanted = max(MIN_MEMCPY_BYTES, 8 * l3_bytes)
    if wanted <= MAX_MEMCPY_BYTES:
        return wanted, ""
    return MAX_MEMCPY_BYTES, (f"--memcpy-buffer default max(256 MiB, 8 x L3 {l3_bytes / MiB:.0f} MiB) = "
                              f"{wanted / MiB:.0f} MiB capped to {MAX_MEMCPY_BYTES / MiB:.0f} MiB "
                              f"(two buffers per copying process)")
