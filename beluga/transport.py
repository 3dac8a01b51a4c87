"""Client-side transports: how an encoded request reaches the service.

* ``CxlChannel`` -- CXL-RPC: the request is written into this client's slot in
  the pool, then the slot's sequence number is bumped; the service polls the
  slots, writes the response into the same slot and bumps the response
  sequence number, which the client polls. No socket anywhere.
* ``TcpChannel`` -- the same messages, length-prefixed over a TCP socket.
* ``LocalChannel`` -- calls a service object in this process (tests).

Block data never travels through any of them: only metadata does.
"""
from __future__ import annotations

import os
import select
import socket
import threading
import time

from . import layout as L
from . import rpc
from .errors import ServiceUnavailableError, SessionExpiredError
from .pool import Pool



_PR_SET_TIMERSLACK = 29
_slack = threading.local()


def reduce_timer_slack(slack_ns: int = 1000) -> None:
    """Let this thread's short sleeps be short (Linux; best effort, once per thread).

    By default Linux may stretch a sleep by 50 us of "timer slack", so the
    backoff's 5 us sleeps last 60-80 us; with 1 us of slack they last what the
    timer hardware allows (~10-30 us in a VM). Polling then costs less latency
    without spinning, which matters when clients and the service share few cores.
    """
    if getattr(_slack, "done", False):
        return
    _slack.done = True
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(slack_ns), 0, 0, 0)
    except Exception:  # not Linux, no libc symbol: sleeps are just longer
        pass


class Backoff:
    """Poll (yielding the CPU) for a short while, then sleep with doubling intervals up to a cap."""

    def __init__(self, min_sleep_s: float, max_sleep_s: float, spin_s: float = 0.0005) -> None:
        self.min_sleep_s = min_sleep_s
        self.max_sleep_s = max_sleep_s
        self.spin_s = spin_s

    def wait(self, ready, deadline: float) -> bool:
        spin_until = min(time.monotonic() + self.spin_s, deadline)
        while time.monotonic() < spin_until:
            if ready():
                return True
            os.sched_yield()
        sleep_s = self.min_sleep_s
        reduce_timer_slack()
        while True:
            if ready():
                return True
            now = time.monotonic()
            if now >= deadline:
                return ready()
            time.sleep(min(sleep_s, deadline - now))
            sleep_s = min(sleep_s * 2, self.max_sleep_s)


