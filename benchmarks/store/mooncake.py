"""Mooncake Store as a benchmark peer: its master, a node holding the memory, and a client.

Mooncake Store (PyPI ``mooncake-transfer-engine-non-cuda``, the ``bench``
extra) is the KV-cache store that vLLM and SGLang deployments use; here it
runs as it would on one CPU-only machine, every part on 127.0.0.1:

* ``mooncake_master`` (shipped in the wheel): the metadata service, which
  places objects in the segments that nodes mount;
* one *holder* process (``python -m benchmarks.store.mooncake hold``), a store
  client that mounts one global segment large enough for the whole working
  set and otherwise only serves it, as a Mooncake store node does;
* the measuring workers: clients that mount no segment, so every get and put
  moves the block over the transfer engine's "tcp" protocol between two
  processes, as a Redis GET does between client and server. Blocks are read
  into buffers registered with the engine (``get_into``, ``batch_get_into``),
  the fastest path a Python caller has.

The metadata handshake is Mooncake's ``P2PHANDSHAKE`` (no etcd or HTTP
metadata server); ``MC_TCP_BIND_ADDRESS=127.0.0.1`` keeps the transfer
engine's listening sockets on loopback, and ``MC_LOG_LEVEL=ERROR`` keeps its
informational log lines off the benchmark's stderr.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .children import stop as stop_child

WHEEL = "mooncake-transfer-engine-non-cuda"
INSTALL_HINT = f"pip install -e '.[bench]' (the `{WHEEL}` wheel; `make setup` installs it)"
OBJECT_NOT_FOUND = -704
"""Mooncake's ErrorCode::OBJECT_NOT_FOUND, what a get of an absent key returns."""


class MooncakeUnavailable(RuntimeError):
    """Mooncake Store cannot run here; the message says why and what to do."""


