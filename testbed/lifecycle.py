"""Testbed lifecycle: up, down, status, list, exec, logs.

A running testbed is a folder `<state>/<name>/` with `state.json`, the SSH key and one
folder per host (overlay disk, QMP and serial sockets, serial and QEMU logs, pid file),
plus the pool's backing files under `<pools>/<name>/`. A later CLI process finds the
testbed from that folder; every pid is checked against /proc before it is signalled.
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
from . import paths, qmp, ssh
from . import topology as topo
from .log import TestbedError, info, step
from .par import map_parallel
from .qemucmd import HostFiles, host_argv
from .shares import Share
from . import shares as shares_mod

SSH_READY_TIMEOUT_S = 180
STATE_FILE = "state.json"
SSHD_STARTED = b"beluga: sshd started"  # printed on the console by images/rootfs/usr/lib/beluga/boot


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

    def wait_said(self, marker: bytes, *, timeout_s: float, failed: bytes | None = None,
                  stop: threading.Event | None = None, proc: subprocess.Popen | None = None) -> None:
        """Wait for the guest to print `marker` on its console. Watching the serial log
        costs the guest nothing; raises when it prints `failed`, QEMU exits (`proc`, where
        this process started it, gives the exit status), or time is up."""
        deadline = time.monotonic() + timeout_s
        while not self.said(marker):
            if failed and self.said(failed):
                raise TestbedError(f"{self.name}: the guest said {failed.decode()!r}")
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
        return topo.parse(self.data["topology_yaml"], self.data["topology_source"])

    @property
    def shares(self) -> list[Share]:
        return [Share.from_state(s) for s in self.data.get("shares") or []]

    @property
    def pool_files(self) -> dict[str, Path]:
        return {k: Path(v) for k, v in self.data["pool_files"].items()}

    def save(self) -> None:
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
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
    return paths.state_dir() / name


def find(name: str) -> Testbed:
    d = testbed_dir(name)
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
    return sorted(p.name for p in d.iterdir() if (p / STATE_FILE).is_file())


@contextlib.contextmanager
def _locked(name: str):
    paths.state_dir().mkdir(parents=True, exist_ok=True)
    lock = paths.state_dir() / f".{name}.lock"
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TestbedError(f"another beluga-testbed command is working on '{name}'",
                               hint="wait for it to finish") from None
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pool_file(name: str, device_id: str) -> Path:
    return paths.pool_dir() / name / f"{device_id}.raw"


def _host_argv(t: topo.Topology, name: str, h: topo.Host, *, kernel: Path, initrd: Path, cmdline: str,
               ssh_port: int, accel: str, provision: bool, shares: list[Share] = ()) -> list[str]:
    """One host's QEMU argv inside testbed `name` (its state folder, pool files and key)."""
    from .provision import GUEST_SCRIPT, POOL_ARGS_FILE
    d = testbed_dir(name)
    return host_argv(t, h, kernel=kernel, initrd=initrd, cmdline=cmdline, files=HostFiles(d / h.name),
                     ssh_port=ssh_port, pool_files={dev.id: _pool_file(name, dev.id) for dev in t.devices},
                     authorized_keys=d / "id_ed25519.pub", accel=accel,
                     pool_args=d / POOL_ARGS_FILE if provision else None,
                     guest_script=GUEST_SCRIPT if provision else None, shares=shares)


def plan(topology_ref: str, name: str | None, accel: str = "tcg", provision: bool = True,
         shares: list[Share] = ()) -> tuple[topo.Topology, str, dict[str, list[str]]]:
    """The argv of every host, without starting anything (for --dry-run)."""
    t = topo.load(topology_ref)
    name = name or t.name
    img = image_mod.find_image()
    kernel = img.kernel if img else Path("<image>/vmlinux")
    initrd = img.initrd if img else Path("<image>/initrd.img")
    cmdline = img.kernel_cmdline if img else image_mod.load_recipe().kernel_cmdline
    out = {h.name: _host_argv(t, name, h, kernel=kernel, initrd=initrd, cmdline=cmdline, ssh_port=10022 + i,
                              accel=accel, provision=provision, shares=shares)
           for i, h in enumerate(t.hosts)}
    return t, name, out


