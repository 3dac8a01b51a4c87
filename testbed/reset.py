"""Reset a running testbed to its state right after `up`, without rebooting a guest.

In this order (each host in parallel where it can be):

1. QEMU (QMP): a host that a hang left stopped is continued; every host's NIC link is
   set up again (a `nic` fault may have taken it down; QMP cannot say, so always).
2. Each guest (testbed/guest/reset.py): every process started after boot is killed (the
   store's `beluga serve` and clients, programs, tests' processes), the devices' poison
   lists are cleared through their own mailbox (Clear Poison), the trace events are
   disabled and the trace buffers emptied, and /tmp, /dev/shm and the testbed's run
   files in /run/beluga are emptied. The first reset after `up` runs it over SSH, as a
   Python process that stays behind as the guest's resident reset helper; the resets
   that follow send one line to that helper over TCP (a 127.0.0.1 port QEMU forwards,
   HELPER_PORT below), or over SSH where that fails.
3. The pool: its backing files are zeroed from this machine (holes punched: every
   guest maps them with share=on and the CXL memory is emulated, so every host reads
   zeros at once; processes that had the pool mapped are gone by then).

What cannot be undone is reported in `ResetReport.not_undone`, never hidden: a host whose
QEMU is gone (a `kill` fault) stays down (only `down` + `up` brings it back), and the
guests' disks (files written outside /tmp, /dev/shm and /run/beluga) and kernel logs
(dmesg) are not rolled back.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import paths, qmp, ssh
from .par import map_parallel

GUEST_SCRIPT = Path(__file__).parent / "guest" / "reset.py"
GUEST_TIMEOUT_S = 60
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
ZERO_CHUNK = 1 << 20


@dataclass(frozen=True)
class HostReset:
    """What the reset did on one host."""
    host: str
    continued: bool = False  # it was stopped (a hang) and runs again
    killed: tuple[str, ...] = ()  # "pid: command line" of every process stopped
    poison_cleared: tuple[str, ...] = ()  # "memN dpa 0x..+0x.." of every range cleared
    files_removed: int = 0
    via: str = ""  # how the guest half ran: "tcp" (the helper, through its port), "ssh" (the
    # helper, through an SSH session), "ssh-once" (a new Python over SSH, which starts the helper)


@dataclass(frozen=True)
class ResetReport:
    """The outcome of a reset: per host, the pool, and what it could not undo."""
    name: str
    seconds: float
    hosts: tuple[HostReset, ...]
    pool_bytes_zeroed: int
    not_undone: tuple[str, ...] = field(default=())

    @property
    def complete(self) -> bool:
        """True when everything was undone."""
        return not self.not_undone

    def to_dict(self) -> dict:
        return {"name": self.name, "seconds": self.seconds, "complete": self.complete,
                "pool_bytes_zeroed": self.pool_bytes_zeroed, "not_undone": list(self.not_undone),
                "hosts": [{"host": h.host, "continued": h.continued, "killed": list(h.killed),
                           "poison_cleared": list(h.poison_cleared), "files_removed": h.files_removed,
                           "via": h.via}
                          for h in self.hosts]}


def _punch_hole(fd: int, size: int) -> int:
    """fallocate(PUNCH_HOLE | KEEP_SIZE) over [0, size): 0, or the errno."""
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, size) == 0:
        return 0
    return ctypes.get_errno()


def zero_file(path: Path) -> int:
    """Make every byte of `path` zero, keeping its size; returns its size. Punches one hole
    over the whole file (tmpfs frees the pages and every shared mapping reads zeros);
    where the file system cannot punch holes, writes zeros over the parts that hold data."""
    with paths.open_nofollow(path, "r+b") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        err = _punch_hole(fd, size)
        if err == 0:
            return size
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(path))
        _write_zeros_over_data(fd, size)
        return size


def _write_zeros_over_data(fd: int, size: int) -> None:
    zeros = bytes(ZERO_CHUNK)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but holes from pos on
                return
            start = pos  # SEEK_DATA unsupported: everything is data
        end = size
        with contextlib.suppress(OSError):
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        while start < end:
            n = min(ZERO_CHUNK, end - start)
            os.pwrite(fd, zeros[:n], start)
            start += n
        pos = end


def _qemu(h) -> tuple[bool, list[str]]:
    """Continue a stopped guest and set its link up; (continued, problems)."""
    problems: list[str] = []
    continued = False
    try:
        st = qmp.execute(h.files.qmp, "query-status", timeout_s=5)
        if not st.get("running"):
            if st.get("status") in ("paused", "suspended", "debug"):
                qmp.execute(h.files.qmp, "cont", timeout_s=5)
                continued = True
            else:
                problems.append(f"{h.name}: the guest is {st.get('status')!r}, not running; a reset cannot resume it")
        qmp.execute(h.files.qmp, "set_link", {"name": "nic0", "up": True}, timeout_s=5)
    except Exception as e:  # noqa: BLE001 - reported per host
        problems.append(f"{h.name}: QMP failed ({type(e).__name__}: {e}): a hang or a NIC fault may remain")
    return continued, problems


def _ssh_run(tb):
    return lambda h, command, timeout_s: ssh.run(h.name, h.ssh_port, tb.key, command, timeout_s=timeout_s)


# The guest half's command over SSH (where the helper's port did not answer). With the
# resident helper alive (guest/reset.py's docstring), a request costs the guest a shell
# and one mkfifo; without it (a testbed that `up` gave no helper, or the helper was
# killed) Python runs the reset once and leaves a helper behind. While it waits for the
# reply, the shell checks every second that the helper still lives; one that died
# mid-request (a test's `kill -9`; a reset keeps its helper) makes the shell run the
# reset itself instead.
CLIENT = """\
d={dir}
once() {{
    printf %s {script} > $d.py  # a file, not -c: `ps` shows a short command for the helper
    (umask 077; printf %s {token} > $d.token)  # not in its argv: `ps`, and a report of what was killed
    python3 -I -S $d.py helper=$d {words}
}}
read -r pid fd < $d/pid 2>/dev/null || {{ once; exit; }}
[ /proc/$pid/fd/$fd -ef $d/req ] && mkfifo -m 600 $d/out.$$ 2>/dev/null || {{ once; exit; }}
exec 3<>$d/out.$$ 4<>$d/req
echo "$$ $d/out.$$ {words} token={token}" >&4
line=
until read -t 1 -r part <&3; do
    line=$line$part
    [ /proc/$pid/fd/$fd -ef $d/req ] || {{ rm -f $d/out.$$; once; exit; }}
