"""Deploy the Beluga store into a running testbed's guests and drive it over SSH.

Nothing is downloaded in the guest: the `beluga` package (pure Python; the guest image
has python3 and NumPy) and the guest-side driver travel as one tarball over SFTP.
"""
from __future__ import annotations

import io
import json
import shlex
import tarfile
from pathlib import Path

from . import ssh
from .log import TestbedError
from .par import map_parallel

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = "/opt/beluga"
GUEST_DRIVER = Path(__file__).parent / "guest" / "store.py"
SERVE_LOG = "/var/log/beluga-serve.log"
SERVE_READY = "/run/beluga/serve.ready"
PY = f"PYTHONPATH={GUEST_DIR} python3"
COHERENCE_REPORT = "/run/beluga/coherence.jsonl"  # the sanitizer's reports in each guest (docs/coherence.md)


def coherence_env(mode: str) -> dict[str, str]:
    """The environment that runs the store (and programs opening the pool) under the coherence sanitizer."""
    if mode == "off":
        return {}
    # A guest (1 GiB of RAM for a 1 GiB pool) cannot hold two private copies of the pool per
    # process: the model covers the metadata there, and the block data stays the shared pool.
    return {"BELUGA_COHERENCE": mode, "BELUGA_COHERENCE_REPORT": COHERENCE_REPORT, "BELUGA_COHERENCE_SCOPE": "metadata"}


def _env_words(env: dict[str, str] | None) -> str:
    return "".join(f"{k}={shlex.quote(v)} " for k, v in sorted((env or {}).items()))


def _tarball() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted((REPO / "beluga").rglob("*.py")):
            tar.add(f, arcname=f"beluga/{f.relative_to(REPO / 'beluga')}")
        tar.add(GUEST_DRIVER, arcname="guest_store.py")
    return buf.getvalue()


def install(tb, hosts) -> None:
    """Copy the store to every host and check that it imports there."""
    blob = _tarball()

    def one(h):
        with ssh.connection(h.ssh_port, tb.key) as c:
            c.run(f"mkdir -p {GUEST_DIR}", hide=True, timeout=60)
            c.put(io.BytesIO(blob), f"{GUEST_DIR}/beluga.tar.gz")
            r = c.run(f"cd {GUEST_DIR} && tar xzf beluga.tar.gz && {PY} -c 'import beluga.client, beluga.service'",
                      hide=True, warn=True, timeout=120)
            if r.exited != 0:
                raise TestbedError(f"{h.name}: the store does not import in the guest: {r.stderr.strip()}")

    map_parallel(one, hosts)


def run_driver(tb, h, verb: str, args: dict, *, timeout_s: float = 300, env: dict[str, str] | None = None) -> dict:
    cmd = f"{_env_words(env)}{PY} {GUEST_DIR}/guest_store.py {verb} {shlex.quote(json.dumps(args))}"
    return ssh.run_json(h, tb.key, cmd, what=f"store {verb}", timeout_s=timeout_s)


def format_pool(tb, h, dax: str, options: list[str]) -> dict:
    # The dax path comes from the guest (provisioning's answer): quoted like every value.
    return ssh.run_json(h, tb.key, f"{PY} -m beluga.cli format {shlex.quote(dax)} --force --json {shlex.join(options)}",
                        what=f"beluga format {dax}", timeout_s=300)


def start_service(tb, h, dax: str, options: list[str], *, timeout_s: float = 120,
                  env: dict[str, str] | None = None) -> dict:
    """`beluga serve` in the background on host h (CXL-RPC through the pool); waits for ready."""
    cmd = (f"rm -f {SERVE_READY}; cd /; setsid nohup env {_env_words(env)}{PY} -m beluga.cli serve {shlex.quote(dax)} --transport cxl "
           f"--ready-file {SERVE_READY} {shlex.join(options)} > {SERVE_LOG} 2>&1 < /dev/null & "
           f"for i in $(seq {int(timeout_s * 10)}); do [ -s {SERVE_READY} ] && exec cat {SERVE_READY}; "
           f"sleep 0.1; done; echo 'service not ready' >&2; tail -5 {SERVE_LOG} >&2; exit 1")
    return ssh.run_json(h, tb.key, cmd, what="starting beluga serve", timeout_s=timeout_s + 30)


def kill_service(tb, h) -> bool:
    r = ssh.run(h.name, h.ssh_port, tb.key, "pkill -9 -f 'beluga.cli serve' && echo killed", timeout_s=30)
    return "killed" in r.stdout
