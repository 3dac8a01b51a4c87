"""CXL-RPC, both halves: request/response slots in the pool itself, no socket anywhere.

* ``CxlChannel`` (client): claims a host slot, writes a request into the slot's
  request buffer, then bumps the slot's request sequence number, and polls the
  response sequence number.
* ``CxlServer`` (the service's side): grants claimed slots, reads heartbeats,
  polls the request words of registered pool clients, answers through
  ``MetadataService.dispatch``, writes the response, then bumps the response
  sequence number.

Every word and buffer goes through the accessors of ``beluga.layout`` (the
publication points listed there). ``Backoff`` and ``reduce_timer_slack`` are the
polling both sides share. Block data never travels through RPC: only metadata does.
"""
from __future__ import annotations

import os
import threading
import time

from . import layout as L
from . import rpc
from .errors import ProtocolError, ServiceUnavailableError, SessionExpiredError
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
        L.publish_request_seq(buf, g, slot, seq, len(message))  # payload first, then the sequence number
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
        L.write_heartbeat(self.buf, self.g, slot, L.read_own_heartbeat(self.buf, self.g, slot) + 1)
        return True

    def close(self) -> None:
        self.slot = None


class CxlServer:
    """The service's half of CXL-RPC: grants claimed host slots, watches heartbeats, and answers
    requests posted in the pool (reads the request words, writes the response, then its seq).

    ``service`` is the MetadataService it serves: its ``clients``, ``grant``, ``dispatch``,
    ``drain_touches``, ``counters``, ``cfg`` and ``clock``."""

    def __init__(self, service) -> None:
        self.service = service
        self.g = service.g
        self.buf = service.buf
        self._pool_clients: tuple | None = None  # registered clients that use pool slots; rebuilt on change
        self._clients_total = -1

    def clients_changed(self) -> None:
        """A client was granted or reaped: the next pass rebuilds its list of pool clients."""
        self._pool_clients = None

    def poll(self, *, claims: bool = True) -> bool:
        """One pass over the host slots. True if it did work.

        Requests of registered clients are checked on every pass (one 8-byte read
        per client); with ``claims`` every slot is also checked for a new claim
        and every client's heartbeat counter is read. The serve loop asks for
        that part only every ``claim_scan_interval_s``: registration and liveness
        are not latency-critical, and skipping the free slots keeps a pass short.
        """
        worked = self._scan_slots() if claims else False
        if self.service.cfg.serve_cxl:
            buf = self.buf
            g = self.g
            pool_clients = self._pool_clients
            if pool_clients is None or len(self.service.clients) != self._clients_total:
                # TCP clients never post requests in the pool: skip them on every pass.
                pool_clients = self._pool_clients = tuple(c for c in self.service.clients.values() if c.transport != "tcp")
                self._clients_total = len(self.service.clients)
            for c in pool_clients:
                req_seq = L.read_request_seq(buf, g, c.slot)
                if req_seq != c.handled_seq:
                    worked |= self._serve_request(c, req_seq, self.service.clock())
        return worked

    def _scan_slots(self) -> bool:
        now = self.service.clock()
        worked = False
        g = self.g
        buf = self.buf
        for slot in range(g.max_clients):
            claim, _req_seq, hb = L.read_client_line(buf, g, slot)
            c = self.service.clients.get(slot)
            if c is None:
                if claim and self.service.cfg.serve_cxl:
                    if L.read_owner(buf, g, slot) == 0:
                        self.service.grant(slot, claim, "cxl")
                        worked = True
                continue
            if hb != c.heartbeat:
                c.heartbeat = hb
                c.seen_at = now
        self.service.drain_touches()
        return worked

    def _serve_request(self, c, req_seq: int, now: float) -> bool:
        g = self.g
        try:
            req = rpc.decode_request(L.read_request(self.buf, g, c.slot))
            if req.seq != req_seq:
                raise ProtocolError(f"request buffer holds seq {req.seq}, the slot announced {req_seq}")
        except ProtocolError as exc:
            # Probably the client is rewriting the buffer right now; give it a moment.
            if c.bad_seq != req_seq:
                c.bad_seq, c.bad_since = req_seq, now
                return False
            if now - c.bad_since < self.service.cfg.bad_request_grace_s:
                return False
            self.service.counters["bad_requests"] += 1
            resp = rpc.encode_response(req_seq, rpc.BAD_REQUEST, f"malformed request: {exc}".encode())
        else:
            resp = self.service.dispatch(req, pool_slot=c.slot)
        if len(resp) > g.rpc_buffer_bytes:
            resp = rpc.encode_response(req_seq, rpc.INTERNAL, b"response larger than the slot's buffer; "
                                                              b"send fewer items per request")
        L.write_response(self.buf, g, c.slot, resp)
        L.publish_response_seq(self.buf, g, c.slot, req_seq, len(resp))  # payload first, then the sequence number
        c.handled_seq = req_seq
        return True
