"""The per-pool flush policy (docs/coherence.md): when the store writes back and invalidates."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from beluga import coherence as C
from beluga.client import local_client
from beluga.pool import Pool
from beluga.service import MetadataService, ServiceConfig
from beluga_store_support import make_pool, subprocess_env

_sanitized = C.env_mode() != "off"


def test_auto_is_on_for_devices_and_off_for_files_and_the_sanitizer_always_flushes():
    assert C.resolve_policy("auto", is_devdax=True, sanitized=False) == "on"
    assert C.resolve_policy("auto", is_devdax=False, sanitized=False) == "off"
    assert C.resolve_policy("on", is_devdax=False, sanitized=False) == "on"
    assert C.resolve_policy("off", is_devdax=True, sanitized=False) == "off"
    assert C.resolve_policy("off", is_devdax=False, sanitized=True) == "on"
    with pytest.raises(ValueError, match="flush policy 'sometimes': expected one of auto, on, off"):
        C.resolve_policy("sometimes", is_devdax=False, sanitized=False)


@pytest.mark.skipif(_sanitized, reason="a sanitized pool always flushes: this test is about plain pools")
def test_a_file_pool_does_not_flush_unless_told_and_its_accessors_then_flush(pool_path, monkeypatch):
    make_pool(pool_path)
    with Pool.open(pool_path) as pool:
        assert pool.flush_policy == "off" and not C.ACTIVE
        assert pool.flush_status() == "flush policy off (a file: one host's page cache is coherent)"
    monkeypatch.setenv("BELUGA_FLUSH_POLICY", "on")
    with Pool.open(pool_path) as pool:
        assert pool.flush_policy == "on"
        assert C.ACTIVE == C.can_flush()
        if C.can_flush():
            assert pool.flush_status() == f"flush policy on ({C.flush_method()})"
            # the client's reader (C when built: it flushes in C) gives the same answers
            svc = MetadataService(pool, ServiceConfig(takeover_wait_s=0))
            c = local_client(svc)
            before = C.sites()
            c.put(b"k" * 32, b"v" * 5000)
            assert c.get(b"k" * 32) == b"v" * 5000
            used = C.sites() - before
            assert {("writeback", "block data"), ("writeback", "block header"), ("writeback", "table bucket"),
                    ("invalidate", "block header"), ("writeback", "index entry")} <= used | before
            assert c.lookup_prefix([b"k" * 32, b"x" * 32]) == 1 and c.get_into(b"k" * 32, bytearray(6000)) == 5000
            c.flush_releases()  # the service drains the touches the reader posted (and wrote back)
            c._closed = True  # noqa: SLF001 - the service goes with the pool
    assert not C.ACTIVE
    monkeypatch.setenv("BELUGA_FLUSH_POLICY", "often")
    with pytest.raises(ValueError, match="BELUGA_FLUSH_POLICY='often': expected one of auto, on, off"):
        Pool.open(pool_path)


def test_stat_says_which_policy_is_in_force(pool_path):
    make_pool(pool_path)
    env = subprocess_env()
    env.pop("BELUGA_COHERENCE", None)
    env["BELUGA_FLUSH_POLICY"] = "off"
    out = subprocess.run([sys.executable, "-m", "beluga.cli", "stat", pool_path], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "  flush policy off (a file: one host's page cache is coherent)\n" in out
    env["BELUGA_FLUSH_POLICY"] = "on"
    got = json.loads(subprocess.run([sys.executable, "-m", "beluga.cli", "stat", pool_path, "--json"],
                                    capture_output=True, text=True, env=env, check=True).stdout)
    assert got["coherence"]["flush_policy"] == "on"
    assert got["coherence"]["flush_status"].startswith("flush policy on")
