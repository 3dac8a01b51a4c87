"""Per-operation breakdown of a lease-free get (in one process, the pieces timed separately).

PYTHONPATH=. .venv/bin/python docs/bench-runs/read_breakdown.py   (BELUGA_NATIVE=0 for the Python path)
A 512 MiB pool in /dev/shm (removed after) served by `beluga serve` in a child process (a service
thread would take the GIL from the measured calls while it drains touches); per block size 96 MiB of blocks
(more than the L3), read in a random order as `beluga bench` reads them. Each figure is the median
of 400-3000 calls in microseconds. "get before" is the get of the previous version, rebuilt here
step by step (probe, read_bytes and post_touch: three calls from Python), timed interleaved with
today's one-call get on the same keys. Used for docs/benchmarks.md's breakdown.
"""
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from beluga import layout as L
from beluga import readpath
from beluga.client import BelugaClient
from beluga.keys import check_key, name_key
from beluga.pool import format_pool

path = f"/dev/shm/beluga-read-breakdown-{os.getpid()}.pool"
format_pool(path, size_bytes=512 << 20, segment_size_bytes=4 << 20)
ready = Path(tempfile.mkdtemp(prefix="beluga-bd-")) / "ready"
svc = subprocess.Popen([sys.executable, "-m", "beluga.cli", "serve", path, "--takeover-wait", "0", "--ready-file",
                        str(ready)], stdout=subprocess.DEVNULL)
while not ready.exists():
    time.sleep(0.02)
out = {"impl": readpath.IMPLEMENTATION}
pc = time.perf_counter
try:
    c = BelugaClient(path)
    g, buf = c.g, c.buf
    table = (g.table_offset, g.table_buckets, g.table_seq_offset)
    ring, head_at = g.touch_ring_offset(c.slot), g.touch_head_offset(c.slot)
    for size in (16384, 262144, 2621440):
        keys = [name_key(f"bd-{size}-{i}") for i in range((96 << 20) // size)]
        data = os.urandom(size)
        for k in keys:
            c.put(k, data)
        c.flush_releases()
        order = keys[:]
        random.Random(size).shuffle(order)
        dest = bytearray(size)
        n = 3000 if size <= 262144 else 400

        def t(fn, n=n):
            vals = []
            for i in range(n):
                k = order[i % len(order)]
                a = pc(); fn(k); vals.append(pc() - a)
            return statistics.median(vals) * 1e6

        hits = {k: c._find(k) for k in keys}
        places = {k: L.unpack_where(g, hits[k][1], hits[k][2]) for k in keys}

        def read_b(k):
            h = hits[k]; p = places[k]
            return readpath.read_bytes(buf, p[0], p[1], k, h[0], h[2], h[3])

        src = memoryview(buf)

        def mcpy(k):
            p = places[k]
            dest[:] = src[p[1]:p[1] + size]

        lock, counts, head = threading.RLock(), {"gets": 0, "hits": 0, "get_bytes": 0}, [L.read_touch_head(buf, g, c.slot)]

        def get_before(key):  # the previous BelugaClient.get's hot path
            if type(key) is bytes and len(key) == L.KEY_BYTES:
                hit = readpath.probe(buf, *table, key)
                if hit:
                    gen, where, length, crc = hit
                    place = L.unpack_where(g, where, length)
                    if place is not None:
                        got = readpath.read_bytes(buf, place[0], place[1], key, gen, length, crc)
                        if type(got) is bytes:
                            counts["gets"] += 1; counts["hits"] += 1; counts["get_bytes"] += length
                            with lock:
                                head[0] = L.post_touch(buf, ring, head_at, head[0], where, gen)
                            return got

        ab = {"get before (probe, read_bytes, post_touch: 3 calls)": get_before, "get now (one call)": c.get}
        vals = {name: [] for name in ab}
        for i in range(n):
            for j, (name, fn) in enumerate(ab.items()):
                k = order[(2 * i + j) % len(order)]
                a = pc(); fn(k); vals[name].append(pc() - a)
        head[0] = L.read_touch_head(buf, g, c.slot)
        row = {name: statistics.median(v) * 1e6 for name, v in vals.items()}
        row.update({
            "check_key": t(check_key),
            "probe (Reader.probe: seqlock read, bucket CRC, key compare)": t(c._reader.probe),
            "read_bytes (header, copy+crc, header; no prefetch)": t(read_b),
            "memcpy same block (slice assign)": t(mcpy),
            "post one touch (Reader.post_touches)": t(lambda k: c._reader.post_touches([(hits[k][1], hits[k][0])])),
            "Reader.get alone": t(c._reader.get),
            "get total": t(c.get),
            "get_into total": t(lambda k: c.get_into(k, dest)),
        })
        if size == 16384:
            pre = [order[i:i + 64] for i in range(0, len(order) - 64, 64)]
            v = []
            for i in range(n):
                ks = pre[i % len(pre)]
                a = pc(); assert c.lookup_prefix(ks) == 64; v.append(pc() - a)
            row["lookup_prefix 64 total"] = statistics.median(v) * 1e6
        out[str(size)] = {k: round(v, 2) for k, v in row.items()}
        for k in keys:
            c.delete(k)
    c.close()
finally:
    svc.terminate()
    svc.wait(10)
    os.unlink(path)
print(json.dumps(out, indent=1))
