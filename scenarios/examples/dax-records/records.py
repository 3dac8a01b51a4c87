#!/usr/bin/env python3
"""Checksummed records published through a shared CXL pool: one host writes, the others check.

A small program of the kind you would test on a beluga-testbed (Python 3 standard library
only). It finds the pool in the environment the testbed gives every program:

    BELUGA_DAX        the pool's dax device (/dev/daxX.Y), or any file for a dry run
    BELUGA_POOL_SIZE  its size in bytes
    BELUGA_HOST_INDEX this host's index, BELUGA_HOST_COUNT the number of hosts

Each host owns one slot of 16 MiB (less on a small pool: whole 2 MiB units, as a devdax
device maps only in those), and the slots sit at the END of the pool: the Beluga store
that the scenario runner deploys keeps its own records at the start. A slot starts with
a header; the records follow it.

    records.py reset                  clear this host's slot header (before a new run)
    records.py write --records 200    publish records into this host's slot
    records.py read --writer 0        follow host 0's slot and check every record
    records.py read --writer 0 --once check what host 0 has committed so far, once
    records.py wait --writer 0 --committed 50   return once host 0 has committed 50 records

A record is committed when the slot header's count says so: the writer stores the record
first, then the header. A reader checks only committed records, each against its CRC-32
and against the bytes it must hold (regenerated from the run's nonce and its index), so a
flipped bit anywhere is caught. Exit status: 0 all good, 1 a record does not check,
2 a usage or setup error, 3 the writer never started.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import struct
import sys
import time
import zlib

ALIGN = 2 << 20  # a devdax device maps in 2 MiB units
SLOT_BYTES = 16 << 20
HEADER = struct.Struct("<8sQIIQQQI")  # magic, nonce, writer, record size, committed, planned, started_ns, crc
HEADER_MAGIC = b"RECORDS1"
HEADER_BYTES = 4096  # the records start one page after the slot
RECORD = struct.Struct("<4sIQII")  # magic, index, nonce, payload length, payload crc
RECORD_MAGIC = b"REC1"


def fail(message: str, code: int = 2):
    print(f"records: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def pool_from_env():
    try:
        dax = os.environ["BELUGA_DAX"]
        size = int(os.environ["BELUGA_POOL_SIZE"])
        index = int(os.environ["BELUGA_HOST_INDEX"])
        count = int(os.environ["BELUGA_HOST_COUNT"])
    except KeyError as e:
        fail(f"{e.args[0]} is not set: run me on a beluga-testbed host (or set it by hand)")
    except ValueError as e:
        fail(f"bad BELUGA_* value: {e}")
    slot = min(SLOT_BYTES, size // count // ALIGN * ALIGN)
    if slot < 2 * HEADER_BYTES:
        fail(f"the pool ({size} bytes) is too small for {count} slots of whole 2 MiB units")
    return dax, size, index, count, slot


def slot_offset(size: int, count: int, slot: int, index: int) -> int:
    """Where host `index`'s slot starts: the slots fill the end of the pool, in host order."""
    return size // ALIGN * ALIGN - (count - index) * slot


class Slot:
    """One host's slot of the pool, mapped read-only or read-write."""

    def __init__(self, dax: str, offset: int, slot_bytes: int, write: bool) -> None:
        fd = os.open(dax, os.O_RDWR if write else os.O_RDONLY)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
            self.m = mmap.mmap(fd, slot_bytes, mmap.MAP_SHARED, prot, offset=offset)
        finally:
            os.close(fd)
        self.offset = offset  # where the slot starts in the pool
        self.size = slot_bytes

    def header(self):
        """(nonce, writer, record size, committed, planned, started_ns), or None if no valid header.
        A header read while the writer rewrites it fails its CRC: read it again."""
        for _ in range(5):
            raw = self.m[:HEADER.size]
            magic, nonce, writer, rsize, committed, planned, started, crc = HEADER.unpack(raw)
            if magic != HEADER_MAGIC:
                return None
            if zlib.crc32(raw[:-4]) == crc:
                return nonce, writer, rsize, committed, planned, started
        return None

    def set_header(self, nonce, writer, rsize, committed, planned, started) -> None:
        body = HEADER.pack(HEADER_MAGIC, nonce, writer, rsize, committed, planned, started, 0)[:-4]
        self.m[:HEADER.size] = body + struct.pack("<I", zlib.crc32(body))
        # No flush(): msync() on a devdax mapping fails (EINVAL); the stores reach the memory directly.

    def record_at(self, i: int, rsize: int) -> int:
        return HEADER_BYTES + i * rsize


