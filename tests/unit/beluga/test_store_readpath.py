"""The lease-free read path: the pool's lookup table, its C and Python readers, touches, recovery.

Every reader test runs against both implementations (the C module when it is
built, and the Python fallback the guests use) and checks they give the same
answers; the whole store suite also runs under each (BELUGA_NATIVE=1 / 0 in
`make test`).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import zlib

import pytest

from beluga import layout as L
from beluga import readpath
from beluga.keys import name_key
from beluga.pool import Pool
from beluga.table import LookupTable

from beluga_store_support import REPO, LocalStore, make_pool

try:
    from beluga import _native
except ImportError:
    _native = None

IMPLS = {"python": (readpath.py_probe, readpath.py_read_into, readpath.py_read_bytes)}
if _native is not None:
    IMPLS["native"] = (_native.probe, _native.read_into, _native.read_bytes)


def k(i) -> bytes:
    return name_key(f"rp-{i}")


def probe_all(buf, g, key):
    """The same probe through every implementation: they must agree."""
    answers = {name: fns[0](buf, g.table_offset, g.table_buckets, g.table_seq_offset, key)
               for name, fns in IMPLS.items()}
    assert len(set(map(repr, answers.values()))) == 1, answers
    return next(iter(answers.values()))


def read_all(buf, g, key, hit, dest_size=None):
    """read_bytes and read_into through every implementation -> (bytes or status, status)."""
    gen, where, length, crc = hit
    hoff, doff = L.unpack_where(g, where, length)
    out = set()
    for name, (_, read_into, read_bytes) in IMPLS.items():
        got = read_bytes(buf, hoff, doff, key, gen, length, crc)
        dest = bytearray(dest_size or length)
        st = read_into(buf, dest, hoff, doff, key, gen, length, crc)
        if st == readpath.READ_OK:
            assert bytes(dest[:length]) == got, name
        out.add((got if isinstance(got, int) else bytes(got), st))
    assert len(out) == 1, out
    return out.pop()


# ---------------------------------------------------------------- the native module is what runs
@pytest.fixture
def raw_store(pool_path, monkeypatch):
    """A store whose pool is never sanitized: the tests below compare the C read path with the
    Python one on the same raw pool bytes, which they damage in place. The C functions read and
    post touches without the flush calls the sanitizer follows (docs/coherence.md: the C Reader
    does not flush yet), so under BELUGA_COHERENCE=check their writes would count as lost."""
    monkeypatch.setenv("BELUGA_COHERENCE", "off")
    s = LocalStore(pool_path)
    yield s
    s.close()


def test_the_c_read_path_runs_when_it_is_expected():
    """Under CI (and with BELUGA_NATIVE=1) a missing or unloadable C module fails, never falls back silently."""
    want = os.environ.get("BELUGA_NATIVE", "")
    if want == "1" or (os.environ.get("CI") == "true" and want != "0"):
        assert _native is not None, "the C read path is not built: run `make setup`"
        assert readpath.IMPLEMENTATION == "native" and readpath.probe is _native.probe
        assert readpath.read_into is _native.read_into and readpath.read_bytes is _native.read_bytes
    elif want == "0":
        assert readpath.IMPLEMENTATION == "python" and readpath.probe is readpath.py_probe


def test_beluga_native_forces_the_choice_and_a_missing_module_is_an_error(tmp_path):
    """A copy of the package without the built module, as the guests have it."""
    shutil.copytree(REPO / "beluga", tmp_path / "beluga", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = "import beluga.readpath as r; print(r.IMPLEMENTATION)"

    def run(value, ci=None):
        env = {k_: v for k_, v in os.environ.items() if k_ not in ("BELUGA_NATIVE", "CI")}
        env["PYTHONPATH"] = str(tmp_path)
        if value is not None:
            env["BELUGA_NATIVE"] = value
        if ci is not None:
            env["CI"] = ci
        # -S: no site-packages, so no editable-install finder, which would find the
        # repository's built module for `beluga._native` once the copy has none (as the
        # guests run it: python3 with the package's folder only).
        return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env,
                              timeout=60, cwd=tmp_path)

    assert run(None).stdout.strip() == "python"  # guests: nothing built, the Python path
    assert run("0").stdout.strip() == "python" and run("0", ci="true").stdout.strip() == "python"
    forced = run("1")
    assert forced.returncode != 0 and "BELUGA_NATIVE=1" in forced.stderr and "make setup" in forced.stderr
    in_ci = run(None, ci="true")  # CI must not pass on the fallback by accident
    assert in_ci.returncode != 0 and "CI=true" in in_ci.stderr and "make setup" in in_ci.stderr
    bad = run("yes")
    assert bad.returncode != 0 and "BELUGA_NATIVE='yes'" in bad.stderr


@pytest.mark.skipif(_native is None, reason="C read path not built")
def test_native_crc32_is_zlibs_crc32():
    rnd = random.Random(7)
    data = os.urandom(3 << 20)
    for n in [*range(0, 700), 4095, 16384, 262144 + 13, 2621440, 3 << 20]:
        off = rnd.randrange(0, 64)
        chunk = data[off : off + n]
        seed = rnd.randrange(1 << 32)
        assert _native.crc32(chunk) == zlib.crc32(chunk), n
        assert _native.crc32(chunk, seed) == zlib.crc32(chunk, seed), n


# ---------------------------------------------------------------- no round trip
def test_hits_misses_contains_and_prefixes_cost_no_round_trip(store):
    c = store.client()
    blocks = {k(i): os.urandom(100 + 1000 * i) for i in range(6)}
    c.put_many(list(blocks.items()))
    calls = c.client_stats().rpc_calls
    assert c.get_many([*blocks, k("absent")]) == [*blocks.values(), None]
    assert c.get_into(k(5), bytearray(8000)) == 5100 and c.get_into(k("absent"), bytearray(10)) is None
    assert c.contains(k(1)) and not c.contains(k("absent"))
    assert c.lookup_prefix([*blocks, k("absent"), k(0)]) == 6
    assert c.client_stats().rpc_calls == calls
    with c.view(k(2)) as v:  # a zero-copy view still takes a lease from the service
        assert bytes(v.data) == blocks[k(2)]
    assert c.client_stats().rpc_calls == calls + 1


def test_lease_free_reads_keep_lru_order(store):
    """A get posts a touch; the service applies it before it picks an eviction victim."""
    c = store.client()
    keys = []
    i = 0
    while store.service.stats()["slots_free"] > 0 or store.service._free_segments:
        c.put(k(i), bytes([i % 256]) * 3000)
        keys.append(k(i))
        i += 1
    for key in keys[:3]:
        assert c.get(key) is not None  # now the three most recently used
    c.put_many([(k(f"new{j}"), b"n" * 3000) for j in range(3)])
    assert all(c.contains(key) for key in keys[:3])
    assert not any(c.contains(key) for key in keys[3:6])


# ---------------------------------------------------------------- readers agree and refuse bad bytes
def test_both_read_paths_agree_on_hits_misses_and_every_kind_of_damage(raw_store):
    store = raw_store
    c = store.client()
    g, buf = store.pool.geometry, store.pool.buf
    data = os.urandom(20_000)
    c.put(k("a"), data)
    hit = probe_all(buf, g, k("a"))
    assert hit[0] > 0 and hit[2] == len(data)
    assert read_all(buf, g, k("a"), hit) == (data, readpath.READ_OK)
    assert probe_all(buf, g, k("absent")) is None
    hoff, doff = L.unpack_where(g, hit[1], hit[2])
    # the wrong key, generation or length for what the header says
    assert read_all(buf, g, k("b"), hit)[1] == readpath.READ_HEADER
    assert read_all(buf, g, k("a"), (hit[0] + 1, *hit[1:]))[1] == readpath.READ_HEADER
    # one flipped data byte
    buf[doff + 777] ^= 0x10
    assert read_all(buf, g, k("a"), hit) == (readpath.READ_CRC, readpath.READ_CRC)
    buf[doff + 777] ^= 0x10
    # a damaged header
    buf[hoff + 40] ^= 1
    assert read_all(buf, g, k("a"), hit)[1] == readpath.READ_HEADER
    buf[hoff + 40] ^= 1
    # the destination too small, a span outside the pool: errors, nothing read
    for _, read_into, read_bytes in IMPLS.values():
        with pytest.raises(ValueError, match="smaller"):
            read_into(buf, bytearray(10), hoff, doff, k("a"), hit[0], hit[2], hit[3])
        with pytest.raises(ValueError, match="outside"):
            read_bytes(buf, len(buf) - 10, doff, k("a"), hit[0], hit[2], hit[3])
    assert read_all(buf, g, k("a"), hit) == (data, readpath.READ_OK)


def test_a_bucket_mid_write_or_damaged_and_a_table_being_rebuilt_send_readers_to_the_service(raw_store):
    store = raw_store
    c = store.client()
    g, buf = store.pool.geometry, store.pool.buf
    c.put(k("a"), b"A" * 5000)
    bucket = g.bucket_offset(store.service.table.where[k("a")])
    seq = L.U32.unpack_from(buf, bucket)[0]
    L.U32.pack_into(buf, bucket, seq + 1)  # odd: the service died mid-write
    assert probe_all(buf, g, k("a")) is False
    calls = c.client_stats().rpc_calls
    assert c.get(k("a")) == b"A" * 5000  # answered by the service instead (LOOKUP with a lease)
    assert c.client_stats().rpc_calls == calls + 1
    L.U32.pack_into(buf, bucket, seq)
    buf[bucket + 20] ^= 0xFF  # a scribbled key: the bucket's CRC no longer matches
    assert probe_all(buf, g, k("a")) is False
    buf[bucket + 20] ^= 0xFF
    assert probe_all(buf, g, k("a"))[2] == 5000
    L.write_table_seq(buf, g, L.read_table_seq(buf, g) + 1)  # odd: a rebuild in progress
    assert probe_all(buf, g, k("a")) is False and probe_all(buf, g, k("absent")) is False
    assert c.get(k("a")) == b"A" * 5000 and c.lookup_prefix([k("a"), k("absent")]) == 1
    assert c.contains(k("a")) and not c.contains(k("absent"))


def test_a_slot_reused_during_the_copy_is_a_miss_never_the_wrong_bytes(store, monkeypatch):
    """The Python reader, interleaved by hand with a writer that reuses the slot mid-copy."""
    c = store.client()
    g, buf = store.pool.geometry, store.pool.buf
    c.put(k("a"), b"old" * 1000)
    hit = probe_all(buf, g, k("a"))
    hoff, doff = L.unpack_where(g, hit[1], hit[2])
    real = readpath.copy_and_checksum

    def copy_while_reused(algo, dest, src):
        # The new writer: header (WRITING, a new generation) first, then its data.
        buf[hoff : hoff + L.BLOCK_HEADER_BYTES] = L.BlockHeader(
            L.BLOCK_WRITING, 3000, hit[0] + 50, 0, 1, k("other")).encode()
        buf[doff : doff + 3000] = b"new" * 1000
        return real(algo, dest, src)

    monkeypatch.setattr(readpath, "copy_and_checksum", copy_while_reused)
    dest = bytearray(3000)
    assert readpath.py_read_into(buf, dest, hoff, doff, k("a"), hit[0], hit[2], hit[3]) in (
        readpath.READ_CRC, readpath.READ_MOVED)


# ---------------------------------------------------------------- the table itself
def test_deleting_from_a_crowded_table_keeps_every_other_key_findable(pool_path):
    """Keys made to share home buckets, published and withdrawn at random; both readers always agree."""
    make_pool(pool_path)
    pool = Pool.open(pool_path)
    try:
        g, buf = pool.geometry, pool.buf
        table = LookupTable(buf, g)
        rnd = random.Random(3)
        homes = [rnd.randrange(g.table_buckets) for _ in range(4)] + [g.table_buckets - 1]
        keys = []
        for i in range(60):  # runs of colliding keys, one of them wrapping round the table's end
            home = homes[i % len(homes)]
            keys.append((home + g.table_buckets * (i + 1)).to_bytes(8, "little") + os.urandom(24))
        assert {L.bucket_home(key, g.table_buckets) for key in keys} == set(homes)
        live: dict[bytes, int] = {}
        for step in range(400):
            key = rnd.choice(keys)
            if key in live and rnd.random() < 0.5:
                table.withdraw(key)
                del live[key]
            else:
                live[key] = step + 1
                table.publish(key, step + 1, 0, 1, g.slot_granularity_bytes, 100, step)
            for other in keys:
                got = probe_all(buf, g, other)
                assert (got[0] if got else None) == live.get(other), (step, other.hex()[:16])
        assert table.relocations > 0  # the backward shift was exercised
    finally:
        pool.close()


def test_recovery_rebuilds_the_table_from_metadata_whatever_it_held(store):
    c = store.client()
    blocks = {k(i): os.urandom(300 + 499 * i) for i in range(30)}
    c.put_many(list(blocks.items()))
    c.delete(k(4))
    g, buf = store.pool.geometry, store.pool.buf
    # A service killed mid-rebuild (odd table sequence) over a table full of garbage.
    buf[g.table_offset : g.table_offset + g.table_buckets * L.TABLE_BUCKET_BYTES] = os.urandom(
        g.table_buckets * L.TABLE_BUCKET_BYTES)
    L.write_table_seq(buf, g, 41)
    store.restart()
    assert L.read_table_seq(buf, g) % 2 == 0
    calls = c.client_stats().rpc_calls
    for key, data in blocks.items():
        assert c.get(key) == (None if key == k(4) else data)
    assert c.client_stats().rpc_calls == calls  # all from the rebuilt table
    store.service.check_invariants()


def test_both_paths_probe_prefixes_post_the_same_touches_and_copy_with_the_same_crc(raw_store):
    store = raw_store
    c = store.client()
    g, buf = store.pool.geometry, store.pool.buf
    c.put_many([(k(i), bytes([i]) * 700) for i in range(5)])
    ring, head_at = g.touch_ring_offset(c.slot), g.touch_head_offset(c.slot)
    keys = [k(0), k(1), k(2), k("absent"), k(3)]
    results = {}
    for name, fn in [("python", readpath.py_probe_prefix)] + (
            [("native", _native.probe_prefix)] if _native is not None else []):
        head = L.read_touch_head(buf, g, c.slot)
        got = fn(buf, g.table_offset, g.table_buckets, g.table_seq_offset, keys, ring, head_at, head)
        assert got[0] == 3 and got[1] == head + 3 and got[2] is False
        assert L.read_touch_head(buf, g, c.slot) == got[1]
        _, posted = L.read_touches(buf, g, c.slot, head)
        results[name] = posted
        with pytest.raises(ValueError, match="32 bytes"):
            fn(buf, g.table_offset, g.table_buckets, g.table_seq_offset, [b"short"], ring, head_at, head)
    assert len({repr(v) for v in results.values()}) == 1
    hits = [probe_all(buf, g, key) for key in keys[:3]]
    assert results["python"] == [(h[1] & 0xFFFFFFFF, h[0] & 0xFFFFFFFF) for h in hits]
    src = os.urandom(300_000)
    for fn in [readpath.py_copy_crc] + ([_native.copy_crc] if _native is not None else []):
        dest = bytearray(len(src))
        assert fn(dest, src) == zlib.crc32(src) and dest == src
        with pytest.raises(ValueError, match="length"):
            fn(bytearray(3), src)


_STREAM_CHECK = """
import mmap, os, sys, zlib
from beluga import readpath
try:
    from beluga import _native  # directly: the check runs with BELUGA_NATIVE=0 too
