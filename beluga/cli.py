"""`beluga` command line: format, serve, stat, put, get, delete, bench.

Made to be driven by scenario steps over SSH: `serve` runs in the foreground
and prints one JSON "ready" line; `--json` prints machine-readable results;
exit status 0 = ok, 1 = miss or verification failure, 2 = error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading

from . import layout as L
from .errors import BelugaError

EXIT_OK = 0
EXIT_MISS = 1
EXIT_ERROR = 2


def _size(text: str) -> int:
    try:
        return L.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beluga", description="Beluga KV-cache store on a shared (CXL) memory pool")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("format", help="initialize a pool (file or /dev/daxX.Y)")
    f.add_argument("pool")
    f.add_argument("--size", type=_size, help="create/resize a pool file to this size (e.g. 256M); not for devdax")
    f.add_argument("--segment-size", type=_size, default=2 * L.MiB, help="bytes per segment (power of two, default 2M)")
    f.add_argument("--max-clients", type=int, default=32, help="client slots in the per-host area (default 32)")
    f.add_argument("--rpc-buffer", type=_size, default=64 * L.KiB, help="request/response buffer per slot (default 64K)")
    f.add_argument("--slot-granularity", type=_size, default=4 * L.KiB, help="block slot size unit (default 4K)")
    f.add_argument("--force", action="store_true", help="reformat an existing pool (destroys its contents)")
    f.add_argument("--json", action="store_true")

    s = sub.add_parser("serve", help="run the metadata service in the foreground")
    s.add_argument("pool")
    s.add_argument("--transport", choices=["cxl", "tcp", "both"], default="both")
    s.add_argument("--host", default="127.0.0.1", help="TCP listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=0, help="TCP port (default: any free one, written into the pool)")
    s.add_argument("--advertise", help="host:port that TCP clients should use (default: the bound address)")
    s.add_argument("--heartbeat-timeout", type=float, default=3.0, help="seconds without a client heartbeat before it is reaped")
    s.add_argument("--lease-ttl", type=float, default=10.0, help="seconds a reader's lease lasts at most")
    s.add_argument("--reservation-ttl", type=float, default=30.0, help="seconds an uncommitted allocation lasts")
    s.add_argument("--takeover-wait", type=float, default=1.0, help="seconds to watch a previous service's heartbeat")
    s.add_argument("--force", action="store_true", help="take over even if another service looks alive")
    s.add_argument("--ready-file", help="also write the ready line to this file")
    s.add_argument("--tcp-max-connections", type=int, default=64,
                   help="open TCP connections at most (default 64; lowered to fit the file limit)")
    s.add_argument("--tcp-max-clients", type=int, default=None,
                   help="client slots TCP clients may hold (default: all but a quarter, kept for pool clients)")
    s.add_argument("--tcp-hello-timeout", type=float, default=5.0,
                   help="seconds a TCP connection may stay without a valid request (default 5)")
    s.add_argument("--tcp-idle-timeout", type=float, default=60.0,
                   help="seconds a TCP connection may stay without a complete frame (default 60)")
    s.add_argument("--tcp-output-limit", type=_size, default=1 << 20,
                   help="unread answers a TCP client may leave waiting before it is cut off (default 1M)")

    st = sub.add_parser("stat", help="report pool metadata (and live service stats with --service)")
    st.add_argument("pool")
    st.add_argument("--service", action="store_true", help="also ask the running service for its stats")
    _client_args(st)
    st.add_argument("--json", action="store_true")

    for name, helptext in (("put", "store a block (debugging)"), ("get", "fetch and verify a block (debugging)"),
                           ("delete", "delete a block (debugging)")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("pool")
        k = c.add_mutually_exclusive_group(required=True)
        k.add_argument("--key", help="64 hex digits")
        k.add_argument("--name", help="derive the key from this name")
        _client_args(c)
        c.add_argument("--json", action="store_true")
        if name == "put":
            d = c.add_mutually_exclusive_group(required=True)
            d.add_argument("--data", help="the block's bytes as UTF-8 text")
            d.add_argument("--file", help="read the block from this file")
            d.add_argument("--random-bytes", type=_size, help="this many deterministic pseudo-random bytes")
            c.add_argument("--seed", default="0", help="seed for --random-bytes")
        if name == "get":
            c.add_argument("--out", help="write the block to this file ('-' for stdout)")
            e = c.add_mutually_exclusive_group()
            e.add_argument("--expect-data", help="exit 1 unless the block equals this UTF-8 text")
            e.add_argument("--expect-file", help="exit 1 unless the block equals this file")
            e.add_argument("--expect-random-bytes", type=_size, help="exit 1 unless it equals put --random-bytes N")
            c.add_argument("--seed", default="0", help="seed for --expect-random-bytes")
    b = sub.add_parser("bench", help="benchmark the store against memcpy, Redis and TCP (not a test; minutes)",
                       description="Pool RPC vs TCP vs Redis vs memcpy, 1/2/4 clients, 16K/256K/2.5M blocks, "
                                   "and a transformers model's prefix KV through the pool; writes JSON and a PNG.")
    try:
        # The bench lives in the repository's benchmarks/ package; the guests get the
        # store alone, and there `beluga bench` says so (main) instead of failing to start.
        from benchmarks.store.run import add_arguments
    except ImportError:
        pass
    else:
        add_arguments(b)
    return p


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=["cxl", "tcp"], default="cxl")
    p.add_argument("--address", help="host:port of the TCP service (default: read from the pool)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the service")


def random_bytes(n: int, seed: str) -> bytes:
    """Deterministic bytes from a seed: the same on every host, for cross-host put/get checks."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def _key(args) -> bytes:
    from .keys import name_key, parse_key

    return parse_key(args.key) if args.key else name_key(args.name)


