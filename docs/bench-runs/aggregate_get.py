"""Is the 2-client aggregate of 2.5 MiB gets bounded by the machine or by the store? (issue 14, item 4)

PYTHONPATH=. .venv/bin/python docs/bench-runs/aggregate_get.py [rounds] [duration_s]

Per round, in an order that rotates from round to round, each of these runs for duration_s with 1 and
then with 2 processes started together (aggregate GB/s = bytes of all processes / the span from the
first start to the last end):

  copy      the store's own copy + CRC-32 (beluga.readpath.copy_crc, the loop a get runs) of 2.5 MiB
            blocks from a private 96 MiB buffer (DRAM-resident, random block order) into one reused
            2.5 MiB destination: a get's access pattern without the store;
  memcpy    the same with numpy.copyto (no CRC);
  get       BelugaClient.get of 39 blocks of 2.5 MiB (96 MiB) from a pool served by `beluga serve`,
            each process in its own random order (what `beluga bench` measures);
  get-idle  the same with the service stopped (SIGSTOP) for the whole measurement: gets ask it
            nothing, so this shows what the service's polling process costs the readers.

Prints per mode the median over rounds of the per-round ratio 2 processes / 1, and the medians of the
GB/s, twice: from the span, and from each process's 25th-percentile time per block (less sensitive to
the processes being descheduled on a shared machine), and how many CPUs the measuring processes
actually got (their CPU time over the wall time); with --json writes every figure. A 1 GiB pool in /dev/shm is created and removed.
"""
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 2621440
SET_BYTES = 96 << 20
N_BLOCKS = SET_BYTES // BLOCK
MODES = ("copy", "memcpy", "get", "get-idle")


def worker(mode: str, pool: str, wid: int, duration_s: float) -> None:
    import numpy as np

    order = list(range(N_BLOCKS))
    random.Random(1000 + wid).shuffle(order)
    if mode in ("copy", "memcpy"):
        from beluga import readpath

        src = np.ones(SET_BYTES, dtype=np.uint8)
        dst = np.zeros(BLOCK, dtype=np.uint8)
        if mode == "copy":
            def op(i):
                readpath.copy_crc(dst, src[i * BLOCK : (i + 1) * BLOCK])
        else:
            def op(i):
                np.copyto(dst, src[i * BLOCK : (i + 1) * BLOCK])
    else:
        from beluga.client import BelugaClient
        from beluga.keys import name_key

        c = BelugaClient(pool, rpc_timeout_s=30)
        a = np.frombuffer(c.buf, dtype=np.uint8)
        int(a[::4096].sum())  # fault the mapping in once, as a long-running reader has
        del a
        keys = [name_key(f"agg-{i}") for i in range(N_BLOCKS)]

        def op(i):
            assert c.get(keys[i]) is not None
    op(order[0])
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())  # the parent says when, once all are ready
    while time.time() < start_at:
        time.sleep(0.0005)
    n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    end = t0 + duration_s
    lat, a = [], t0
    while True:
        op(order[n % N_BLOCKS])
        n += 1
        t1 = time.perf_counter()
        lat.append(t1 - a)
        a = t1
        if t1 >= end:
            break
    lat.sort()
    # perf_counter is CLOCK_MONOTONIC: comparable across processes on one machine
    print(json.dumps({"bytes": n * BLOCK, "t0": t0, "t1": t1, "p25": lat[len(lat) // 4],
                      "cpu_share": (time.process_time() - cpu0) / (t1 - t0)}), flush=True)


def run(mode: str, procs: int, pool: str, duration_s: float, service) -> float:
    ws = [subprocess.Popen([sys.executable, __file__, "--worker", mode, pool, str(w), str(duration_s)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for w in range(procs)]
    for w in ws:
        assert w.stdout.readline().strip() == "ready"
    if mode == "get-idle":  # the workers have registered; now the service stops polling
        os.kill(service.pid, signal.SIGSTOP)
    try:
        start_at = time.time() + 0.05
        for w in ws:
            w.stdin.write(f"{start_at}\n")
            w.stdin.flush()
        outs = [json.loads(w.communicate(timeout=120)[0]) for w in ws]
    finally:
        if mode == "get-idle":
            os.kill(service.pid, signal.SIGCONT)
    span = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
    # Also what the processes read while they ran (BLOCK per op at each one's 25th-percentile op
    # time): on a shared machine a process is often descheduled mid-op, which the span counts and
    # this mostly does not.
    return (sum(o["bytes"] for o in outs) / span / 1e9, sum(BLOCK / o["p25"] for o in outs) / 1e9,
            sum(o["cpu_share"] for o in outs))


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    duration_s = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
    from beluga.client import BelugaClient
    from beluga.keys import name_key
    from beluga.pool import format_pool

    tmp = Path(tempfile.mkdtemp(prefix="beluga-agg-"))
    pool = f"/dev/shm/beluga-agg-{os.getpid()}.pool"
    format_pool(pool, size_bytes=1 << 30, segment_size_bytes=4 << 20)
    ready = tmp / "ready"
    service = subprocess.Popen([sys.executable, "-m", "beluga.cli", "serve", pool, "--transport", "both",
                                "--takeover-wait", "0", "--ready-file", str(ready)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    figures = {m: {1: [], 2: []} for m in MODES}
    at_p25 = {m: {1: [], 2: []} for m in MODES}
    cpus = {m: {1: [], 2: []} for m in MODES}
    try:
        while not ready.exists():
            time.sleep(0.02)
        with BelugaClient(pool) as c:
            data = os.urandom(BLOCK)
            for i in range(N_BLOCKS):
                c.put(name_key(f"agg-{i}"), data)
        for r in range(rounds):
            modes = MODES[r % len(MODES):] + MODES[: r % len(MODES)]
            for mode in modes:
                for procs in (1, 2):
                    span_gbps, p25_gbps, cpu = run(mode, procs, pool, duration_s, service)
                    figures[mode][procs].append(span_gbps)
                    at_p25[mode][procs].append(p25_gbps)
                    cpus[mode][procs].append(cpu)
    finally:
        service.terminate()
        service.wait(10)
        os.unlink(pool)
    out = {"rounds": rounds, "duration_s": duration_s, "loadavg_end": os.getloadavg(), "gbps": figures,
           "gbps_at_p25_op_time": at_p25, "cpus_used": cpus}
    for name, table in (("aggregate", figures), ("at p25 op time", at_p25)):
        for mode in MODES:
            one, two = table[mode][1], table[mode][2]
            ratios = [b / a for a, b in zip(one, two)]
            out.setdefault(f"ratio_2_over_1 {name}", {})[mode] = statistics.median(ratios)
            print(f"{name:15s} {mode:9s} 1 process {statistics.median(one):6.2f} GB/s  2 processes "
                  f"{statistics.median(two):6.2f} GB/s  2/1 per round: median {statistics.median(ratios):.2f} "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    for mode in MODES:
        print(f"CPUs the measuring processes got  {mode:9s} 1 process {statistics.median(cpus[mode][1]):.2f}  "
              f"2 processes {statistics.median(cpus[mode][2]):.2f} (sum of CPU time / wall time)")
    if "--json" in sys.argv:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
