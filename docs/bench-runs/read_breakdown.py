"""Per-operation breakdown of a lease-free get (in one process, the pieces timed separately).

PYTHONPATH=. .venv/bin/python docs/bench-runs/read_breakdown.py   (BELUGA_NATIVE=0 for the Python path)
A 256 MiB pool in /dev/shm (removed after) and a service thread; per block size 48 MiB of blocks; each
figure is the median of 400-3000 calls in microseconds. Used for docs/benchmarks.md's breakdown.
"""
import json
import os
import statistics
import time

from beluga import layout as L
from beluga import readpath
from beluga.client import BelugaClient
from beluga.keys import check_key, name_key
from beluga.pool import format_pool
from beluga.service import ServiceConfig, ServiceThread

path = f"/dev/shm/beluga-read-breakdown-{os.getpid()}.pool"
format_pool(path, size_bytes=256 << 20, segment_size_bytes=4 << 20)
svc = ServiceThread(path, ServiceConfig(takeover_wait_s=0))
out = {"impl": readpath.IMPLEMENTATION}
try:
    c = BelugaClient(path)
    g, buf = c.g, c.buf
    for size in (16384, 262144, 2621440):
        keys = [name_key(f"bd-{size}-{i}") for i in range(max(8, (48 << 20) // size))]
        data = os.urandom(size)
        for k in keys:
            c.put(k, data)
        dest = bytearray(size)
        def t(fn, n=2000):
            vals = []
            for i in range(n):
                k = keys[i % len(keys)]
                a = time.perf_counter(); fn(k); vals.append(time.perf_counter() - a)
            return statistics.median(vals) * 1e6
        n = 3000 if size <= 262144 else 400
        hits = {k: c._find(k) for k in keys}
        places = {k: L.unpack_where(g, hits[k][1], hits[k][2]) for k in keys}
        def read_b(k):
            h = hits[k]; p = places[k]
            return readpath.read_bytes(buf, p[0], p[1], k, h[0], h[2], h[3])
        def read_i(k):
            h = hits[k]; p = places[k]
            return readpath.read_into(buf, dest, p[0], p[1], k, h[0], h[2], h[3])
        src = memoryview(buf)
        def mcpy(k):
            p = places[k]
            dest[:] = src[p[1]:p[1] + size]
        row = {
            "check_key": t(check_key, n),
            "probe": t(lambda k: readpath.probe(buf, g.table_offset, g.table_buckets, g.table_seq_offset, k), n),
            "read_bytes (header, copy+crc, header)": t(read_b, n),
            "read_into (header, copy+crc, header)": t(read_i, n),
            "memcpy same block (slice assign)": t(mcpy, n),
            "post touch": t(lambda k: c._post_touches([(hits[k][1], hits[k][0])]), n),
            "get total": t(c.get, n),
            "get_into total": t(lambda k: c.get_into(k, dest), n),
        }
        from beluga import rpc
        wkeys = [name_key(f"bd-put-{size}-{i}") for i in range(64)]
        scratch = bytearray(size)
        row["put total"] = t(lambda k: c.put(wkeys[hash(k) % 64], data), max(200, n // 10))
        row["put: one RPC round trip (NOP)"] = t(lambda k: c._call(rpc.OP_NOP), n)
        row["put: copy+crc of the data (copy_crc)"] = t(lambda k: readpath.copy_crc(scratch, data), n)
        if size == 16384:
            pre = [keys[i:i + 64] for i in range(0, len(keys) - 64, 64)]
            vals = []
            for i in range(n):
                ks = pre[i % len(pre)]
                a = time.perf_counter(); assert c.lookup_prefix(ks) == 64; vals.append(time.perf_counter() - a)
            row["lookup_prefix 64 total"] = statistics.median(vals) * 1e6
            row["probe x64 only"] = row["probe"] * 64
        out[str(size)] = {k: round(v, 2) for k, v in row.items()}
        for k in keys:
            c.delete(k)
    c.close()
finally:
    svc.stop()
    os.unlink(path)
print(json.dumps(out, indent=1))
