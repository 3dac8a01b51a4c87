"""The TCP transport, both halves: the same messages as CXL-RPC, each prefixed with its length.

``TcpChannel`` is the client's side (heartbeats still go to the pool); ``TcpServer``
is the service's: length-prefixed frames, one selector, no blocking.

It runs inside the service's single-threaded loop, so nothing here may wait
on a client. The listener is on 127.0.0.1 by default, but any local process
can connect, so every resource a connection can take is bounded:

* a frame is at most the pool's RPC buffer (``rpc_buffer_bytes``, the size
  of a pool slot's request buffer); a longer length prefix is answered with
  a CLOSING notice and the connection is closed (an 0xffffffff prefix once
  made the service buffer 300 MiB);
* answers go out with non-blocking sends; what the kernel does not take
  waits in the connection's output buffer, and a connection whose buffer
  passes ``tcp_output_limit_bytes`` (a client that sends but never reads) is
  closed (a blocking send once stalled the loop until every other client was
  reaped);
* at most ``tcp_max_connections`` connections, fewer if the file limit
  (RLIMIT_NOFILE) leaves less room; one over the limit is told so and closed;
* a connection that has not made a valid request (HELLO or one with a live
  session) within ``tcp_hello_timeout_s``, or no complete frame within
  ``tcp_idle_timeout_s``, is closed (clients reconnect on their next call);
* an accept that fails (EMFILE, ENFILE, ENOBUFS, ...) is logged and accepting
  pauses for ``tcp_accept_backoff_s``: it never ends the service;
* a connection is answered at most ``tcp_frames_per_pass`` frames per loop
  pass, so a pipelining client cannot starve the pool slots or other sockets;
* TCP clients hold at most ``tcp_max_clients`` host slots, so that the last
  slots stay free for clients of the pool transport.
"""
from __future__ import annotations

import errno
import os
import select
import selectors
import socket
import time

from . import layout as L
from . import rpc
from .cxlrpc import CxlChannel
from .errors import ProtocolError, ServiceUnavailableError
from .pool import Pool

_RECV_BYTES = 256 << 10
FD_MARGIN = 8
"""File descriptors kept free beside the connections (pool, logs, the accept itself)."""


