"""Block-level benchmark workers: the store (pool RPC and TCP), Redis and Mooncake Store over loopback, memcpy.

Each measuring process is a ``Worker`` (a child process started with the
``spawn`` method, so it shares nothing with the parent but the pool file). The
parent sends it tasks through a pipe; every task names a wall-clock start time
so that the workers of one measurement start together, runs for a fixed
duration and sends back the per-operation latencies and byte counts.
"""
from __future__ import annotations

import array
import multiprocessing as mp
import os
import socket
import time

from beluga.keys import name_key

KiB = 1024
MiB = 1024 * KiB
BATCH = 8
"""Blocks per call in the batched get (``get_many_into``; Redis: MGET): a 128-token prefix of 16-token blocks."""
PREFIX = 64
"""Keys per ``lookup_prefix`` in the prefix op: a 1024-token prompt of 16-token blocks, every key a hit."""


def block_keys(block_bytes: int, count: int) -> list[bytes]:
    """The working set of one block size: the same 32-byte keys in the pool and in Redis."""
    return [name_key(f"bench-{block_bytes}-{i}") for i in range(count)]


# ---------------------------------------------------------------- a minimal Redis client
class RespClient:
    """GET/SET/EXISTS over RESP2 on one TCP connection, no pipelining.

    As lean as a Python client gets (the best case for the Redis baseline):
    values are sent with ``sendmsg`` straight from the caller's buffer and
    received with ``recv_into`` straight into the caller's buffer, and the
    client polls its socket for the answer as the store's client polls the pool.
    """

    def __init__(self, host: str, port: int, *, timeout_s: float = 10.0, busy_poll_s: float = 0.0005) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout_s = timeout_s
        self.busy_poll_s = busy_poll_s
        if busy_poll_s:
            self.sock.setblocking(False)
        self._buf = bytearray(64 * KiB)
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def _recv_into(self, dest) -> int:
        """recv_into that first polls the socket for ``busy_poll_s`` (yielding the CPU), then blocks.

        Like the store's client, which polls pool memory for its answer: without it
        every Redis round trip would also pay for waking a sleeping process, which
        on a VM's idle cores costs tens of microseconds.
        """
        if not self.busy_poll_s:
            return self.sock.recv_into(dest)
        spin_until = time.monotonic() + self.busy_poll_s
        while True:
            try:
                return self.sock.recv_into(dest)
            except BlockingIOError:
                pass
            if time.monotonic() < spin_until:
                os.sched_yield()
                continue
            import select

            if not select.select([self.sock], [], [], self.timeout_s)[0]:
                raise TimeoutError(f"redis did not answer within {self.timeout_s}s")

    def _send(self, *parts) -> None:
        """Send every byte of ``parts`` (blocking while sending; values go out without being joined)."""
        self.sock.settimeout(self.timeout_s)
        try:
            views = [memoryview(p).cast("B") for p in parts]
            while views:
                sent = self.sock.sendmsg(views)
                while views and sent >= views[0].nbytes:
                    sent -= views[0].nbytes
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]
        finally:
            if self.busy_poll_s:
                self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    def _line(self) -> bytes:
        while True:
            at = self._buf.find(b"\r\n", self._start, self._end)
            if at >= 0:
                line = bytes(self._buf[self._start : at])
                self._start = at + 2
                return line
            if self._start:
                n = self._end - self._start
                self._buf[:n] = self._buf[self._start : self._end]
                self._start, self._end = 0, n
            got = self._recv_into(self._mv[self._end :])
            if not got:
                raise ConnectionError("redis closed the connection")
            self._end += got

    def _read_into(self, dest: memoryview) -> None:
        n = dest.nbytes
        have = min(n, self._end - self._start)
        dest[:have] = self._mv[self._start : self._start + have]
        self._start += have
        while have < n:
            got = self._recv_into(dest[have:])
            if not got:
                raise ConnectionError("redis closed the connection")
            have += got

    def _skip_crlf(self) -> None:
        self._read_into(memoryview(bytearray(2)))

    @staticmethod
    def _cmd(*parts: bytes, value_len: int | None = None) -> bytes:
        n = len(parts) + (value_len is not None)
        out = [b"*%d\r\n" % n]
        for p in parts:
            out.append(b"$%d\r\n%s\r\n" % (len(p), p))
        if value_len is not None:
            out.append(b"$%d\r\n" % value_len)
        return b"".join(out)

    def set(self, key: bytes, value) -> None:
        mv = memoryview(value).cast("B")
        self._send(self._cmd(b"SET", key, value_len=mv.nbytes), mv, b"\r\n")
        line = self._line()
        if line != b"+OK":
            raise RuntimeError(f"redis SET answered {line!r}")

    def get_into(self, key: bytes, dest: memoryview) -> int | None:
        self._send(self._cmd(b"GET", key))
        line = self._line()
        if line[:1] != b"$":
            raise RuntimeError(f"redis GET answered {line!r}")
        n = int(line[1:])
        if n < 0:
            return None
        self._read_into(dest[:n])
        self._skip_crlf()
        return n

    def mget_into(self, keys, dests) -> list[int | None]:
        self._send(self._cmd(b"MGET", *keys))
        line = self._line()
        if line[:1] != b"*" or int(line[1:]) != len(keys):
            raise RuntimeError(f"redis MGET answered {line!r}")
        out = []
        for dest in dests:
            line = self._line()
            n = int(line[1:])
            if n < 0:
                out.append(None)
                continue
            self._read_into(dest[:n])
            self._skip_crlf()
            out.append(n)
        return out

    def exists(self, key: bytes) -> bool:
        self._send(self._cmd(b"EXISTS", key))
        line = self._line()
        if line[:1] != b":":
            raise RuntimeError(f"redis EXISTS answered {line!r}")
        return int(line[1:]) > 0

    def command(self, *parts: bytes) -> bytes:
        self._send(self._cmd(*parts))
        return self._line()


