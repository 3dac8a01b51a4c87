"""`beluga bench`: the store against its baselines, side by side, in one run.

    beluga bench [--out DIR] [--sizes 16K,256K,2.5M] [--clients 1,2,4] [--rounds 5]
                 [--duration 0.3] [--working-set 96M] [--pool-size 1G] [--no-redis]
                 [--no-mooncake] [--no-model] [--model-prefixes 1024,4096,8192] [--quick]

What runs, all on this host and in this one invocation:

* a pool file in /dev/shm (pages faulted in once, as a devdax device's are),
  `beluga serve` on it (pool RPC and TCP), 1, 2 and 4 client processes;
* per block size: put and get latency (p50/p99), throughput (GB/s,
  aggregated over the clients), hit-lookup rate; `get` returns a new bytes
  object, `get_into` copies into the caller's buffer; beside each get, the
  "bare read": the get's copy + CRC of the same pool memory with no store
  around it, with as many processes (what the machine gives that pattern);
* baselines: memcpy of buffers larger than the CPU caches (the limit; as many
  copying processes as clients), Redis over loopback (Debian's redis-server,
  started and stopped here, with a lean RESP client that reads straight into
  the caller's buffer and polls its socket as the store's client polls the
  pool), Mooncake Store over loopback (``benchmarks.store.mooncake``: its master,
  a store node holding the working set, clients reading over its "tcp"
  transfer protocol into registered buffers), and the store's own TCP
  transport;
* a real model's KV cache (`benchmarks.store.kv`): TTFT with and without loading
  the prefix's KV blocks from the pool;
* every measurement is repeated ``--rounds`` times, interleaved, and the
  medians are reported.

Writes bench.json and bench.png under --out and prints the ratios against the
targets of the store-performance issue. Targets are checked here, never in
timed tests.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

from beluga import layout as L
from .children import remove_orphans, stop as stop_child
from .mooncake import MooncakeServer, MooncakeUnavailable
from .sizing import POOL_MAX_CLIENTS, memcpy_buffer_bytes, plan_working_set, segment_bytes_for
from .store import BATCH, PREFIX, KiB, MiB, RespClient, Workers, block_keys

DEFAULT_SIZES = "16K,256K,2.5M"
DEFAULT_CLIENTS = "1,2,4"
DEFAULT_PREFIXES = "1024,4096,8192"

TARGETS = {
    "get_vs_memcpy": 0.7,
    "get_vs_memcpy_2m": 0.85,  # from 2 MiB blocks up
    "redis_over_store_16k_p50": 10.0,
    "mooncake_over_store_16k_p50": 10.0,
    "rpc_pool_faster_than_tcp": 1.0,
    "aggregate_1_to_2_clients": 1.0,
    "aggregate_1_to_2_clients_2m": 1.6,  # 2 clients' aggregate get over 1 client's, from 2 MiB blocks up
    "aggregate_vs_bare": 0.9,  # (a diagnostic) the store's 1-to-2 ratio over the bare read's in the same rounds
    "prefix64_p50_us": 10.0,  # lookup_prefix of 64 keys (all hits): p50 at most this many microseconds
    "redis_put_over_store_put_p50": 1.0,  # a put no slower than Redis's SET (p50), from 256 KiB up
}


# ---------------------------------------------------------------- the machine
def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def l3_cache_bytes() -> int:
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.exists() else []:
        size = _read(str(idx / "size"))
        if size:
            try:
                best = max(best, L.parse_size(size))
            except ValueError:
                pass
    return best or 32 * MiB


def describe_machine() -> dict:
    cpu = ""
    flags = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name") and not cpu:
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1]
    mem_kib = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    versions = {"python": platform.python_version()}
    for mod in ("numpy", "torch", "transformers", "isal"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    from beluga.checksum import IMPLEMENTATION

    redis = shutil.which("redis-server")
    redis_version = ""
    if redis:
        try:
            redis_version = subprocess.run([redis, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        from importlib.metadata import version

        mooncake_version = version("mooncake-transfer-engine-non-cuda")
    except Exception:
        mooncake_version = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "l3_cache_bytes": l3_cache_bytes(), "virtualized": " hypervisor" in f" {flags} ",
        "kernel": platform.release(), "hostname": socket.gethostname(), "versions": versions,
        "crc32_implementation": IMPLEMENTATION, "redis_server": redis_version,
        "mooncake": mooncake_version,
        "loadavg_start": _read("/proc/loadavg"),
    }


# ---------------------------------------------------------------- services we start
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """Debian's redis-server on loopback, no persistence; stopped by ``stop()``."""

    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (`make setup` installs it; apt-get install redis-server)")
        self.port = _free_port()
        self.log = tmp / "redis.log"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--daemonize", "no", "--dir", str(tmp), "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # never leave a server behind
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            try:
                c = RespClient("127.0.0.1", self.port, timeout_s=2)
                try:
                    if c.command(b"PING") == b"+PONG":
                        return
                finally:
                    c.close()
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {self.log})")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_child(self.proc)


class StoreService:
    """`beluga serve POOL --transport both` in a child process."""

    def __init__(self, pool: str, tmp: Path) -> None:
        self.ready_file = tmp / "serve.ready"
        self.log = open(tmp / "serve.log", "wb")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "beluga.cli", "serve", pool, "--transport", "both", "--takeover-wait", "0",
             "--ready-file", str(self.ready_file)], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"beluga serve did not start (see {tmp / 'serve.log'})")
            time.sleep(0.02)
        self.ready = json.loads(self.ready_file.read_text())

    def stop(self) -> None:
        stop_child(self.proc)
        self.log.close()


