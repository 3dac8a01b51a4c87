"""A misbehaving TCP client of the metadata service, as its own process (no GIL shared with the
healthy clients whose latency the tests measure). Prints one JSON line with what happened.

Each mode connects, prints {"ready": true} and waits for a line on stdin before attacking
(so that the start of a Python process does not count as the attack).

    huge-frame HOST PORT BYTES   send a 0xffffffff length prefix, then up to BYTES bytes of it
    never-read HOST PORT COUNT   register, pipeline COUNT STATS requests, read no answer; when a
                                 second line arrives on stdin, report whether the service has closed us
"""
from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time

from beluga import rpc

_FRAME = struct.Struct("<I")


def send_all(sock: socket.socket, payload: bytes, chunk: int = 64 << 10) -> tuple[int, str | None]:
    """(bytes the service took, the error that stopped us or None)."""
    sent = 0
    try:
        while sent < len(payload):
            sock.sendall(payload[sent : sent + chunk])
            sent += min(chunk, len(payload) - sent)
    except OSError as exc:  # reset/broken pipe: refused; timeout: the service stopped reading
        return sent, type(exc).__name__
    return sent, None


def closed_by_service(sock: socket.socket, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return False
        try:
            if not sock.recv(65536):
                return True
        except ConnectionError:
            return True


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise EOFError("closed")
            out += chunk
        return out

    (n,) = _FRAME.unpack(exact(4))
    return rpc.decode_response(exact(n))


def framed(msg: bytes) -> bytes:
    return _FRAME.pack(len(msg)) + msg


def ready() -> None:
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()


def main(mode: str, host: str, port: str, n: str) -> None:
    if mode == "huge-frame":
        sock = socket.create_connection((host, int(port)), timeout=10)
        ready()
        sock.sendall(b"\xff\xff\xff\xff")
        sent, error = send_all(sock, bytes(int(n)))
        print(json.dumps({"sent": sent, "error": error}), flush=True)
        return
    if mode == "never-read":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little room here: the service's fills
        sock.settimeout(10)
        sock.connect((host, int(port)))
        nonce = 0xBAD
        sock.sendall(framed(rpc.encode_request(0, nonce, rpc.NO_SLOT, rpc.OP_HELLO,
                                               rpc.HELLO_REQ.pack(nonce, rpc.NO_SLOT, 0, b"attacker"))))
        _, status, body = read_frame(sock)
        assert status == rpc.OK, body
        slot, _ = rpc.HELLO_RESP.unpack(body)
        flood = b"".join(framed(rpc.encode_request(seq, nonce, slot, rpc.OP_STATS)) for seq in range(1, int(n) + 1))
        ready()
        sent, error = send_all(sock, flood)
        print(json.dumps({"sent": sent, "of": len(flood), "error": error}), flush=True)
        sys.stdin.readline()
        print(json.dumps({"closed_by_service": closed_by_service(sock, 10)}), flush=True)
        return
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
