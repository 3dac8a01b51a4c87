"""SSH to the guests: a key per testbed, no user ssh config, timeouts everywhere.

The guests are throwaway VMs reached only on 127.0.0.1 with a key made for this
testbed, so their host keys are accepted without checking, on purpose.
"""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
from fabric import Config, Connection

from .log import TestbedError

# paramiko logs a failed handshake ("Exception (client): Error reading SSH protocol
# banner") straight to stderr; the callers here report failures themselves.
logging.getLogger("paramiko").setLevel(logging.CRITICAL)

CONNECT_TIMEOUT_S = 10
COMMAND_TIMEOUT_S = 120
SSH_OPTIONS = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}"]


def generate_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "beluga-testbed", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


def banner_ready(port: int, timeout_s: float = 0.5) -> bool:
    """True once sshd answers with its banner. A plain TCP connect is not enough:
    QEMU's user network accepts connections before the guest listens."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def config() -> Config:
    # lazy: read no fabric/invoke config files; load_ssh_configs off: ~/.ssh/config is not read.
    return Config(lazy=True, ssh_config=paramiko.SSHConfig(), overrides={
        "load_ssh_configs": False,
        "timeouts": {"connect": CONNECT_TIMEOUT_S, "command": COMMAND_TIMEOUT_S},
    })


def connection(port: int, key: Path) -> Connection:
    return Connection(
        "127.0.0.1", user="root", port=port, config=config(), connect_timeout=CONNECT_TIMEOUT_S,
        connect_kwargs={"key_filename": str(key), "look_for_keys": False, "allow_agent": False,
                        "banner_timeout": CONNECT_TIMEOUT_S, "auth_timeout": CONNECT_TIMEOUT_S},
    )


@dataclass(frozen=True)
class Result:
    host: str
    exit_code: int
    stdout: str
    stderr: str
    error: str | None = None  # set when the command could not run at all

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0

    @property
    def why(self) -> str:
        """One line on why it failed: the connection error, else stderr's last line, else the exit code."""
        if self.error or self.stderr.strip():
            return self.error or self.stderr.strip().splitlines()[-1]
        if self.exit_code == -1:
            return "the command ended without an exit status (killed, or out of memory in the guest?)"
        return f"exit {self.exit_code}"


def run(host: str, port: int, key: Path, command: str, *, timeout_s: float = COMMAND_TIMEOUT_S) -> Result:
    try:
        with connection(port, key) as c:
            r = c.run(command, hide=True, warn=True, timeout=timeout_s, in_stream=False)
            return Result(host, r.exited, r.stdout, r.stderr)
    except Exception as e:  # noqa: BLE001 - reported per host, never swallowed
        return Result(host, -1, "", "", error=f"{type(e).__name__}: {e}")


def run_json(h, key: Path, command: str, *, what: str, timeout_s: float = COMMAND_TIMEOUT_S) -> dict:
    """Run a command on host h whose last line of output is JSON; a failure names the host and `what`."""
    r = run(h.name, h.ssh_port, key, command, timeout_s=timeout_s)
    if not r.ok:
        raise TestbedError(f"{h.name}: {what} failed: {r.why}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def wait_ready(port: int, key: Path, *, timeout_s: float, alive=lambda: True) -> None:
    """One real SSH command, retried (retries probe the banner first) until it answers.
    Call it once the guest has said on its console that sshd started
    (lifecycle.HostState.wait_said): probing before the guest listens is not free, each
    connection that QEMU's user network cannot complete stalls the guest for seconds
    (measured: 4 guests probed from boot took 40 s instead of 15 s to answer)."""
    deadline = time.monotonic() + timeout_s
    first = True
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("QEMU exited")
        # The guest says sshd runs: connect for real at once, since a separate banner
        # probe costs a whole sshd-session start (~0.4 s under TCG). Later tries probe first.
        if first or banner_ready(port):
            first = False
            r = run("probe", port, key, "true", timeout_s=max(5.0, deadline - time.monotonic()))
            if r.ok:
                return
        time.sleep(0.25)
    raise TimeoutError(f"no SSH answer on 127.0.0.1:{port} within {timeout_s:.0f} s")


def ssh_argv(port: int, key: Path, command: list[str] | None = None) -> list[str]:
    argv = ["ssh", *SSH_OPTIONS, "-i", str(key), "-p", str(port), "root@127.0.0.1"]
    if command:
        argv += ["--", *command]
    return argv