# ---------------------------------------------------------------- the measuring process
def _touch(buf) -> None:
    """Fault in every page of the pool mapping once (a long-running server has done so long ago)."""
    try:
        import numpy as np

        a = np.frombuffer(buf, dtype=np.uint8)
        int(a[:: 4096].sum())
        del a
    except ImportError:
        for off in range(0, len(buf), 4096):
            buf[off]


def _memcpy(buffer_bytes: int, duration_s: float) -> dict:
    import numpy as np

    src = np.ones(buffer_bytes, dtype=np.uint8)
    dst = np.zeros(buffer_bytes, dtype=np.uint8)
    np.copyto(dst, src)
    copied, t0 = 0, time.perf_counter()
    lat = array.array("d")
    while True:
        a = time.perf_counter()
        np.copyto(dst, src)
        b = time.perf_counter()
        lat.append(b - a)
        copied += buffer_bytes
        if b - t0 >= duration_s:
            break
    return {"bytes": copied, "ops": len(lat), "hits": len(lat), "t0": t0, "t1": b, "lat": lat.tobytes()}


def _memcpy_blocks(block_bytes: int, set_bytes: int, duration_s: float) -> dict:
    """Copy block-sized pieces out of a buffer larger than the caches into one reused destination."""
    import numpy as np

    src = np.ones(set_bytes, dtype=np.uint8)
    dst = np.zeros(block_bytes, dtype=np.uint8)
    n = set_bytes // block_bytes
    copied, i, t0 = 0, 0, time.perf_counter()
    while True:
        at = (i % n) * block_bytes
        np.copyto(dst, src[at : at + block_bytes])
        copied += block_bytes
        i += 1
        if i % 64 == 0 and time.perf_counter() - t0 >= duration_s:
            break
    t1 = time.perf_counter()
    return {"bytes": copied, "ops": i, "hits": i, "t0": t0, "t1": t1, "lat": b""}


