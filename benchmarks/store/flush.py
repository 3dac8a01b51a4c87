"""What the cache-line flushes cost on this host: a block copied into the pool, with and without them.

    python -m benchmarks.store.flush [--sizes 16K,256K,2560K] [--rounds 15] [--json]

For each size, in rounds that interleave the variants (so that a busy machine
slows them alike), the median time of:

* ``copy``: the block copied into the pool (what a put does without flushes);
* ``copy+writeback``: the copy, then ``coherence.writeback`` over it and ``fence``
  (the publishing side);
* ``invalidate+copy out``: ``coherence.invalidate`` over the block, then the copy
  out of the pool (the consuming side), beside ``copy out`` alone;
* ``sanitized copy+writeback``: the same under the coherence sanitizer (the model's
  cost, not a hardware one), with ``--sanitizer``.

The pool is a formatted file under /dev/shm (removed afterwards). Prints a
Markdown table (or JSON with ``--json``); ratios are against ``copy`` (``copy out``
for the consuming side) of the same size, measured in the same rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from beluga import coherence
from beluga import layout as L
from beluga.pool import Pool, format_pool

DEFAULT_SIZES = (16 * L.KiB, 256 * L.KiB, 2560 * L.KiB)


def parse_size(text: str) -> int:
    t = text.strip().upper()
    mult = {"K": L.KiB, "M": L.MiB}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def _time(fn, repeat: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(repeat):
        fn()
    return (time.perf_counter_ns() - t0) / repeat / 1e3  # µs per call


def measure(sizes, rounds: int, sanitizer: bool) -> dict:
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(shm, f"beluga-flush-bench-{os.getpid()}.pool")
    biggest = max(sizes)
    seg = max(L.MiB * 4, 1 << (biggest - 1).bit_length())
    format_pool(path, size_bytes=seg * 4 + 8 * L.MiB, segment_size_bytes=seg, max_clients=2)
    plain = Pool.open(path, coherence="off")
    checked = Pool.open(path, coherence="check-collect", coherence_report="") if sanitizer else None
    try:
        off = plain.geometry.segments_offset
        results = {}
        for size in sizes:
            src = os.urandom(size)
            out = bytearray(size)
            repeat = max(3, int(2 * L.MiB // size))

            def copy(buf=plain.buf):
                buf[off: off + size] = src

            def copy_wb(buf=plain.buf):
                buf[off: off + size] = src
                coherence.writeback(buf, off, size)
                coherence.fence()

            def copy_out(buf=plain.buf):
                out[:] = buf[off: off + size]

            def inv_copy_out(buf=plain.buf):
                coherence.invalidate(buf, off, size)
                out[:] = buf[off: off + size]

            variants = {"copy": copy, "copy+writeback": copy_wb, "copy out": copy_out,
                        "invalidate+copy out": inv_copy_out}
            if checked is not None:
                other = bytes(b ^ 0xFF for b in src[:64]) * (size // 64) + src[size - size % 64:]
                turn = [src, other]  # new bytes in every line each time, else the model writes nothing back

                def sanitized(buf=checked.buf):
                    turn.reverse()
                    buf[off: off + size] = turn[0]
                    coherence.writeback(buf, off, size)
                    coherence.fence()
                variants["sanitized copy+writeback"] = sanitized
            samples: dict[str, list[float]] = {k: [] for k in variants}
            names = list(variants)
            for r in range(rounds):
                for k in names[r % len(names):] + names[: r % len(names)]:
                    samples[k].append(_time(variants[k], repeat))
            med = {k: statistics.median(v) for k, v in samples.items()}
            spread = {k: (min(v), max(v)) for k, v in samples.items()}
            base = {"copy": "copy", "copy+writeback": "copy", "sanitized copy+writeback": "copy",
                    "copy out": "copy out", "invalidate+copy out": "copy out"}
            results[size] = {k: {"median_us": round(med[k], 2), "min_us": round(spread[k][0], 2),
                                 "max_us": round(spread[k][1], 2), "ratio": round(med[k] / med[base[k]], 2)}
                             for k in variants}
        return {"flush": coherence.status(), "rounds": rounds, "cpu": _cpu(), "sizes": results}
    finally:
        if checked is not None:
            checked.close()
        plain.close()
        for p in (path, path + ".coherence"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def markdown(res: dict) -> str:
    f = res["flush"]
    how = (f"writeback {f['writeback']}, invalidate {f['invalidate']}, fence {f['fence']}" if f["can_flush"]
           else f"no flushes ({f['why']})")
    lines = [f"{res['cpu']}; {how}; median of {res['rounds']} interleaved rounds (min-max)", "",
             "| block | variant | µs per block | vs the copy alone |", "|---|---|---|---|"]
    for size, variants in res["sizes"].items():
        for k, v in variants.items():
            lines.append(f"| {int(size) // L.KiB} KiB | {k} | {v['median_us']:.1f} ({v['min_us']:.1f}-{v['max_us']:.1f})"
                         f" | {v['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.store.flush", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(f"{s // L.KiB}K" for s in DEFAULT_SIZES),
                    help="block sizes, comma-separated (K, M suffixes)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sanitizer", action="store_true", help="also time the coherence sanitizer's writeback")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    res = measure(sizes, max(1, args.rounds), args.sanitizer)
    print(json.dumps(res, sort_keys=True) if args.json else markdown(res), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
