"""The fast CRC-32 path: same values as zlib's, checksum-while-copying, batched verified loads."""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest

from beluga import checksum as C
from beluga import layout as L
from beluga.keys import name_key

from beluga_store_support import REPO, subprocess_env, written_back


@pytest.mark.parametrize("n", [0, 1, 63, 4096, C.CHUNK_BYTES - 1, C.CHUNK_BYTES, C.CHUNK_BYTES + 1,
                               3 * C.CHUNK_BYTES + 12345])
def test_copy_and_checksum_is_a_copy_plus_the_zlib_crc(n):
    src = os.urandom(n)
    dest = bytearray(n + 7)  # larger than the block: only the first n bytes are written
    crc = C.copy_and_checksum(C.CRC32, memoryview(dest), memoryview(src))
    assert bytes(dest[:n]) == src and dest[n:] == bytes(7)
    assert crc == zlib.crc32(src) == C.checksum(C.CRC32, src)
    assert C.meta_crc(src[n // 2 :], C.meta_crc(src[: n // 2])) == zlib.crc32(src)  # running CRC


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        C.copy_and_checksum(99, memoryview(bytearray(1)), memoryview(b"x"))


def test_both_implementations_agree_so_hosts_with_and_without_isal_share_a_pool(pool_path):
    """A block put by a client using zlib's CRC-32 is read by one using ISA-L's, and back."""
    from beluga_store_support import make_pool

    make_pool(pool_path)
    script = (
        "import sys, zlib; from beluga import checksum as C; from beluga.pool import Pool; "
        "from beluga.service import MetadataService, ServiceConfig; from beluga.client import local_client; "
        "svc = MetadataService(Pool.open(sys.argv[1]), ServiceConfig(takeover_wait_s=0, force=True)); "
        "c = local_client(svc); data = bytes(range(256)) * 1000; "
        "assert C.checksum(C.CRC32, data) == zlib.crc32(data); "
        "c.put(bytes(32), data) if sys.argv[2] == 'put' else None; "
        "got = c.get(bytes(32)); assert got == data, 'verified get failed'; print(C.IMPLEMENTATION)"
    )
    impls = []
    for impl, step in (("zlib", "put"), (None, "get"), (None, "put"), ("zlib", "get")):
        env = subprocess_env()
        env.pop("BELUGA_CRC_IMPL", None)
        if impl:
            env["BELUGA_CRC_IMPL"] = impl
        out = subprocess.run([sys.executable, "-c", script, pool_path, step], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        impls.append(out.stdout.strip())
    assert impls[0] == impls[3] == "zlib"
    assert impls[1] == impls[2] == _expected_default(), "the default is the fast path wherever ISA-L is installed"


def _expected_default() -> str:
    """What the store must pick without BELUGA_CRC_IMPL: ISA-L where the package is installed.
    CI installs the test extra (isal), so there a silent fallback to zlib fails instead."""
    try:
        import isal.isal_zlib  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI=true but the isal package is missing: the test extra installs it (pyproject.toml)")
        return "zlib"
    return "isal"


def test_the_fast_crc_path_is_the_one_in_use():
    """The checks above pass with either implementation; this one says which ran."""
    if os.environ.get("BELUGA_CRC_IMPL", "").lower() == "zlib":
        assert C.IMPLEMENTATION == "zlib" and C.crc32 is zlib.crc32
        return
    want = _expected_default()
    assert C.IMPLEMENTATION == want
    if want == "isal":
        from isal import isal_zlib

        assert C.crc32 is isal_zlib.crc32


def test_get_many_into_verifies_every_block_without_a_round_trip(store):
    c = store.client()
    keys = [name_key(f"m{i}") for i in range(4)]
    blocks = [os.urandom(1000 * (i + 1)) for i in range(3)]
    c.put_many(list(zip(keys[:3], blocks)))
    outs = [bytearray(5000) for _ in keys]
    calls = c.client_stats().rpc_calls
    assert c.get_many_into(keys, outs) == [1000, 2000, 3000, None]
    assert c.client_stats().rpc_calls == calls  # found through the pool's lookup table
    assert all(bytes(o[: len(b)]) == b for o, b in zip(outs, blocks))
    # A damaged block in the batch is a miss (counted and reported), the others still load.
    loc = c._lookup([keys[1]], 0)[0]
    c.buf[loc.data_offset + 10] ^= 0xFF
    written_back(c.buf, loc.data_offset + 10, 1)
    assert c.get_many_into(keys[:3], outs[:3]) == [1000, None, 3000]
    assert c.client_stats().corrupt_misses == 1 and not c.contains(keys[1])
    with pytest.raises(ValueError, match="only"):
        c.get_many_into([keys[2]], [bytearray(10)])
    with pytest.raises(ValueError, match="writable"):
        c.get_many_into([keys[0]], [b"read-only"])
    with pytest.raises(ValueError, match="2 keys but 1"):
        c.get_many_into(keys[:2], outs[:1])
    c.flush_releases()
    assert store.service.stats()["leases"] == 0


def test_header_fast_check_matches_the_full_decode():
    key = name_key("h")
    raw = L.BlockHeader(L.BLOCK_COMPLETE, 100, 7, 0xDEADBEEF, 3, key).encode()
    assert L.block_header_matches(raw, key, 7, 100, 0xDEADBEEF)
    assert not L.block_header_matches(raw, key, 8, 100, 0xDEADBEEF)
    assert not L.block_header_matches(raw, name_key("other"), 7, 100, 0xDEADBEEF)
    writing = L.BlockHeader(L.BLOCK_WRITING, 100, 7, 0xDEADBEEF, 3, key).encode()
    assert not L.block_header_matches(writing, key, 7, 100, 0xDEADBEEF)
    torn = bytearray(raw)
    torn[40] ^= 1  # inside the key: the header's own CRC no longer matches
    assert L.BlockHeader.decode(bytes(torn)) is None and not L.block_header_matches(bytes(torn), key, 7, 100, 0xDEADBEEF)