class _State:
    def __init__(self, wid: int, pool: str | None, redis_port: int | None, mooncake: dict | None = None) -> None:
        self.wid = wid
        self.pool = pool
        self.redis_port = redis_port
        self.mooncake_config = mooncake
        self.clients: dict[str, object] = {}
        self.redis: RespClient | None = None
        self.mc = None
        self.payloads: dict[int, bytes] = {}
        self.outs: dict[int, bytearray] = {}

    def client(self, transport: str):
        c = self.clients.get(transport)
        if c is None:
            from beluga.client import BelugaClient

            c = BelugaClient(self.pool, transport=transport, rpc_timeout_s=30.0)
            if len(self.clients) == 0:
                _touch(c.buf)
            self.clients[transport] = c
        return c

    def rds(self) -> RespClient:
        if self.redis is None:
            self.redis = RespClient("127.0.0.1", self.redis_port)
        return self.redis

    def mooncake(self):
        if self.mc is None:
            from .mooncake import MooncakeClient

            self.mc = MooncakeClient(self.mooncake_config["master"],
                                     local_buffer_bytes=self.mooncake_config["local_buffer_bytes"])
        return self.mc

    def payload(self, n: int) -> bytes:
        if n not in self.payloads:
            self.payloads[n] = os.urandom(n)
        return self.payloads[n]

    def out(self, n: int) -> bytearray:
        if n not in self.outs:
            self.outs[n] = bytearray(n)
        return self.outs[n]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        if self.redis is not None:
            self.redis.close()
        if self.mc is not None:
            self.mc.close()


def _op(state: _State, system: str, op: str, block_bytes: int):
    """-> a function(key) -> (bytes moved, hit) for one operation."""
    if system == "redis":
        r = state.rds()
        if op == "put":
            data = state.payload(block_bytes)
            return lambda k: (r.set(k, data), (block_bytes, True))[1]
        if op in ("get", "get_into"):
            out = memoryview(state.out(block_bytes))

            def rget(k):
                n = r.get_into(k, out)
                return (n or 0, n is not None)

            return rget
        if op == "get_batch":
            outs = [memoryview(bytearray(block_bytes)) for _ in range(BATCH)]

            def rmget(ks):
                got = r.mget_into(ks, outs)
                return (sum(n or 0 for n in got), all(n is not None for n in got))

            return rmget
        if op == "lookup":
            return lambda k: (0, r.exists(k))
    elif system == "mooncake":
        # Mooncake's keys are strings: the same 32-byte keys, in hex.
        mc = state.mooncake()
        if op == "put":
            data = state.payload(block_bytes)
            return lambda k: (mc.put(k.hex(), data), (block_bytes, True))[1]
        if op in ("get", "get_into"):
            _, addr = mc.buffer(block_bytes)

            def mget(k):
                n = mc.get_into(k.hex(), addr, block_bytes)
                return (n or 0, n is not None)

            return mget
        if op == "get_batch":
            _, addr = mc.buffer(block_bytes, BATCH)

            def mbatch(ks):
                got = mc.get_many_into([k.hex() for k in ks], addr, block_bytes)
                return (sum(n or 0 for n in got), all(n is not None for n in got))

            return mbatch
        if op == "lookup":
            return lambda k: (0, mc.exists(k.hex()))
    elif system == "bare":
        # The get's copy + CRC alone, over the same pool mapping, at offsets (not keys) given by the
        # parent: the machine's own limit for this access pattern, with no store around it.
        from beluga import readpath

        buf = state.client("cxl").buf
        dest = memoryview(state.out(block_bytes))

        def bare(off):
            readpath.copy_crc(dest, buf[off : off + block_bytes])
            return (block_bytes, True)

        return bare
    else:
        c = state.client(system)
        if op == "put":
            data = state.payload(block_bytes)
            return lambda k: (c.put(k, data), (block_bytes, True))[1]
        if op == "get":
            def get(k):
                d = c.get(k)
                return (0, False) if d is None else (len(d), True)

            return get
        if op == "get_into":
            out = state.out(block_bytes)

            def get_into(k):
                n = c.get_into(k, out)
                return (n or 0, n is not None)

            return get_into
        if op == "get_batch":
            outs = [bytearray(block_bytes) for _ in range(BATCH)]

            def get_batch(ks):
                got = c.get_many_into(ks, outs)
                return (sum(n or 0 for n in got), all(n is not None for n in got))

            return get_batch
        if op == "lookup":
            return lambda k: (0, c.lookup_prefix([k]) == 1)
        if op == "prefix":
            return lambda ks: (0, c.lookup_prefix(ks) == len(ks))
        if op == "nop":
            return lambda k: (c.ping(), (0, True))[1]
    raise ValueError(f"unknown system/op {system}/{op}")


