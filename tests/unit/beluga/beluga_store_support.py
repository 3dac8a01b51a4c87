"""Helpers for the Beluga store tests: pools under /dev/shm, services, clients.

Imported by name from the tests (a unique module name, unlike `conftest`, so it
cannot collide with other test directories' conftest modules).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from beluga import coherence
from beluga.client import local_client
from beluga.layout import KiB
from beluga.pool import Pool, format_pool
from beluga.service import MetadataService, ServiceConfig

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("_store_worker.py")
SHM = "/dev/shm"


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@contextmanager
def no_hang(what: str, seconds: int = 60):
    """Fail, rather than hang the suite, when the block never returns.

    A guard against a hang, not a speed check: the calls it wraps end in well under a
    second (their own timeouts say so), and the bound is far above any machine's noise.
    """
    def hung(signum, frame):
        raise AssertionError(f"{what} hung: it had not returned after {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class FakeClock:
    """The service's clock, advanced by hand: lease/heartbeat expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def pool_path():
    path = os.path.join(SHM, f"beluga-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.pool")
    yield path
    for p in (path, path + ".tmp", path + ".coherence"):  # .coherence: the sanitizer's side table
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


SMALL = dict(size_bytes=8 << 20, segment_size_bytes=256 * KiB, max_clients=8, rpc_buffer_bytes=16 * KiB)


def written_back(buf, off: int, n: int) -> None:
    """A test wrote pool bytes directly (damage, a crafted record, another writer): write them back
    and fence, as the store does with its own writes, so that under the coherence sanitizer
    (BELUGA_COHERENCE=check) the other hosts, and this one's next invalidate, see them."""
    coherence.writeback(buf, off, n, "test")
    coherence.fence("test")


def make_pool(path: str, **overrides):
    kw = dict(SMALL)
    kw.update(overrides)
    return format_pool(path, **kw)


class LocalStore:
    """A formatted pool + an in-process service on a fake clock + helpers to make clients."""

    def __init__(self, path: str, config: ServiceConfig | None = None, **fmt) -> None:
        self.path = path
        make_pool(path, **fmt)
        self.clock = FakeClock()
        self.config = config or ServiceConfig(takeover_wait_s=0, heartbeat_timeout_s=3.0, lease_ttl_s=10.0,
                                              reservation_ttl_s=30.0)
        self.pool = Pool.open(path)
        self.service = MetadataService(self.pool, self.config, clock=self.clock)
        self.clients = []

    def client(self, **kw):
        c = local_client(self.service, **kw)
        self.clients.append(c)
        return c

    def restart(self) -> None:
        """Drop the service object (as if killed -9) and recover a new one from the pool."""
        self.service = MetadataService(self.pool, self.config, clock=self.clock)
        for c in self.clients:
            c.channel.service = self.service

    def close(self) -> None:
        for c in self.clients:
            c._closed = True
        self.pool.close()


@pytest.fixture
def store(pool_path):
    s = LocalStore(pool_path)
    yield s
    s.close()


class ServiceProcess:
    """`beluga serve` in a child process, killable with SIGKILL."""

    def __init__(self, pool: str, tmp: Path, *, transport: str = "both", extra=(), preexec_fn=None) -> None:
        self.pool = pool
        self.tmp = tmp
        self.transport = transport
        self.extra = list(extra)
        self.preexec_fn = preexec_fn  # runs in the child before exec (e.g. setrlimit)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, *, wait: bool = True, timeout_s: float = 30.0) -> dict | None:
        self.starts += 1
        ready = self.tmp / f"ready-{self.starts}.json"
        log = open(self.tmp / f"service-{self.starts}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "beluga.cli", "serve", self.pool, "--transport", self.transport,
             "--ready-file", str(ready), "--takeover-wait", "0.3", *self.extra],
            stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), preexec_fn=self.preexec_fn,
        )
        log.close()
        if not wait:
            return None
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not ready after {timeout_s}s: {self.log()}")
            time.sleep(0.02)
        return json.loads(ready.read_text())

    def log(self) -> str:
        return (self.tmp / f"service-{self.starts}.log").read_text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def service_process(pool_path, tmp_path):
    procs = []

    def start(*, transport="both", extra=(), preexec_fn=None, **fmt):
        make_pool(pool_path, **fmt)
        sp = ServiceProcess(pool_path, tmp_path, transport=transport, extra=extra, preexec_fn=preexec_fn)
        procs.append(sp)
        sp.start()
        return sp

    yield start
    for sp in procs:
        sp.kill()


def spawn_worker(*args, log: Path) -> subprocess.Popen:
    fh = open(log, "a")
    try:
        return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stdout=fh, stderr=subprocess.STDOUT,
                                env=subprocess_env())
    finally:
        fh.close()
