"""The store's put and get with its flushes and without them, in the same run (issue 15).

    python -m benchmarks.store.flush_store [--sizes 16K,256K] [--blocks 64] [--rounds 5]

Two pools in /dev/shm, each with its own `beluga serve` (CXL-RPC): one with the flush policy on
(BELUGA_FLUSH_POLICY=on: every publication written back and fenced, every consumption
invalidated first), one with it off (a file's default). One client per pool in this process,
its pool opened with the same policy. Each round puts `--blocks` blocks of each size into both
pools and gets them back, alternating which pool goes first; the medians over the rounds are
reported in microseconds per block. Gets go through the client's reader (the C Reader when built,
which flushes in C when the policy is on); they are also timed with the Python reader and the policy
off (the guests' path, for comparison).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from beluga import coherence, layout as L, readpath
from beluga.client import BelugaClient
import hashlib
from beluga.pool import Pool, format_pool


def _serve(path: str, policy: str, tmp: str) -> subprocess.Popen:
    ready = os.path.join(tmp, f"ready-{policy}.json")
    env = dict(os.environ, BELUGA_FLUSH_POLICY=policy)
    proc = subprocess.Popen([sys.executable, "-m", "beluga.cli", "serve", path, "--transport", "cxl",
                             "--ready-file", ready, "--takeover-wait", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"beluga serve ({policy}) did not start")
        time.sleep(0.02)
    return proc


def measure(sizes: list[int], blocks: int, rounds: int, pool_bytes: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="beluga-flush-store-")
    paths = {p: f"/dev/shm/beluga-flush-store-{os.getpid()}-{p}.pool" for p in ("on", "off")}
    procs, clients = [], {}
    try:
        for policy, path in paths.items():
            format_pool(path, size_bytes=pool_bytes, force=True)
            procs.append(_serve(path, policy, tmp))
            clients[policy] = BelugaClient(Pool.open(path, flush=policy), transport="cxl", rpc_timeout_s=30)
        py_off = readpath.reader(clients["off"].buf, clients["off"].g, readpath.PyReader)
        times = {(s, v): [] for s in sizes for v in ("put on", "put off", "get on", "get off", "get py off")}
        for r in range(rounds):
            for size in sizes:
                data = os.urandom(size)
                keys = [hashlib.sha256(b"%d-%d-%d" % (r, size, i)).digest() for i in range(blocks)]
                order = ("on", "off") if r % 2 == 0 else ("off", "on")
                for policy in order:
                    c = clients[policy]
                    t = time.perf_counter()
                    for k in keys:
                        c.put(k, data)
                    times[(size, f"put {policy}")].append((time.perf_counter() - t) / blocks * 1e6)
                for policy in order:
                    c = clients[policy]
                    t = time.perf_counter()
                    for k in keys:
                        if c.get(k) is None:
                            raise RuntimeError("a block just put is missing")
                    times[(size, f"get {policy}")].append((time.perf_counter() - t) / blocks * 1e6)
                t = time.perf_counter()
                for k in keys:
                    py_off.get(k)
                times[(size, "get py off")].append((time.perf_counter() - t) / blocks * 1e6)
                for c in clients.values():
                    c.delete_many(keys)
        return {"flush": coherence.status(), "blocks": blocks, "rounds": rounds,
                "median_us": {f"{s} {v}": round(statistics.median(x), 1) for (s, v), x in times.items()}}
    finally:
        for c in clients.values():
            c.close()
        for p in procs:
            p.terminate()
            p.wait(10)
        for path in paths.values():
            for f in (path, path + ".coherence"):
                try:
                    os.unlink(f)
                except FileNotFoundError:
                    pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.store.flush_store", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16K,256K", help="block sizes (default 16K,256K)")
    p.add_argument("--blocks", type=int, default=64, help="blocks per size and round (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; medians are reported (default 5)")
    p.add_argument("--pool-size", type=L.parse_size, default=256 * L.MiB, help="each pool's size (default 256M)")
    args = p.parse_args(argv)
    if not coherence.can_flush():
        print(f"this host cannot flush: {coherence.status()['why']}", file=sys.stderr)
        return 2
    sizes = [L.parse_size(s) for s in args.sizes.split(",")]
    res = measure(sizes, args.blocks, args.rounds, args.pool_size)
    print(json.dumps(res, indent=1, sort_keys=True))
    print("| block | put, flushes off | put, flushes on | get, flushes off | get, flushes on | get (Python reader), off |",
          file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    m = res["median_us"]
    for s in sizes:
        print(f"| {s // 1024} KiB | {m[f'{s} put off']} | {m[f'{s} put on']} | {m[f'{s} get off']} | "
              f"{m[f'{s} get on']} | {m[f'{s} get py off']} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