def payload(nonce: int, writer: int, i: int, n: int) -> bytes:
    return random.Random(nonce ^ (writer << 48) ^ (i << 8)).randbytes(n)


def cmd_reset(args) -> int:
    dax, size, index, count, slot_bytes = pool_from_env()
    s = Slot(dax, slot_offset(size, count, slot_bytes, index), slot_bytes, write=True)
    s.m[:HEADER_BYTES] = bytes(HEADER_BYTES)
    print(f"slot {index} at pool offset {s.offset:#x} cleared", flush=True)
    return 0


def cmd_write(args) -> int:
    dax, size, index, count, slot_bytes = pool_from_env()
    s = Slot(dax, slot_offset(size, count, slot_bytes, index), slot_bytes, write=True)
    capacity = (slot_bytes - HEADER_BYTES) // args.record_bytes
    if args.records > capacity:
        fail(f"{args.records} records of {args.record_bytes} bytes do not fit in a slot of {slot_bytes} bytes "
             f"(at most {capacity})")
    nonce = int.from_bytes(os.urandom(8), "little")
    started = time.time_ns()
    s.set_header(nonce, index, args.record_bytes, 0, args.records, started)
    n = args.record_bytes - RECORD.size
    print(f"host {index}: publishing {args.records} records of {args.record_bytes} bytes "
          f"at pool offset {s.offset:#x} (nonce {nonce:#x})", flush=True)
    for i in range(args.records):
        body = payload(nonce, index, i, n)
        off = s.record_at(i, args.record_bytes)
        s.m[off:off + args.record_bytes] = RECORD.pack(RECORD_MAGIC, i, nonce, n, zlib.crc32(body)) + body
        s.set_header(nonce, index, args.record_bytes, i + 1, args.records, started)  # commit: after the record
        if (i + 1) % args.progress_every == 0:
            print(f"committed {i + 1}", flush=True)
        if args.interval_s:
            time.sleep(args.interval_s)
    print(f"wrote {args.records} records", flush=True)
    return 0


def check(s: Slot, writer: int, nonce: int, rsize: int, i: int) -> str | None:
    """Why record i does not check, or None."""
    off = s.record_at(i, rsize)
    raw = s.m[off:off + rsize]
    magic, index, rnonce, n, crc = RECORD.unpack(raw[:RECORD.size])
    body = raw[RECORD.size:RECORD.size + n]
    where = f"record {i} of host {writer} at pool offset {s.offset + off:#x}"
    if magic != RECORD_MAGIC or index != i or rnonce != nonce or n != rsize - RECORD.size:
        return f"{where}: bad record header (magic {magic!r}, index {index}, nonce {rnonce:#x}, length {n})"
    if zlib.crc32(body) != crc:
        return f"{where}: CRC-32 {zlib.crc32(body):#010x}, the record says {crc:#010x}"
    expected = payload(nonce, writer, i, n)
    if body != expected:
        at = next(k for k in range(n) if body[k] != expected[k])
        return f"{where}: byte {at} is {body[at]:#04x}, expected {expected[at]:#04x} (the CRC matched: rewritten?)"
    return None


