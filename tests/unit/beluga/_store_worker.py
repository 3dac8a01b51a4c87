"""Child processes standing in for hosts in the multi-process tests.

    writer POOL LOG TRANSPORT STOPFILE WRITER_ID   put (and sometimes delete) blocks, log acknowledgements
    reader POOL LOG TRANSPORT STOPFILE LOGDIR      read acknowledged blocks and check every byte
    hold   POOL KEYHEX READYFILE                   hold a zero-copy view (lease) forever
    stall  POOL READYFILE                          allocate, write half a block, never commit
    switch POOL LOG WRITER_ID PUTS SIZES           put PUTS blocks, changing size class every few puts

Writers log "ACK key size" only after put() returned and "DELETING key"
before a delete is sent, so the parent knows exactly which keys must survive.
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from pathlib import Path

from beluga import layout as L
from beluga import rpc
from beluga.cli import random_bytes
from beluga.client import BelugaClient
from beluga.errors import BelugaError, PoolFullError, ServiceUnavailableError
from beluga.keys import name_key


def block_size(key: bytes) -> int:
    return 1 + int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % 20000


def expected(key: bytes) -> bytes:
    return random_bytes(block_size(key), key.hex())


def connect(pool: str, transport: str) -> BelugaClient:
    while True:
        try:
            return BelugaClient(pool, transport=transport, rpc_timeout_s=1.0, heartbeat_interval_s=0.1)
        except ServiceUnavailableError:
            time.sleep(0.1)


def writer(pool: str, log: str, transport: str, stopfile: str, wid: str) -> None:
    rng = random.Random(f"{wid}-{os.getpid()}")
    out = open(log, "a", buffering=1)
    c = connect(pool, transport)
    n = 0
    acked: list[bytes] = []
    while not os.path.exists(stopfile):
        n += 1
        time.sleep(rng.uniform(0.002, 0.02))  # a steady trickle: the pool must never fill up
        try:
            if acked and rng.random() < 0.1:
                key = acked.pop(rng.randrange(len(acked)))
                out.write(f"DELETING {key.hex()}\n")
                c.delete(key)
                continue
            if rng.random() < 0.3:
                keys = [name_key(f"{wid}-{os.getpid()}-{n}-{i}") for i in range(rng.randint(2, 5))]
                c.put_many([(k, expected(k)) for k in keys])
            else:
                keys = [name_key(f"{wid}-{os.getpid()}-{n}")]
                c.put(keys[0], expected(keys[0]))
            for k in keys:
                out.write(f"ACK {k.hex()} {block_size(k)}\n")
            acked.extend(keys)
        except ServiceUnavailableError:
            out.write("DOWN\n")
            time.sleep(0.05)
        except BelugaError as exc:
            out.write(f"ERROR {type(exc).__name__}: {exc}\n")
            time.sleep(0.05)
    c.close()
    out.write("DONE\n")


def acked_keys(logdir: str) -> list[bytes]:
    keys = []
    for p in Path(logdir).glob("*.writer.log"):
        for line in p.read_text().splitlines():
            if line.startswith("ACK "):
                keys.append(bytes.fromhex(line.split()[1]))
    return keys


def reader(pool: str, log: str, transport: str, stopfile: str, logdir: str) -> None:
    rng = random.Random(os.getpid())
    out = open(log, "a", buffering=1)
    c = connect(pool, transport)
    keys: list[bytes] = []
    i = hits = misses = 0
    while not os.path.exists(stopfile):
        if i % 20 == 0:
            keys = acked_keys(logdir)
        i += 1
        if not keys:
            time.sleep(0.02)
            continue
        try:
            mode = rng.random()
            if mode < 0.4:
                picks = [rng.choice(keys) for _ in range(rng.randint(1, 6))]
                got = c.get_many(picks)
            elif mode < 0.7:
                picks = [rng.choice(keys)]
                got = [c.get(picks[0])]
            else:
                picks = [rng.choice(keys)]
                v = c.view(picks[0])
                if v is None:
                    got = [None]
                else:
                    with v:
                        time.sleep(rng.random() * 0.02)  # hold the lease a little while
                        got = [bytes(v.data)]
            for k, data in zip(picks, got):
                if data is None:
                    misses += 1
                elif data != expected(k):
                    out.write(f"TORN {k.hex()}\n")
                else:
                    hits += 1
        except ServiceUnavailableError:
            out.write("DOWN\n")
            time.sleep(0.05)
        except BelugaError as exc:
            out.write(f"ERROR {type(exc).__name__}: {exc}\n")
            time.sleep(0.05)
    st = c.client_stats()
    c.close()
    out.write(f"DONE hits={hits} misses={misses} corrupt={st.corrupt_misses}\n")


def hold(pool: str, keyhex: str, readyfile: str) -> None:
    c = BelugaClient(pool, rpc_timeout_s=2.0, heartbeat_interval_s=0.1)
    v = c.view(bytes.fromhex(keyhex))
    Path(readyfile).write_text("held" if v is not None else "miss")
    while True:
        time.sleep(1)


def stall(pool: str, readyfile: str) -> None:
    """Allocate a slot and write half a block, like a writer killed mid-put."""
    c = BelugaClient(pool, rpc_timeout_s=2.0, heartbeat_interval_s=0.1)
    key = name_key("stalled")
    data = expected(key)
    rows, _, _ = rpc.ALLOC_RESP.unpack(c._call(rpc.OP_ALLOC, rpc.ALLOC_REQ.pack([(len(data),)])))
    a = rpc.Allocation(*rows[0][1:])
    c.buf[a.header_offset : a.header_offset + L.BLOCK_HEADER_BYTES] = L.BlockHeader(
        L.BLOCK_WRITING, len(data), a.generation, 0, c.slot, key).encode()
    half = len(data) // 2
    c.buf[a.data_offset : a.data_offset + half] = data[:half]
    Path(readyfile).write_text(f"{a.segment} {a.slot}")
    while True:
        time.sleep(1)


def switch(pool: str, log: str, wid: str, puts: str, sizes: str) -> None:
    """Put blocks into a pool kept full by writers like this one, moving through the size classes.

    Every put must succeed or raise PoolFullError; whatever else it raises is logged as ERROR.
    A block read back right after its put is its bytes or a miss (evicted since), never other bytes.
    """
    classes = [int(x) for x in sizes.split(",")]
    out = open(log, "a", buffering=1)
    c = BelugaClient(pool, rpc_timeout_s=10.0, heartbeat_interval_s=0.1)
    stored = full = 0
    for n in range(int(puts)):
        size = classes[(n // 4 + int(wid)) % len(classes)] - n % 3  # a few puts per class, then the next
        key = name_key(f"switch-{wid}-{n}")
        data = random_bytes(size, key.hex())
        try:
            c.put(key, data)
        except PoolFullError:
            full += 1
            continue
        except BelugaError as exc:
            out.write(f"ERROR put of {size} bytes: {type(exc).__name__}: {exc}\n")
            continue
        stored += 1
        got = c.get(key)
        if got is not None and got != data:
            out.write(f"TORN {key.hex()}\n")
    c.close()
    out.write(f"DONE stored={stored} full={full}\n")


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"writer": writer, "reader": reader, "hold": hold, "stall": stall, "switch": switch}[mode](*args)