def _client(args):
    from .client import BelugaClient

    return BelugaClient(args.pool, transport=args.transport, address=args.address, rpc_timeout_s=args.timeout,
                        heartbeat_interval_s=None)


def _emit(args, obj: dict, text: str) -> None:
    print(json.dumps(obj, sort_keys=True) if getattr(args, "json", False) else text, flush=True)


def cmd_format(args) -> int:
    from .pool import format_pool

    res = format_pool(args.pool, size_bytes=args.size, force=args.force, segment_size_bytes=args.segment_size,
                      max_clients=args.max_clients, rpc_buffer_bytes=args.rpc_buffer,
                      slot_granularity_bytes=args.slot_granularity)
    g = res.geometry
    _emit(args, {"pool": res.path, "devdax": res.is_devdax, "layout_version": L.LAYOUT_VERSION,
                 "pool_size_bytes": g.pool_size_bytes, "segment_size_bytes": g.segment_size_bytes,
                 "segment_count": g.segment_count, "max_clients": g.max_clients,
                 "max_block_bytes": g.max_block_bytes, "segments_offset": g.segments_offset},
          f"formatted {res.path}: {g.segment_count} segments of {g.segment_size_bytes} bytes, "
          f"{g.max_clients} client slots, blocks up to {g.max_block_bytes} bytes")
    return EXIT_OK