done
echo "$line$part"
"""


def helper_dir() -> str:
    """The guest folder of the resident helper of this version of guest/reset.py."""
    return "/run/beluga/reset-" + hashlib.sha256(GUEST_SCRIPT.read_bytes()).hexdigest()[:12]


def _words(args: dict) -> str:
    """The guest half's arguments as guest/reset.py reads them: `poison=1 port=47811`."""
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in args.items())


def guest_command(args: dict, token: str = "", *, folder: str | None = None, script: str | None = None) -> str:
    """The shell command of the guest half (`folder` and `script` are for tests)."""
    return CLIENT.format(dir=shlex.quote(folder or helper_dir()), token=shlex.quote(token),
                         script=shlex.quote(GUEST_SCRIPT.read_text() if script is None else script), words=_words(args))


def _guest(h, args: dict, run, token: str = "") -> tuple[dict | None, list[str]]:
    r = run(h, guest_command(args, token), GUEST_TIMEOUT_S)
    if not r.ok:
        return None, [f"{h.name}: the guest reset failed ({r.why}): its processes, poison and trace buffers "
                      "were not reset"]
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, [f"{h.name}: the guest reset printed no result: {r.stdout[-200:]!r}"]
    return out, [f"{h.name}: {p}" for p in out.get("not_undone", [])]


# The helper's TCP port in the guest. QEMU forwards a free port of 127.0.0.1 to it
# (hostfwd_add: made by `up`, or by a reset that started the helper over SSH): the requests that
# follow skip SSH's key exchange and the guest's sshd-session, 2-3 s for four guests on
# a busy machine. The port and a token (the testbed's secret, as its SSH key: another
# user of this machine who connects gets nothing without it) are in HELPER_FILE.
HELPER_PORT = 47811
HELPER_FILE = "reset-helper.json"
HELPER_CONNECT_S = 2.0


def _helper_record(tb) -> dict:
    """{"token": hex, "hosts": {host: {"pid": QEMU pid, "port": forwarded port}}}."""
    path = Path(tb.dir) / HELPER_FILE
    try:
        rec = json.loads(path.read_text())
        if isinstance(rec.get("token"), str) and isinstance(rec.get("hosts"), dict):
            return rec
    except (OSError, ValueError, AttributeError):
        pass
    return {"token": secrets.token_hex(16), "hosts": {}}


def helper_token(tb) -> str:
    """The testbed's token for its guests' reset helpers (made and saved on first use)."""
    rec = _helper_record(tb)
    if not (Path(tb.dir) / HELPER_FILE).exists():
        with contextlib.suppress(OSError):  # then the first reset makes another, over SSH
            _save_helper_record(tb, rec)
    return rec["token"]


def start_command(token: str, *, folder: str | None = None, port: int = HELPER_PORT) -> str:
    """Shell commands that start the guest's reset helper in the background, without a
    reset: `up` puts them before its last SSH call per guest, so the first reset finds
    the helpers running. Python's start and this file's compile (most of a second of the
    guest's CPU) run at nice 19, behind that call's own work, and go on while the host
    verifies the pool; the helper then takes its own priority."""
    return START.format(dir=shlex.quote(folder or helper_dir()), token=shlex.quote(token),
                        script=shlex.quote(GUEST_SCRIPT.read_text()), port=port)


START = """\
d={dir}
printf %s {script} > $d.py
(umask 077; printf %s {token} > $d.token)
nice -n 19 python3 -I -S $d.py helper=$d port={port} start=1 < /dev/null > /dev/null 2>&1 &
"""