def make_pool(path: str, size_bytes: int, max_block: int) -> L.Geometry:
    """Format a pool whose segments hold the largest block, and fault in all its pages."""
    from beluga.pool import Pool, format_pool

    res = format_pool(path, size_bytes=size_bytes, force=True, segment_size_bytes=segment_bytes_for(max_block),
                      max_clients=POOL_MAX_CLIENTS)
    with Pool.open(path) as pool:
        zeros = bytes(64 * MiB)
        start, end = res.geometry.segments_offset, res.geometry.used_bytes
        for off in range(start, end, len(zeros)):
            n = min(len(zeros), end - off)
            pool.buf[off : off + n] = zeros[:n]
    return res.geometry


# ---------------------------------------------------------------- statistics
def _pct(sorted_vals, q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, math.ceil(q * len(sorted_vals)) - 1))
    return sorted_vals[i]


def summarize(results: list[dict]) -> dict:
    """One measurement (all workers of one round) -> throughput and latency figures."""
    lat = array("d")
    for r in results:
        lat.frombytes(r.get("lat", b""))
    lat = sorted(lat)
    span = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    total_bytes = sum(r["bytes"] for r in results)
    ops = sum(r["ops"] for r in results)
    return {
        "gbps": total_bytes / span / 1e9 if span > 0 else 0.0,
        "ops_per_s": ops / span if span > 0 else 0.0,
        "p50_us": _pct(lat, 0.50) * 1e6, "p99_us": _pct(lat, 0.99) * 1e6,
        "ops": ops, "hits": sum(r["hits"] for r in results),
    }


def combine(rounds: list[dict]) -> dict:
    """Medians over rounds (each round's own figure is kept too)."""
    out = {}
    for k in ("gbps", "ops_per_s", "p50_us", "p99_us"):
        out[k] = statistics.median(r[k] for r in rounds)
    ops = sum(r["ops"] for r in rounds)
    out["hit_ratio"] = sum(r["hits"] for r in rounds) / ops if ops else 0.0
    out["ops"] = ops
    out["rounds"] = [{k: round(r[k], 4) for k in ("gbps", "ops_per_s", "p50_us", "p99_us")} for r in rounds]
    return out


# ---------------------------------------------------------------- the run
def parse_list(text: str, conv) -> list:
    return [conv(x) for x in text.split(",") if x.strip()]


