"""Runs INSIDE a guest (python3 of Debian trixie, stdlib only), sent over SSH by testbed/reset.py.

    python3 -I -S -c "$(cat guest_reset.py)" [poison=0] [kill_deadline_s=5]   # prints one JSON line

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


def stop_processes(deadline_s=5.0):
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
    deadline = time.monotonic() + deadline_s
    while True:
        procs = processes()
        pids = to_stop(procs, me, ticks, base)
        if not pids:
            return killed, []
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
    mounted = not os.path.isdir(f"{DEBUGFS}/cxl") and os.system(f"mount -t debugfs none {DEBUGFS} 2>/dev/null") == 0
    try:
        return _clear(found, serials)
    finally:
        if mounted:  # not mounted after boot: left as it was
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


def main(args):
    t0 = time.monotonic()
    out = {"not_undone": [], "phases": {}}

    def lap(name, t=[t0]):
        now = time.monotonic()
        out["phases"][name] = round(now - t[0], 3)
        t[0] = now

    killed, problems = stop_processes(args.get("kill_deadline_s", 5.0))
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
    """`poison=0 kill_deadline_s=5` -> {"poison": False, "kill_deadline_s": 5.0}."""
    out = {}
    for w in words:
        k, _, v = w.partition("=")
        out[k] = (v not in ("0", "false", "no")) if k == "poison" else float(v)
    return out


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
    print(dumps(main(parse_args(sys.argv[1:]))))