def up(topology_ref: str, *, name: str | None = None, accel: str = "auto", retain: bool = False,
       provision: bool = True, shares: list[Share] = ()) -> Testbed:
    """`shares` (shares.parse_all) are exported by every host's QEMU and mounted in every
    guest once it is up."""
    t = topo.load(topology_ref)
    name = name or t.name
    img = image_mod.require_image()
    start = time.monotonic()
    with _locked(name):
        d = testbed_dir(name)
        if (d / STATE_FILE).exists():
            tb = find(name)
            alive = [h.name for h in tb.hosts if h.alive()]
            what = f"is up ({', '.join(alive)} running)" if alive else "has leftovers from an earlier run"
            raise TestbedError(f"testbed '{name}' {what}",
                               hint=f"'beluga-testbed down {name}' first, or pick another --name")
        chosen, notice = accel_mod.choose(accel, img.kernel)
        info(f"• {notice}")
        tb = None
        procs: dict[str, subprocess.Popen] = {}
        try:
            with step(f"state folder {d} and pool files ({t.pool_size_bytes >> 20} MiB, sparse)"):
                d.mkdir(parents=True)
                ssh.generate_key(d / "id_ed25519")
                pool_files = _create_pool_files(name, t)
                if provision:
                    from .provision import POOL_ARGS_FILE, pool_args, signing_plan
                    (d / POOL_ARGS_FILE).write_text(json.dumps(pool_args(t, sign=signing_plan(t))))
                hosts = []
                for h in t.hosts:
                    files = HostFiles(d / h.name)
                    files.dir.mkdir()
                    _check_socket_path(files.qmp)
                    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img.disk),
                                    str(files.overlay)], check=True, stdin=subprocess.DEVNULL)
                    port = _free_port()
                    argv = _host_argv(t, name, h, kernel=img.kernel, initrd=img.initrd, cmdline=img.kernel_cmdline,
                                      ssh_port=port, accel=chosen, provision=provision, shares=shares)
                    hosts.append({"name": h.name, "pid": None, "ssh_port": port, "dir": str(files.dir), "argv": argv})
                tb = Testbed(name, d, {
                    "name": name, "topology": t.name, "topology_source": t.source,
                    "topology_yaml": topo.resolve(topology_ref).read_text(), "accel": chosen, "image": img.key,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pool_dir": str(paths.pool_dir() / name),
                    "pool_files": {k: str(v) for k, v in pool_files.items()}, "hosts": hosts, "pool": None,
                    "shares": [s.to_state() for s in shares],
                })
                tb.save()
            with step(f"launch {len(hosts)} host(s) under {chosen}"):
                for h in tb.hosts:
                    with open(h.files.qemu_log, "w") as log:
                        p = subprocess.Popen(h.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
                    procs[h.name] = p
                    next(x for x in tb.data["hosts"] if x["name"] == h.name)["pid"] = p.pid
                tb.save()
                time.sleep(0.3)
                for h in tb.hosts:
                    if procs[h.name].poll() is not None:
                        raise _host_failed(h, f"QEMU exited at start (exit {procs[h.name].returncode})")
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
            if tb is not None and isinstance(e, KeyboardInterrupt):
                info("✗ interrupted")
            if retain:
                info(f"• --retain: leaving '{name}' as it is for inspection; 'beluga-testbed down {name}' removes it")
            else:
                with step(f"roll back '{name}'"):
                    _teardown(name)
            raise
    info(f"✓ {name} is up: {len(t.hosts)} host(s) ready in {time.monotonic() - start:.1f} s")
    return find(name)


def _check_socket_path(p: Path) -> None:
    if len(str(p)) > 100:
        raise TestbedError(f"socket path too long for a unix socket: {p}",
                           hint="set BELUGA_TESTBED_STATE to a shorter folder")


def _create_pool_files(name: str, t: topo.Topology) -> dict[str, Path]:
    d = paths.pool_dir() / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    out = {}
    for dev in t.devices:
        f = _pool_file(name, dev.id)
        with open(f, "wb") as fh:
            fh.truncate(dev.size_bytes)
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
        h.wait_said(SSHD_STARTED, timeout_s=SSH_READY_TIMEOUT_S, stop=stop, proc=procs[h.name])
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
    found = d.exists() or (paths.pool_dir() / name).exists()
    if (d / STATE_FILE).is_file():
        tb = Testbed(name, d, json.loads((d / STATE_FILE).read_text()))
        map_parallel(_stop_host, tb.hosts)
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(paths.pool_dir() / name, ignore_errors=True)
    with contextlib.suppress(OSError):
        (paths.state_dir() / f".{name}.lock").unlink()
    with contextlib.suppress(OSError):
        paths.pool_dir().rmdir()  # only if empty
    return found


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
            "created_at": tb.data["created_at"], "hosts": hosts, "shares": [s.to_state() for s in tb.shares]}


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