def cmd_serve(args) -> int:
    from . import coherence
    from .pool import Pool
    from .service import MetadataService, ServiceConfig

    cfg = ServiceConfig(
        heartbeat_timeout_s=args.heartbeat_timeout, lease_ttl_s=args.lease_ttl,
        reservation_ttl_s=args.reservation_ttl, serve_cxl=args.transport in ("cxl", "both"),
        tcp_host=args.host if args.transport in ("tcp", "both") else None, tcp_port=args.port,
        advertise=args.advertise, takeover_wait_s=args.takeover_wait, force=args.force,
        tcp_max_connections=args.tcp_max_connections, tcp_max_clients=args.tcp_max_clients,
        tcp_hello_timeout_s=args.tcp_hello_timeout, tcp_idle_timeout_s=args.tcp_idle_timeout,
        tcp_output_limit_bytes=args.tcp_output_limit,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    pool = Pool.open(args.pool)
    service = MetadataService(pool, cfg)

    def ready(svc) -> None:
        line = json.dumps({"event": "ready", "pid": os.getpid(), "pool": args.pool, "transport": args.transport,
                           "tcp_address": svc.tcp_address, "recovery": svc.recovery,
                           "coherence": dict(coherence.status(), flush_policy=pool.flush_policy,
                                             flush_status=pool.flush_status())}, sort_keys=True)
        print(line, flush=True)
        if args.ready_file:
            tmp = args.ready_file + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(line + "\n")
            os.replace(tmp, args.ready_file)  # readers never see a half-written file

    try:
        service.serve(stop, on_ready=ready)
    finally:
        service.release_pool()
        pool.close()
    return EXIT_OK


def cmd_stat(args) -> int:
    from . import coherence
    from .report import pool_report
    from .pool import Pool

    with Pool.open(args.pool) as pool:
        report = pool_report(pool)
        # this host's cache flushes, and whether the store uses them on this pool (docs/coherence.md)
        report["coherence"] = dict(coherence.status(), flush_policy=pool.flush_policy,
                                   flush_status=pool.flush_status())
    if args.service:
        c = _client(args)
        try:
            report["service_stats"] = c.service_stats()
        finally:
            c.close()
    if args.json:
        print(json.dumps(report, sort_keys=True), flush=True)
        return EXIT_OK
    g = report["geometry"]
    svc = report["service"]
    print(f"pool {report['pool']} (layout v{report['layout_version']}, {'devdax' if report['devdax'] else 'file'})")
    print(f"  {g['segment_count']} segments x {g['segment_size_bytes']} bytes, {g['max_clients']} client slots, "
          f"blocks up to {g['max_block_bytes']} bytes")
    print("  segments: " + ", ".join(f"{k} {v}" for k, v in report["segments"].items()))
    print(f"  blocks: {report['blocks']} committed ({report['committed_bytes']} bytes), {report['reserved']} reserved")
    print(f"  service: {'running' if svc['running'] else 'not running'}"
          + (f" pid {svc['pid']} on {svc['host']} tcp {svc['tcp_address'] or '-'}" if svc["running"] else ""))
    print(f"  clients: {len(report['clients'])}")
    print(f"  {coherence.status_line()}")
    print(f"  {report['coherence']['flush_status']}")
    for problem in report["invalid_records"]:
        print(f"  invalid record (the service refuses to start on it): {problem}")
    if "service_stats" in report:
        print("  service stats: " + json.dumps(report["service_stats"]["counters"], sort_keys=True))
    return EXIT_OK


def cmd_put(args) -> int:
    from .checksum import CRC32, checksum

    if args.data is not None:
        data = args.data.encode()
    elif args.file:
        with open(args.file, "rb") as fh:
            data = fh.read()
    else:
        data = random_bytes(args.random_bytes, args.seed)
    key = _key(args)
    c = _client(args)
    try:
        c.put(key, data)
    finally:
        c.close()
    _emit(args, {"key": key.hex(), "length_bytes": len(data), "crc32": f"{checksum(CRC32, data):08x}"},
          f"put {key.hex()} ({len(data)} bytes)")
    return EXIT_OK


def cmd_get(args) -> int:
    from .checksum import CRC32, checksum

    key = _key(args)
    c = _client(args)
    try:
        data = c.get(key)
        corrupt = c.client_stats().corrupt_misses
    finally:
        c.close()
    if data is None:
        _emit(args, {"key": key.hex(), "hit": False, "corrupt": bool(corrupt)},
              f"miss {key.hex()}" + (" (stored block failed verification)" if corrupt else ""))
        return EXIT_MISS
    expect = None
    if args.expect_data is not None:
        expect = args.expect_data.encode()
    elif args.expect_file:
        with open(args.expect_file, "rb") as fh:
            expect = fh.read()
    elif args.expect_random_bytes is not None:
        expect = random_bytes(args.expect_random_bytes, args.seed)
    if args.out == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    elif args.out:
        with open(args.out, "wb") as fh:
            fh.write(data)
    matches = None if expect is None else data == expect
    if args.out != "-":
        _emit(args, {"key": key.hex(), "hit": True, "length_bytes": len(data),
                     "crc32": f"{checksum(CRC32, data):08x}", "matches": matches},
              f"hit {key.hex()} ({len(data)} bytes)" + ("" if matches is None else
                                                       " matches" if matches else " DOES NOT MATCH the expected bytes"))
    return EXIT_MISS if matches is False else EXIT_OK


def cmd_delete(args) -> int:
    key = _key(args)
    c = _client(args)
    try:
        existed = c.delete(key)
    finally:
        c.close()
    _emit(args, {"key": key.hex(), "deleted": existed}, f"{'deleted' if existed else 'not found'} {key.hex()}")
    return EXIT_OK if existed else EXIT_MISS


def _bench_missing() -> str | None:
    try:
        import benchmarks.store.run  # noqa: F401
    except ImportError as e:
        return (f"beluga bench: the benchmarks package is not installed here ({e}); it comes with the "
                "beluga-testbed repository (`make setup` installs it), not with the store alone")
    return None


def cmd_bench(args) -> int:
    from benchmarks.store.run import main_args

    return main_args(args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and (missing := _bench_missing()):
        print(missing, file=sys.stderr)
        return EXIT_ERROR
    args = _parser().parse_args(argv)
    handler = {"format": cmd_format, "serve": cmd_serve, "stat": cmd_stat, "put": cmd_put, "get": cmd_get,
               "delete": cmd_delete, "bench": cmd_bench}[args.command]
    try:
        return handler(args)
    except (BelugaError, OSError, ValueError) as exc:
        print(f"beluga {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