except ImportError:
    _native = None
fns = [readpath.py_copy_crc] + ([_native.copy_crc] if _native is not None else [])
src = os.urandom(300_001)
for fn in fns:
    for n in (0, 1, 63, 64, 65, 255, 256, 257, 4096, 262_144, 300_001):
        for at in (0, 1, 16, 64):  # mmap is page-aligned: 0 and 64 get streamed stores, 1 and 16 do not
            for stream in (False, True):
                m = mmap.mmap(-1, n + 256)
                m[:] = b"\\xa5" * len(m)
                crc = fn(memoryview(m)[at : at + n], src[:n], stream)
                assert crc == zlib.crc32(src[:n]), (fn, n, at, stream)
                assert m[at : at + n] == src[:n], (fn, n, at, stream)
                assert m[:at] == b"\\xa5" * at and m[at + n :] == b"\\xa5" * (len(m) - at - n), (fn, n, at, stream)
print("checked", len(fns))
"""


@pytest.mark.parametrize("env", [{}, {"BELUGA_NATIVE_NO_AVX512": "1"}], ids=["this-cpu", "no-avx512"])
def test_copy_crc_copies_exactly_its_bytes_with_zlibs_crc_streamed_or_not(env):
    """A put's copy (``stream``: non-temporal stores where the pool's slot is aligned): every size
    around the folding loops' steps, aligned and not; nothing written outside ``dest``. Both the
    AVX-512 and the SSE loop of the C version (a child process: the choice is made at import)."""
    run = subprocess.run([sys.executable, "-c", _STREAM_CHECK], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, **env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["checked", "2" if _native is not None else "1"]


# ---------------------------------------------------------------- a whole get in one call
READERS = {"python": readpath.PyReader} | ({"native": _native.Reader} if _native is not None else {})


def test_both_readers_give_the_same_answers_post_the_same_touches_and_count_the_same(raw_store):
    store = raw_store
    """readpath.reader: get / get_into / lookup_prefix / probe in one call each, C and Python alike."""
    c = store.client()
    g, buf = store.pool.geometry, store.pool.buf
    data = {k(i): os.urandom(5000 + 3000 * i) for i in range(4)}
    c.put_many(list(data.items()))
    ring, head_at = g.touch_ring_offset(c.slot), g.touch_head_offset(c.slot)
    hit = probe_all(buf, g, k(1))
    hoff, doff = L.unpack_where(g, hit[1], hit[2])
    answers, touches = {}, {}
    for name, cls in READERS.items():
        r = readpath.reader(buf, g, cls=cls)
        head = L.read_touch_head(buf, g, c.slot)
        got = [r.get(k(0))]  # no ring yet: a hit posts nothing
        assert L.read_touch_head(buf, g, c.slot) == head
        r.set_ring(ring, head_at)
        got += [r.get(k(1)), r.get(k("absent")), r.probe(k(2)), r.probe(k("absent"))]
        dest = bytearray(20_000)
        got += [r.get_into(k(3), dest), bytes(dest[: len(data[k(3)])]), r.get_into(k("absent"), dest)]
        with pytest.raises(ValueError, match="destination only 10"):
            r.get_into(k(3), bytearray(10))
        got.append(r.lookup_prefix([k(2), k(3), k("absent"), k(0)]))
        r.post_touches([(hit[1], hit[0])])
        buf[doff + 100] ^= 1  # damaged bytes: (READ_CRC, generation), retried once with the same entry
        got += [r.get(k(1)), r.get_into(k(1), dest)]
        buf[doff + 100] ^= 1
        buf[hoff + 40] ^= 1  # a damaged header
        got.append(r.get(k(1)))
        buf[hoff + 40] ^= 1
        for bad in (b"short", bytearray(k(1)), "text", None):
            with pytest.raises(ValueError, match="32 bytes"):
                r.get(bad)
            with pytest.raises(ValueError, match="32 bytes"):
                r.lookup_prefix([k(0), bad])
        seq = L.read_table_seq(buf, g)
        L.write_table_seq(buf, g, seq + 1)  # a rebuild in progress: ask the service
        got += [r.get(k(0)), r.get_into(k(0), dest), r.probe(k(0)), r.lookup_prefix([k(0)])]
        L.write_table_seq(buf, g, seq)
        got.append(r.counts())
        r.set_ring(None)
        got.append(r.get(k(2)) == data[k(2)])
        assert L.read_touch_head(buf, g, c.slot) == head + 5  # get, get_into, two prefix hits, post_touches
        touches[name] = L.read_touches(buf, g, c.slot, head)[1]
        answers[name] = got
    a = answers["python"]
    assert a[0] == data[k(0)] and a[1] == data[k(1)] and a[2] is None and a[3] == probe_all(buf, g, k(2))
    assert a[4] is None and a[5] == len(data[k(3)]) and a[6] == data[k(3)] and a[7] is None
    assert a[8] == (2, False)
    assert a[9] == a[10] == (readpath.READ_CRC, hit[0]) and a[11] == (readpath.READ_HEADER, hit[0])
    assert a[12:16] == [False, False, False, (0, True)]
    assert a[16] == {"gets": 5, "hits": 3, "misses": 2, "get_bytes": 5000 + 8000 + 14000}  # failures: the caller counts
    assert len({repr(v) for v in answers.values()}) == 1, answers
    assert len({repr(v) for v in touches.values()}) == 1
