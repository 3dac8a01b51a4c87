"""Testbed lifecycle: up, down, status, list, exec, logs.

A running testbed is a folder `<state>/<name>/` with `state.json` (read and written by
state.py alone), the SSH key and one folder per host (overlay disk, QMP and serial
sockets, serial and QEMU logs, pid file), plus the pool's backing files under
`<pools>/<name>/`. A later CLI process finds the testbed from that folder; every pid is
checked against /proc before it is signalled (machine.py). `up` is an ExitStack of
steps, each with its undo (see `up`).

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
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from . import accel as accel_mod
from . import image as image_mod
from . import kernel as kernel_mod
from . import names as names_mod
from . import paths, ssh
from . import shares as shares_mod
from . import topology as topo
from .log import TestbedError, info, step
from .machine import Machine
from .par import map_parallel
from .qemucmd import QEMU, HostFiles, host_argv
from .shares import Share
from .state import STATE_FILE, HostRecord, KernelRecord, TestbedState, pid_is_ours  # noqa: F401 - pid_is_ours: its home was here

SSH_READY_TIMEOUT_S = 180
SSHD_STARTED = b"beluga: sshd started"  # printed on the console by images/rootfs/usr/lib/beluga/boot
BOOT_FAILED = b"beluga: boot failed"  # printed by testbed/kernel_init.sh (a user kernel's initrd)
PORT_ATTEMPTS = 5

# The typed model (state.py); the old names stay for the code that imports them from here.
Testbed = TestbedState
HostState = HostRecord


def testbed_dir(name: str) -> Path:
    """`<state>/<name>`; a name that is not one (`..`, `a/b`, `x,y`) never becomes a path."""
    return paths.state_dir() / names_mod.check(name, "testbed name")


def find(name: str) -> TestbedState:
    """The running testbed `name`, read from its state folder (typed, parsed once)."""
    d = testbed_dir(name)
    paths.check_private(paths.state_dir())
    if not (d / STATE_FILE).is_file():
        running = names()
        hint = f"running: {', '.join(running)}" if running else "none is running; 'beluga-testbed up TOPOLOGY' starts one"
        raise TestbedError(f"no testbed named '{name}'", hint=hint)
    return TestbedState.load(d)


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


def _refuse_in_use(name: str, d: Path) -> None:
    """A testbed of that name, running or left over, is never started over."""
    if (d / STATE_FILE).exists():
        try:
            alive = [h.name for h in find(name).hosts if h.alive()]
        except TestbedError:  # a state file this version cannot read: leftovers all the same
            alive = []
        what = f"is up ({', '.join(alive)} running)" if alive else "has leftovers from an earlier run"
        raise TestbedError(f"testbed '{name}' {what}",
                           hint=f"'beluga-testbed down {name}' first, or pick another --name")
    if os.path.lexists(d):
        raise TestbedError(f"testbed '{name}' has leftovers from an earlier run ({d})",
                           hint=f"'beluga-testbed down {name}' first, or pick another --name")


class _Writer:
    """The one writer of a testbed's state while `up` builds it: every change is a new
    frozen state, saved at once, so state.json always names every QEMU that runs."""

    def __init__(self, st: TestbedState) -> None:
        self.state = st.save()

    def host(self, name: str, **changes) -> None:
        self.state = self.state.with_host(name, **changes).save()


@contextlib.contextmanager
def _undone_on_failure(name: str, *, retain: bool) -> Iterator[contextlib.ExitStack]:
    """An ExitStack for `up`'s steps, each of which pushes its own undo. The undos run
    (last step first, under one 'roll back' line) when a step fails or Ctrl-C comes;
    with `retain` they are dropped and everything stays for inspection. On success the
    stack is popped: nothing is undone."""
    stack = contextlib.ExitStack()
    try:
        yield stack
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            info("✗ interrupted")
        if retain:
            stack.pop_all()
            info(f"• --retain: leaving '{name}' as it is for inspection; 'beluga-testbed down {name}' removes it")
        else:
            with step(f"roll back '{name}'"):
                stack.close()
        raise
    stack.pop_all()


def up(topology_ref: str, *, name: str | None = None, accel: str = "auto", retain: bool = False,
       provision: bool = True, shares: Sequence[Share] = (), kernel: Path | None = None, initrd: Path | None = None,
       modules: Path | None = None, qemu: Path | None = None) -> TestbedState:
    """Boot a topology's hosts and make the pool; the running testbed's state.

    The steps, each on an ExitStack with its undo: the state folder, key and pool files
    (undo: remove them, and stop whatever QEMU state.json or a pid file names); one
    Machine per host, its pid saved as it starts (undo: stop it); the wait for every
    guest's sshd; provisioning; the shares' mounts. A failure or Ctrl-C undoes every step
    done, unless `retain`. `shares` (shares.parse_all) are exported by every host's QEMU
    and mounted in every guest once it is up. `kernel`, `initrd`, `modules` and `qemu`
    (each over the topology's `kernel:` field of that name) boot a user's kernel with its
    modules tree and use another QEMU binary: see kernel.py."""
    t = topo.load(topology_ref)
    name = _testbed_name(name, t)
    uk = _user_kernel(t, kernel, initrd, modules, qemu)
    img = image_mod.require_image()
    kernel_mod.plan(uk, img, testbed_dir(name))  # the modules' version, before anything is made
    start = time.monotonic()
    with _locked(name):
        d = testbed_dir(name)
        _refuse_in_use(name, d)
        paths.private_dir(paths.pool_dir())  # refused before anything is made or rolled back there
        chosen, notice = accel_mod.choose(accel, img.kernel)
        info(f"• {notice}")
        boot = kernel_mod.plan(uk, img, d)
        with _undone_on_failure(name, retain=retain) as undo:
            with step(f"state folder {d} and pool files ({t.pool_size_bytes >> 20} MiB, sparse)"):
                undo.callback(_teardown, name)
                boot = _make_files(name, t, uk, img, boot, provision=provision)

                def argv_for(host: str, port: int) -> list[str]:
                    return _host_argv(t, name, t.host(host), boot=boot, cmdline=img.kernel_cmdline,
                                      ssh_port=port, accel=chosen, provision=provision, shares=shares)

                hosts = []
                for h, port in zip(t.hosts, _free_ports(len(t.hosts))):
                    files = HostFiles(paths.make_child_dir(d, h.name))
                    _check_socket_path(files.qmp)
                    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img.disk),
                                    str(files.overlay)], check=True, stdin=subprocess.DEVNULL, umask=paths.UMASK)
                    os.chmod(files.overlay, paths.FILE_MODE)
                    hosts.append(HostRecord(h.name, None, port, files.dir, tuple(argv_for(h.name, port))))
                rec = _Writer(TestbedState(
                    name=name, dir=d, topology_name=t.name, topology_source=t.source,
                    topology_yaml=topo.resolve(topology_ref).read_text(), parsed=t, accel=chosen,
                    image=img.key, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    pool_dir=paths.pool_dir() / name,
                    pool_files={dev.id: _pool_file(name, dev.id) for dev in t.devices}, hosts=tuple(hosts),
                    shares=tuple(shares),
                    kernel=KernelRecord.from_json(boot.to_state(uk)) if uk or boot.qemu != QEMU else None))
            with step(f"launch {len(hosts)} host(s) under {chosen}"):
                machines = _launch_all(undo, rec, argv_for)
            names_ = ", ".join(h.name for h in rec.state.hosts)
            with step(f"wait for {names_} to boot (sshd started)" if provision else f"wait for SSH on {names_}"):
                _wait_all_ssh(rec.state, machines, probe=not provision)
            if provision:
                from . import provision as prov
                prov.provision(rec.state, at_boot=True)
            if shares:
                with step(f"mount {len(shares)} shared folder(s) on {names_}: "
                          + ", ".join(f"{s.host_dir} at {s.guest_dir} ({'rw' if s.rw else 'ro'})" for s in shares)):
                    shares_mod.mount(rec.state, list(shares))
    info(f"✓ {name} is up: {len(t.hosts)} host(s) ready in {time.monotonic() - start:.1f} s")
    return find(name)


def _make_files(name: str, t: topo.Topology, uk: kernel_mod.UserKernel, img: image_mod.Image,
                boot: kernel_mod.Boot, *, provision: bool) -> kernel_mod.Boot:
    """The state folder, the SSH key, the pool files, a user's kernel unpacked, the
    guests' pool arguments. Returns what QEMU boots."""
    d = paths.make_child_dir(paths.state_dir(), name)
    ssh.generate_key(d / "id_ed25519")
    os.chmod(d / "id_ed25519.pub", paths.FILE_MODE)
    _create_pool_files(name, t)
    if uk.kernel is not None:
        boot = kernel_mod.prepare(uk, img, d)
    if provision:
        from .provision import POOL_ARGS_FILE, pool_args, signing_plan
        paths.write_private(d / POOL_ARGS_FILE, json.dumps(pool_args(t, sign=signing_plan(t))))
    return boot


def _machine(undo: contextlib.ExitStack, rec: _Writer, host: str) -> Machine:
    """Launch host's QEMU as state.json has it; its pid is saved before anything else runs,
    and its undo (stop it) is on the stack."""
    h = rec.state.host(host)
    m = Machine(h.name, h.files, h.argv, on_start=lambda pid: rec.host(host, pid=pid))
    undo.callback(m.kill)
    return m.launch()


def _launch_all(undo: contextlib.ExitStack, rec: _Writer, argv_for) -> dict[str, Machine]:
    """Start every host's QEMU and wait until each answers on QMP (its SSH forward is bound
    by then). A host whose port another program took in the meantime starts again on
    another port; any other failure raises LaunchError, with the argv and the end of the
    host's logs."""
    machines = {h.name: _machine(undo, rec, h.name) for h in rec.state.hosts}
    pending = list(machines)
    for _ in range(PORT_ATTEMPTS):
        taken = []
        for n in pending:
            why = _wait_started(machines[n])
            if why is None:
                continue
            if not machines[n].port_taken():
                raise machines[n].failed(why)
            taken.append(n)
        if not taken:
            return machines
        in_use = {h.ssh_port for h in rec.state.hosts}
        for n, port in zip(taken, _free_ports(len(taken), avoid=in_use)):
            info(f"• {n}: port {rec.state.host(n).ssh_port} was taken before QEMU could bind it; again on port {port}")
            rec.host(n, ssh_port=port, argv=tuple(argv_for(n, port)), pid=None)
            machines[n] = _machine(undo, rec, n)
        pending = taken
    raise machines[pending[0]].failed(f"no free port for the SSH forward after {PORT_ATTEMPTS} attempts")


def _wait_started(m: Machine) -> str | None:
    """None once `m` answers on QMP, else why not (Machine.wait_started)."""
    return m.wait_started()


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


def _wait_all_ssh(tb: TestbedState, machines: Mapping[str, Machine], *, probe: bool = True) -> None:
    """Every host says on its console that sshd started; with `probe`, each then answers a
    command over SSH. (Provisioning's first SSH call proves that instead: it comes once the
    guest has made its region, and an earlier one would take the guest's vCPU from it.)"""
    stop = threading.Event()  # set on the first failure or Ctrl-C: the other waits end too

    def wait(h: HostRecord) -> None:
        m = machines[h.name]
        deadline = time.monotonic() + SSH_READY_TIMEOUT_S
        h.wait_said(SSHD_STARTED, timeout_s=SSH_READY_TIMEOUT_S, failed=BOOT_FAILED, stop=stop, proc=m.process)
        if not probe:
            return
        try:
            ssh.wait_ready(h.ssh_port, tb.key, timeout_s=max(1.0, deadline - time.monotonic()),
                           alive=lambda: not stop.is_set() and m.returncode is None)
        except RuntimeError:
            raise h.failed(f"QEMU exited while booting (exit {m.returncode})") from None
        except TimeoutError as e:
            raise h.failed(str(e)) from None

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
        map_parallel(lambda m: m.shutdown(), _machines_to_stop(name, d))
    paths.remove_child(paths.state_dir(), d)
    paths.remove_child(paths.pool_dir(), pool)
    with contextlib.suppress(OSError):
        paths.remove_child(paths.state_dir(), paths.state_dir() / f".{name}.lock")
    with contextlib.suppress(OSError):
        paths.pool_dir().rmdir()  # only if empty
    return found


def _machines_to_stop(name: str, d: Path) -> list[Machine]:
    """The hosts in state.json and, should it be missing or unreadable (a CLI killed in the
    middle of `up`), every host folder's QEMU pid file: no QEMU outlives its files."""
    hosts: list[HostRecord] = []
    with contextlib.suppress(OSError, ValueError, TestbedError):
        hosts += TestbedState.load(d).hosts
    known = {(h.dir, h.pid) for h in hosts}
    for pidfile in sorted(d.glob(f"*/{HostFiles(Path()).pidfile.name}")):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if (pidfile.parent, pid) not in known:
                hosts.append(HostRecord(pidfile.parent.name, pid, 0, pidfile.parent))
    return [Machine.attach(h) for h in hosts]


def status(name: str) -> dict:
    """What `beluga-testbed status --json` prints for testbed `name`."""
    return describe(find(name))


def describe(tb: TestbedState) -> dict:
    """A testbed's status as JSON: each host's pid, port, running or not, pool state."""
    hosts = []
    for h in tb.hosts:
        alive = h.alive()
        hp = tb.pool.hosts.get(h.name) if tb.pool else None
        hosts.append({
            "name": h.name, "pid": h.pid, "ssh_port": h.ssh_port,
            "state": "running" if alive else "stopped",
            "pool": ("ready" if hp and hp.ready else "not ready") if alive else "-",
            "dax": hp.dax if hp else None,
        })
    return {"name": tb.name, "topology": tb.topology_name, "accel": tb.accel, "image": tb.image,
            "created_at": tb.created_at, "hosts": hosts, "shares": [s.to_state() for s in tb.shares],
            "kernel": tb.kernel.to_json() if tb.kernel else None}


def resolve_hosts(tb: TestbedState, host: str | None, all_: bool) -> list[HostRecord]:
    """Every host (`all_`), or the one named; an error with the host list otherwise."""
    if all_:
        return list(tb.hosts)
    if not host:
        raise TestbedError("name a host, or --all", hint=f"hosts: {', '.join(h.name for h in tb.hosts)}")
    return [tb.host(host)]


def exec_on(tb: TestbedState, hosts: Sequence[HostRecord], command: str, *,
            timeout_s: float = ssh.COMMAND_TIMEOUT_S) -> list[ssh.Result]:
    """Run a command on hosts in parallel; one result per host, in host order."""
    return map_parallel(lambda h: ssh.run(h.name, h.ssh_port, tb.key, command, timeout_s=timeout_s), hosts)


def export_logs(name: str, dest: Path | None = None) -> Path:
    """Every host's serial and QEMU logs, its dmesg (where it runs) and state.json in one
    folder (made if missing); returns it."""
    tb = find(name)
    dest = dest or Path.cwd() / f"beluga-logs-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "state.json").write_text(json.dumps(tb.to_json(), indent=2))
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
