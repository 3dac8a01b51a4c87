#!/usr/bin/env python3
"""Boot benchmark (not a test): time to SSH-ready for one host, and `up` to ready for a topology.

    .venv/bin/python benchmarks/boot.py [--runs 3] [--topology 4hosts-1switch] [--json out.json]

Each run is a real `up` (fresh overlays and pool files) followed by `down`. Reports the
median and the spread, with the machine they ran on; the README quotes the medians.
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

from testbed import lifecycle, ssh  # noqa: E402


def one_host_ssh_ready() -> dict:
    """QEMU start to the first successful SSH command on one host (no pool provisioning)."""
    start = time.monotonic()
    tb = lifecycle.up("1host-1switch", name="bench-boot", provision=False, accel="tcg")
    total = time.monotonic() - start
    h = tb.hosts[0]
    marks = ssh.run(h.name, h.ssh_port, tb.key, "cat /run/beluga/boot-times").stdout.split()
    lifecycle.down("bench-boot")
    guest = dict(zip(marks[1::2], map(float, marks[0::2])))
    return {"ssh_ready_s": round(total, 2), "guest_uptime_at": guest}


def topology_up(topology: str) -> dict:
    start = time.monotonic()
    lifecycle.up(topology, name="bench-up", accel="tcg")
    total = time.monotonic() - start
    lifecycle.down("bench-up")
    return {"up_to_ready_s": round(total, 2)}


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": values}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--topology", default="4hosts-1switch")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    state = tempfile.mkdtemp(prefix="bt-bench-", dir="/tmp")
    os.environ.setdefault("BELUGA_TESTBED_STATE", state)
    try:
        single = [one_host_ssh_ready() for _ in range(args.runs)]
        ups = [topology_up(args.topology) for _ in range(args.runs)]
    finally:
        shutil.rmtree(state, ignore_errors=True)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "one_host_ssh_ready_s": summary([r["ssh_ready_s"] for r in single]),
        "one_host_guest_marks": single[-1]["guest_uptime_at"],
        f"{args.topology}_up_to_ready_s": summary([r["up_to_ready_s"] for r in ups]),
        "targets": {"one_host_ssh_ready_s": 8.0, f"{args.topology}_up_to_ready_s": 25.0},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for key, target in result["targets"].items():
        med = result[key]["median"]
        print(f"{'✓' if med <= target else '✗'} {key}: median {med} s (target <= {target} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
