"""Runs INSIDE a guest, next to the deployed `beluga` package (PYTHONPATH=/opt/beluga).

    python3 guest_store.py VERB '<json args>'     # prints one JSON line

Verbs: put, get, locate, scan, stat, coherence. Block i of set S has the key name_key("S/i") and
the bytes Random("S/i").randbytes(size): every host can check them without a copy.
"""
import json
import os
import random
import re
import subprocess
import sys
import time

from beluga import layout as L
from beluga.client import BelugaClient
from beluga.keys import name_key
from beluga.pool import Pool
from beluga.report import pool_report

TRACE = "/sys/kernel/tracing"
EVENTS = ("cxl_poison", "cxl_general_media", "cxl_dram")


def block(set_name, i, size):
    ident = f"{set_name}/{i}"
    # Mersenne Twister in C: a string seed is hashed with SHA-512, the same on every
    # host and Python version; hashing per 32 bytes instead costs seconds per MiB under TCG.
    return name_key(ident), random.Random(ident).randbytes(size)


def client(args):
    return BelugaClient(args["pool"], transport=args.get("transport", "cxl"),
                        rpc_timeout_s=args.get("rpc_timeout_s", 20.0), heartbeat_interval_s=0.5)


def put(args):
    c = client(args)
    done = []
    for i in range(args["start"], args["start"] + args["count"]):
        key, data = block(args["set"], i, args["size"])
        c.put(key, data)
        done.append(i)
        # Streamed to the host as it happens: after a crash, the host knows which
        # puts the service had acknowledged.
        print(f"committed {i}", flush=True)
        if args.get("delay_s"):
            time.sleep(args["delay_s"])
    c.close()
    return {"committed": done}


def get(args):
    c = client(args)
    hits, misses, torn = [], [], []
    idx = list(range(args["start"], args["start"] + args["count"]))
    # Batched lookups (each RPC through the pool is slow under TCG), in chunks small
    # enough that a chunk's blocks and their expected bytes fit a guest's memory.
    chunk = max(1, min(64, (32 << 20) // max(1, args["size"])))
    for k in range(0, len(idx), chunk):
        part = [(i, *block(args["set"], i, args["size"])) for i in idx[k:k + chunk]]
        for (i, _key, want), got in zip(part, c.get_many([key for _, key, _ in part])):
            if got is None:
                misses.append(i)
            elif got != want:
                torn.append(i)  # returned as valid with the wrong bytes: what must never happen
            else:
                hits.append(i)
    stats = c.client_stats()
    c.close()
    return {"hits": hits, "misses": misses, "torn": torn, "corrupt_misses": stats.corrupt_misses}


def locate(args):
    c = client(args)
    key, _ = block(args["set"], args["index"], args["size"])
    loc = c.locate(key)  # the service's answer: where the committed block lives
    c.close()
    if loc is None:
        raise SystemExit(f"block {args['set']}/{args['index']} is not in the store")
    return {"data_offset": loc.data_offset, "length_bytes": loc.length_bytes, "generation": loc.generation}


def _region_base():
    out = subprocess.run(["cxl", "list", "-R"], capture_output=True, text=True).stdout.strip()
    regions = json.loads(out) if out else []
    regions = regions if isinstance(regions, list) else [regions]
    return regions[0]["resource"] if regions else None


def enable_trace(args):
    for ev in EVENTS:
        p = f"{TRACE}/events/cxl/{ev}/enable"
        if os.path.exists(p):
            with open(p, "w") as f:
                f.write("1")
    return {"enabled": [ev for ev in EVENTS if os.path.exists(f"{TRACE}/events/cxl/{ev}/enable")]}


def _committed_blocks(pool):
    """(data offset, length, key) of every committed block, from the index (metadata only)."""
    g, buf = pool.geometry, pool.buf
    out = []
    for si in range(g.segment_count):
        seg = L.read_segment_entry(buf, g.segment_entry_offset(si))
        if seg is None or seg.state == L.SEG_FREE:
            continue
        lay = g.slot_layout(seg.data_slot_bytes)
        for sl, e in enumerate(L.read_index_entries(buf, g, si, seg.slot_count)):
            if e is not None and e.state == L.ENTRY_COMMITTED:
                out.append((g.segment_offset(si) + lay.data_offset(sl), e.length_bytes, e.key))
    return out


def scan(args):
    """Read the devices' poison lists and the media events the kernel traced; stop serving
    (delete) every committed block whose bytes overlap an affected address."""
    for mem in os.listdir("/sys/bus/cxl/devices"):
        trig = f"/sys/bus/cxl/devices/{mem}/trigger_poison_list"
        if mem.startswith("mem") and os.path.exists(trig):
            with open(trig, "w") as f:
                f.write("1")
    time.sleep(0.5)
    base = _region_base()
    events = []
    with open(f"{TRACE}/trace") as f:
        for line in f:
            # cxl_poison prints hpa=0x..., the media events print hpa=... without the 0x.
            m = re.search(r"(cxl_poison|cxl_general_media|cxl_dram):.*?\bhpa=(?:0x)?([0-9a-f]+)", line)
            if m:
                dpa = re.search(r"\bdpa=(?:0x)?([0-9a-f]+)", line)
                length = re.search(r"\bdpa_length=(?:0x)?([0-9a-f]+)", line)
                events.append({"event": m.group(1), "hpa": int(m.group(2), 16),
                               "dpa": int(dpa.group(1), 16) if dpa else None,
                               "length": int(length.group(1), 16) if length else 64, "line": line.strip()[:300]})
    affected = []
    for e in events:
        hpa = e["hpa"]
        if base is None or hpa == (1 << 64) - 1 or hpa < base:
            continue  # not mapped by the region (ULLONG_MAX: no HPA translation)
        affected.append((hpa - base, max(e["length"], 64)))
    pool = Pool.open(args["pool"])
    hit = [(off, n, key) for off, n, key in _committed_blocks(pool)
           if any(a < off + n and off < a + alen for a, alen in affected)]
    pool.close()
    removed = []
    if hit:
        c = client(args)
        for off, n, key in hit:
            if c.delete(key):
                removed.append({"key": key.hex(), "data_offset": off, "length_bytes": n})
        c.close()
    return {"events": events, "region_base": base, "affected": affected, "quarantined": removed}


def stat(args):
    pool = Pool.open(args["pool"])
    r = pool_report(pool)
    pool.close()
    return r


def coherence(args):
    """The coherence sanitizer's reports on this host (oldest first); `clear` removes them."""
    from beluga.coherence import read_reports

    path = args["report"]
    reports = read_reports(path)
    if args.get("clear"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return {"count": len(reports), "reports": reports[:5]}


if __name__ == "__main__":
    verb, raw = sys.argv[1], sys.argv[2]
    fn = {"put": put, "get": get, "locate": locate, "scan": scan, "stat": stat, "enable_trace": enable_trace,
          "coherence": coherence}[verb]
    print(json.dumps(fn(json.loads(raw)), default=str))
