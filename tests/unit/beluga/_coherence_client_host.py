"""One client "host" of the coherence removal proof: a process with its own (sanitized) pool and a
BelugaClient over CXL-RPC, driven by one JSON command a line on stdin (one JSON answer a line).

Blocks are named by index: block i holds `block_bytes(i, version)` (lengths not a multiple of 64,
so every block ends in a partly written line). Answers: {"ok": result} or {"error": "..."}.
"""
import hashlib
import json
import sys
import time

from beluga import coherence
from beluga.client import BelugaClient
from beluga.report import pool_report


def key(i: int) -> bytes:
    return hashlib.sha256(b"coherence-proof-%d" % i).digest()


def block_bytes(i: int, version: int = 0) -> bytes:
    seed = hashlib.sha256(b"data-%d-%d" % (i, version)).digest()
    return (seed * (5000 // len(seed) + 1))[: 5000 + 8 * i]


def serve() -> None:
    client = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "open":
                client = BelugaClient(cmd["path"], transport="cxl", rpc_timeout_s=cmd.get("timeout_s", 5.0),
                                      heartbeat_interval_s=0.1)
                result = client.slot
            elif op == "put":
                client.put_many([(key(i), block_bytes(i, cmd.get("version", 0))) for i in cmd["blocks"]])
                result = None
            elif op == "get":  # -> per block: "ok", "miss" or "wrong"
                result = []
                for i in cmd["blocks"]:
                    got = client.get(key(i))
                    result.append("miss" if got is None else "ok" if got == block_bytes(i, cmd.get("version", 0))
                                  else "wrong")
            elif op == "get_into":
                result = []
                for i in cmd["blocks"]:
                    dest = bytearray(len(block_bytes(i)) + 64)
                    n = client.get_into(key(i), dest)
                    result.append("miss" if n is None else "ok" if bytes(dest[:n]) == block_bytes(i) else "wrong")
            elif op == "lookup_prefix":
                result = client.lookup_prefix([key(i) for i in cmd["blocks"]])
            elif op == "view":
                v = client.view(key(cmd["block"]))
                result = "miss" if v is None else "ok" if bytes(v.data) == block_bytes(cmd["block"]) else "wrong"
                if v is not None:
                    v.release()
            elif op == "evict":
                result = client.evict(cmd["count"])
            elif op == "sync":  # the service has applied our touches (a NOP drains the rings)
                client.flush_releases()
                client.ping()
                result = None
            elif op == "sleep":
                time.sleep(cmd["s"])
                result = None
            elif op == "reregistrations":
                result = client.client_stats().reregistrations
            elif op == "report":  # what `beluga stat` would say, read by this host
                r = pool_report(client.pool)
                result = {"blocks": r["blocks"], "service_pid": r["service"]["pid"]}
            elif op == "sites":
                result = sorted(coherence.sites())
            elif op == "close":
                client.close()
                result = None
            else:
                raise ValueError(f"unknown op {op}")
            reply = {"ok": result}
        except Exception as exc:  # a CoherenceError (mode check) or a store error: the proof counts it
            reply = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