class _Conn:
    __slots__ = ("sock", "fd", "peer", "inbuf", "outbuf", "opened_at", "last_frame_at", "authenticated",
                 "events", "served_pass")

    def __init__(self, sock: socket.socket, peer: str, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.opened_at = now
        self.last_frame_at = now
        self.authenticated = False
        self.events = 0
        self.served_pass = -1


def fd_budget() -> tuple[int, int, int] | None:
    """(connections the file limit leaves room for, soft limit, descriptors open now); None if unlimited."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = 16
    return max(1, soft - used - FD_MARGIN), soft, used


class TcpServer:
    """Serve ``service`` (a MetadataService) on host:port; call ``poll`` from the service loop."""

    def __init__(self, service, host: str, port: int, *, log) -> None:
        self.service = service
        self.cfg = cfg = service.cfg
        self.log = log
        self.max_frame_bytes = service.g.rpc_buffer_bytes
        max_clients = service.g.max_clients
        # Pool clients need no connection, so a flood of HELLOs must leave them some slots; with
        # --max-clients 1, or no pool transport served, there is nobody to keep them for.
        reserve = min(max(1, max_clients // 4), max_clients - 1) if cfg.serve_cxl else 0
        default_tcp = max_clients - reserve
        self.max_tcp_clients = max(0, min(max_clients, default_tcp if cfg.tcp_max_clients is None
                                          else cfg.tcp_max_clients))
        self.max_connections = max(1, cfg.tcp_max_connections)
        self.output_limit_bytes = max(cfg.tcp_output_limit_bytes, 2 * (4 + self.max_frame_bytes))  # >= 2 answers
        budget = fd_budget()
        if budget is not None and budget[0] < self.max_connections:
            log(f"TCP connection limit lowered from {self.max_connections} to {budget[0]}: the file limit "
                f"(RLIMIT_NOFILE) is {budget[1]} and {budget[2]} descriptors are open (raise it with `ulimit -n`)")
            self.max_connections = budget[0]
        self.counters = {
            "accepted": 0, "accept_errors": 0, "refused_connection_limit": 0, "closed_oversize_frame": 0,
            "closed_malformed_frame": 0, "closed_output_overflow": 0, "closed_hello_timeout": 0,
            "closed_idle": 0, "closed_by_peer": 0, "refused_tcp_client_limit": 0,
        }
        self.listener = socket.create_server((host, port))
        # Kernel buffers, inherited by accepted sockets: a client has one request in flight, so one
        # frame each way fits with room to spare; left to autotuning, a client that does not read
        # would pin megabytes of kernel memory per connection and delay its cut-off by as much.
        kernel_bytes = max(64 << 10, 2 * (4 + self.max_frame_bytes))
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            self.listener.setsockopt(socket.SOL_SOCKET, opt, kernel_bytes)
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self._listening = True
        self._accept_resume_at = 0.0
        self._last_accept_log = -1e9
        self._accept_errors_unlogged = 0
        self._last_close_log = -1e9
        self._closes_unlogged = 0
        self.conns: dict[int, _Conn] = {}
        self._pending: set[_Conn] = set()  # complete frames left over after a connection's share of a pass
        self._next_sweep = 0.0
        self._pass = 0

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    def stats(self) -> dict:
        return {"connections": len(self.conns), "max_connections": self.max_connections,
                "max_tcp_clients": self.max_tcp_clients, "max_frame_bytes": self.max_frame_bytes,
                "output_limit_bytes": self.output_limit_bytes,
                **self.counters}

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self.sel.close()
        self.listener.close()

    # ------------------------------------------------------------ the loop's entry point
    def poll(self, timeout_s: float) -> bool:
        """Accept, read, answer and send whatever is ready (waiting at most ``timeout_s``). True if it did work."""
        self._pass += 1
        now = time.monotonic()
        if not self._listening and now >= self._accept_resume_at:
            self.sel.register(self.listener, selectors.EVENT_READ)
            self._listening = True
        if now >= self._next_sweep:
            self._next_sweep = now + 0.05
            self._sweep(now)
        worked = False
        for key, events in self.sel.select(0 if self._pending else timeout_s):
            if key.fileobj is self.listener:
                self._accept()
                continue
            conn = self.conns.get(key.fd)
            if conn is None:
                continue
            worked = True
            if events & selectors.EVENT_WRITE:
                self._flush(conn)
            if events & selectors.EVENT_READ and self._open(conn):
                self._read(conn)
        for conn in list(self._pending):
            if self._open(conn):
                self._answer_frames(conn)
                worked = True
            else:
                self._pending.discard(conn)
        return worked

    # ------------------------------------------------------------ connections
    def _accept(self) -> None:
        for _ in range(64):  # a burst at most per pass
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                # EMFILE/ENFILE/ENOBUFS/ENOMEM: the listener stays readable, so stop polling it for a while
                # instead of spinning on it; the connections we have keep being served.
                self.counters["accept_errors"] += 1
                self._accept_errors_unlogged += 1
                now = time.monotonic()
                if now - self._last_accept_log >= 1.0:
                    self.log(f"accepting a TCP connection failed ({self._accept_errors_unlogged} time(s) since "
                             f"the last message): {exc}; pausing accepts for {self.cfg.tcp_accept_backoff_s}s "
                             f"({len(self.conns)} connections open; raise the file limit or lower "
                             f"--tcp-max-connections)")
                    self._last_accept_log = now
                    self._accept_errors_unlogged = 0
                if self._listening:
                    self.sel.unregister(self.listener)
                    self._listening = False
                self._accept_resume_at = now + self.cfg.tcp_accept_backoff_s
                return
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            self.counters["accepted"] += 1
            if len(self.conns) >= self.max_connections:
                self.counters["refused_connection_limit"] += 1
                notice = _closing_frame(f"connection refused: the service has {len(self.conns)} TCP connections "
                                        f"open, its limit (--tcp-max-connections, file limit); retry later")
                try:
                    sock.setblocking(False)
                    sock.send(notice)
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, peer, time.monotonic())
            self.conns[conn.fd] = conn
            self._set_events(conn)

    def _open(self, conn: _Conn) -> bool:
        # By identity: a closed connection's descriptor number may already belong to a new one.
        return self.conns.get(conn.fd) is conn

    def _set_events(self, conn: _Conn) -> None:
        want = 0
        if len(conn.inbuf) < 4 + self.max_frame_bytes:
            want |= selectors.EVENT_READ
        if conn.outbuf:
            want |= selectors.EVENT_WRITE
        if want == conn.events:
            return
        if conn.events == 0:
            self.sel.register(conn.sock, want)
        elif want == 0:
            self.sel.unregister(conn.sock)
        else:
            self.sel.modify(conn.sock, want)
        conn.events = want

    def _close(self, conn: _Conn, counter: str | None = None, reason: str = "") -> None:
        if not self._open(conn):
            return
        del self.conns[conn.fd]
        if counter:
            self.counters[counter] += 1
        if reason:
            # At most one line a second: a client that reconnects to misbehave must not flood the log.
            now = time.monotonic()
            if now - self._last_close_log >= 1.0:
                more = f" ({self._closes_unlogged} more since the last message)" if self._closes_unlogged else ""
                self.log(f"closed TCP connection from {conn.peer}: {reason}{more}")
                self._last_close_log, self._closes_unlogged = now, 0
            else:
                self._closes_unlogged += 1
        if conn.events:
            self.sel.unregister(conn.sock)
            conn.events = 0
        self._pending.discard(conn)
        conn.sock.close()

    def _sweep(self, now: float) -> None:
        hello_s, idle_s = self.cfg.tcp_hello_timeout_s, self.cfg.tcp_idle_timeout_s
        for conn in list(self.conns.values()):
            if not conn.authenticated and now - conn.opened_at > hello_s:
                self._close(conn, "closed_hello_timeout")
            elif now - conn.last_frame_at > idle_s:
                self._close(conn, "closed_idle")

    # ------------------------------------------------------------ input
    def _read(self, conn: _Conn) -> None:
        room = 4 + self.max_frame_bytes - len(conn.inbuf)
        if room <= 0:
            return
        try:
            data = conn.sock.recv(min(_RECV_BYTES, room))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn, "closed_by_peer")
            return
        conn.inbuf += data
        self._answer_frames(conn)
        if self._open(conn):
            self._set_events(conn)  # a full input buffer stops reading until frames are answered

    def _answer_frames(self, conn: _Conn) -> None:
        if conn.served_pass == self._pass:  # its share of this pass is taken: the rest waits for the next
            self._pending.add(conn)
            return
        conn.served_pass = self._pass
        self._pending.discard(conn)
        buf = conn.inbuf
        for _ in range(max(1, self.cfg.tcp_frames_per_pass)):
            if len(buf) < 4:
                break
            n = rpc.frame_length(buf)
            if n > self.max_frame_bytes:
                self._refuse(conn, "closed_oversize_frame",
                             f"frame of {n} bytes exceeds the {self.max_frame_bytes}-byte RPC buffer")
                return
            if len(buf) < 4 + n:
                break
            msg = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            conn.last_frame_at = time.monotonic()
            resp = self._dispatch(conn, msg)
            if resp is None:
                return  # the connection was closed
            L.answer_off_pool(self.service.buf)  # what the request changed in the pool is out first
            if not self._send(conn, rpc.frame(resp)):
                return
        else:
            if len(buf) >= 4 and len(buf) >= 4 + rpc.frame_length(buf):
                self._pending.add(conn)
        if self._open(conn):
            self._set_events(conn)

    def _dispatch(self, conn: _Conn, msg: bytes) -> bytes | None:
        svc = self.service
        try:
            req = rpc.decode_request(msg)
        except ProtocolError as exc:
            # TCP does not tear frames: a bad one means a broken or hostile client. Answer, then hang up.
            svc.counters["bad_requests"] += 1
            self._refuse(conn, "closed_malformed_frame", f"malformed request: {exc}")
            return None
        if req.op == rpc.OP_HELLO:
            refusal = self._hello_refusal(req)
            if refusal is not None:
                self.counters["refused_tcp_client_limit"] += 1
                return rpc.encode_response(req.seq, rpc.NO_CLIENT_SLOT, refusal.encode())
            resp = svc.dispatch(req)
            if rpc.response_status(resp) == rpc.OK:
                conn.authenticated = True
            return resp
        client = svc.clients.get(req.slot)
        if client is not None and client.nonce == req.nonce:
            conn.authenticated = True
        return svc.dispatch(req)

    def _hello_refusal(self, req: rpc.Request) -> str | None:
        """Why a HELLO may not take a new host slot (None: it may, or it resumes its own)."""
        svc = self.service
        try:
            nonce, resume, _pid, _host = rpc.decode_hello(req.body)
        except ProtocolError:
            return None  # the service answers it as malformed
        c = svc.clients.get(resume)
        if c is not None and c.nonce == nonce:
            return None
        tcp_clients = sum(1 for c in svc.clients.values() if c.transport == "tcp")
        if tcp_clients < self.max_tcp_clients:
            return None
        return (f"no free client slot for TCP clients: {tcp_clients} of the {svc.g.max_clients} slots are held by "
                f"TCP clients, the most allowed (--tcp-max-clients {self.max_tcp_clients}); the others are kept "
                f"for clients of the pool transport")

    def _refuse(self, conn: _Conn, counter: str, why: str) -> None:
        """Send a CLOSING notice (best effort) and close."""
        try:
            conn.sock.send(_closing_frame(why + "; closing the connection"))
        except OSError:
            pass
        self._close(conn, counter, why)

    # ------------------------------------------------------------ output
    def _send(self, conn: _Conn, data: bytes) -> bool:
        """Queue ``data``; False if the connection had to be closed."""
        if not conn.outbuf:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn, "closed_by_peer")
                return False
            if sent == len(data):
                return True
            data = data[sent:]
        conn.outbuf += data
        if len(conn.outbuf) > self.output_limit_bytes:
            self._close(conn, "closed_output_overflow",
                        f"{len(conn.outbuf)} bytes of answers are waiting and the client does not read them "
                        f"(limit --tcp-output-limit {self.output_limit_bytes})")
            return False
        return True

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn, "closed_by_peer")
            return
        del conn.outbuf[:sent]
        self._set_events(conn)


def _closing_frame(message: str) -> bytes:
    resp = rpc.encode_response(0, rpc.CLOSING, message.encode()[: rpc.MAX_MESSAGE_BYTES * 2])
    return rpc.frame(resp)


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