def _run(state: _State, task: dict) -> dict:
    kind = task["kind"]
    if kind == "memcpy":
        return _memcpy(task["buffer_bytes"], task["duration_s"])
    if kind == "memcpy_blocks":
        return _memcpy_blocks(task["block_bytes"], task["set_bytes"], task["duration_s"])
    size = task["block_bytes"]
    keys = task["keys"]
    if kind == "fill":
        fn = _op(state, task["system"], "put", size)
        for k in keys:
            fn(k)
        return {"ops": len(keys)}
    fn = _op(state, task["system"], task["op"], size)
    # A different, fixed order per worker: workers do not read the same block at the same moment.
    order = list(keys)
    import random

    random.Random(1000 + state.wid).shuffle(order)
    if task["op"].endswith("_batch"):
        order = [order[j : j + BATCH] for j in range(0, len(order) - BATCH + 1, BATCH)]
    elif task["op"] == "prefix":
        order = [order[j : j + PREFIX] for j in range(0, len(order) - PREFIX + 1, PREFIX)]
    fn(order[0])  # warm the code path
    start_at = task["start_at"]
    while time.time() < start_at:
        time.sleep(min(0.001, max(0.0, start_at - time.time())))
    lat = array.array("d")
    moved = hits = 0
    n = len(order)
    i = 0
    deadline = time.perf_counter() + task["duration_s"]
    t0 = pc = time.perf_counter()
    while pc < deadline:
        k = order[i % n]
        fn_res = fn(k)
        b = time.perf_counter()
        lat.append(b - pc)
        pc = b
        moved += fn_res[0]
        hits += fn_res[1]
        i += 1
    return {"bytes": moved, "ops": i, "hits": hits, "t0": t0, "t1": pc, "lat": lat.tobytes()}


def _worker_main(wid: int, pool: str | None, redis_port: int | None, conn, mooncake: dict | None = None) -> None:
    state = _State(wid, pool, redis_port, mooncake)
    try:
        while True:
            task = conn.recv()
            if task is None:
                break
            try:
                conn.send(("ok", _run(state, task)))
            except Exception as exc:  # report, keep serving: the parent decides
                import traceback

                conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        state.close()
        conn.close()


class Workers:
    """``n`` measuring processes that run the same task together."""

    def __init__(self, n: int, *, pool: str | None, redis_port: int | None, mooncake: dict | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        for wid in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(wid, pool, redis_port, child, mooncake), daemon=True,
                            name=f"beluga-bench-{wid}")
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)

    def __len__(self) -> int:
        return len(self.procs)

    def run(self, tasks: list[dict], *, timeout_s: float = 300.0) -> list[dict]:
        for conn, task in zip(self.conns, tasks):
            conn.send(task)
        out = []
        failed = None
        for conn in self.conns:
            try:
                if not conn.poll(timeout_s):
                    raise TimeoutError(f"a benchmark worker did not answer within {timeout_s}s")
                status, res = conn.recv()
            except (EOFError, OSError) as exc:
                raise RuntimeError(f"a benchmark worker died ({type(exc).__name__}: {exc})") from None
            if status != "ok":
                # Read every worker's answer first: one left in its pipe would answer the next task.
                failed = failed or f"benchmark worker failed: {res}"
            out.append(res)
        if failed:
            raise RuntimeError(failed)
        return out

    def run_same(self, task: dict, **kw) -> list[dict]:
        return self.run([dict(task) for _ in self.procs], **kw)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
