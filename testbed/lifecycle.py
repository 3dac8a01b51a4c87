"""Testbed lifecycle: up, down, status, list, exec, logs.

A running testbed is a folder `<state>/<name>/` with `state.json`, the SSH key and one
folder per host (overlay disk, QMP and serial sockets, serial and QEMU logs, pid file),
plus the pool's backing files under `<pools>/<name>/`. A later CLI process finds the
testbed from that folder; every pid is checked against /proc before it is signalled.

Folders are 0700 and files and sockets 0600 whatever the umask (paths.py); `name` passes
names.check before it becomes a path, and only direct children of the state and pool
folders are ever removed. Each QEMU's pid is in state.json from the moment it starts, so
a failure or Ctrl-C at any point of `up` stops every QEMU started so far.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import threading
from dataclasses import dataclass
from pathlib import Path

from . import accel as accel_mod
from . import image as image_mod
from . import kernel as kernel_mod
from . import names as names_mod
from . import paths, qmp, ssh
from . import topology as topo
from .log import TestbedError, info, step
from .par import map_parallel
from .qemucmd import QEMU, HostFiles, host_argv
from .shares import Share
from . import shares as shares_mod

SSH_READY_TIMEOUT_S = 180
STATE_FILE = "state.json"
SSHD_STARTED = b"beluga: sshd started"  # printed on the console by images/rootfs/usr/lib/beluga/boot
BOOT_FAILED = b"beluga: boot failed"  # printed by testbed/kernel_init.sh (a user kernel's initrd)
START_TIMEOUT_S = 60  # from exec to QEMU answering on QMP (its init done, the SSH forward bound)
PORT_ATTEMPTS = 5
# QEMU's words when the SSH forward's port is taken (it exits 1 at once):
# "-netdev user,...,hostfwd=tcp:127.0.0.1:39697-:22: Could not set up host forwarding rule ..."
PORT_TAKEN = "Could not set up host forwarding rule"


@dataclass(frozen=True)
class HostState:
    name: str
    pid: int | None
    ssh_port: int
    dir: Path
    argv: list[str]

    @property
    def files(self) -> HostFiles:
        return HostFiles(self.dir)

    def alive(self) -> bool:
        return pid_is_ours(self.pid, self.dir)

    def said(self, marker: bytes) -> bool:
        """Whether the guest printed `marker` on its serial console (the boot script's lines)."""
        try:
            with open(self.files.serial_log, "rb") as f:
                return marker in f.read()
        except OSError:
            return False

    def line_with(self, marker: bytes) -> str:
        """The first console line that holds `marker` (the whole line: it says why)."""
        try:
            text = self.files.serial_log.read_bytes()
        except OSError:
            return marker.decode()
        for line in text.splitlines():
            if marker in line:
                return line.decode(errors="replace").strip()
        return marker.decode()

    def wait_said(self, marker: bytes, *, timeout_s: float, failed: bytes | None = None,
                  stop: threading.Event | None = None, proc: subprocess.Popen | None = None) -> None:
        """Wait for the guest to print `marker` on its console. Watching the serial log
        costs the guest nothing; raises when it prints `failed`, QEMU exits (`proc`, where
        this process started it, gives the exit status), or time is up."""
        deadline = time.monotonic() + timeout_s
        while not self.said(marker):
            if failed and self.said(failed):
                raise TestbedError(f"{self.name}: the guest said {self.line_with(failed)!r}")
            if stop is not None and stop.is_set():
                raise TestbedError(f"{self.name}: wait abandoned")  # another host failed first
            if proc is not None and proc.poll() is not None:
                raise _host_failed(self, f"QEMU exited while booting (exit {proc.returncode})")
            if not self.alive():
                raise _host_failed(self, "QEMU exited while booting")
            if time.monotonic() > deadline:
                raise _host_failed(self, f"the guest did not say {marker.decode()!r} on its console "
                                         f"within {timeout_s:.0f} s")
            time.sleep(0.1)


@dataclass(frozen=True)
class Testbed:
    name: str
    dir: Path
    data: dict

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def hosts(self) -> list[HostState]:
        return [HostState(h["name"], h.get("pid"), h["ssh_port"], Path(h["dir"]), h["argv"]) for h in self.data["hosts"]]

    def host(self, name: str) -> HostState:
        for h in self.hosts:
            if h.name == name:
                return h
        raise TestbedError(f"testbed '{self.name}' has no host '{name}' (hosts: {', '.join(h.name for h in self.hosts)})")

    @property
    def topology(self) -> topo.Topology:
        return topo.parse(self.data["topology_yaml"], self.data["topology_source"], check_paths=False)

    @property
    def shares(self) -> list[Share]:
        return [Share.from_state(s) for s in self.data.get("shares") or []]

    @property
    def pool_files(self) -> dict[str, Path]:
        return {k: Path(v) for k, v in self.data["pool_files"].items()}

    def save(self) -> None:
        tmp = self.dir / (STATE_FILE + ".tmp")
        paths.write_private(tmp, json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.dir / STATE_FILE)


def pid_is_ours(pid: int | None, host_dir: Path) -> bool:
    """Alive and still the QEMU we started (pids get reused)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(host_dir).encode() in cmdline


def testbed_dir(name: str) -> Path:
    """`<state>/<name>`; a name that is not one (`..`, `a/b`, `x,y`) never becomes a path."""
    return paths.state_dir() / names_mod.check(name, "testbed name")


def find(name: str) -> Testbed:
    d = testbed_dir(name)
    paths.check_private(paths.state_dir())
    f = d / STATE_FILE
    if not f.is_file():
        running = names()
        hint = f"running: {', '.join(running)}" if running else "none is running; 'beluga-testbed up TOPOLOGY' starts one"
        raise TestbedError(f"no testbed named '{name}'", hint=hint)
    return Testbed(name, d, json.loads(f.read_text()))


def names() -> list[str]:
    d = paths.state_dir()
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir()
                  if names_mod.problem(p.name) is None and (p / STATE_FILE).is_file())


@contextlib.contextmanager
def _locked(name: str):
    testbed_dir(name)  # the name check
    paths.private_dir(paths.state_dir())
    lock = paths.state_dir() / f".{name}.lock"
    with os.fdopen(paths.create_private(lock), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TestbedError(f"another beluga-testbed command is working on '{name}'",
                               hint="wait for it to finish") from None
        yield


def _free_ports(n: int, avoid: set[int] = frozenset()) -> list[int]:
    """`n` distinct free loopback ports, none in `avoid`. Every socket stays bound until all
    are drawn: one bound and closed at a time, the kernel handed the same port to two hosts
    (36 times in 20,000 draws of 8). QEMU binds them later, so one may still be taken by then:
    `_launch` retries that host on another."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            if len(socks) > n + 100:
                raise TestbedError("no free TCP port on 127.0.0.1 for the SSH forwards")
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in avoid and port not in ports:
                ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


def _pool_file(name: str, device_id: str) -> Path:
    return paths.pool_dir() / name / f"{device_id}.raw"


def _host_argv(t: topo.Topology, name: str, h: topo.Host, *, boot: kernel_mod.Boot, cmdline: str,
               ssh_port: int, accel: str, provision: bool, shares: list[Share] = ()) -> list[str]:
    """One host's QEMU argv inside testbed `name` (its state folder, pool files and key)."""
    from .provision import GUEST_SCRIPT, POOL_ARGS_FILE
    d = testbed_dir(name)
    all_shares = list(shares) + ([boot.modules_share] if boot.modules_share else [])
    return host_argv(t, h, kernel=boot.kernel, initrd=boot.initrd, cmdline=cmdline, files=HostFiles(d / h.name),
                     ssh_port=ssh_port, pool_files={dev.id: _pool_file(name, dev.id) for dev in t.devices},
                     authorized_keys=d / "id_ed25519.pub", accel=accel,
                     pool_args=d / POOL_ARGS_FILE if provision else None,
                     guest_script=GUEST_SCRIPT if provision else None, shares=all_shares, qemu=boot.qemu)


def _user_kernel(t: topo.Topology, kernel: Path | None, initrd: Path | None, modules: Path | None,
                 qemu: Path | None) -> kernel_mod.UserKernel:
    """The options given over the topology's `kernel:` fields, each path checked."""
    uk = kernel_mod.UserKernel(kernel, initrd, modules, qemu).over(t.kernel)
    kernel_mod.check(uk)
    return uk


def plan(topology_ref: str, name: str | None, accel: str = "tcg", provision: bool = True,
         shares: list[Share] = (), *, kernel: Path | None = None, initrd: Path | None = None,
         modules: Path | None = None, qemu: Path | None = None) -> tuple[topo.Topology, str, dict[str, list[str]]]:
    """The argv of every host, without starting anything (for --dry-run). A user's bzImage
    shows as the vmlinux that `up` unpacks into the testbed's state folder."""
    t = topo.load(topology_ref)
    name = _testbed_name(name, t)
    uk = _user_kernel(t, kernel, initrd, modules, qemu)
    img = image_mod.find_image()
    boot = kernel_mod.plan(uk, img, testbed_dir(name))
    cmdline = img.kernel_cmdline if img else image_mod.load_recipe().kernel_cmdline
    out = {h.name: _host_argv(t, name, h, boot=boot, cmdline=cmdline, ssh_port=10022 + i,
                              accel=accel, provision=provision, shares=shares)
           for i, h in enumerate(t.hosts)}
    return t, name, out


def _testbed_name(name: str | None, t: topo.Topology) -> str:
    """The name a testbed gets: --name, else the topology's own `name:` (checked here too,
    whatever loaded the topology: it becomes a folder name)."""
    if name is not None:
        return names_mod.check(name, "testbed name")
    if (why := names_mod.problem(t.name)) is not None:
        raise TestbedError(f"{t.source}: name: {why} (it names the testbed when --name is not given)",
                           hint="fix the topology's name, or give one with --name")
    return t.name


def up(topology_ref: str, *, name: str | None = None, accel: str = "auto", retain: bool = False,
       provision: bool = True, shares: list[Share] = (), kernel: Path | None = None, initrd: Path | None = None,
       modules: Path | None = None, qemu: Path | None = None) -> Testbed:
    """`shares` (shares.parse_all) are exported by every host's QEMU and mounted in every
    guest once it is up. `kernel`, `initrd`, `modules` and `qemu` (each over the topology's
    `kernel:` field of that name) boot a user's kernel with its modules tree and use another
    QEMU binary: see kernel.py."""
    t = topo.load(topology_ref)
    name = _testbed_name(name, t)
    uk = _user_kernel(t, kernel, initrd, modules, qemu)
    img = image_mod.require_image()
    kernel_mod.plan(uk, img, testbed_dir(name))  # the modules' version, before anything is made
    start = time.monotonic()
    with _locked(name):
        d = testbed_dir(name)
        if (d / STATE_FILE).exists():
            tb = find(name)
            alive = [h.name for h in tb.hosts if h.alive()]
            what = f"is up ({', '.join(alive)} running)" if alive else "has leftovers from an earlier run"
            raise TestbedError(f"testbed '{name}' {what}",
                               hint=f"'beluga-testbed down {name}' first, or pick another --name")
        if os.path.lexists(d):
            raise TestbedError(f"testbed '{name}' has leftovers from an earlier run ({d})",
                               hint=f"'beluga-testbed down {name}' first, or pick another --name")
        paths.private_dir(paths.pool_dir())  # refused before anything is made or rolled back there
        chosen, notice = accel_mod.choose(accel, img.kernel)
        info(f"• {notice}")
        boot = kernel_mod.plan(uk, img, d)
        # Every QEMU this process started, by host: rollback stops each of them, whatever
        # state.json got to say (the pid goes there too, as each one starts).
        procs: dict[str, subprocess.Popen] = {}
        try:
            with step(f"state folder {d} and pool files ({t.pool_size_bytes >> 20} MiB, sparse)"):
                paths.make_child_dir(paths.state_dir(), name)
                ssh.generate_key(d / "id_ed25519")
                os.chmod(d / "id_ed25519.pub", paths.FILE_MODE)
                pool_files = _create_pool_files(name, t)
                if uk.kernel is not None:
                    boot = kernel_mod.prepare(uk, img, d)
                if provision:
                    from .provision import POOL_ARGS_FILE, pool_args, signing_plan
                    paths.write_private(d / POOL_ARGS_FILE, json.dumps(pool_args(t, sign=signing_plan(t))))
                hosts = []
                for h, port in zip(t.hosts, _free_ports(len(t.hosts))):
                    files = HostFiles(paths.make_child_dir(d, h.name))
                    _check_socket_path(files.qmp)
                    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img.disk),
                                    str(files.overlay)], check=True, stdin=subprocess.DEVNULL, umask=paths.UMASK)
                    os.chmod(files.overlay, paths.FILE_MODE)
                    argv = _host_argv(t, name, h, boot=boot, cmdline=img.kernel_cmdline,
                                      ssh_port=port, accel=chosen, provision=provision, shares=shares)
                    hosts.append({"name": h.name, "pid": None, "ssh_port": port, "dir": str(files.dir), "argv": argv})
                tb = Testbed(name, d, {
                    "name": name, "topology": t.name, "topology_source": t.source,
                    "topology_yaml": topo.resolve(topology_ref).read_text(), "accel": chosen, "image": img.key,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pool_dir": str(paths.pool_dir() / name),
                    "pool_files": {k: str(v) for k, v in pool_files.items()}, "hosts": hosts, "pool": None,
                    "shares": [s.to_state() for s in shares],
                    "kernel": boot.to_state(uk) if uk or boot.qemu != QEMU else None,
                })
                tb.save()
            with step(f"launch {len(hosts)} host(s) under {chosen}"):
                _launch_all(tb, procs, lambda h, port: _host_argv(
                    t, name, t.host(h), boot=boot, cmdline=img.kernel_cmdline,
                    ssh_port=port, accel=chosen, provision=provision, shares=shares))
            names = ", ".join(h.name for h in tb.hosts)
            with step(f"wait for {names} to boot (sshd started)" if provision else f"wait for SSH on {names}"):
                _wait_all_ssh(tb, procs, probe=not provision)
            if provision:
                from . import provision as prov
                prov.provision(tb, at_boot=True)
            if shares:
                with step(f"mount {len(shares)} shared folder(s) on {names}: "
                          + ", ".join(f"{s.host_dir} at {s.guest_dir} ({'rw' if s.rw else 'ro'})" for s in shares)):
                    shares_mod.mount(tb, list(shares))
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                info("✗ interrupted")
            if retain:
                info(f"• --retain: leaving '{name}' as it is for inspection; 'beluga-testbed down {name}' removes it")
            else:
                with step(f"roll back '{name}'"):
                    try:
                        for p in procs.values():
                            _kill(p)
                    finally:
                        _teardown(name)
            raise
    info(f"✓ {name} is up: {len(t.hosts)} host(s) ready in {time.monotonic() - start:.1f} s")
    return find(name)


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C (or SIGTERM/SIGHUP) waits until the block is done, then raises: between the
    fork of a QEMU and the note of its pid it would orphan that QEMU. (Handlers, unlike a
    blocked signal mask, do not pass on to the child.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            raise KeyboardInterrupt


def _start(tb: Testbed, name: str, procs: dict[str, subprocess.Popen]) -> None:
    """Start one host's QEMU; its pid is in `procs` and state.json before anything else runs."""
    h = tb.host(name)
    with os.fdopen(paths.create_private(h.files.qemu_log), "w") as log, _interrupts_deferred():
        # umask: QEMU creates the QMP and serial sockets, the serial log and the pid file;
        # the serial console is a root shell in the guest.
        p = subprocess.Popen(h.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, umask=paths.UMASK)
        procs[name] = p
        _host_record(tb, name)["pid"] = p.pid
        tb.save()


def _host_record(tb: Testbed, name: str) -> dict:
    return next(x for x in tb.data["hosts"] if x["name"] == name)


def _launch_all(tb: Testbed, procs: dict[str, subprocess.Popen], argv_for) -> None:
    """Start every host's QEMU and wait until each answers on QMP (its SSH forward is bound
    by then). A host whose port another program took in the meantime starts again on
    another port; any other failure raises, with the end of the host's logs."""
    for h in tb.hosts:
        _start(tb, h.name, procs)
    pending = [h.name for h in tb.hosts]
    for _ in range(PORT_ATTEMPTS):
        taken = []
        for n in pending:
            h = tb.host(n)
            why = _wait_started(h, procs[n])
            if why is None:
                continue
            if not _said_port_taken(h):
                raise _host_failed(h, why)
            taken.append(n)
        if not taken:
            return
        in_use = {h.ssh_port for h in tb.hosts}
        for n, port in zip(taken, _free_ports(len(taken), avoid=in_use)):
            rec = _host_record(tb, n)
            info(f"• {n}: port {rec['ssh_port']} was taken before QEMU could bind it; again on port {port}")
            rec["ssh_port"], rec["argv"], rec["pid"] = port, argv_for(n, port), None
            _start(tb, n, procs)
        pending = taken
    h = tb.host(pending[0])
    raise _host_failed(h, f"no free port for the SSH forward after {PORT_ATTEMPTS} attempts")


def _said_port_taken(h: HostState) -> bool:
    try:
        return PORT_TAKEN in h.files.qemu_log.read_text(errors="replace")
    except OSError:
        return False


def _wait_started(h: HostState, p: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> str | None:
    """None once QEMU answers on its QMP socket: its monitor starts after the netdevs, so the
    SSH forward's port is bound by then. Otherwise why not."""
    deadline = time.monotonic() + timeout_s
    while p.poll() is None:
        if h.files.qmp.exists():
            try:
                qmp.execute(h.files.qmp, "query-status", timeout_s=2)
                return None
            except Exception:  # noqa: BLE001 - not listening yet, or exiting: poll() says which
                pass
        if time.monotonic() > deadline:
            return f"QEMU did not answer on its QMP socket within {timeout_s:.0f} s"
        time.sleep(0.05)
    return f"QEMU exited at start (exit {p.returncode})"


def _kill(p: subprocess.Popen) -> None:
    """Stop a QEMU this process started (rollback: its files go next, nothing to save)."""
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout=3)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


def _check_socket_path(p: Path) -> None:
    if len(str(p)) > 100:
        raise TestbedError(f"socket path too long for a unix socket: {p}",
                           hint="set BELUGA_TESTBED_STATE to a shorter folder")


def _create_pool_files(name: str, t: topo.Topology) -> dict[str, Path]:
    """`<pools>/<name>/<device>.raw`, sparse, 0600; never through a symlink."""
    root = paths.private_dir(paths.pool_dir())
    paths.remove_child(root, root / name)  # a pool left by a testbed whose state is gone
    paths.make_child_dir(root, name)
    out = {}
    for dev in t.devices:
        f = _pool_file(name, dev.id)
        fd = paths.create_private(f, exclusive=True)
        try:
            os.ftruncate(fd, dev.size_bytes)
        finally:
            os.close(fd)
        out[dev.id] = f
    return out


def _host_failed(h: HostState, why: str) -> TestbedError:
    tail = []
    for f, label in ((h.files.qemu_log, "QEMU log"), (h.files.serial_log, "serial log")):
        try:
            lines = f.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            continue
        if lines:
            tail.append(f"--- {h.name} {label} ({f}), last lines:\n" + "\n".join(lines))
    return TestbedError(f"{h.name}: {why}\n" + "\n".join(tail))


def _wait_all_ssh(tb: Testbed, procs: dict[str, subprocess.Popen], *, probe: bool = True) -> None:
    """Every host says on its console that sshd started; with `probe`, each then answers a
    command over SSH. (Provisioning's first SSH call proves that instead: it comes once the
    guest has made its region, and an earlier one would take the guest's vCPU from it.)"""
    stop = threading.Event()  # set on the first failure or Ctrl-C: the other waits end too

    def wait(h: HostState) -> None:
        deadline = time.monotonic() + SSH_READY_TIMEOUT_S
        h.wait_said(SSHD_STARTED, timeout_s=SSH_READY_TIMEOUT_S, failed=BOOT_FAILED, stop=stop, proc=procs[h.name])
        if not probe:
            return
        try:
            ssh.wait_ready(h.ssh_port, tb.key, timeout_s=max(1.0, deadline - time.monotonic()),
                           alive=lambda: not stop.is_set() and procs[h.name].poll() is None)
        except RuntimeError:
            raise _host_failed(h, f"QEMU exited while booting (exit {procs[h.name].returncode})") from None
        except TimeoutError as e:
            raise _host_failed(h, str(e)) from None

    try:
        map_parallel(wait, tb.hosts)
    except BaseException:
        stop.set()
        raise


def down(name: str) -> bool:
    """Stop every host and remove every file of the testbed. Idempotent: False if nothing was there."""
    with _locked(name):
        return _teardown(name)


def _teardown(name: str) -> bool:
    d = testbed_dir(name)
    paths.check_private(paths.pool_dir())
    pool = paths.pool_dir() / name
    found = os.path.lexists(d) or os.path.lexists(pool)
    if os.path.isdir(d) and not os.path.islink(d):
        map_parallel(_stop_host, _hosts_to_stop(name, d))
    paths.remove_child(paths.state_dir(), d)
    paths.remove_child(paths.pool_dir(), pool)
    with contextlib.suppress(OSError):
        paths.remove_child(paths.state_dir(), paths.state_dir() / f".{name}.lock")
    with contextlib.suppress(OSError):
        paths.pool_dir().rmdir()  # only if empty
    return found


def _hosts_to_stop(name: str, d: Path) -> list[HostState]:
    """The hosts in state.json and, should it be missing or unreadable (a CLI killed in the
    middle of `up`), every host folder's QEMU pid file: no QEMU outlives its files."""
    hosts: list[HostState] = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        hosts += Testbed(name, d, json.loads((d / STATE_FILE).read_text())).hosts
    known = {(h.dir, h.pid) for h in hosts}
    for pidfile in sorted(d.glob(f"*/{HostFiles(Path()).pidfile.name}")):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if (pidfile.parent, pid) not in known:
                hosts.append(HostState(pidfile.parent.name, pid, 0, pidfile.parent, []))
    return hosts


def _stop_host(h: HostState) -> None:
    """Polite to forceful: QMP quit, SIGTERM, SIGKILL; each with a timeout."""
    if not h.alive():
        return
    with contextlib.suppress(Exception):
        qmp.execute(h.files.qmp, "quit", timeout_s=2)
    if _wait_gone(h, 3):
        return
    for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(h.pid, sig)  # type: ignore[arg-type]
        if _wait_gone(h, wait_s):
            return
    raise TestbedError(f"{h.name}: QEMU (pid {h.pid}) did not exit after SIGKILL")


def _wait_gone(h: HostState, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not h.alive():
            # Reap it if it is our child (the CLI that ran `up`).
            with contextlib.suppress(ChildProcessError, TypeError):
                os.waitpid(h.pid, os.WNOHANG)  # type: ignore[arg-type]
            return True
        time.sleep(0.05)
    return not h.alive()


def status(name: str) -> dict:
    tb = find(name)
    pool = tb.data.get("pool") or {}
    hosts = []
    for h in tb.hosts:
        alive = h.alive()
        hp = (pool.get("hosts") or {}).get(h.name)
        hosts.append({
            "name": h.name, "pid": h.pid, "ssh_port": h.ssh_port,
            "state": "running" if alive else "stopped",
            "pool": ("ready" if hp and hp.get("ready") else "not ready") if alive else "-",
            "dax": hp.get("dax") if hp else None,
        })
    return {"name": tb.name, "topology": tb.data["topology"], "accel": tb.data["accel"], "image": tb.data["image"],
            "created_at": tb.data["created_at"], "hosts": hosts, "shares": [s.to_state() for s in tb.shares],
            "kernel": tb.data.get("kernel")}


def resolve_hosts(tb: Testbed, host: str | None, all_: bool) -> list[HostState]:
    if all_:
        return tb.hosts
    if not host:
        raise TestbedError("name a host, or --all", hint=f"hosts: {', '.join(h.name for h in tb.hosts)}")
    return [tb.host(host)]


def exec_on(tb: Testbed, hosts: list[HostState], command: str, *, timeout_s: float = ssh.COMMAND_TIMEOUT_S) -> list[ssh.Result]:
    """Run a command on hosts in parallel; one result per host, in host order."""
    return map_parallel(lambda h: ssh.run(h.name, h.ssh_port, tb.key, command, timeout_s=timeout_s), hosts)


def export_logs(name: str, dest: Path | None = None) -> Path:
    tb = find(name)
    dest = dest or Path.cwd() / f"beluga-logs-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "state.json").write_text(json.dumps(tb.data, indent=2))
    alive = [h for h in tb.hosts if h.alive()]
    dmesg = {r.host: r for r in exec_on(tb, alive, "dmesg", timeout_s=30)}
    for h in tb.hosts:
        hd = dest / h.name
        hd.mkdir(exist_ok=True)
        for f in (h.files.serial_log, h.files.qemu_log):
            if f.exists():
                shutil.copy2(f, hd / f.name)
        r = dmesg.get(h.name)
        if r is not None:
            (hd / "dmesg.txt").write_text(r.stdout if r.ok else f"dmesg failed: {r.error or r.stderr}")
        else:
            (hd / "dmesg.txt").write_text("host not running: no dmesg\n")
    return dest