def cmd_read(args) -> int:
    dax, size, index, count, slot_bytes = pool_from_env()
    if not 0 <= args.writer < count:
        fail(f"--writer {args.writer}: there are {count} hosts (0 to {count - 1})")
    s = Slot(dax, slot_offset(size, count, slot_bytes, args.writer), slot_bytes, write=False)
    me = os.environ.get("BELUGA_HOST", f"host {index}")
    deadline = time.monotonic() + args.start_timeout_s
    h = s.header()
    while h is None and not args.once:
        if time.monotonic() > deadline:
            fail(f"host {args.writer} published nothing within {args.start_timeout_s:g} s", 3)
        time.sleep(0.1)
        h = s.header()
    if h is None:
        fail(f"host {args.writer}'s slot has no records header", 3)
    nonce, _, rsize, committed, planned, _ = h
    print(f"{me}: following host {args.writer} (nonce {nonce:#x}, {planned} records planned)", flush=True)
    verified, mismatches = 0, []
    last_progress = time.monotonic()
    while True:
        h = s.header()
        if h is not None and h[0] != nonce:
            fail(f"host {args.writer} started another run (nonce {h[0]:#x}) while I checked nonce {nonce:#x}", 1)
        if h is not None and h[3] > committed:
            committed, last_progress = h[3], time.monotonic()
        while verified < committed:
            why = check(s, args.writer, nonce, rsize, verified)
            if why:
                mismatches.append(why)
                print(f"MISMATCH {why}", flush=True)
            verified += 1
            if verified % args.progress_every == 0:
                print(f"verified {verified}", flush=True)
        finished = committed >= planned
        if args.once or finished or mismatches:
            break
        if time.monotonic() - last_progress > args.idle_s:
            break
        time.sleep(0.05)
    if finished:
        state = "the writer finished"
    elif args.once:
        state = f"{committed} of {planned} committed so far"
    else:
        state = f"the writer stopped: no progress for {args.idle_s:g} s, {committed} of {planned} committed"
    verdict = "all check" if not mismatches else f"{len(mismatches)} DO NOT CHECK"
    print(f"verified {verified} records from host {args.writer}, {verdict} ({state})", flush=True)
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"reader": me, "writer": args.writer, "nonce": nonce, "verified": verified,
                       "committed": committed, "planned": planned, "writer_finished": finished,
                       "mismatches": mismatches}, f, indent=2)
    return 1 if mismatches else 0


def cmd_wait(args) -> int:
    """Block until the writer has committed `--committed` records: a scenario step that
    holds a fault back until the program under test is well under way."""
    dax, size, _, count, slot_bytes = pool_from_env()
    if not 0 <= args.writer < count:
        fail(f"--writer {args.writer}: there are {count} hosts (0 to {count - 1})")
    s = Slot(dax, slot_offset(size, count, slot_bytes, args.writer), slot_bytes, write=False)
    deadline = time.monotonic() + args.timeout_s
    while True:
        h = s.header()
        if h is not None and h[3] >= args.committed:
            print(f"host {args.writer} has committed {h[3]} records", flush=True)
            return 0
        if time.monotonic() > deadline:
            got = "no records header" if h is None else f"{h[3]} committed"
            fail(f"host {args.writer} did not commit {args.committed} records within {args.timeout_s:g} s ({got})", 3)
        time.sleep(0.1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("reset", help="clear this host's slot header").set_defaults(func=cmd_reset)
    w = sub.add_parser("write", help="publish records into this host's slot")
    w.add_argument("--records", type=int, default=200)
    w.add_argument("--record-bytes", type=int, default=4096)
    w.add_argument("--interval-s", type=float, default=0.0, help="pause after each record")
    w.add_argument("--progress-every", type=int, default=50)
    w.set_defaults(func=cmd_write)
    r = sub.add_parser("read", help="check the records of one host's slot")
    r.add_argument("--writer", type=int, default=0, help="the writer's host index")
    r.add_argument("--once", action="store_true", help="check what is committed now, then exit")
    r.add_argument("--idle-s", type=float, default=5.0, help="a writer without progress this long has stopped")
    r.add_argument("--start-timeout-s", type=float, default=60.0, help="how long to wait for the writer's header")
    r.add_argument("--progress-every", type=int, default=50)
    r.add_argument("--report", help="write a JSON summary here")
    r.set_defaults(func=cmd_read)
    wt = sub.add_parser("wait", help="return once the writer has committed some records")
    wt.add_argument("--writer", type=int, default=0, help="the writer's host index")
    wt.add_argument("--committed", type=int, required=True, help="how many records")
    wt.add_argument("--timeout-s", type=float, default=120.0)
    wt.set_defaults(func=cmd_wait)
    args = p.parse_args(argv)
    if getattr(args, "record_bytes", RECORD.size + 1) <= RECORD.size:
        fail(f"--record-bytes must be more than {RECORD.size}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