def run(args) -> dict:
    sizes = parse_list(args.sizes, L.parse_size)
    client_counts = parse_list(args.clients, int)
    prefixes = parse_list(args.model_prefixes, int)
    l3 = l3_cache_bytes()
    # Writers: the fill and put workers, and worker 0's TCP client. Refused before anything starts.
    plan = plan_working_set(sizes, args.pool_size, l3_bytes=l3, requested_bytes=args.working_set,
                            writers=max(client_counts) + 1)
    machine = describe_machine()
    working_set = plan.per_size_bytes
    memcpy_bytes, memcpy_capped = memcpy_buffer_bytes(l3, args.memcpy_buffer)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="beluga-bench-"))
    if not args.pool:
        for gone in remove_orphans("/dev/shm", "beluga-bench-"):
            print(f"beluga bench: removed {gone}, left by a bench run that was killed", file=sys.stderr)
    pool = args.pool or f"/dev/shm/beluga-bench-{os.getpid()}.pool"
    report: dict = {
        "machine": machine,
        "config": {"sizes": sizes, "clients": client_counts, "rounds": args.rounds, "duration_s": args.duration,
                   "working_set_bytes": working_set, "memcpy_buffer_bytes": memcpy_bytes, "pool": pool,
                   "pool_size_bytes": args.pool_size, "model_prefixes": prefixes if args.model else [],
                   "working_set_wanted_bytes": plan.wanted_bytes, "working_set_total_bytes": plan.total_bytes,
                   "working_set": plan.describe()},
        "measurements": [], "memcpy": {}, "memcpy_blocks": {}, "model": None, "targets": [], "notes": [],
    }
    report["notes"] += [note for note in (plan.capped, memcpy_capped) if note]
    t_start = time.monotonic()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    service = redis = mooncake = None
    workers: dict[int, Workers] = {}
    try:
        say(f"beluga bench: pool {pool} (pages faulted in), {plan.describe()}, "
            f"memcpy buffers {memcpy_bytes >> 20} MiB")
        geometry = make_pool(pool, args.pool_size, max(sizes))
        report["config"]["segment_size_bytes"] = geometry.segment_size_bytes
        service = StoreService(pool, tmp)
        if args.redis:
            try:
                redis = RedisServer(tmp)
            except (FileNotFoundError, RuntimeError) as exc:
                report["notes"].append(f"Redis baseline skipped: {exc}")
                say(f"beluga bench: Redis baseline skipped: {exc}")
        keysets = {s: block_keys(s, n) for s, n in plan.blocks.items()}
        if args.mooncake:
            # One segment for every size's working set, with room to spare: Mooncake starts
            # evicting at 90% full, and an upsert allocates the new copy before freeing the old.
            stored = sum(s * len(k) for s, k in keysets.items())
            segment = -(-(stored * 5 // 4 + 64 * MiB) // MiB) * MiB
            try:
                mooncake = MooncakeServer(tmp, segment_bytes=segment)
                report["config"]["mooncake"] = {"master": mooncake.address, "segment_bytes": segment,
                                                "pids": mooncake.pids}
            except (MooncakeUnavailable, OSError) as exc:
                report["notes"].append(f"Mooncake baseline skipped: {exc}")
                say(f"beluga bench: Mooncake baseline skipped: {exc}")
        mc_config = ({"master": mooncake.address, "local_buffer_bytes": 2 * max(sizes) + 16 * MiB}
                     if mooncake else None)
        for n in client_counts:
            workers[n] = Workers(n, pool=pool, redis_port=redis.port if redis else None, mooncake=mc_config)
        # Fill the pool (and Redis, Mooncake) with each size's working set, split over the largest worker set.
        filler = workers[max(client_counts)]
        systems_fill = ["cxl"] + (["redis"] if redis else [])
        for s, keys in keysets.items():
            for system in systems_fill:
                filler.run([{"kind": "fill", "system": system, "block_bytes": s, "keys": keys[i :: len(filler)]}
                            for i in range(len(filler))])
        if mooncake:
            try:
                for s, keys in keysets.items():
                    filler.run([{"kind": "fill", "system": "mooncake", "block_bytes": s,
                                 "keys": keys[i :: len(filler)]} for i in range(len(filler))])
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                report["notes"].append(f"Mooncake baseline dropped: {first}")
                say(f"beluga bench: Mooncake baseline dropped: {first}")
                mooncake.stop()
                mooncake = None
        say(f"beluga bench: filled {sum(len(k) for k in keysets.values())} blocks per system "
            f"in {time.monotonic() - t_start:.0f}s; measuring {args.rounds} rounds of {args.duration}s each")
        raw: dict[tuple, list] = {}

        # The bare read's offsets: block-sized pieces of the pool's segment area, as many as the working set
        # has blocks (the same memory, the same amount of it, as the store's gets read).
        seg_off, seg_end = geometry.segments_offset, geometry.used_bytes
        bare_offsets = {s: [seg_off + i * s for i in range(len(keysets[s])) if seg_off + (i + 1) * s <= seg_end]
                        for s in sizes}

        def measure(n: int, system: str, op: str, size: int) -> None:
            # Before a Redis or Mooncake measurement, give the store's service time to go from its short "warm"
            # sleeps to idle polling (poll_warm_s), so that it takes no CPU from its peer.
            delay = 0.1 if system in ("redis", "mooncake") else 0.05
            keys = bare_offsets[size] if system == "bare" else keysets[size]
            task = {"kind": "op", "system": system, "op": op, "block_bytes": size, "keys": keys,
                    "duration_s": args.duration, "start_at": time.time() + delay}
            if system == "mooncake" and op == "put":
                # Mooncake refuses one key's concurrent writes (the later upsert ends in ILLEGAL_CLIENT):
                # its writers take disjoint slices of the working set.
                tasks = [dict(task, keys=keys[i::n]) for i in range(n)]
            else:
                tasks = [dict(task) for _ in range(n)]
            raw.setdefault((system, op, size, n), []).append(summarize(workers[n].run(tasks)))

        # Within a round, each operation is measured with 1, 2, 4 clients back to back, and the store's get
        # right beside the bare read of the same memory: the host's memory bandwidth drifts within seconds
        # (other tenants, where the host runs our two vCPUs), and the aggregate targets are ratios of these.
        peers = (["redis"] if redis else []) + (["mooncake"] if mooncake else [])
        for rnd in range(args.rounds):
            report["machine"].setdefault("loadavg_rounds", []).append(_read("/proc/loadavg"))
            for n in client_counts:
                res = workers[n].run_same({"kind": "memcpy", "buffer_bytes": memcpy_bytes, "duration_s": args.duration})
                raw.setdefault(("memcpy", "copy", memcpy_bytes, n), []).append(summarize(res))
            for s in sizes:
                n0 = client_counts[0]
                res = workers[n0].run_same({"kind": "memcpy_blocks", "block_bytes": s, "set_bytes": memcpy_bytes,
                                            "duration_s": args.duration / 2})
                raw.setdefault(("memcpy_blocks", "copy", s, n0), []).append(summarize(res))
                for op in ("put", "get", "get_into", "get_batch", "lookup"):
                    for n in client_counts:
                        measure(n, "cxl", op, s)
                        if op == "get":
                            measure(n, "bare", "get", s)
                for system in peers:
                    for op in ("put", "get", "get_batch", "lookup"):
                        for n in client_counts:
                            measure(n, system, op, s)
                if 1 in client_counts:
                    for op in ("put", "get", "lookup"):
                        measure(1, "tcp", op, s)
            if 1 in client_counts:
                for system in ("cxl", "tcp"):
                    measure(1, system, "nop", sizes[0])
                if len(keysets[sizes[0]]) >= PREFIX:
                    measure(1, "cxl", "prefix", sizes[0])
            say(f"beluga bench: round {rnd + 1}/{args.rounds} done at {time.monotonic() - t_start:.0f}s")
        for (system, op, size, n), rounds in sorted(raw.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
            m = {"system": system, "op": op, "block_bytes": size, "clients": n, **combine(rounds)}
            if system == "memcpy":
                report["memcpy"][str(n)] = m["gbps"]
                report.setdefault("memcpy_rounds", {})[str(n)] = [r["gbps"] for r in m["rounds"]]
            elif system == "memcpy_blocks":
                report["memcpy_blocks"][str(size)] = m["gbps"]
            else:
                report["measurements"].append(m)
        for w in workers.values():
            w.close()
        workers = {}
        if args.model and prefixes:
            say("beluga bench: model prefix reuse (transformers, random weights) ...")
            report["model"] = run_model(pool, prefixes, rounds=min(args.rounds, 3), say=say)
    finally:
        for w in workers.values():
            w.close()
        if redis is not None:
            redis.stop()
        if mooncake is not None:
            mooncake.stop()
        if service is not None:
            service.stop()
        if not args.pool:
            try:
                os.unlink(pool)
            except FileNotFoundError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    report["machine"]["loadavg_end"] = _read("/proc/loadavg")
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    report["targets"] = evaluate(report)
    return report


def run_model(pool: str, prefixes: list[int], *, rounds: int, say) -> dict:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"needs torch and transformers (pip install -e '.[test]'): {exc}"}
    from beluga.client import BelugaClient
    from . import kv

    model = kv.build_model(kv.BENCH_MODEL)
    spec = kv.kv_spec(model)
    out = {"model": {**kv.BENCH_MODEL.__dict__, "dtype": "float32", "params": sum(p.numel() for p in model.parameters())},
           "kv_block_bytes": spec.nbytes, "block_tokens": spec.block_tokens, "logits_atol": kv.LOGITS_ATOL,
           "torch_threads": __import__("torch").get_num_threads(), "results": []}
    with BelugaClient(pool, transport="cxl", rpc_timeout_s=30.0) as client:
        kv.prefix_reuse(client, model, 256, suffix_tokens=16, rounds=1)  # warm-up: allocator, kernels
        for p in prefixes:
            r = kv.prefix_reuse(client, model, p, rounds=rounds)
            say(f"beluga bench:   prefix {p}: TTFT full {r.ttft_full_s * 1e3:.0f} ms, from pool "
                f"{r.ttft_cached_s * 1e3:.0f} ms (KV load {r.load_s * 1e3:.1f} ms), -{r.ttft_reduction:.1%}, "
                f"max |dlogit| {r.max_abs_logit_diff:.2g}")
            out["results"].append(r.as_dict())
    return out


# ---------------------------------------------------------------- targets and output
def find(report: dict, system: str, op: str, size: int, clients: int = 1) -> dict | None:
    for m in report["measurements"]:
        if (m["system"], m["op"], m["block_bytes"], m["clients"]) == (system, op, size, clients):
            return m
    return None


def _round_ratio(num: list | None, den: list | None, fallback: float) -> float:
    """Median of per-round ratios (num[i] / den[i], measured seconds apart in the same round).

    The machine's speed drifts over a run (other tenants of the host), so ratios
    taken within each round are steadier than a ratio of two medians.
    """
    per_round = _per_round(num, den)
    return statistics.median(per_round) if per_round else fallback


def _per_round(num: list | None, den: list | None) -> list[float] | None:
    """num[i] / den[i] for each round, or None when the rounds do not pair up (or a den is 0)."""
    if num and den and len(num) == len(den) and all(d > 0 for d in den):
        return [a / b for a, b in zip(num, den)]
    return None


def _rounds(m: dict | None, key: str) -> list | None:
    return [r[key] for r in m["rounds"]] if m and m.get("rounds") else None


def _bare_scaling(report: dict, size: int, a: dict, b: dict) -> dict | None:
    """The bare read's 1-to-2-process ratio, and the store's relative to it, per round.

    The bare read is the get's copy + CRC of the same pool memory with nothing around it, measured
    right beside the store's get in each round: what the machine gives this access pattern then.
    """
    ba, bb = find(report, "bare", "get", size, 1), find(report, "bare", "get", size, 2)
    if not (ba and bb):
        return None
    store = _per_round(_rounds(b, "gbps"), _rounds(a, "gbps"))
    bare = _per_round(_rounds(bb, "gbps"), _rounds(ba, "gbps"))
    ratio = statistics.median(bare) if bare else bb["gbps"] / ba["gbps"]
    relative = _round_ratio(store, bare, (b["gbps"] / a["gbps"]) / (bb["gbps"] / ba["gbps"]))
    return {"a": ba["gbps"], "b": bb["gbps"], "ratio": ratio, "relative": relative}


def evaluate(report: dict) -> list[dict]:
    """Each target as a ratio from this run: the median over rounds of the ratio within each round."""
    out = []
    sizes = report["config"]["sizes"]
    memcpy1 = report["memcpy"].get("1")
    memcpy1_rounds = (report.get("memcpy_rounds") or {}).get("1")
    for s in [s for s in sizes if s >= 256 * KiB]:
        goal = TARGETS["get_vs_memcpy_2m"] if s >= 2 * MiB else TARGETS["get_vs_memcpy"]
        for op in ("get", "get_into", "get_batch"):
            m = find(report, "cxl", op, s)
            if m and memcpy1:
                ratio = _round_ratio(_rounds(m, "gbps"), memcpy1_rounds, m["gbps"] / memcpy1)
                label = {"get": "get", "get_into": "get_into", "get_batch": f"get_many_into x{BATCH}"}[op]
                out.append({"target": f"{label} {_size(s)} >= {goal}x memcpy",
                            "primary": op == "get", "value": round(ratio, 3),
                            "threshold": goal, "met": ratio >= goal,
                            "detail": f"{m['gbps']:.2f} GB/s vs memcpy {memcpy1:.2f} GB/s (medians)"})
        st, peer = find(report, "cxl", "put", s), find(report, "redis", "put", s)
        if st and peer:
            goal = TARGETS["redis_put_over_store_put_p50"]
            ratio = _round_ratio(_rounds(peer, "p50_us"), _rounds(st, "p50_us"), peer["p50_us"] / st["p50_us"])
            out.append({"target": f"put {_size(s)} p50 no slower than Redis", "primary": True,
                        "value": round(ratio, 2), "threshold": goal, "met": ratio >= goal,
                        "detail": f"store {st['p50_us']:.1f} us vs Redis {peer['p50_us']:.1f} us (medians)"})
    small = min(sizes)
    st = find(report, "cxl", "get", small)
    for system in ("redis", "mooncake"):
        peer = find(report, system, "get", small)
        if st and peer:
            goal = TARGETS[f"{system}_over_store_16k_p50"]
            ratio = _round_ratio(_rounds(peer, "p50_us"), _rounds(st, "p50_us"), peer["p50_us"] / st["p50_us"])
            out.append({"target": f"{_size(small)} get p50 >= {goal:g}x lower than {NAMES[system]}",
                        "primary": True, "value": round(ratio, 2), "threshold": goal, "met": ratio >= goal,
                        "detail": f"store {st['p50_us']:.1f} us vs {NAMES[system]} {peer['p50_us']:.1f} us (medians)"})
    cx, tc = find(report, "cxl", "nop", small), find(report, "tcp", "nop", small)
    if cx and tc:
        ratio = _round_ratio(_rounds(tc, "p50_us"), _rounds(cx, "p50_us"), tc["p50_us"] / cx["p50_us"])
        out.append({"target": "pool RPC round trip faster than TCP", "primary": True, "value": round(ratio, 2),
                    "threshold": TARGETS["rpc_pool_faster_than_tcp"], "met": ratio > TARGETS["rpc_pool_faster_than_tcp"],
                    "detail": f"pool {cx['p50_us']:.1f} us vs TCP {tc['p50_us']:.1f} us (p50 of an empty request)"})
    if 1 in report["config"]["clients"] and 2 in report["config"]["clients"]:
        for s in sizes:
            a, b = find(report, "cxl", "get", s, 1), find(report, "cxl", "get", s, 2)
            if a and b:
                ratio = _round_ratio(_rounds(b, "gbps"), _rounds(a, "gbps"), b["gbps"] / a["gbps"])
                detail = f"{a['gbps']:.2f} -> {b['gbps']:.2f} GB/s (medians)"
                bare = _bare_scaling(report, s, a, b)
                if bare:
                    detail += (f"; the bare copy+CRC of the same memory, beside it: {bare['a']:.2f} -> "
                               f"{bare['b']:.2f} GB/s, {bare['ratio']:.3f}x")
                if s >= 2 * MiB:
                    goal = TARGETS["aggregate_1_to_2_clients_2m"]
                    name, met = f"aggregate get {_size(s)} with 2 clients >= {goal}x 1 client", ratio >= goal
                else:
                    goal = 1.0
                    name, met = f"aggregate get {_size(s)} grows from 1 to 2 clients", ratio > goal
                out.append({"target": name, "primary": True, "value": round(ratio, 3), "threshold": goal,
                            "met": met, "detail": detail})
                if bare and s >= 2 * MiB:
                    goal = TARGETS["aggregate_vs_bare"]
                    out.append({"target": f"aggregate get {_size(s)} scales as the bare read does (>= {goal}x its "
                                          f"1-to-2 ratio)", "primary": False, "value": round(bare["relative"], 3),
                                "threshold": goal, "met": bare["relative"] >= goal,
                                "detail": f"store {ratio:.3f}x, bare {bare['ratio']:.3f}x from 1 to 2 processes "
                                          f"(medians of per-round ratios)"})
    px = find(report, "cxl", "prefix", small)
    if px:
        goal = TARGETS["prefix64_p50_us"]
        out.append({"target": f"lookup_prefix of {PREFIX} keys p50 <= {goal:g} us", "primary": True,
                    "value": round(px["p50_us"], 2), "threshold": goal, "met": px["p50_us"] <= goal,
                    "detail": f"p50 {px['p50_us']:.1f} us, p99 {px['p99_us']:.1f} us (median of rounds)"})
    model = report.get("model") or {}
    for r in model.get("results", []):
        out.append({"target": f"model prefix {r['prefix_tokens']}: cached logits match (atol {model['logits_atol']:g})",
                    "primary": True, "value": r["max_abs_logit_diff"], "threshold": model["logits_atol"],
                    "met": bool(r["logits_match"]),
                    "detail": f"TTFT {r['ttft_full_s'] * 1e3:.0f} -> {r['ttft_cached_s'] * 1e3:.0f} ms "
                              f"(-{r['ttft_reduction']:.1%}, paper: -89.6%)"})
    return out


ORDER = {"cxl": 0, "bare": 1, "tcp": 2, "redis": 3, "mooncake": 4}
"""Systems in the order the tables show them."""
NAMES = {"cxl": "pool", "bare": "bare read", "tcp": "TCP", "redis": "Redis", "mooncake": "Mooncake"}


def _size(n: int) -> str:
    if n >= MiB:
        return f"{n / MiB:g} MiB"
    return f"{n / KiB:g} KiB"


def format_report(report: dict) -> str:
    lines = []
    m = report["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, L3 {m['l3_cache_bytes'] >> 20} MiB, "
                 f"{'VM' if m['virtualized'] else 'bare metal'}, kernel {m['kernel']}, CRC-32 via {m['crc32_implementation']}")
    lines.append(f"memcpy ({report['config']['memcpy_buffer_bytes'] >> 20} MiB buffers): " + ", ".join(
        f"{n} proc {v:.2f} GB/s" for n, v in report["memcpy"].items()))
    if report["config"].get("working_set"):
        lines.append(report["config"]["working_set"])
    lines.append("")
    head = f"{'size':>9} {'system':>8} {'cl':>2} {'op':>9} {'p50 us':>9} {'p99 us':>9} {'GB/s':>7} {'ops/s':>9} {'hit':>5}"
    lines.append(f"(cl = client processes; GB/s and ops/s are aggregates; get_batch = {BATCH} blocks per call, "
                 f"its latency is per call; prefix = lookup_prefix of {PREFIX} keys, per call; nop = empty RPC round trip; "
                 f"bare = a get's copy + CRC of the same pool memory with no store around it)")
    lines.append(head)
    ops = {"put": 0, "get": 1, "get_into": 2, "get_batch": 3, "lookup": 4, "prefix": 5, "nop": 6}
    for x in sorted(report["measurements"], key=lambda x: (x["block_bytes"], x["clients"], ORDER[x["system"]], ops[x["op"]])):
        name = {"cxl": "pool", "bare": "bare", "tcp": "tcp", "redis": "redis", "mooncake": "mooncake"}[x["system"]]
        size = "-" if x["op"] == "nop" else _size(x["block_bytes"])
        lines.append(f"{size:>9} {name:>8} {x['clients']:>2} {x['op']:>9} {x['p50_us']:>9.1f} {x['p99_us']:>9.1f} "
                     f"{x['gbps']:>7.2f} {x['ops_per_s']:>9.0f} {x['hit_ratio']:>5.2f}")
    model = report.get("model")
    if model and model.get("results"):
        lines.append("")
        lines.append(f"model: Llama-style, {model['model']['num_hidden_layers']} layers, hidden {model['model']['hidden_size']}, "
                     f"{model['model']['params'] / 1e6:.1f}M params (random), KV block {model['kv_block_bytes'] >> 10} KiB")
        for r in model["results"]:
            lines.append(f"  prefix {r['prefix_tokens']:>5} + {r['suffix_tokens']} tokens: TTFT full {r['ttft_full_s'] * 1e3:8.1f} ms, "
                         f"KV from pool {r['ttft_cached_s'] * 1e3:7.1f} ms (load {r['load_s'] * 1e3:.1f} ms, "
                         f"{r['kv_bytes_loaded'] >> 20} MiB): -{r['ttft_reduction']:.1%}, {r['speedup']:.1f}x; "
                         f"max |dlogit| {r['max_abs_logit_diff']:.2g}, argmax equal {r['argmax_equal']}")
    elif model and model.get("skipped"):
        lines.append(f"model: skipped: {model['skipped']}")
    lines.append("")
    lines.append("targets:")
    for t in report["targets"]:
        lines.append(f"  [{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['value']:g} "
                     f"(threshold {t['threshold']:g}) {t['detail']}")
    for n in report["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The figures as Markdown tables (what docs/benchmarks.md shows)."""
    m = report["machine"]
    cfg = report["config"]
    out = [f"Machine: {m['cpu']} ({'KVM guest' if m['virtualized'] else 'bare metal'}), {m['cores']} cores, "
           f"{m['memory_gib']} GiB, L3 {m['l3_cache_bytes'] >> 20} MiB, Linux {m['kernel']}, Python "
           f"{m['versions']['python']}, numpy {m['versions']['numpy']}, torch {m['versions']['torch']}, "
           f"transformers {m['versions']['transformers']}, CRC-32 via {m['crc32_implementation']}, "
           f"{m['redis_server'].split(' sha=')[0]}"
           + (f", Mooncake Store {m['mooncake']} (`mooncake-transfer-engine-non-cuda`, tcp over loopback)"
              if any(x["system"] == "mooncake" for x in report["measurements"]) else "")
           + f". {cfg['rounds']} rounds of {cfg['duration_s']} s, medians; "
           f"run took {report.get('elapsed_s', 0):.0f} s.", ""]
    out.append("memcpy of " + f"{cfg['memcpy_buffer_bytes'] >> 20} MiB buffers: " + ", ".join(
        f"{n} process{'es' if n != '1' else ''} {v:.2f} GB/s" for n, v in report["memcpy"].items())
        + "; block-sized copies out of the same buffer into one reused destination (1 process): " + ", ".join(
        f"{_size(int(k))} {v:.2f} GB/s" for k, v in report["memcpy_blocks"].items()) + ".")
    out.append("")
    out.append("| block | system | op | p50 us | p99 us | GB/s | ops/s |")
    out.append("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    ops = {"put": 0, "get": 1, "get_into": 2, "get_batch": 3, "lookup": 4, "prefix": 5, "nop": 6}
    rows = sorted((x for x in report["measurements"] if x["clients"] == 1),
                  key=lambda x: (x["op"] == "nop", x["block_bytes"], ORDER[x["system"]], ops[x["op"]]))
    for x in rows:
        name = NAMES[x["system"]]
        size = "-" if x["op"] == "nop" else _size(x["block_bytes"])
        op = f"get_batch (x{BATCH})" if x["op"] == "get_batch" else x["op"]
        out.append(f"| {size} | {name} | {op} | {x['p50_us']:.1f} | {x['p99_us']:.1f} | "
                   f"{x['gbps']:.2f} | {x['ops_per_s']:.0f} |")
    out.append("")
    counts = cfg["clients"]
    out.append("| block | system | op | " + " | ".join(f"{n} client{'s' if n > 1 else ''} GB/s" for n in counts) + " |")
    out.append("| --- | --- | --- | " + " | ".join("---:" for _ in counts) + " |")
    for size in cfg["sizes"]:
        for system, op in (("cxl", "get"), ("bare", "get"), ("cxl", "get_batch"), ("cxl", "put"), ("redis", "get"),
                           ("redis", "put"), ("mooncake", "get"), ("mooncake", "put")):
            vals = [find(report, system, op, size, n) for n in counts]
            if any(vals):
                name = NAMES[system]
                out.append(f"| {_size(size)} | {name} | {op} | " + " | ".join(
                    f"{v['gbps']:.2f}" if v else "-" for v in vals) + " |")
    out.append("| - | memcpy | copy | " + " | ".join(f"{report['memcpy'].get(str(n), float('nan')):.2f}"
                                                    for n in counts) + " |")
    out.append("")
    out.append("Hit-lookup rate (`lookup_prefix([key])`, every lookup a hit), single client: " + ", ".join(
        f"{_size(s)} {find(report, 'cxl', 'lookup', s)['ops_per_s'] / 1000:.1f}k/s"
        for s in cfg["sizes"] if find(report, "cxl", "lookup", s)) + "; hit ratio "
        + f"{min((x['hit_ratio'] for x in report['measurements']), default=0):.2f} everywhere.")
    model = report.get("model") or {}
    if model.get("results"):
        mm = model["model"]
        out.append("")
        out.append(f"Model: Llama-style, {mm['num_hidden_layers']} layers, hidden {mm['hidden_size']}, "
                   f"{mm['num_attention_heads']} heads / {mm['num_key_value_heads']} KV heads, "
                   f"{mm['params'] / 1e6:.1f}M parameters (random), float32, {model['torch_threads']} torch threads; "
                   f"KV block {model['kv_block_bytes'] >> 10} KiB per 16 tokens.")
        out.append("")
        out.append("| prefix + suffix tokens | KV loaded | TTFT full | TTFT prefix from pool (load) | reduction | speed-up | max abs logit diff |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in model["results"]:
            out.append(f"| {r['prefix_tokens']} + {r['suffix_tokens']} | {r['kv_bytes_loaded'] >> 20} MiB | "
                       f"{r['ttft_full_s'] * 1e3:.0f} ms | {r['ttft_cached_s'] * 1e3:.0f} ms "
                       f"({r['load_s'] * 1e3:.0f} ms) | -{r['ttft_reduction']:.1%} | {r['speedup']:.1f}x | "
                       f"{r['max_abs_logit_diff']:.2g} |")
    out.append("")
    out.append("| target | value | threshold | met | figures |")
    out.append("| --- | ---: | ---: | --- | --- |")
    for t in report["targets"]:
        out.append(f"| {t['target']} | {t['value']:g} | {t['threshold']:g} | {'yes' if t['met'] else '**no**'} | "
                   f"{t['detail']} |")
    return "\n".join(out)


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = report["config"]["sizes"]
    labels = [_size(s) for s in sizes]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0][0]
    for system, op, style in (("cxl", "get", "o-"), ("cxl", "get_into", "s--"), ("cxl", "get_batch", "d-."),
                              ("tcp", "get", "^-"), ("redis", "get", "x-"), ("redis", "get_batch", "x-."),
                              ("mooncake", "get", "v-"), ("mooncake", "get_batch", "v-.")):
        ys = [(find(report, system, op, s) or {}).get("gbps", float("nan")) for s in sizes]
        if system in ("redis", "mooncake") and all(math.isnan(y) for y in ys):
            continue  # a baseline that did not run
        ax.plot(labels, ys, style, label=f"{'pool' if system == 'cxl' else system} {op}")
    if "1" in report["memcpy"]:
        ax.axhline(report["memcpy"]["1"], color="gray", ls=":", label="memcpy (1 proc, > cache)")
        ax.axhline(0.7 * report["memcpy"]["1"], color="red", ls=":", lw=0.8, label="0.7x memcpy target")
    ax.set_title("single-client get throughput")
    ax.set_ylabel("GB/s")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for system, op, style in (("cxl", "get", "o-"), ("tcp", "get", "^-"), ("redis", "get", "x-"),
                              ("mooncake", "get", "v-"), ("cxl", "put", "o:"), ("redis", "put", "x:"),
                              ("mooncake", "put", "v:")):
        ys = [(find(report, system, op, s) or {}).get("p50_us", float("nan")) for s in sizes]
        if system in ("redis", "mooncake") and all(math.isnan(y) for y in ys):
            continue
        ax.plot(labels, ys, style, label=f"{'pool' if system == 'cxl' else system} {op} p50")
    ax.set_yscale("log")
    ax.set_title("single-client latency (p50)")
    ax.set_ylabel("microseconds")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    counts = report["config"]["clients"]
    for i, s in enumerate(sizes):
        ys = [(find(report, "cxl", "get", s, n) or {}).get("gbps", float("nan")) for n in counts]
        ax.plot(counts, ys, "o-", color=f"C{i}", label=f"pool get {_size(s)}")
        for system, style in (("redis", "x:"), ("mooncake", "v-.")):
            ys = [(find(report, system, "get", s, n) or {}).get("gbps", float("nan")) for n in counts]
            if not all(math.isnan(y) for y in ys):
                ax.plot(counts, ys, style, color=f"C{i}", label=f"{system} get {_size(s)}")
        ys = [(find(report, "bare", "get", s, n) or {}).get("gbps", float("nan")) for n in counts]
        if not all(math.isnan(y) for y in ys):
            ax.plot(counts, ys, "+--", color=f"C{i}", lw=0.8, label=f"bare read {_size(s)}")
    ax.plot(counts, [report["memcpy"].get(str(n), float("nan")) for n in counts], "k--", label="memcpy")
    ax.set_xticks(counts)
    ax.set_xlabel("client processes")
    ax.set_ylabel("aggregate GB/s")
    ax.set_title("aggregate get throughput")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    model = report.get("model") or {}
    res = model.get("results") or []
    if res:
        xs = [str(r["prefix_tokens"]) for r in res]
        import numpy as np

        at = np.arange(len(xs))
        ax.bar(at - 0.2, [r["ttft_full_s"] * 1e3 for r in res], 0.4, label="compute everything")
        ax.bar(at + 0.2, [r["ttft_cached_s"] * 1e3 for r in res], 0.4, label="prefix KV from the pool")
        for i, r in enumerate(res):
            ax.text(at[i] + 0.2, r["ttft_cached_s"] * 1e3, f"-{r['ttft_reduction']:.0%}", ha="center", va="bottom",
                    fontsize=8)
        ax.set_xticks(at, xs)
        ax.set_xlabel("shared prefix (tokens)")
        ax.set_ylabel("TTFT (ms)")
        ax.set_yscale("log")
        ax.set_title("time to first token, random-weight Llama-style model")
        ax.legend(fontsize=8)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "model part not run", ha="center")
    m = report["machine"]
    fig.suptitle(f"beluga bench on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), "
                 f"medians of {report['config']['rounds']} rounds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/bench", help="directory for bench.json and bench.png (default out/bench)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"block sizes (default {DEFAULT_SIZES})")
    p.add_argument("--clients", default=DEFAULT_CLIENTS, help=f"client process counts (default {DEFAULT_CLIENTS})")
    p.add_argument("--rounds", type=int, default=5, help="repetitions of every measurement; medians are reported (default 5)")
    p.add_argument("--duration", type=float, default=0.3, help="seconds per measurement (default 0.3)")
    p.add_argument("--working-set", type=L.parse_size, default=0,
                   help="bytes of blocks per size (default: max(96M, 3 x L3), capped to what the pool holds): "
                        "larger than the caches; one that does not fit --pool-size is refused")
    p.add_argument("--memcpy-buffer", type=L.parse_size, default=0,
                   help="bytes per memcpy buffer (default: max(256M, 8 x L3), at most 1G): larger than the caches")
    p.add_argument("--pool-size", type=L.parse_size, default=1024 * MiB, help="pool file size (default 1G)")
    p.add_argument("--pool", help="pool file to (re)format and use (default: a new file in /dev/shm, removed after)")
    p.add_argument("--no-redis", dest="redis", action="store_false", help="skip the Redis baseline")
    p.add_argument("--no-mooncake", dest="mooncake", action="store_false",
                   help="skip the Mooncake Store baseline (needs the `bench` extra otherwise)")
    p.add_argument("--no-model", dest="model", action="store_false", help="skip the transformers TTFT part")
    p.add_argument("--model-prefixes", default=DEFAULT_PREFIXES, help=f"prefix lengths (default {DEFAULT_PREFIXES})")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 0.2 s, prefixes 256,1024")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables instead (for docs/benchmarks.md)")
    p.add_argument("--from-json", help="do not measure: re-print (and re-plot) the report in this bench.json")


def main_args(args) -> int:
    if args.quick:
        args.rounds, args.duration = 1, 0.2
        if args.model_prefixes == DEFAULT_PREFIXES:
            args.model_prefixes = "256,1024"
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["targets"] = evaluate(report)
    else:
        report = run(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    png = out_dir / "bench.png"
    if not plot(report, png):
        report["notes"].append("no PNG: matplotlib is not installed (pip install -e '.[test]')")
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    elif args.markdown:
        print(format_markdown(report))
    else:
        print(format_report(report))
        print(f"\nwrote {out_dir / 'bench.json'}" + (f" and {png}" if png.exists() else "")
              + f" in {report['elapsed_s']:.0f}s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="beluga bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
