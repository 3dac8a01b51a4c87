"""What the guests need: no torch, no testbed, plain python3 + numpy, devdax-style access."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from beluga_store_support import REPO, subprocess_env

PKG = REPO / "beluga"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_package_imports_nothing_from_testbed_and_torch_only_in_the_tensor_module():
    files = sorted(PKG.glob("*.py"))
    assert len(files) >= 10
    for f in files:
        names = _imports(f)
        assert "testbed" not in names, f
        if f.name != "tensor.py":
            assert "torch" not in names, f


def test_whole_store_works_without_torch(pool_path, tmp_path):
    """Block torch the way a guest lacks it, then format, serve, put and get."""
    script = textwrap.dedent(f"""
        import sys, threading
        sys.modules["torch"] = None  # any 'import torch' now raises ImportError
        import beluga, beluga.cli, beluga.client, beluga.service, beluga.cxlrpc, beluga.tcprpc, beluga.report
        from beluga.pool import format_pool
        from beluga.service import ServiceConfig, ServiceThread
        from beluga.client import BelugaClient
        from beluga.keys import prefix_keys
        format_pool({pool_path!r}, size_bytes=8 << 20, segment_size_bytes=256 << 10, max_clients=4,
                    rpc_buffer_bytes=8192)
        t = ServiceThread({pool_path!r}, ServiceConfig(takeover_wait_s=0))
        with BelugaClient({pool_path!r}) as c:
            keys = prefix_keys(list(range(64)))
            c.put_many([(k, k * 100) for k in keys])
            assert c.get_many(keys) == [k * 100 for k in keys]
            assert c.lookup_prefix(keys) == 4
        t.stop()
        try:
            import beluga.tensor as bt
            bt.KVBlockSpec(1, 1, 1).nbytes
        except ImportError:
            print("tensor api needs torch: ok")
        print("guest ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "guest ok" in out.stdout and "tensor api needs torch: ok" in out.stdout


def test_the_store_cli_works_without_the_benchmarks_package(pool_path):
    """A guest gets the beluga package alone (no benchmarks/): the CLI still formats and
    reports, and `beluga bench` says what is missing instead of a traceback."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["benchmarks"] = None  # as in a guest: 'import benchmarks' raises ImportError
        from beluga import cli
        assert cli.main(["format", {pool_path!r}, "--size", "8M", "--segment-size", "256K"]) == 0
        sys.exit(cli.main(["bench", "--quick"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "beluga bench: the benchmarks package is not installed here" in out.stderr


def test_pool_access_is_mmap_only(pool_path, monkeypatch):
    """devdax refuses read()/write(): the pool code must never use them on the pool."""
    import os

    from beluga.pool import Pool
    from beluga_store_support import make_pool

    make_pool(pool_path)
    fds = set()
    opened = []
    real_open = os.open

    def tracking_open(path, flags, *a, **kw):
        fd = real_open(path, flags, *a, **kw)
        if os.fspath(path) == pool_path:
            fds.add(fd)
            opened.append(fd)
        return fd

    def refuse(name):
        real = getattr(os, name)

        def wrapped(fd, *a, **kw):
            assert fd not in fds, f"os.{name} on the pool fd (devdax gives EINVAL)"
            return real(fd, *a, **kw)

        return wrapped

    real_close = os.close

    def tracking_close(fd):
        fds.discard(fd)  # the number may be reused for another file (the sanitizer's side table)
        return real_close(fd)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "close", tracking_close)
    for name in ("read", "write", "pread", "pwrite"):
        monkeypatch.setattr(os, name, refuse(name))
    import builtins

    real_builtin_open = builtins.open

    def guarded_open(file, *a, **kw):
        assert os.fspath(file) != pool_path, "builtins.open on the pool"
        return real_builtin_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded_open)
    from beluga.client import local_client
    from beluga.service import MetadataService, ServiceConfig

    with Pool.open(pool_path) as pool:
        svc = MetadataService(pool, ServiceConfig(takeover_wait_s=0))
        c = local_client(svc)
        c.put(b"k" * 32, b"v" * 5000)
        assert c.get(b"k" * 32) == b"v" * 5000
        c._closed = True
    assert opened
