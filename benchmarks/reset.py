#!/usr/bin/env python3
"""Reset benchmark (not a test): how long `Testbed.reset()` takes to bring a testbed back
to its state right after `up`, after each run left a mess on every host.

    .venv/bin/python benchmarks/reset.py [--runs 5] [--topology 4hosts-1switch] [--json out.json]

One `up` (which starts each guest's resident reset helper and forwards a port to it:
testbed/reset.py), then a first reset after a mess, timed alone. Then per round: every
host gets processes started after boot (a `sleep` and a Python process that keeps the
pool's devdax device mapped), a file in /tmp, the CXL trace events on; the pool gets
1 MiB of bytes from this machine and two poisoned lines in each guest's copy of its
devices. Then, timed:

* `reset` as the pytest fixture runs it (`tb.reset()` of an API object that keeps its
  SSH connections open between calls), and
* `reset_cold` as `beluga-testbed reset NAME` runs it (a new process's view: the state
  read again, no connection kept), after a second mess;

and, interleaved in the same round, the floor: one `true` on every host at once over the
kept SSH connections (the cheapest way to run anything on every guest; the reset itself
talks to the guests' helpers through their forwarded ports, or over SSH where that
fails: how each guest was reached is printed). Each reset is checked complete (nothing
in `not_undone`, the pool reads zeros). Reports medians and spreads, the ratio to the
floor, and the machine's load: the machine is shared, so the load average is printed
with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed import reset as reset_mod  # noqa: E402
from testbed.api import Testbed  # noqa: E402

TARGET_S = 3.0  # 4hosts-1switch, tb.reset()
HOLD_POOL = ("import mmap, os, sys, time\n"
             "m = mmap.mmap(os.open(sys.argv[1], os.O_RDWR), 2 << 20)\n"
             "m[0:4] = b'busy'\n"
             "time.sleep(3600)\n")


def mess(tb: Testbed) -> None:
    """What a test or a scenario leaves behind (not timed)."""
    for h in tb.hosts:
        tb.exec(h.name, ["sh", "-c", "setsid sleep 3600 > /dev/null 2>&1 < /dev/null & "
                                     f"setsid python3 -c {_q(HOLD_POOL)} {h.dax} > /dev/null 2>&1 < /dev/null & "
                                     "echo 1 > /sys/kernel/tracing/events/cxl/enable; echo x > /tmp/left"],
                check=True)
    tb.pool.write(1 << 20, os.urandom(1 << 20))
    tb.poison(64 << 10, 64)
    tb.poison(tb.pool.stripe_bytes * 7 + 128, 64)


def _q(s: str) -> str:
    import shlex
    return shlex.quote(s)


def check_clean(tb: Testbed, report) -> None:
    if report.not_undone:
        raise SystemExit("reset left things undone: " + "; ".join(report.not_undone))
    if tb.pool.read(1 << 20, 1 << 20) != bytes(1 << 20):
        raise SystemExit("the pool is not zero after reset")
    killed = [len(h.killed) for h in report.hosts]
    if min(killed) < 2:
        raise SystemExit(f"reset killed too few processes: {killed}")


def via(report) -> str:
    """How the guest halves ran, e.g. "tcp x4" or "tcp x3, ssh-once x1"."""
    kinds = [h.via for h in report.hosts]
    return ", ".join(f"{k} x{kinds.count(k)}" for k in sorted(set(kinds)))


def floor(tb: Testbed) -> float:
    start = time.monotonic()
    tb.exec(None, ["true"], check=True)
    return time.monotonic() - start


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--topology", default="4hosts-1switch")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--name", default="bench-reset", help="the testbed's name (default: bench-reset)")
    args = ap.parse_args()
    own_state = "BELUGA_TESTBED_STATE" not in os.environ
    state = tempfile.mkdtemp(prefix="bt-bench-", dir="/tmp") if own_state else None
    if state:
        os.environ["BELUGA_TESTBED_STATE"] = state
    warm, cold, floors, loads, vias = [], [], [], [], []
    try:
        t0 = time.monotonic()
        with Testbed.up(args.topology, name=args.name) as tb:
            up_s = time.monotonic() - t0
            tb.exec(None, ["true"], check=True)  # open the kept connections
            first_load = os.getloadavg()[0]
            mess(tb)
            start = time.monotonic()
            report = tb.reset()
            first = time.monotonic() - start
            check_clean(tb, report)
            first_via = via(report)
            print(f"• first reset {first:.2f} s ({first_via}), load {first_load:.1f}", file=sys.stderr, flush=True)
            for i in range(args.runs):
                print(f"• round {i + 1}/{args.runs}", file=sys.stderr, flush=True)
                loads.append(os.getloadavg()[0])
                floors.append(floor(tb))
                mess(tb)
                start = time.monotonic()
                report = tb.reset()
                warm.append(time.monotonic() - start)
                check_clean(tb, report)
                vias.append(via(report))
                mess(tb)
                start = time.monotonic()
                report = reset_mod.reset(tb._state)  # a new process's view, as the CLI
                cold.append(time.monotonic() - start)
                check_clean(tb, report)
                vias[-1] += " / " + via(report)
                print(f"  reset {warm[-1]:.2f} s, cold {cold[-1]:.2f} s, floor {floors[-1]:.2f} s, "
                      f"load {loads[-1]:.1f} ({vias[-1]})", file=sys.stderr, flush=True)
    finally:
        if state:
            shutil.rmtree(state, ignore_errors=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_1min_per_round": [round(x, 1) for x in loads], "loadavg_at_end": os.getloadavg()},
        "topology": args.topology,
        "up_s": round(up_s, 1),
        "first_reset_s": round(first, 2),
        "first_reset_loadavg_1min": round(first_load, 1),
        "first_reset_via": first_via,
        "via_per_round": vias,
        "reset_s": summary(warm),
        "reset_cold_s": summary(cold),
        "floor_exec_true_all_hosts_s": summary(floors),
        "reset_x_floor": summary([w / f for w, f in zip(warm, floors)]),
        "reset_cold_x_floor": summary([c / f for c, f in zip(cold, floors)]),
        "target": {"reset_s_median": TARGET_S},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    med = result["reset_s"]["median"]
    print(f"{'✓' if med <= TARGET_S else '✗'} reset of {args.topology}: median {med} s (target <= {TARGET_S} s), "
          f"load average {statistics.median(loads):.1f} on {os.cpu_count()} CPUs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