class CxlChannel:
    """Request/response slots in the pool itself (the paper's CXL-RPC)."""

    name = "cxl"

    def __init__(self, pool: Pool, *, min_sleep_s: float = 5e-6, max_sleep_s: float = 1e-3) -> None:
        self.pool = pool
        self.g = pool.geometry
        self.buf = pool.buf
        self.backoff = Backoff(min_sleep_s, max_sleep_s)
        self.slot: int | None = None
        self.nonce = 0

    def register(self, nonce: int, *, pid: int, host: str, timeout_s: float, resume_slot: int | None = None) -> tuple[int, int, int]:
        """Claim a free host slot; the service grants it. -> (slot, epoch, current request seq)."""
        buf, g = self.buf, self.g
        if resume_slot is not None and L.read_owner(buf, g, resume_slot) == nonce:
            return resume_slot, L.read_epoch(buf, g, resume_slot), L.read_request_seq(buf, g, resume_slot)
        deadline = time.monotonic() + timeout_s
        n = self.g.max_clients
        start = int.from_bytes(os.urandom(2), "little") % n  # spread claimants over the slots
        for i in range(n):
            slot = (start + i) % n
            if L.read_owner(buf, g, slot) != 0 or L.read_claim(buf, g, slot) != 0:
                continue
            L.write_client_info(buf, g, slot, pid=pid, host=host)
            L.publish_claim(buf, g, slot, nonce)

            def decided() -> bool:
                return L.read_owner(buf, g, slot) != 0 or L.read_claim(buf, g, slot) != nonce

            if not self.backoff.wait(decided, deadline):
                if L.read_claim(buf, g, slot) == nonce:
                    L.publish_claim(buf, g, slot, 0)  # withdraw, so the slot is not pinned
                raise ServiceUnavailableError(
                    f"no metadata service granted a client slot on {self.pool.path} within {timeout_s}s "
                    f"(is `beluga serve {self.pool.path}` running with the cxl transport?)"
                )
            if L.read_owner(buf, g, slot) == nonce:
                self.slot, self.nonce = slot, nonce
                return slot, L.read_epoch(buf, g, slot), L.read_request_seq(buf, g, slot)
            # Lost the race for this slot to another claimant: try the next one.
        raise ServiceUnavailableError(
            f"no free client slot on {self.pool.path}: all {n} are in use or being claimed "
            f"(format the pool with more --max-clients)"
        )

    def max_message_bytes(self) -> int:
        return self.g.rpc_buffer_bytes

    def call(self, message: bytes, seq: int, timeout_s: float) -> bytes:
        slot = self.slot
        buf, g = self.buf, self.g
        if L.read_owner(buf, g, slot) != self.nonce:
            # Reaped while we were away: writing would scribble on another client's slot.
            raise SessionExpiredError(f"client slot {slot} on {self.pool.path} was reclaimed by the service")
        L.write_request(buf, g, slot, message)
        L.publish_request_seq(buf, g, slot, seq)  # payload first, then the sequence number
        read_response_seq = L.read_response_seq
        # The answer often lands within a few microseconds: look before setting up the wait.
        ok = read_response_seq(buf, g, slot) == seq or self.backoff.wait(
            lambda: read_response_seq(buf, g, slot) == seq, time.monotonic() + timeout_s)
        if not ok:
            raise ServiceUnavailableError(
                f"metadata service did not answer request {seq} on client slot {slot} of {self.pool.path} "
                f"within {timeout_s}s (is `beluga serve` running? it may have died; retry once it is back)"
            )
        return L.read_response(buf, g, slot)

    def heartbeat(self) -> bool:
        """Bump our heartbeat counter; False once the slot is no longer ours."""
        slot = self.slot
        if slot is None or L.read_owner(self.buf, self.g, slot) != self.nonce:
            return False
        L.write_heartbeat(self.buf, self.g, slot, L.read_heartbeat(self.buf, self.g, slot) + 1)
        return True

    def close(self) -> None:
        self.slot = None


