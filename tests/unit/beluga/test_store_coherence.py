"""The coherence sanitizer and the cache-line flushes (beluga/coherence.py, docs/coherence.md).

Two hosts are two real processes over one real /dev/shm pool: this test process
(host A) and a `_coherence_host.py` child (host B), each with its own sanitized
cache. The native instructions are run on this CPU in child processes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from beluga import coherence as C
from beluga.pool import Pool

from beluga_store_support import make_pool

REPO = Path(__file__).resolve().parents[3]
HOST_SCRIPT = Path(__file__).with_name("_coherence_host.py")


class Host:
    """Host B: a child process with its own sanitized pool."""

    def __init__(self, path: str, mode: str = "check-collect", report: str | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HOST_SCRIPT.parent)]))
        self.proc = subprocess.Popen([sys.executable, str(HOST_SCRIPT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.call("open", path=path, mode=mode, report=report)

    def call(self, op: str, **kw):
        self.proc.stdin.write(json.dumps(dict(kw, op=op)) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            return reply
        return reply["ok"]

    def close(self) -> None:
        self.call("close")
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(params=["by-line", "numpy"])
def two_hosts(request, pool_path, tmp_path, monkeypatch):
    """Host A (this process, mode check: raises) and host B (a child, check-collect). The model
    checks short ranges line by line and long ones with NumPy: each test runs on both paths."""
    make_pool(pool_path)
    report = str(tmp_path / "b.jsonl")
    a = Pool.open(pool_path, coherence="check", coherence_report=str(tmp_path / "a.jsonl"))
    b = Host(pool_path, report=report)
    if request.param == "numpy":
        monkeypatch.setattr(C, "SMALL_LINES", 0)
        b.call("small", n=0)
    C.clear_reports()
    try:
        yield a, b, report
    finally:
        b.close()
        a.close()
        C.clear_reports()


def places(pool: Pool) -> tuple[int, int]:
    """A payload (the first data slot) and a publishing word (the service area's table line)."""
    g = pool.geometry
    return g.segments_offset + 100, g.service_offset + 256


def test_a_write_not_written_back_is_invisible_to_the_other_host(two_hosts):
    a, b, _ = two_hosts
    x, _ = places(a)
    a.buf[x : x + 5] = b"hello"
    b.call("invalidate", off=x, n=5)
    assert b.call("read", off=x, n=5) == bytes(5).hex()
    C.writeback(a.buf, x, 5)
    C.fence()
    assert b.call("read", off=x, n=5) == bytes(5).hex(), "B's cached copy stays until it invalidates"
    b.call("invalidate", off=x, n=5)
    assert b.call("read", off=x, n=5) == b"hello".hex()


def test_a_read_after_the_others_writeback_without_invalidate_is_reported(two_hosts):
    a, b, report = two_hosts
    x, w = places(a)
    b.call("invalidate", off=x, n=5)
    b.call("read", off=x, n=5)  # B caches the old payload
    a.buf[x : x + 5] = b"fresh"
    C.writeback(a.buf, x, 5)
    C.fence()
    a.buf[w : w + 8] = (7).to_bytes(8, "little")
    C.publish(a.buf, w, 8, [(x, 5)], "test word")
    b.call("invalidate", off=w, n=8)
    assert b.call("note_read", off=w, n=8, what="test word") == (7).to_bytes(8, "little").hex()
    assert b.call("note_read", off=x, n=5, what="test payload") == bytes(5).hex()  # stale: no invalidate
    (rep,) = b.call("reports")
    assert rep["kind"] == C.STALE_READ
    assert rep["offset"] == x
    assert rep["region"] == "block data: segment 0 +100"
    assert rep["what"] == "test payload"
    assert any("_coherence_host.py" in f and "serve" in f for f in rep["stack"]), rep["stack"]
    assert [r["offset"] for r in C.read_reports(report)] == [x], "the report file has it too"
    assert C.reports() == [], "A did nothing wrong"


def test_a_read_racing_a_writeback_it_has_not_seen_published_is_not_reported(two_hosts):
    # A seqlock reader may read a line that a writer is rewriting: the re-check of the
    # sequence word discards it. Only reads of writebacks the reader saw published count.
    a, b, _ = two_hosts
    x, _ = places(a)
    b.call("invalidate", off=x, n=5)
    a.buf[x : x + 5] = b"racer"
    C.writeback(a.buf, x, 5)
    C.fence()
    assert b.call("note_read", off=x, n=5, what="racing read") == bytes(5).hex()
    assert b.call("reports") == []


def test_a_publication_with_a_payload_line_not_written_back_is_reported(two_hosts):
    a, b, _ = two_hosts
    x, w = places(a)
    g = a.geometry
    a.buf[x : x + 200] = b"p" * 200  # four lines; the second is never written back
    C.writeback(a.buf, x, 28)
    C.writeback(a.buf, x + 92, 108)
    C.fence()
    a.buf[w : w + 8] = (1).to_bytes(8, "little")
    with pytest.raises(C.CoherenceError) as err:
        C.publish(a.buf, w, 8, [(x, 200)], "test commit")
    rep = err.value.report
    assert rep.kind == C.NOT_WRITTEN_BACK
    assert rep.offset == (x // 64 + 1) * 64 == g.segments_offset + 128
    assert rep.what == "test commit" and rep.region == "block data: segment 0 +128"
    assert any("test_a_publication_with_a_payload_line_not_written_back" in f for f in rep.stack)
    assert "test commit" in str(err.value) and hex(rep.offset) in str(err.value)
    b.call("invalidate", off=x, n=200)
    seen = bytes.fromhex(b.call("read", off=x, n=200))
    assert seen[:28] == b"p" * 28 and seen[28:92] == bytes(64), "the other host reads the old line"


def test_a_publication_before_the_fence_is_reported(two_hosts):
    a, _, _ = two_hosts
    x, w = places(a)
    a.buf[x : x + 8] = b"unfenced"
    C.writeback(a.buf, x, 8)
    a.buf[w : w + 8] = (1).to_bytes(8, "little")
    with pytest.raises(C.CoherenceError) as err:
        C.note_publish(a.buf, w, [(x, 8)], "test word")
    assert err.value.report.kind == C.NOT_FENCED and err.value.report.offset == x


def test_correct_flushes_report_nothing_both_ways(two_hosts):
    a, b, report = two_hosts
    x, w = places(a)
    g = a.geometry
    resp = g.response_offset(1)
    for i in range(1, 6):
        payload = bytes([i]) * 300
        a.buf[x : x + 300] = payload
        C.writeback(a.buf, x, 300)
        C.fence()
        a.buf[w : w + 8] = i.to_bytes(8, "little")
        C.publish(a.buf, w, 8, [(x, 300)], "test word")
        b.call("invalidate", off=w, n=8)
        assert b.call("note_read", off=w, n=8, what="word") == i.to_bytes(8, "little").hex()
        b.call("invalidate", off=x, n=300)
        assert b.call("note_read", off=x, n=300, what="payload") == payload.hex()
        # and an answer back from B to A, through another region
        b.call("write", off=resp, hex=(payload[:50]).hex())
        b.call("writeback", off=resp, n=50)
        b.call("fence")
        b.call("write", off=resp + 64 * 4, hex=i.to_bytes(8, "little").hex())
        assert b.call("publish", word_off=resp + 256, word_len=8, payload=[[resp, 50]], what="answer") is None
        C.invalidate(a.buf, resp + 256, 8)
        C.note_read(a.buf, resp + 256, 8, "answer word")
        C.invalidate(a.buf, resp, 50)
        C.note_read(a.buf, resp, 50, "answer")
        assert bytes(a.buf[resp : resp + 50]) == payload[:50]
    assert b.call("reports") == [] and C.reports() == []
    assert C.read_reports(report) == []


def test_invalidating_unwritten_writes_is_a_lost_write(two_hosts):
    a, _, _ = two_hosts
    g = a.geometry
    entry = g.index_entry_offset(2, 5)
    a.buf[entry : entry + 4] = b"lost"
    with pytest.raises(C.CoherenceError) as err:
        C.invalidate(a.buf, entry, 64, "test entry")
    assert err.value.report.kind == C.LOST_WRITE
    assert err.value.report.region == "index entry of segment 2 slot 5"
    assert bytes(a.buf[entry : entry + 4]) == bytes(4), "the write is gone, as on the hardware modelled"


def test_a_writeback_over_the_others_newer_bytes_in_the_same_line_is_a_clobber(two_hosts):
    a, b, _ = two_hosts
    line = a.geometry.host_slot_offset(0)  # the client line: one writer only, by design
    b.call("write", off=line + 8, hex=(b"B" * 8).hex())
    b.call("writeback", off=line, n=64)
    a.buf[line : line + 8] = b"A" * 8  # A's copy of the line still has B's bytes as zeros
    with pytest.raises(C.CoherenceError) as err:
        C.writeback(a.buf, line, 8, "test claim")
    assert err.value.report.kind == C.CLOBBER
    assert err.value.report.offset == line + 8
    assert err.value.report.region == "host slot 0: client line (claim, request seq, heartbeat)"


def test_memoryview_slices_of_the_pool_are_found_by_address(two_hosts):
    a, b, _ = two_hosts
    x, _ = places(a)
    part = a.buf[x - 100 : x + 1000]
    part[100:104] = b"view"
    C.writeback(part, 100, 4)
    b.call("invalidate", off=x, n=4)
    assert b.call("read", off=x, n=4) == b"view".hex()
    import numpy as np

    arr = np.frombuffer(a.buf, dtype=np.uint8)[x:]
    arr[:4] = 9
    C.writeback(arr, 0, 4)
    b.call("invalidate", off=x, n=4)
    assert b.call("read", off=x, n=4) == bytes([9] * 4).hex()


def test_removed_call_sites_become_no_ops_and_the_publication_is_caught(two_hosts):
    a, _, _ = two_hosts
    x, w = places(a)
    a.buf[x : x + 8] = b"payload!"
    with C.removed(("writeback", "test payload")):
        C.writeback(a.buf, x, 8, "test payload")
    C.fence()
    assert ("writeback", "test payload") in C.sites()
    with pytest.raises(C.CoherenceError):
        C.note_publish(a.buf, w, [(x, 8)], "test word")
    C.writeback(a.buf, x, 8, "test payload")
    C.fence()
    C.note_publish(a.buf, w, [(x, 8)], "test word")


def test_bad_modes_and_removals_are_clear_errors(pool_path, monkeypatch):
    make_pool(pool_path)
    with pytest.raises(ValueError, match="coherence mode 'bogus': expected check or check-collect"):
        Pool.open(pool_path, coherence="bogus")
    monkeypatch.setenv("BELUGA_COHERENCE", "chek")
    with pytest.raises(ValueError, match=r"BELUGA_COHERENCE='chek': expected one of off, check, check-collect"):
        Pool.open(pool_path)
    with pytest.raises(ValueError, match="BELUGA_COHERENCE_REMOVE: 'flush:x': expected OP:WHAT"):
        C._parse_removed("writeback:a, flush:x")


def test_regions_of_the_layout_are_named(pool_path):
    make_pool(pool_path)
    with Pool.open(pool_path, coherence="off") as p:
        g = p.geometry
        assert p.coherence is None
    names = {
        0: "superblock",
        g.service_offset + 256: "service area: table sequence line",
        g.host_slot_offset(3) + 128: "host slot 3: service line (owner, response seq, epoch)",
        g.touch_head_offset(1): "host slot 1: touch head",
        g.touch_ring_offset(1) + 80: "host slot 1: touch ring entry 10",
        g.request_offset(2) + 7: "host slot 2: request buffer +7",
        g.response_offset(2): "host slot 2: response buffer +0",
        g.segment_entry_offset(4) + 32: "segment-table entry of segment 4 (copy B)",
        g.index_entry_offset(1, 2): "index entry of segment 1 slot 2",
        g.table_offset + 64 * 9 + 3: "lookup-table bucket 9",
        g.header_offset(3, 1) + 127: "block header of segment 3 slot 1",
        g.segment_offset(2) + 4096: "block data: segment 2 +4096",
    }
    for off, name in names.items():
        assert C.describe(g, off) == name


# ---------------------------------------------------------------- the instructions on this CPU

NATIVE_PROBE = r"""
import mmap, os, sys
from beluga import coherence as C
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 1 << 20)
mm = mmap.mmap(fd, 1 << 20)
os.close(fd)
mm[4000:4100] = b"x" * 100
C.writeback(mm, 3990, 200); C.fence(); C.invalidate(mm, 0, 1 << 20)
assert mm[4000:4100] == b"x" * 100
s = C.status()
print(s["writeback"], s["invalidate"], s["fence"], s["can_flush"], C.status_line())
"""


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def run_probe(tmp_path, **env) -> list[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("BELUGA_NATIVE", "BELUGA_FLUSH")}
    full.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", NATIVE_PROBE, str(tmp_path / "lines")], env=full, text=True,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split(maxsplit=4)


def native_built() -> bool:
    r = subprocess.run([sys.executable, "-c", "import beluga._native as n; n.writeback"], cwd=REPO,
                       env={k: v for k, v in os.environ.items() if k != "BELUGA_NATIVE"}, capture_output=True)
    return r.returncode == 0


def test_the_native_instructions_run_on_this_cpu(tmp_path):
    if not native_built():
        if os.environ.get("CI") == "true":
            pytest.fail("the C module with the flush functions is not built: run `make setup`")
        pytest.skip("the C module beluga._native is not built (`make setup`): nothing native to run")
    flags = cpu_flags()
    best = "clwb" if "clwb" in flags else "clflushopt" if "clflushopt" in flags else "clflush"
    method, inval, fence, can, line = run_probe(tmp_path)
    assert (method, can) == (best, "True"), line
    assert line.startswith(f"cache flushes: writeback {best}, invalidate {inval}, fence {fence}")
    print(f"chosen on this CPU: writeback {method}, invalidate {inval}, fence {fence}")
    assert run_probe(tmp_path, BELUGA_FLUSH="clflush")[:3] == ["clflush", "clflush", "mfence"]
    if "clflushopt" in flags:
        assert run_probe(tmp_path, BELUGA_FLUSH="clflushopt")[:3] == ["clflushopt", "clflushopt", "sfence"]


@pytest.mark.parametrize("env,why", [({"BELUGA_FLUSH": "none"}, "BELUGA_FLUSH=none"),
                                     ({"BELUGA_NATIVE": "0"}, "BELUGA_NATIVE=0")])
def test_without_the_module_the_store_says_it_cannot_flush(tmp_path, env, why):
    method, inval, fence, can, line = run_probe(tmp_path, **env)
    assert (method, inval, fence, can) == ("none", "none", "none", "False")
    assert line.startswith(f"cache flushes: none ({why}") and "safe only on a coherent pool" in line


def test_scope_metadata_models_the_metadata_and_leaves_the_block_data_shared(pool_path, monkeypatch):
    """For hosts too small for two private copies of the pool (the testbed's guests)."""
    make_pool(pool_path)
    monkeypatch.setenv("BELUGA_COHERENCE_SCOPE", "metadata")
    a = Pool.open(pool_path, coherence="check")
    b = Host(pool_path)  # inherits the scope from the environment
    try:
        g = a.geometry
        assert a.coherence.size < g.segments_offset + 4096 and a.coherence.pool_size == len(a.buf)
        entry, data = g.index_entry_offset(0, 1), g.segment_offset(1) + 64
        a.buf[entry : entry + 4] = b"meta"
        a.buf[data : data + 4] = b"data"
        b.call("invalidate", off=entry, n=4)
        b.call("invalidate", off=data, n=4)
        assert b.call("read", off=entry, n=4) == bytes(4).hex(), "metadata: private until written back"
        assert b.call("read", off=data, n=4) == b"data".hex(), "block data: the shared pool itself"
        C.writeback(a.buf, entry, 4)
        C.writeback(a.buf, data, 4)
        C.fence()
        C.note_publish(a.buf, None, [(data, 4)], "data is not checked")
        b.call("invalidate", off=entry, n=4)
        assert b.call("read", off=entry, n=4) == b"meta".hex()
        assert b.call("reports") == []
        assert os.path.exists(pool_path + ".coherence")
    finally:
        b.close()
        a.close()
    assert not os.path.exists(pool_path + ".coherence"), "the last host to close removes the side table"
    with pytest.raises(ValueError, match="BELUGA_COHERENCE_SCOPE='some': expected one of all, metadata"):
        monkeypatch.setenv("BELUGA_COHERENCE_SCOPE", "some")
        Pool.open(pool_path, coherence="check")
