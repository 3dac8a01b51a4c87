"""A stand-in for qemu-system-x86_64 in unit tests of `up`/`down`: it reads the argv that
testbed/qemucmd.py builds and does what QEMU does with the host's files, without a guest.

- binds the SSH forward's port on 127.0.0.1; taken: QEMU's message and exit 1
- writes the pid file, creates the serial socket and serial log (with the umask it was given)
- serves QMP on the -qmp socket: the greeting, qmp_capabilities, query-status, stop and
  cont (with QEMU's STOP and RESUME events, sent after the reply as QEMU does), quit
  (with its SHUTDOWN event)
- prints "beluga: sshd started" on the serial log once QMP is up
- records its argv, one JSON line per start, in $FAKE_QEMU_RECORD

$FAKE_QEMU_FAIL=HOST: that host exits 1 at start; $FAKE_QEMU_HANG=HOST: that host never
answers on QMP (a QEMU stuck in its init).
"""
import json
import os
import re
import socket
import sys
import time


def opts(value: str) -> dict[str, str]:
    """QEMU's option-list rule: ',' separates, ',,' is a comma inside a value."""
    out: dict[str, str] = {}
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    for n, p in enumerate(parts):
        key, eq, val = p.partition("=")
        out[key if eq else f"_{n}"] = val if eq else key
    return out


def main() -> None:
    argv = sys.argv[1:]
    args: dict[str, list[str]] = {}
    for i, a in enumerate(argv):
        if a.startswith("-") and i + 1 < len(argv):
            args.setdefault(a, []).append(argv[i + 1])
    host = opts(args["-name"][0])["_0"].split("/")[-1]
    if rec := os.environ.get("FAKE_QEMU_RECORD"):
        with open(rec, "a") as f:
            f.write(json.dumps({"host": host, "pid": os.getpid(), "argv": sys.argv}) + "\n")
    if os.environ.get("FAKE_QEMU_FAIL") == host:
        print(f"qemu-system-x86_64: {host}: cannot start (FAKE_QEMU_FAIL)", file=sys.stderr)
        sys.exit(1)
    netdev = args["-netdev"][0]
    port = int(re.search(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22", netdev).group(1))
    fwd = socket.socket()
    try:
        fwd.bind(("127.0.0.1", port))
        fwd.listen()
    except OSError:
        print(f"qemu-system-x86_64: -netdev {netdev}: Could not set up host forwarding rule "
              f"'tcp:127.0.0.1:{port}-:22'", file=sys.stderr)
        sys.exit(1)
    with open(args["-pidfile"][0], "w") as f:
        f.write(f"{os.getpid()}\n")
    chardev = opts(args["-chardev"][0])
    serial_log = open(chardev["logfile"], "a")
    serial = socket.socket(socket.AF_UNIX)
    serial.bind(chardev["path"])
    serial.listen()
    if os.environ.get("FAKE_QEMU_HANG") == host:
        while True:
            time.sleep(1)
    qmp = socket.socket(socket.AF_UNIX)
    qmp.bind(opts(args["-qmp"][0])["_0"].removeprefix("unix:"))
    qmp.listen()
    serial_log.write("beluga: sshd started\n")
    serial_log.flush()
    while True:
        conn, _ = qmp.accept()
        with conn:
            try:
                serve_qmp(conn)
            except OSError:
                pass  # the client went away: wait for the next one, as QEMU does


RUNNING = [True]  # the vCPUs' state, across QMP connections


def event(name: str, data: dict | None = None) -> bytes:
    t = time.time()
    msg = {"event": name, "timestamp": {"seconds": int(t), "microseconds": int(t % 1 * 1e6)}}
    if data is not None:
        msg["data"] = data
    return json.dumps(msg).encode() + b"\r\n"


def serve_qmp(conn: socket.socket) -> None:
    """QMP messages are JSON objects one after another, not lines: the client sends no newline."""
    conn.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, '
                 b'"capabilities": []}}\r\n')
    buf, dec = "", json.JSONDecoder()
    while data := conn.recv(4096):
        buf += data.decode()
        while buf.strip():
            try:
                msg, end = dec.raw_decode(buf.lstrip())
            except ValueError:
                break  # the rest of the message is still on its way
            buf = buf.lstrip()[end:]
            cmd = msg["execute"]
            status = {"status": "running" if RUNNING[0] else "paused", "running": RUNNING[0]}
            reply = {"return": status if cmd == "query-status" else {}}
            if "id" in msg:
                reply["id"] = msg["id"]
            conn.sendall(json.dumps(reply).encode() + b"\r\n")
            if cmd == "stop" and RUNNING[0]:
                RUNNING[0] = False
                conn.sendall(event("STOP"))
            elif cmd == "cont" and not RUNNING[0]:
                RUNNING[0] = True
                conn.sendall(event("RESUME"))
            elif cmd == "quit":
                conn.sendall(event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
                sys.exit(0)

if __name__ == "__main__":
    main()
