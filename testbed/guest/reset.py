"""Runs INSIDE a guest (python3 of Debian trixie, stdlib only), sent over SSH by testbed/reset.py.

    python3 -I -S reset.py [poison=0] [kill_deadline_s=5] [helper=DIR [port=PORT] [start=1]]   # one JSON line

Puts a running guest back to its state right after `up`, without rebooting it:

1. Processes. The base system is every process that started before the guest's boot
   script finished (the last mark in /run/beluga/boot-times: busybox init, sshd's
   listener, the console), kernel threads, this script's own chain of parents (its SSH
   session), the base sshd's per-connection processes (sshd-session: other clients'
   open connections survive a reset), and the pids listed in /run/beluga/base.pids (for
   a daemon that is part of the base system but starts later). Every other process was started later by someone
   over SSH (a test, a scenario's `beluga serve` and clients, a program run by
   `run_program`, the shell of an open `beluga-testbed ssh`): all are frozen (SIGSTOP,
   so none can start another), then killed (SIGKILL), and the scan repeats until none
   is left.
2. Poison. The devices' poison lists are read (trigger_poison_list: the kernel reports
   them as cxl_poison trace events) and every poisoned 64-byte line is cleared through
   the device's own mailbox (debugfs clear_poison); the lists are read again to check.
3. Trace. Every trace event is disabled (none is enabled after boot) and the ring
   buffers are emptied; tracing stays on.
4. Files the guest keeps in memory: /run/beluga/programs and serve.ready, and what is
   in /tmp and /dev/shm (tmpfs, empty after boot; never across a mount point, so a
   shared folder mounted there is left alone).

Prints what it did and, in "not_undone", everything it could not undo.

The resident helper (helper=DIR): after its reset, the process forks a daemon that waits
for the next reset request, so later resets skip starting Python and compiling this
file (0.5-0.6 s per guest under TCG on an idle machine, more than the reset's own work;
several times that with four guests on two busy host cores). Its pid and the FIFO's fd
number are in DIR/pid; it runs at nice -10, ahead of what it stops. It keeps itself when
it resets; a one-shot reset kills any helper left (one of an older script, one that
stopped answering) like every other process started after boot, then starts its own.
DIR is named after a hash of this file's text, so a changed script never talks to an
old helper. Requests come two ways:

* on the FIFO DIR/req, from an SSH session: `CLIENT_PID REPLY_FIFO WORDS...`; the reset
  keeps CLIENT_PID's chain of parents instead of its own, and its JSON line goes to
  REPLY_FIFO (made by the client: testbed/reset.py's CLIENT shell script);
* on TCP port=PORT, from the host through QEMU's forward of a 127.0.0.1 port (no SSH
  handshake, no shell): `TOKEN VERSION WORDS...`, answered only with the testbed's token
  (given in the file DIR.token, or with a FIFO request) and this file's version.

Imports nothing of the project: this file's text is what travels. Nor json, re or
signal: under TCG, with four guests on two host cores, their imports (enum above all)
cost the guest 0.4-0.8 s, more than the reset's own work; hence _signal, the word
parsing and the small JSON writer below.
"""
import _signal
import os
import sys
import time

TRACE = "/sys/kernel/tracing"
DEBUGFS = "/sys/kernel/debug"
CXL_DEVICES = "/sys/bus/cxl/devices"
BOOT_TIMES = "/run/beluga/boot-times"
# A daemon that `up` (or anything else meant to be part of the base system) starts after
# the boot script has ended writes its pid here, one per line: a reset keeps it.
BASE_PIDS = "/run/beluga/base.pids"
PF_KTHREAD = 0x00200000
POISON_LINE = 64  # the clear_poison mailbox command clears one 64-byte line
MAX_POISON_LINES = 65536  # 4 MiB of poison per reset; more is reported, not cleared
RUN_FILES = ["/run/beluga/serve.ready"]
RUN_DIRS = ["/run/beluga/programs"]
TMPFS_DIRS = ["/tmp", "/dev/shm"]
HELPER_NICE = -10


def clock_ticks():
    return os.sysconf("SC_CLK_TCK")


def boot_end_s(path=BOOT_TIMES):
    """Uptime (s) of the boot script's last mark, or None without marks."""
    try:
        with open(path) as f:
            marks = [float(line.split()[0]) for line in f if line.strip()]
    except (OSError, ValueError, IndexError):
        return None
    return max(marks) if marks else None