def client_env(env: dict | None = None) -> dict:
    """The environment every Mooncake process of the benchmark runs with."""
    env = dict(os.environ if env is None else env)
    env["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
    env.setdefault("MC_LOG_LEVEL", os.environ.get("MC_LOG_LEVEL", "ERROR"))
    return env


def master_executable() -> str:
    """The ``mooncake_master`` binary inside the installed wheel (not its Python wrapper)."""
    try:
        spec = importlib.util.find_spec("mooncake")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MooncakeUnavailable(f"{WHEEL} is not installed ({INSTALL_HINT})")
    for folder in spec.submodule_search_locations:
        exe = Path(folder) / "mooncake_master"
        if exe.is_file():
            if not os.access(exe, os.X_OK):
                raise MooncakeUnavailable(f"{exe} is not executable (reinstall: {INSTALL_HINT})")
            return str(exe)
    raise MooncakeUnavailable(f"the installed mooncake package has no mooncake_master binary "
                              f"(it is not {WHEEL}?; {INSTALL_HINT})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


class MooncakeServer:
    """``mooncake_master`` and one holder node on loopback; ``stop()`` ends both (always call it)."""

    def __init__(self, tmp: Path, *, segment_bytes: int, master_exe: str | None = None,
                 start_timeout_s: float = 60.0) -> None:
        self.master = self.holder = None
        self.segment_bytes = segment_bytes
        exe = master_exe or master_executable()
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.master_log = tmp / "mooncake-master.log"
        self.holder_log = tmp / "mooncake-holder.log"
        env = client_env()
        try:
            with open(self.master_log, "wb") as log:
                self.master = subprocess.Popen(
                    [exe,
                     f"--rpc_port={self.port}",
                     "--rpc_address=127.0.0.1",
                     # Its HTTP metrics server listens on 0.0.0.0:9003 by default: a second
                     # benchmark on the host would collide with it.
                     "--metrics_host=127.0.0.1",
                     f"--metrics_port={_free_port()}",
                     # A client silent for client_ttl (default 10 s) is dropped with its segment;
                     # on a shared two-core machine a starved process can miss heartbeats that long.
                     "--client_ttl=60"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + start_timeout_s
            self._wait_listening(deadline)
            root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            with open(self.holder_log, "wb") as log:
                self.holder = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.store.mooncake", "hold", self.address, str(segment_bytes)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
            self._wait_holder(deadline)
        except BaseException:
            self.stop()  # never leave a master or a holder behind
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self.master, self.holder) if p is not None]

    def _wait_listening(self, deadline: float) -> None:
        while True:
            if self.master.poll() is not None:
                raise MooncakeUnavailable(f"mooncake_master exited with status {self.master.returncode} before "
                                          f"it listened on {self.address}: {_tail(self.master_log) or 'no output'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise MooncakeUnavailable(f"mooncake_master did not listen on {self.address}: "
                                          f"{_tail(self.master_log) or 'no output'}")
            time.sleep(0.05)

    def _wait_holder(self, deadline: float) -> None:
        out = self.holder.stdout
        while True:
            ready, _, _ = select.select([out], [], [], max(0.0, min(1.0, deadline - time.monotonic())))
            if ready:
                line = out.readline().decode(errors="replace").strip()
                if line == "ready":
                    return
                if line:
                    raise MooncakeUnavailable(f"the Mooncake store node did not start: {line}")
            if self.holder.poll() is not None:
                raise MooncakeUnavailable(f"the Mooncake store node exited with status {self.holder.returncode}: "
                                          f"{_tail(self.holder_log) or 'no output'}")
            if time.monotonic() > deadline:
                raise MooncakeUnavailable(f"the Mooncake store node did not mount its segment in time: "
                                          f"{_tail(self.holder_log) or 'no output'}")

    def stop(self) -> None:
        if self.holder is not None:
            try:
                self.holder.stdin.close()  # the holder's signal to unmount and exit
            except OSError:
                pass
            try:
                self.holder.wait(10)
            except subprocess.TimeoutExpired:
                pass
            stop_child(self.holder)
            self.holder.stdout.close()
        stop_child(self.master)


class MooncakeClient:
    """One measuring process's MooncakeDistributedStore: no segment of its own, reads into registered buffers."""

    def __init__(self, master: str, *, local_buffer_bytes: int) -> None:
        os.environ.update(client_env({}))
        from mooncake.store import MooncakeDistributedStore

        self.store = MooncakeDistributedStore()
        # Setup logs an error-level line even when all is well ("Local segment descriptor not
        # found": this client mounts no segment); keep its log for when setup does fail.
        with tempfile.TemporaryFile() as log:
            saved = os.dup(2)
            os.dup2(log.fileno(), 2)
            try:
                rc = self.store.setup("127.0.0.1", "P2PHANDSHAKE", 0, local_buffer_bytes, "tcp", "", master)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            if rc != 0:
                log.seek(0)
                last = log.read().decode(errors="replace").strip().splitlines()[-2:]
                raise RuntimeError(f"Mooncake client setup against {master} returned {rc}: {' | '.join(last)}")
        self._buffers: dict[tuple[int, int], tuple[bytearray, int]] = {}

    def buffer(self, block_bytes: int, count: int = 1) -> tuple[bytearray, int]:
        """A buffer of ``count`` blocks registered with the transfer engine, and its address."""
        got = self._buffers.get((block_bytes, count))
        if got is None:
            buf = bytearray(block_bytes * count)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            rc = self.store.register_buffer(addr, len(buf))
            if rc != 0:
                raise RuntimeError(f"Mooncake register_buffer of {len(buf)} bytes returned {rc}")
            got = self._buffers[(block_bytes, count)] = (buf, addr)
        return got

    def put(self, key: str, data) -> None:
        """Write ``data`` under ``key``, replacing any value (``upsert``: a ``put`` of a present key writes nothing)."""
        rc = self.store.upsert(key, data)
        if rc != 0:
            raise RuntimeError(f"Mooncake upsert of {key} returned {rc}")

    def get_into(self, key: str, addr: int, size: int) -> int | None:
        n = self.store.get_into(key, addr, size)
        if n == OBJECT_NOT_FOUND:
            return None
        if n < 0:
            raise RuntimeError(f"Mooncake get_into of {key} returned {n}")
        return n

    def get_many_into(self, keys: list[str], addr: int, size: int) -> list[int | None]:
        got = self.store.batch_get_into(keys, [addr + i * size for i in range(len(keys))], [size] * len(keys))
        out: list[int | None] = []
        for key, n in zip(keys, got):
            if n < 0 and n != OBJECT_NOT_FOUND:
                raise RuntimeError(f"Mooncake batch_get_into of {key} returned {n}")
            out.append(None if n < 0 else n)
        return out

    def exists(self, key: str) -> bool:
        rc = self.store.is_exist(key)
        if rc < 0:
            raise RuntimeError(f"Mooncake is_exist of {key} returned {rc}")
        return rc == 1

    def close(self) -> None:
        for buf, addr in self._buffers.values():
            self.store.unregister_buffer(addr)
        self._buffers.clear()
        self.store.close()


def _hold(master: str, segment_bytes: int) -> int:
    """The holder node: mount one global segment, say "ready", serve until stdin closes."""
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", "P2PHANDSHAKE", segment_bytes, 16 << 20, "tcp", "", master)
    if rc != 0:
        print(f"setup of a {segment_bytes >> 20} MiB segment against {master} returned {rc}", flush=True)
        return 1
    print("ready", flush=True)
    try:
        sys.stdin.buffer.read()  # EOF: the benchmark is done
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "hold":
        sys.exit(_hold(sys.argv[2], int(sys.argv[3])))
    sys.exit("usage: python -m benchmarks.store.mooncake hold MASTER_ADDRESS SEGMENT_BYTES")