def forward_helpers(tb) -> None:
    """Forward a 127.0.0.1 port to the helper of every running guest that has none yet."""
    rec = _helper_record(tb)
    todo = [h for h in tb.hosts if h.alive() and (rec["hosts"].get(h.name) or {}).get("pid") != h.pid]
    got = {h.name: {"pid": h.pid, "port": p} for h, p in zip(todo, map_parallel(_forward, todo)) if p is not None}
    if got:
        rec["hosts"].update(got)
        with contextlib.suppress(OSError):  # then the resets go over SSH
            _save_helper_record(tb, rec)


def _save_helper_record(tb, rec: dict) -> None:
    path = Path(tb.dir) / HELPER_FILE
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    paths.write_private(tmp, json.dumps(rec) + "\n")
    os.replace(tmp, path)


def _guest_tcp(h, port: int, token: str, args: dict) -> dict | None:
    """The guest half through the helper's forwarded port; None when that did not work
    (no helper listening, a wrong token, a lost connection): the caller asks over SSH."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=HELPER_CONNECT_S) as c:
            c.settimeout(GUEST_TIMEOUT_S)
            c.sendall(f"{token} {Path(helper_dir()).name} {_words(args)}\n".encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = c.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        out = json.loads(data) if data.endswith(b"\n") else None
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None  # (not the helper: some program on its port)


def _forward(h) -> int | None:
    """A free port of 127.0.0.1 forwarded by h's QEMU to the helper's port; None if QEMU
    refused (then the resets go on over SSH)."""
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            said = qmp.execute(h.files.qmp, "human-monitor-command",
                               {"command-line": f"hostfwd_add net0 tcp:127.0.0.1:{port}-:{HELPER_PORT}"},
                               timeout_s=5)
        except Exception:  # noqa: BLE001 - the SSH way stays
            return None
        if not (isinstance(said, str) and said.strip()):  # HMP says nothing when it worked
            return port
    return None


def reset(tb, *, poison: bool = True, run=None) -> ResetReport:
    """Reset testbed `tb` (a lifecycle.Testbed); see the module's docstring. The guest half
    goes to each guest's resident helper through its forwarded port where there is one,
    else over SSH: `run(host, command, timeout_s) -> ssh.Result` (default: a new SSH
    connection per host; the API passes its kept connections)."""
    run = run or _ssh_run(tb)
    rec = _helper_record(tb)
    forwards: dict[str, dict] = {}
    start = time.monotonic()
    hosts = tb.hosts
    not_undone: list[str] = []
    dead = [h for h in hosts if not h.alive()]
    for h in dead:
        not_undone.append(f"{h.name}: QEMU is not running (killed?): a reset does not reboot a host; "
                          f"'beluga-testbed down {tb.name}' and 'up' bring it back")
    live = [h for h in hosts if h.alive()]
    device_of = {d.serial: d.id for d in tb.topology.devices}

    def one(h) -> tuple[HostReset, list[str]]:
        continued, problems = _qemu(h)
        fwd = rec["hosts"].get(h.name)
        fwd = fwd if isinstance(fwd, dict) and fwd.get("pid") == h.pid else None
        out = _guest_tcp(h, fwd["port"], rec["token"], {"poison": poison}) if fwd else None
        via = "tcp"
        if out is not None:
            problems += [f"{h.name}: {p}" for p in out.get("not_undone", [])]
        else:
            out, more = _guest(h, {"poison": poison, "port": HELPER_PORT}, run, rec["token"])
            problems += more
            via = "ssh" if (out or {}).get("helper") else "ssh-once"
            if out is not None and fwd is None and (port := _forward(h)) is not None:
                forwards[h.name] = {"pid": h.pid, "port": port}
        out = out or {}
        cleared = tuple(f"{device_of.get(c.get('serial'), '?')} (guest {c['memdev']}) dpa {d:#x}+{n:#x}"
                        for c in out.get("poison_cleared", []) for d, n in c["ranges"])
        return HostReset(h.name, continued, tuple(f"{k['pid']}: {k['cmd']}" for k in out.get("killed", [])),
                         cleared, out.get("files_removed", 0), via if out else ""), problems

    results = map_parallel(one, live)
    for _, problems in results:
        not_undone += problems
    if forwards:
        rec["hosts"].update(forwards)
        try:
            _save_helper_record(tb, rec)
        except OSError:
            pass  # the next reset asks over SSH again
    zeroed = 0
    for dev, f in sorted(tb.pool_files.items()):
        try:
            zeroed += zero_file(f)
        except OSError as e:
            not_undone.append(f"pool: {dev} ({f}) not zeroed: {e.strerror or e}")
    by_host = {r.host: r for r, _ in results}
    return ResetReport(tb.name, round(time.monotonic() - start, 3),
                       tuple(by_host.get(h.name, HostReset(h.name)) for h in hosts), zeroed, tuple(not_undone))