class TcpChannel:
    """Length-prefixed messages over TCP (loopback or a guest network), for comparison."""

    name = "tcp"

    def __init__(self, pool: Pool, address: str | None = None, *, connect_timeout_s: float = 2.0) -> None:
        self.pool = pool
        self.g = pool.geometry
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.sock: socket.socket | None = None
        self.slot: int | None = None
        self.nonce = 0
        self._hb = CxlChannel(pool)  # heartbeats live in the pool whatever the transport

    def _resolve(self) -> tuple[str, int]:
        addr = self.address
        if not addr:
            area = L.read_service_area(self.pool.buf, self.g)
            addr = area.tcp_address if area.nonce else ""
            if not addr:
                raise ServiceUnavailableError(
                    f"no TCP address for the metadata service of {self.pool.path}: none is running with "
                    f"--transport tcp/both (or give the address explicitly)"
                )
        host, _, port = addr.rpartition(":")
        try:
            return host.strip("[]"), int(port)
        except ValueError:
            raise ServiceUnavailableError(f"TCP address {addr!r} is not host:port") from None

    def _connect(self, timeout_s: float) -> socket.socket:
        if self.sock is not None and self._stale(self.sock):
            # Between our calls nothing may arrive: readable means the service closed the
            # connection (idle timeout, restart) or left a CLOSING notice. Start afresh.
            self._drop()
        if self.sock is None:
            host, port = self._resolve()
            try:
                s = socket.create_connection((host, port), timeout=min(timeout_s, self.connect_timeout_s))
            except OSError as exc:
                raise ServiceUnavailableError(f"cannot reach the metadata service at {host}:{port}: {exc}") from None
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = s
        return self.sock

    def register(self, nonce: int, *, pid: int, host: str, timeout_s: float, resume_slot: int | None = None) -> tuple[int, int, int]:
        body = rpc.HELLO_REQ.pack(nonce, rpc.NO_SLOT if resume_slot is None else resume_slot, pid, host.encode()[:32])
        msg = rpc.encode_request(0, nonce, rpc.NO_SLOT, rpc.OP_HELLO, body)
        seq, status, resp = rpc.decode_response(self.call(msg, 0, timeout_s))
        if status != rpc.OK:
            raise ServiceUnavailableError(f"registration refused: {resp.decode(errors='replace')}")
        slot, epoch = rpc.HELLO_RESP.unpack(resp)
        self.slot, self.nonce = slot, nonce
        self._hb.slot, self._hb.nonce = slot, nonce
        return slot, epoch, 0

    def max_message_bytes(self) -> int:
        return self.g.rpc_buffer_bytes  # same limits as the pool transport: identical batching

    def call(self, message: bytes, seq: int, timeout_s: float) -> bytes:
        sock = self._connect(timeout_s)
        try:
            sock.settimeout(timeout_s)
            sock.sendall(rpc.frame(message))
            head = self._recv_exact(sock, 4)
            n = rpc.frame_length(head)
            if n > self.g.rpc_buffer_bytes:
                raise EOFError(f"the service sent a {n}-byte frame, more than the {self.g.rpc_buffer_bytes}-byte "
                               f"RPC buffer")
            resp = self._recv_exact(sock, n)
            if rpc.response_status(resp) == rpc.CLOSING:
                raise EOFError(resp[rpc.RESPONSE_HEADER.size :].decode("utf-8", errors="replace"))
            return resp
        except TimeoutError:
            self._drop()
            raise ServiceUnavailableError(
                f"metadata service over TCP did not answer request {seq} within {timeout_s}s") from None
        except (OSError, EOFError) as exc:
            self._drop()
            raise ServiceUnavailableError(
                f"metadata service over TCP dropped request {seq}: {exc or type(exc).__name__}") from None

    @staticmethod
    def _stale(sock: socket.socket) -> bool:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))

    @staticmethod
    def _recv_exact(sock: socket.socket, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            chunk = sock.recv(n - got)
            if not chunk:
                raise EOFError("connection closed by the service")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _drop(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def heartbeat(self) -> bool:
        return self._hb.heartbeat()

    def close(self) -> None:
        self._drop()
        self._hb.slot = None


class LocalChannel:
    """Hands requests straight to a MetadataService object in this process (tests)."""

    name = "local"

    def __init__(self, service) -> None:
        self.service = service
        self.pool = service.pool
        self.slot: int | None = None

    def register(self, nonce: int, *, pid: int, host: str, timeout_s: float, resume_slot: int | None = None) -> tuple[int, int, int]:
        body = rpc.HELLO_REQ.pack(nonce, rpc.NO_SLOT if resume_slot is None else resume_slot, pid, host.encode()[:32])
        seq, status, resp = rpc.decode_response(
            self.service.handle(rpc.encode_request(0, nonce, rpc.NO_SLOT, rpc.OP_HELLO, body)))
        if status != rpc.OK:
            raise ServiceUnavailableError(f"registration refused: {resp.decode(errors='replace')}")
        slot, epoch = rpc.HELLO_RESP.unpack(resp)
        self.slot = slot
        return slot, epoch, 0

    def max_message_bytes(self) -> int:
        return self.pool.geometry.rpc_buffer_bytes

    def call(self, message: bytes, seq: int, timeout_s: float) -> bytes:
        return self.service.handle(message)

    def heartbeat(self) -> bool:
        return True

    def close(self) -> None:
        self.slot = None
