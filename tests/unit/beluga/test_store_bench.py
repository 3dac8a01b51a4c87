"""`beluga bench` machinery: the Redis client, the statistics, and a tiny end-to-end run.

No timing is asserted here: the benchmark's targets are checked by `beluga bench`
itself. These tests only make sure it runs and reports what it claims to.
"""
from __future__ import annotations

import json
import shutil
from array import array

import pytest

from beluga.bench import run as bench
from beluga.bench.store import RespClient
from beluga.keys import name_key

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@needs_redis
def test_resp_client_against_a_real_redis(tmp_path):
    server = bench.RedisServer(tmp_path)
    try:
        c = RespClient("127.0.0.1", server.port)
        big = bytes(range(256)) * 1000  # larger than the client's receive buffer
        c.set(name_key("a"), big)
        c.set(name_key("b"), b"")
        out = memoryview(bytearray(len(big)))
        assert c.get_into(name_key("a"), out) == len(big) and out.tobytes() == big
        assert c.get_into(name_key("missing"), out) is None
        outs = [memoryview(bytearray(len(big))) for _ in range(3)]
        assert c.mget_into([name_key("a"), name_key("missing"), name_key("b")], outs) == [len(big), None, 0]
        assert outs[0].tobytes() == big
        assert c.exists(name_key("a")) and not c.exists(name_key("missing"))
        c.close()
    finally:
        server.stop()
    assert server.proc.poll() is not None  # stopped by the benchmark, not left behind


def _res(t0, t1, nbytes, lat_s):
    return {"t0": t0, "t1": t1, "bytes": nbytes, "ops": len(lat_s), "hits": len(lat_s),
            "lat": array("d", lat_s).tobytes()}


def test_summaries_aggregate_workers_and_take_medians_over_rounds():
    one = bench.summarize([_res(0.0, 1.0, 2_000_000_000, [1e-6] * 50 + [3e-6] * 49 + [1e-3]),
                           _res(0.5, 2.0, 2_000_000_000, [2e-6] * 100)])
    assert one["gbps"] == pytest.approx(2.0)  # 4 GB over the 2 s both workers span
    assert one["ops"] == 200 and one["p50_us"] == pytest.approx(2.0) and one["p99_us"] == pytest.approx(3.0)
    rounds = [dict(one, gbps=g) for g in (1.0, 5.0, 2.0)]
    assert bench.combine(rounds)["gbps"] == 2.0 and bench.combine(rounds)["hit_ratio"] == 1.0


def test_targets_are_ratios_from_the_same_run():
    def m(system, op, size, clients, **kw):
        return {"system": system, "op": op, "block_bytes": size, "clients": clients, **kw}

    report = {
        "config": {"sizes": [16384, 262144], "clients": [1, 2]},
        "memcpy": {"1": 10.0, "2": 15.0},
        "measurements": [
            m("cxl", "get", 262144, 1, gbps=8.0), m("cxl", "get", 262144, 2, gbps=12.0),
            m("cxl", "get", 16384, 1, gbps=1.0, p50_us=5.0), m("cxl", "get", 16384, 2, gbps=0.9),
            m("redis", "get", 16384, 1, p50_us=60.0),
            m("cxl", "nop", 16384, 1, p50_us=10.0), m("tcp", "nop", 16384, 1, p50_us=50.0),
        ],
    }
    got = {t["target"]: t for t in bench.evaluate(report)}
    assert got["get 256 KiB >= 0.7x memcpy"]["value"] == 0.8 and got["get 256 KiB >= 0.7x memcpy"]["met"]
    assert got["16 KiB get p50 >= 10x lower than Redis"]["value"] == 12.0
    assert got["pool RPC round trip faster than TCP"]["met"]
    assert got["aggregate get 256 KiB grows from 1 to 2 clients"]["met"]
    assert not got["aggregate get 16 KiB grows from 1 to 2 clients"]["met"]


def test_bench_runs_end_to_end_and_writes_json_and_png(tmp_path, capsys):
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([
        "--out", str(tmp_path), "--sizes", "64K", "--clients", "1,2", "--rounds", "1", "--duration", "0.05",
        "--working-set", "1M", "--memcpy-buffer", "8M", "--pool-size", "64M", "--no-model", "--quiet",
    ])
    assert bench.main_args(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    printed = capsys.readouterr().out
    assert "targets:" in printed and "pool RPC round trip faster than TCP" in printed
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"] is not None
    seen = {(m["system"], m["op"], m["block_bytes"], m["clients"]) for m in report["measurements"]}
    for size in (65536,):
        for op in ("put", "get", "get_into", "get_batch", "lookup"):
            assert ("cxl", op, size, 1) in seen and ("cxl", op, size, 2) in seen
        assert ("tcp", "get", size, 1) in seen
        if shutil.which("redis-server"):
            assert ("redis", "get", size, 2) in seen
    for m in report["measurements"]:
        assert m["hit_ratio"] == 1.0, m  # every block that was put is found, on every system
    assert set(report["memcpy"]) == {"1", "2"}
    names = [t["target"] for t in report["targets"]]
    assert "pool RPC round trip faster than TCP" in names and any("grows from 1 to 2" in n for n in names)
    png = tmp_path / "bench.png"
    if __import__("importlib").util.find_spec("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_exposes_bench():
    from beluga.cli import _parser

    args = _parser().parse_args(["bench", "--quick", "--no-redis"])
    assert args.command == "bench" and args.quick and not args.redis and args.sizes == "16K,256K,2.5M"


def test_target_ratios_are_taken_within_rounds_when_rounds_are_there():
    """The machine's speed drifts: a ratio per round, then the median, not a ratio of medians."""
    def m(system, op, size, clients, gbps_rounds):
        rounds = [{"gbps": g, "p50_us": 1.0, "p99_us": 1.0, "ops_per_s": 1.0} for g in gbps_rounds]
        return {"system": system, "op": op, "block_bytes": size, "clients": clients,
                "gbps": sorted(gbps_rounds)[len(gbps_rounds) // 2], "p50_us": 1.0, "rounds": rounds}

    report = {
        "config": {"sizes": [262144], "clients": [1]},
        "memcpy": {"1": 10.0}, "memcpy_rounds": {"1": [20.0, 10.0, 5.0]},
        "measurements": [m("cxl", "get", 262144, 1, [16.0, 8.0, 4.0])],  # 0.8x memcpy in every round
    }
    got = {t["target"]: t for t in bench.evaluate(report)}
    assert got["get 256 KiB >= 0.7x memcpy"]["value"] == 0.8 and got["get 256 KiB >= 0.7x memcpy"]["met"]
