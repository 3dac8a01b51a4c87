"""Where a put's time goes, beside Redis's SET of the same size in the same rounds.

    python -m benchmarks.store.put_breakdown [--size 256K] [--rounds 5] [--puts 1000]

Runs the real `BelugaClient.put` against `beluga serve` (a child process, as in `beluga
bench`) on a 1 GiB pool in /dev/shm, new versions of 96 MiB of blocks in a random order,
and times its steps by wrapping the functions the put calls (each wrapper adds ~0.3 us):
each RPC (alloc, commit) as the client sees it, the copy + CRC into the slot, the two
header writes; "the rest" is the whole put minus those. The empty RPC (`ping`) is the
transport's floor, so an RPC's time above it is the service's handling and the messages'
size. Redis's SET (the bench's RESP client) is measured in the same rounds. Prints the
medians over rounds of each step's p50 (us), and each round's figures as JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from beluga import layout as L
from beluga import readpath, rpc
from .run import RedisServer, StoreService, make_pool
from .store import RespClient, block_keys

MiB = 1 << 20


def _p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1e6 if xs else float("nan")


def _round(client, redis, keys: list[bytes], data: bytes, puts: int, rng: random.Random) -> dict:
    """One round: ``puts`` timed puts (their steps too), then as many pings and Redis SETs."""
    steps: dict[str, list[float]] = {"put": [], "alloc": [], "commit": [], "copy + CRC": [], "headers": []}
    real_call, real_copy, real_header = client._call, readpath.copy_crc, L.write_block_header

    def timed(fn, name):
        """``fn``, its time appended to steps[name(args)] (or steps[name])."""
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                steps.setdefault(name(a) if callable(name) else name, []).append(time.perf_counter() - t)
        return wrapper

    # The client calls readpath.copy_crc and L.write_block_header through their modules: patched there.
    client._call = timed(real_call, lambda a: rpc.OP_NAMES.get(a[0], str(a[0])))
    readpath.copy_crc, L.write_block_header = timed(real_copy, "copy + CRC"), timed(real_header, "headers")
    try:
        for _ in range(puts):
            k = keys[rng.randrange(len(keys))]
            t = time.perf_counter()
            client.put(k, data)
            steps["put"].append(time.perf_counter() - t)
    finally:
        del client._call
        readpath.copy_crc, L.write_block_header = real_copy, real_header
    steps["ping"] = []
    for _ in range(puts):
        t = time.perf_counter()
        client.ping()
        steps["ping"].append(time.perf_counter() - t)
    steps["Redis SET"] = []
    if redis is not None:
        for _ in range(puts):
            k = keys[rng.randrange(len(keys))]
            t = time.perf_counter()
            redis.set(k, data)
            steps["Redis SET"].append(time.perf_counter() - t)
    out = {name: _p50(xs) for name, xs in steps.items()}
    out["headers"] = _p50([a + b for a, b in zip(steps["headers"][0::2], steps["headers"][1::2])])  # two per put
    parts = ("alloc", "commit", "copy + CRC", "headers")
    out["the rest (put - the parts)"] = out["put"] - sum(out[p] for p in parts)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.store.put_breakdown", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=L.parse_size, default=256 * 1024, help="block size (default 256K)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--puts", type=int, default=1000, help="puts per round (default 1000)")
    p.add_argument("--json", action="store_true", help="print every round's figures as JSON")
    args = p.parse_args(argv)
    from beluga.client import BelugaClient

    tmp = Path(tempfile.mkdtemp(prefix="beluga-put-"))
    pool = f"/dev/shm/beluga-bench-{os.getpid()}.pool"
    service = redis_server = client = redis = None
    rounds = []
    try:
        make_pool(pool, 1024 * MiB, args.size)
        service = StoreService(pool, tmp)
        try:
            redis_server = RedisServer(tmp)
            redis = RespClient("127.0.0.1", redis_server.port)
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"put_breakdown: Redis skipped: {exc}", file=sys.stderr)
        client = BelugaClient(pool, transport="cxl", rpc_timeout_s=30.0)
        keys = block_keys(args.size, max(16, -(-96 * MiB // args.size)))
        data = os.urandom(args.size)
        for k in keys:  # the working set exists: every measured put replaces a block, as in the bench
            client.put(k, data)
            if redis is not None:
                redis.set(k, data)
        rng = random.Random(1)
        for _ in range(args.rounds):
            rounds.append(_round(client, redis, keys, data, args.puts, rng))
    finally:
        if client is not None:
            client.close()
        if redis is not None:
            redis.close()
        if redis_server is not None:
            redis_server.stop()
        if service is not None:
            service.stop()
        try:
            os.unlink(pool)
        except FileNotFoundError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"size": args.size, "puts_per_round": args.puts, "rounds": rounds}, indent=1))
        return 0
    print(f"{args.size // 1024} KiB put, {args.rounds} rounds of {args.puts}; medians over rounds of each p50 (range):")
    for name in rounds[0]:
        vals = [r[name] for r in rounds]
        print(f"  {name:28} {statistics.median(vals):8.1f} us  ({min(vals):.1f}-{max(vals):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