def read_proc(pid):
    """(ppid, flags, start ticks, comm) of a process, or None if it is gone (or a zombie).
    os.open/os.read: a text-mode open() per process costs several times more under TCG."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            stat = os.read(fd, 4096).decode(errors="replace")
        finally:
            os.close(fd)
    except OSError:
        return None
    comm = stat[stat.find("(") + 1:stat.rfind(")")]
    rest = stat[stat.rfind(")") + 2:].split()
    # rest[0] is field 3 (state): ppid is field 4, flags field 9, starttime field 22.
    if len(rest) < 20 or rest[0] in ("Z", "X"):
        return None
    return {"pid": pid, "ppid": int(rest[1]), "flags": int(rest[6]), "start": int(rest[19]), "comm": comm}


def cmdline(pid, comm):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return (cmd or f"[{comm}]")[:200]


def processes():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = read_proc(int(name))
            if p is not None:
                out[p["pid"]] = p
    return out


def user_processes():
    """The processes under init (every one a test can start), found through the children
    files of /proc/PID/task/TID: the kernel threads, most of /proc, are never read, so
    the first scan is 5-10x faster. A process forking meanwhile can be missed (the kernel
    says these lists are exact only for stopped processes), so a full scan (processes())
    confirms the end."""
    out = {}
    todo = [1]
    while todo:
        pid = todo.pop()
        p = read_proc(pid)
        if p is None or pid in out:
            continue
        out[pid] = p
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo.extend(int(w) for w in f.read().split())
            except (OSError, ValueError):
                pass
    return out


def ancestry(procs, pid):
    chain = set()
    while pid and pid not in chain:
        chain.add(pid)
        p = procs.get(pid)
        pid = p["ppid"] if p else 0
    return chain


SSHD = ("sshd", "sshd-session", "sshd-auth")


def to_stop(procs, me, boot_end_ticks, base_pids=()):
    """The processes that are not part of the base system (see the module's docstring).
    The per-connection processes of the base sshd (sshd-session) stay too, so that other
    clients' open connections survive a reset (what runs under them does not)."""
    keep = ancestry(procs, me) | set(base_pids)
    keep |= {pid for pid, p in procs.items()
             if pid <= 2 or p["flags"] & PF_KTHREAD or p["ppid"] == 2 or p["start"] <= boot_end_ticks}
    grew = True
    while grew:
        grew = False
        for pid, p in procs.items():
            parent = procs.get(p["ppid"])
            if pid not in keep and p["comm"] in SSHD and parent and parent["comm"] in SSHD and p["ppid"] in keep:
                keep.add(pid)
                grew = True
    return sorted(pid for pid in procs if pid not in keep)


def stop_processes(deadline_s=5.0, anchor=None):
    """Freeze and kill every process not of the base system; the chain of parents of
    `anchor` (default: this process; the client's shell for the helper) is kept."""
    end = boot_end_s()
    if end is None:
        return [], [f"processes: no boot marks in {BOOT_TIMES}: which processes belong to the base "
                    "system is unknown, none were stopped"]
    ticks = int(end * clock_ticks())
    base = []
    try:
        with open(BASE_PIDS) as f:
            base = [int(w) for w in f.read().split() if w.isdigit()]
    except OSError:
        pass
    killed = []
    me = os.getpid()
    if anchor is not None:  # the helper: it stays, and so does its client's chain
        base.append(me)
        me = anchor
    deadline = time.monotonic() + deadline_s
    full = not os.path.exists("/proc/1/task/1/children")
    while True:
        procs = processes() if full else user_processes()
        pids = to_stop(procs, me, ticks, base)
        if not pids:
            if full:
                return killed, []
            full = True  # none left under init: confirm with every pid of /proc
            continue
        if time.monotonic() > deadline:
            return killed, ["processes: still running after SIGKILL: "
                            + ", ".join(f"{p} ({cmdline(p, procs[p]['comm'])[:80]})" for p in pids if p in procs)]
        for pid in pids:
            if all(k["pid"] != pid for k in killed):
                killed.append({"pid": pid, "cmd": cmdline(pid, procs[pid]["comm"])})
        for sig in (_signal.SIGSTOP, _signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        # Gone once /proc says so (a zombie counts as gone: its parent reaps it).
        while any(read_proc(p) is not None for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def parse_poison(trace_text):
    """{memdev: [(dpa, length)]} and {memdev: serial} from the cxl_poison trace lines of
    a poison-list read (guest memN names are not stable; serials are)."""
    out, serials = {}, {}
    for line in trace_text.splitlines():
        if " cxl_poison: " not in line:
            continue
        f = dict(w.split("=", 1) for w in line.split(" cxl_poison: ", 1)[1].split() if "=" in w)
        if f.get("trace_type") != "List" or not {"memdev", "serial", "dpa", "dpa_length"} <= f.keys():
            continue
        try:
            mem, serial, ent = f["memdev"], int(f["serial"]), (int(f["dpa"], 16), int(f["dpa_length"], 16))
        except ValueError:
            continue
        serials[mem] = serial
        out.setdefault(mem, [])
        if ent not in out[mem]:
            out[mem].append(ent)
    return out, serials


def memdevs():
    if not os.path.isdir(CXL_DEVICES):
        return []
    return sorted(d for d in os.listdir(CXL_DEVICES)
                  if d.startswith("mem") and os.path.exists(f"{CXL_DEVICES}/{d}/trigger_poison_list"))


def read_poison_lists():
    write(f"{TRACE}/trace", "")
    write(f"{TRACE}/events/cxl/cxl_poison/enable", "1")
    for mem in memdevs():
        # The kernel reads the list through the mailbox and emits the trace events
        # before the write returns.
        write(f"{CXL_DEVICES}/{mem}/trigger_poison_list", "1")
    with open(f"{TRACE}/trace") as f:
        return parse_poison(f.read())


def clear_poison():
    if not os.path.exists(f"{TRACE}/events/cxl/cxl_poison/enable"):
        return [], ["poison: the kernel has no cxl_poison trace event: poison lists not read, nothing cleared"]
    found, serials = read_poison_lists()
    if not found:
        return [], []
    mounted = not os.path.isdir(f"{DEBUGFS}/cxl") and mount_debugfs()
    try:
        return _clear(found, serials)
    finally:
        if mounted:  # not mounted after boot: left as it was
            umount_debugfs()


_libc = None  # ctypes' libc, loaded by the helper once: mount(2) without an exec


def load_libc():
    global _libc
    try:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
        _libc.umount.argtypes = [ctypes.c_char_p]
    except (ImportError, OSError, AttributeError):
        _libc = None


def mount_debugfs():
    # A one-shot run pays two execs (sh, mount); importing ctypes would cost it more.
    if _libc is not None:
        return _libc.mount(b"none", DEBUGFS.encode(), b"debugfs", 0, None) == 0
    return os.system(f"mount -t debugfs none {DEBUGFS} 2>/dev/null") == 0


def umount_debugfs():
    if _libc is not None:
        _libc.umount(DEBUGFS.encode())
    else:
        os.system(f"umount {DEBUGFS} 2>/dev/null")


def _clear(found, serials):
    cleared, problems = [], []
    for mem, ents in sorted(found.items()):
        ctl = f"{DEBUGFS}/cxl/{mem}/clear_poison"
        if not os.path.exists(ctl):
            problems.append(f"poison: {mem} has no {ctl} (the device or kernel does not offer Clear Poison): "
                            f"{len(ents)} poisoned range(s) left")
            continue
        lines = 0
        for dpa, length in ents:
            for a in range(dpa - dpa % POISON_LINE, dpa + length, POISON_LINE):
                if lines >= MAX_POISON_LINES:
                    break
                try:
                    write(ctl, hex(a))
                    lines += 1
                except OSError as e:
                    problems.append(f"poison: {mem} dpa {a:#x}: clear_poison failed: {e.strerror or e}")
                    break
        cleared.append({"memdev": mem, "serial": serials.get(mem), "ranges": [[d, n] for d, n in ents],
                        "lines": lines})
    left, _ = read_poison_lists()
    for mem, ents in sorted(left.items()):
        problems.append(f"poison: {mem} still lists {len(ents)} poisoned range(s) after clearing: "
                        + ", ".join(f"dpa {d:#x}+{n:#x}" for d, n in ents[:8]))
    return cleared, problems


def reset_trace():
    if not os.path.isdir(f"{TRACE}/events"):
        return ["trace: no tracefs at " + TRACE]
    write(f"{TRACE}/events/enable", "0")
    write(f"{TRACE}/trace", "")  # empties every CPU's ring buffer
    write(f"{TRACE}/tracing_on", "1")
    return []


def remove_tree(top, keep_top=True):
    """Remove what is under `top`, never following a symbolic link and never entering
    another file system (a folder mounted there, e.g. a shared folder, is left alone)."""
    try:
        dev = os.lstat(top).st_dev
    except FileNotFoundError:
        return 0
    removed = 0

    def clear(d):
        nonlocal removed
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_dev != dev:
                    continue  # a mount point
                if e.is_dir(follow_symlinks=False):
                    clear(e.path)
                    os.rmdir(e.path)
                else:
                    os.unlink(e.path)
                removed += 1
            except OSError:
                pass

    clear(top)
    if not keep_top:
        try:
            os.rmdir(top)
        except OSError:
            pass
    return removed


def clear_files():
    removed = 0
    for f in RUN_FILES:
        try:
            os.unlink(f)
            removed += 1
        except FileNotFoundError:
            pass
    for d in RUN_DIRS:
        removed += remove_tree(d, keep_top=False)
    for d in TMPFS_DIRS:
        removed += remove_tree(d)
    return removed


def main(args, anchor=None):
    t0 = time.monotonic()
    out = {"not_undone": [], "phases": {}}

    def lap(name, t=[t0]):
        now = time.monotonic()
        out["phases"][name] = round(now - t[0], 3)
        t[0] = now

    killed, problems = stop_processes(args.get("kill_deadline_s", 5.0), anchor)
    out["killed"] = killed
    out["not_undone"] += problems
    lap("processes")
    if args.get("poison", True):
        cleared, problems = clear_poison()
        out["poison_cleared"] = cleared
        out["not_undone"] += problems
        lap("poison")
    out["not_undone"] += reset_trace()
    lap("trace")
    out["files_removed"] = clear_files()
    lap("files")
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def parse_args(words):
    """`poison=0 kill_deadline_s=5 helper=/run/beluga/reset-x` -> {"poison": False,
    "kill_deadline_s": 5.0, "helper": "/run/beluga/reset-x"}."""
    out = {}
    for w in words:
        k, _, v = w.partition("=")
        if k in ("poison", "start"):
            out[k] = v not in ("0", "false", "no")
        elif k in ("helper", "token"):
            out[k] = v
        elif k == "port":
            out[k] = int(v)
        else:
            out[k] = float(v)
    return out


# ------------------------------------------------------------------ the resident helper
def helper_alive(d):
    """True when DIR/pid names a process that holds DIR/req open at the fd it names."""
    try:
        with open(f"{d}/pid") as f:
            pid, fd = f.read().split()
        return os.path.samestat(os.stat(f"/proc/{pid}/fd/{fd}"), os.stat(f"{d}/req"))
    except (OSError, ValueError):
        return False


def take_token(path):
    """The testbed's token that the client left in `path` (then removed), or None."""
    try:
        with open(path) as f:
            token = f.read().strip()
        os.unlink(path)
        return token or None
    except OSError:
        return None


def start_helper(d, token=None, port=None):
    """Fork the resident helper for DIR (a daemon: its own session, stdio on /dev/null,
    so the SSH command that started it returns); nothing when one is alive."""
    if helper_alive(d):
        return
    top, mine = os.path.split(d)
    for name in os.listdir(top):  # an older script's folder and file (its helper is killed)
        if name.startswith("reset-") and name not in (mine, mine + ".py", mine + ".token"):
            remove_tree(f"{top}/{name}", keep_top=False)
            try:
                os.unlink(f"{top}/{name}")
            except OSError:
                pass
    sys.stdout.flush()
    if os.fork():
        return
    try:  # the first child: a new session, then the daemon, then gone
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.chdir("/")
        serve(d, token, port)
    finally:
        os._exit(0)


def serve(d, token=None, port=None):
    """The helper's loop: requests on the FIFO DIR/req (from SSH sessions) and, where
    `port` is given, on TCP (from the host, through QEMU's forward of a 127.0.0.1 port:
    no SSH handshake, no shell); see handle() and serve_tcp(). It never ends on a bad
    request: only a signal ends it."""
    os.makedirs(d, mode=0o700, exist_ok=True)
    req = f"{d}/req"
    try:
        os.unlink(req)
    except FileNotFoundError:
        pass
    os.mkfifo(req, 0o600)
    fd = os.open(req, os.O_RDWR)  # a reader and a writer: never blocks, never sees EOF
    load_libc()
    try:  # ahead of what it stops on the guest's one vCPU (a test's Python still starting)
        os.setpriority(os.PRIO_PROCESS, 0, HELPER_NICE)
    except OSError:
        pass
    import select
    state = {"token": token}
    listener = listen(port) if port else None
    with open(f"{d}/pid.tmp", "w") as f:
        f.write(f"{os.getpid()} {fd}\n")
    os.rename(f"{d}/pid.tmp", f"{d}/pid")
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    if listener is not None:
        poll.register(listener.fileno(), select.POLLIN)
    buf = b""
    while True:
        for ready, _ in poll.poll():
            if ready != fd:
                serve_tcp(d, listener, state)
                continue
            buf += os.read(fd, 4096)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                handle(d, line.decode(errors="replace"), state)


def listen(port):
    # _socket, not socket: socket.py imports enum, which costs a TCG guest most of a second.
    import _socket
    try:
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(4)
        return s
    except OSError:
        return None  # the port is taken: requests come over SSH only


def run_reset(args, anchor):
    try:
        out = main(args, anchor=anchor)
    except Exception as e:  # noqa: BLE001 - the helper outlives a failed reset; the client hears of it
        out = {"not_undone": [f"the reset helper failed: {type(e).__name__}: {e}"]}
    out["helper"] = True
    return dumps(out) + "\n"


def handle(d, line, state):
    """One request from the FIFO: `CLIENT_PID REPLY_FIFO WORDS...`; the reply is one JSON
    line. A `token=` word is the testbed's token from then on."""
    words = line.split()
    if len(words) < 2 or not words[0].isdigit() or not words[1].startswith(f"{d}/out."):
        return
    try:
        args = parse_args(words[2:])
    except ValueError:
        return
    if args.get("token"):
        state["token"] = args["token"]
    reply(words[1], run_reset(args, int(words[0])))


def serve_tcp(d, listener, state):
    """One request over TCP: `TOKEN VERSION WORDS...`, VERSION the name of the helper's
    folder (reset-<hash of this file>). A wrong token or another version gets the
    connection closed without a word: the host then asks over SSH (with the key), where
    another version's helper is replaced."""
    import _socket
    try:
        fd, _ = listener._accept()
    except OSError:
        return
    conn = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
    try:
        conn.settimeout(3)  # the host sends its line at once; anyone else is not waited for long
        data = b""
        while b"\n" not in data and len(data) < 4096:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        words = data.split(b"\n", 1)[0].decode(errors="replace").split()
        if len(words) < 2 or not state["token"] or not same(words[0], state["token"]) \
                or words[1] != os.path.basename(d):
            return
        args = parse_args(words[2:])
        conn.settimeout(None)
        conn.sendall(run_reset(args, os.getpid()).encode())
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


def same(a, b):
    """a == b in a time that does not depend on where they differ."""
    a, b = a.encode(), b.encode()
    diff = len(a) ^ len(b)
    for x, y in zip(a, b):
        diff |= x ^ y
    return diff == 0


def reply(path, text):
    try:  # the client holds it open for reading; without a reader (it died) ENXIO
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.unlink(path)
        os.set_blocking(fd, True)  # a reader that dies now makes the write fail (EPIPE), not hang
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass
    finally:
        os.close(fd)


def dumps(o):
    """JSON of None, bool, int, float, str, list, tuple and dict with str keys."""
    if o is None or o is True or o is False:
        return {None: "null", True: "true", False: "false"}[o]
    if isinstance(o, (int, float)):
        return repr(o)
    if isinstance(o, str):
        out = []
        for c in o:
            n = ord(c)
            if c in '"\\':
                out.append("\\" + c)
            elif 32 <= n < 127:
                out.append(c)
            elif n < 0x10000:
                out.append("\\u%04x" % n)
            else:
                n -= 0x10000
                out.append("\\u%04x\\u%04x" % (0xD800 + (n >> 10), 0xDC00 + (n & 0x3FF)))
        return '"' + "".join(out) + '"'
    if isinstance(o, (list, tuple)):
        return "[" + ",".join(dumps(x) for x in o) + "]"
    if isinstance(o, dict):
        return "{" + ",".join(dumps(str(k)) + ":" + dumps(v) for k, v in o.items()) + "}"
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


if __name__ == "__main__":
    ARGS = parse_args(sys.argv[1:])
    if not ARGS.get("start"):  # start=1: only start the helper (at `up`)
        print(dumps(main(ARGS)))
    if os.path.basename(ARGS.get("helper", "")).startswith("reset-"):
        start_helper(ARGS["helper"], take_token(ARGS["helper"] + ".token"), ARGS.get("port"))
