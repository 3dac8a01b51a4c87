"""The removal proof (issue 15, item 3): every writeback and invalidate call site of the store is
needed, and the coherence sanitizer shows it.

A focused scenario runs the store across hosts, each a process with its own sanitized pool: a
`beluga serve` (then a second one, which recovers the pool), a writer and a reader (which opened the
pool before anything was written, so its cache holds the old lines). With one (op, what) site
removed in every process (BELUGA_COHERENCE_REMOVE), the scenario must fail: a sanitizer report, or
a result a user would notice (a miss, wrong bytes, an RPC timeout, a re-registration, a wrong
`beluga stat`). The table in docs/coherence.md is generated from SITES below and kept equal to it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beluga import coherence as C
from beluga_store_support import make_pool, subprocess_env

HERE = Path(__file__).parent
HOST = HERE / "_coherence_client_host.py"
DOC = HERE.parents[2] / "docs" / "coherence.md"

SITES = {
    # (op, what): the step of the scenario that fails without it, and how
    ("writeback", "claim"): "registration: the service never sees the claim (RPC timeout)",
    ("writeback", "grant"): "registration: the client never sees the grant (RPC timeout)",
    ("writeback", "request"): "every call: the service reads an old request (stale-read report / timeout)",
    ("writeback", "response"): "every call: the client reads an old response (not-written-back report)",
    ("writeback", "heartbeat"): "idle reader: the service reaps it (re-registration), or its own stat drops the line (lost-write)",
    ("writeback", "service area"): "`beluga stat` on the reader: the service's pid is not there",
    ("writeback", "segment entry"): "restart: the new service recovers no segment (misses)",
    ("writeback", "index entry"): "restart: the new service recovers no block (misses); stat counts none",
    ("writeback", "table bucket"): "get: the reader finds no bucket (misses)",
    ("writeback", "table seq"): "restart: the new service rebuilds the table before its odd sequence is out (not-written-back report)",
    ("writeback", "block header"): "get: the header does not match (miss), commit refused",
    ("writeback", "block data"): "get: the bytes fail their CRC (not-written-back report)",
    ("writeback", "touch entry"): "evict: the service drops the block the reader read (not-written-back)",
    ("writeback", "touch head"): "evict: the service never sees the reader's touches and evicts its block",
    ("invalidate", "client line"): "registration: the service never sees the claim (RPC timeout)",
    ("invalidate", "service line"): "registration: the client never sees the grant (RPC timeout)",
    ("invalidate", "request"): "second call: the service reads its old copy of the request",
    ("invalidate", "response"): "second call: the client reads its old copy of the response",
    ("invalidate", "service area"): "`beluga stat` on the reader: an old pid (stale-read report)",
    ("invalidate", "segment entry"): "`beluga stat` on the reader: no segment in use (stale-read report)",
    ("invalidate", "index entry"): "`beluga stat` on the reader: no block (stale-read report)",
    ("invalidate", "table bucket"): "get: the reader's copy of the bucket is empty (misses)",
    ("invalidate", "table seq"): "restart: the reader's probe reads the old table sequence (stale-read report)",
    ("invalidate", "block header"): "get: the reader's copy of the header is empty (miss)",
    ("invalidate", "block data"): "get: the reader's copy of the bytes fails the CRC (miss)",
    ("invalidate", "block slot"): "rewrite of a block by another writer: its stale last line is a clobber",
    ("invalidate", "touch head"): "evict: the service never sees the reader's touches and evicts its block",
    ("invalidate", "touch entry"): "evict: the service reads old touch entries and evicts the reader's block",
}


# The proof runs its own sanitized processes whatever this run's mode; it takes minutes, so it
# runs once: in the sanitized pass of `make test` (or when asked for: BELUGA_COHERENCE_PROOF=1).
proof_run = pytest.mark.skipif(
    os.environ.get("BELUGA_COHERENCE", "off").strip() in ("", "off") and not os.environ.get("BELUGA_COHERENCE_PROOF"),
    reason="the removal proof runs once, in the sanitized pass (BELUGA_COHERENCE=check) or with BELUGA_COHERENCE_PROOF=1")


class Client:
    def __init__(self, path: str, env: dict, log) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HOST)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, text=True, env=env)
        self.open = self.call("open", path=path)

    def call(self, op: str, **kw):
        self.proc.stdin.write(json.dumps(dict(kw, op=op)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            return {"error": f"host exited ({self.proc.wait()})"}
        reply = json.loads(line)
        return reply if "error" in reply else reply["ok"]

    def close(self) -> None:
        self.call("close")
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _serve(path: str, env: dict, tmp: Path, n: int) -> subprocess.Popen:
    ready = tmp / f"ready-{n}.json"
    proc = subprocess.Popen([sys.executable, "-m", "beluga.cli", "serve", path, "--transport", "cxl",
                             "--ready-file", str(ready), "--takeover-wait", "0", "--heartbeat-timeout", "1.0"],
                            stdout=open(tmp / f"service-{n}.log", "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 30
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


def run_scenario(path: str, tmp: Path, remove: str = "") -> tuple[list[str], set]:
    """-> (what went wrong, the (op, what) sites the processes used)."""
    make_pool(path, force=True)
    reports, sites = tmp / "reports.jsonl", tmp / "sites.jsonl"
    for f in (reports, sites):
        f.unlink(missing_ok=True)
    env = dict(subprocess_env(), BELUGA_COHERENCE="check-collect", BELUGA_COHERENCE_REPORT=str(reports),
               BELUGA_COHERENCE_SITES=str(sites), BELUGA_COHERENCE_REMOVE=remove)
    env["PYTHONPATH"] += os.pathsep + str(HERE)
    wrong: list[str] = []

    def expect(what, got, want):
        if got != want:
            wrong.append(f"{what}: {got!r}, expected {want!r}")

    log = open(tmp / "hosts.log", "a")
    services, clients = [], []
    try:
        services.append(_serve(path, env, tmp, 1))
        reader = Client(path, env, log)  # opens the pool first: its cache holds the pool as formatted
        writer = Client(path, env, log)
        clients += [reader, writer]
        expect("reader registers", type(reader.open), int)
        expect("writer registers", type(writer.open), int)
        expect("put", writer.call("put", blocks=[0, 1, 2, 3]), None)
        expect("get", reader.call("get", blocks=[0]), ["ok"])
        expect("get_into", reader.call("get_into", blocks=[1]), ["ok"])
        expect("sync", reader.call("sync"), None)
        expect("evict", writer.call("evict", count=1), 1)  # the least recently used: 2 (0 and 1 were read)
        expect("get after evict", reader.call("get", blocks=[0, 1, 2, 3]), ["ok", "ok", "miss", "ok"])
        expect("view", reader.call("view", block=3), "ok")
        expect("rewrite", reader.call("put", blocks=[2], version=0), None)  # another writer, a reused slot
        expect("get rewritten", writer.call("get", blocks=[2]), ["ok"])
        expect("idle", reader.call("sleep", s=4.0), None)  # the service may forgive a stall or two
        expect("call after idling", reader.call("sync"), None)  # a reaped reader registers again here
        expect("reader still registered", reader.call("reregistrations"), 0)
        expect("stat", reader.call("report"), {"blocks": 4, "service_pid": services[0].pid})
        services[0].send_signal(signal.SIGTERM)
        services[0].wait(10)
        services.append(_serve(path, env, tmp, 2))  # a new host recovers the pool
        expect("get after restart", reader.call("get", blocks=[0, 1, 2, 3]), ["ok"] * 4)
        expect("lookup_prefix after restart", reader.call("lookup_prefix", blocks=[0, 1, 2, 3]), 4)
        expect("put after restart", writer.call("put", blocks=[4]), None)
        expect("get after restart", reader.call("get", blocks=[4]), ["ok"])
        expect("get all after restart", reader.call("get", blocks=[0, 1, 2, 3, 4]), ["ok"] * 5)
        expect("stat after restart", reader.call("report"), {"blocks": 5, "service_pid": services[1].pid})
    finally:
        for c in clients:
            c.close()
        for s in services:
            if s.poll() is None:
                s.send_signal(signal.SIGTERM)
                try:
                    s.wait(10)
                except subprocess.TimeoutExpired:
                    s.kill()
        log.close()
    found = C.read_reports(str(reports))
    wrong += [f"{r['kind']} at {r['region']} ({r['what']})" for r in found[:3]]
    used = set()
    if sites.exists():
        for line in sites.read_text().splitlines():
            used |= {tuple(s) for s in json.loads(line)}
    return wrong, used


def table() -> str:
    rows = ["| call site (op, what) | what fails without it (scenario step) |", "|---|---|"]
    for (op, what), how in sorted(SITES.items()):
        rows.append(f"| `{op}` `{what}` | {how} |")
    return "\n".join(rows) + "\n"


@proof_run
def test_the_scenario_passes_with_every_site_and_uses_each(pool_path, tmp_path):
    wrong, used = run_scenario(pool_path, tmp_path)
    assert wrong == []
    assert {s for s in used if s[0] != "fence"} == set(SITES)


@proof_run
@pytest.mark.parametrize("site", sorted(SITES), ids=lambda s: f"{s[0]}:{s[1]}")
def test_removing_a_site_fails_the_scenario(site, pool_path, tmp_path):
    wrong, _ = run_scenario(pool_path, tmp_path, remove=f"{site[0]}:{site[1]}")
    assert wrong, f"removing {site} went unnoticed"


def test_docs_have_the_table():
    text = DOC.read_text()
    assert table() in text, "docs/coherence.md: regenerate the table (python -m pytest ... -k docs prints it)\n" + table()
