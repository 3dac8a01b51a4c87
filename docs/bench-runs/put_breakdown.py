"""Where a put's time goes, across processes: client, transport waits, the service's handling by step.

PYTHONPATH=. .venv/bin/python docs/bench-runs/put_breakdown.py [block_bytes] [puts]

The service runs in a child process (as `beluga serve` does) with its request handling wrapped in
timers: per pool request the moment it picks the request up and the moment its answer is written,
and the time spent in each step of ALLOC and COMMIT. The client puts new versions of 96 MiB of
existing blocks in a random order (what `beluga bench` measures) and records, per request, when it
starts encoding, when the request is posted, when it sees the answer and when it has decoded it;
CLOCK_MONOTONIC (time.perf_counter) is the same clock in both processes. Medians in microseconds.
Timers cost ~0.1-0.2 us each, so the steps add up to a little more than without them.
"""
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time

pc = time.perf_counter


def service(path: str, out: str) -> None:
    from beluga import layout as L
    from beluga import rpc
    from beluga.pool import Pool
    from beluga.service import MetadataService, ServiceConfig

    svc = MetadataService(Pool.open(path), ServiceConfig(takeover_wait_s=0))
    seen, steps = {}, {}

    def wrap(obj, name, label):
        real = getattr(obj, name)

        def timed(*a, **kw):
            t = pc()
            try:
                return real(*a, **kw)
            finally:
                steps.setdefault(label, []).append(pc() - t)
        setattr(obj, name, timed)

    # The service's index and CXL-RPC server are their own objects since the service was split
    # into modules (beluga/index.py, beluga/cxlrpc.py); before, the service held both roles.
    index, server = getattr(svc, "blocks", svc), getattr(svc, "cxl", svc)
    serve_name = "_serve_request" if hasattr(server, "_serve_request") else "_serve_pool_request"
    real_serve = getattr(server, serve_name)

    def serve_timed(c, seq, now):
        a = pc()
        r = real_serve(c, seq, now)
        seen[seq] = (a, pc())
        return r
    setattr(server, serve_name, serve_timed)

    def public(obj, name):
        return name.lstrip("_") if hasattr(obj, name.lstrip("_")) else name
    wrap(rpc, "decode_request", "decode request")
    wrap(rpc, "encode_response", "encode response")
    wrap(svc, public(svc, "_drain_touches"), "drain touch rings")
    wrap(index, public(index, "_alloc_one"), "ALLOC: one slot")
    wrap(index, "_segment_for", "ALLOC:   find a segment")
    wrap(index, "_set_owner", "ALLOC:     take over a sealed segment (persist it)")
    wrap(index, public(index, "_commit_one"), "COMMIT: one block")
    wrap(L, "block_header_matches", "COMMIT:   check the block header")
    wrap(index, "_unindex", "COMMIT:   free the replaced copy")
    wrap(index, "_publish", "COMMIT:   publish in the lookup table")
    wrap(index, "_maybe_seal", "COMMIT:   seal a full segment")
    wrap(index, "_persist_entry", "persist an index entry (each)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    open(out + ".ready", "w").close()
    svc.serve(stop)
    with open(out, "w") as f:
        json.dump({"seen": seen, "steps": {k: [len(v), statistics.median(v)] for k, v in steps.items()}}, f)


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 262144
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    from beluga import readpath, rpc
    from beluga.client import BelugaClient
    from beluga.keys import name_key
    from beluga.pool import format_pool

    path = f"/dev/shm/beluga-put-breakdown-{os.getpid()}.pool"
    out = f"{path}.json"
    format_pool(path, size_bytes=512 << 20, segment_size_bytes=4 << 20)
    child = subprocess.Popen([sys.executable, __file__, "--service", path, out])
    try:
        while not os.path.exists(out + ".ready"):
            time.sleep(0.01)
        c = BelugaClient(path)
        keys = [name_key(f"put-{i}") for i in range((96 << 20) // size)]
        data = os.urandom(size)
        for k in keys:
            c.put(k, data)
        order = keys[:]
        random.Random(2).shuffle(order)
        calls, cur = [], {}
        real_call, real_rpc = c.channel.call, c._call

        def channel_call(msg, seq, timeout):
            cur["posted"] = pc()
            r = real_call(msg, seq, timeout)
            cur["answered"], cur["seq"] = pc(), seq
            return r

        def rpc_call(op, body=b"", **kw):
            a = pc()
            r = real_rpc(op, body, **kw)
            calls.append((op, cur["seq"], a, cur["posted"], cur["answered"], pc()))
            return r
        copies, real_copy = [], readpath.copy_crc

        def copy_crc(dest, src):
            a = pc()
            r = real_copy(dest, src)
            copies.append(pc() - a)
            return r
        c.channel.call, c._call, readpath.copy_crc = channel_call, rpc_call, copy_crc
        puts = []
        for i in range(count):
            a = pc()
            c.put(order[i % len(order)], data)
            puts.append(pc() - a)
        c.channel.call, c._call, readpath.copy_crc = real_call, real_rpc, real_copy
        c.close()
    finally:
        child.terminate()
        child.wait(10)
        os.unlink(path)
    with open(out) as f:
        srv = json.load(f)
    os.unlink(out)
    os.unlink(out + ".ready")
    seen = {int(k): v for k, v in srv["seen"].items()}
    med = lambda v: round(statistics.median(v) * 1e6, 1)  # noqa: E731
    res = {"block_bytes": size, "puts": count, "put total": med(puts), "copy + CRC into the slot (copy_crc)": med(copies)}
    for op in (rpc.OP_ALLOC, rpc.OP_COMMIT):
        rows = [(s, a, p, r, b) for (o, s, a, p, r, b) in calls if o == op and s in seen]
        name = rpc.OP_NAMES[op].upper()
        res[name] = {
            "whole call": med([b - a for s, a, p, r, b in rows]),
            "client: encode, post": med([p - a for s, a, p, r, b in rows]),
            "posted -> service picks it up": med([seen[s][0] - p for s, a, p, r, b in rows]),
            "service: read, decode, handle, encode, write answer": med([seen[s][1] - seen[s][0] for s, a, p, r, b in rows]),
            "answer written -> client sees it": med([r - seen[s][1] for s, a, p, r, b in rows]),
            "client: decode": med([b - r for s, a, p, r, b in rows]),
        }
    res["put outside the two calls and the copy (headers, packing, checks)"] = round(
        res["put total"] - res["ALLOC"]["whole call"] - res["COMMIT"]["whole call"]
        - res["copy + CRC into the slot (copy_crc)"], 1)
    res["service steps (calls per put, median us)"] = {
        k: [round(n / (count + len(keys)), 2), round(m * 1e6, 2)] for k, (n, m) in sorted(srv["steps"].items())}
    res["loadavg"] = os.getloadavg()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--service":
        service(sys.argv[2], sys.argv[3])
    else:
        main()
