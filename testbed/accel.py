"""Which accelerator to use: KVM only where a real guest runs under it, else TCG.

/dev/kvm existing proves nothing: under nested virtualisation KVM may abort on an
MSR write ('failed to set MSR 0x10a') or stop with 'KVM internal error. Suberror: 1'
on ordinary kernel code. So the probe boots the guest kernel under KVM for a moment.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import paths

PROBE_TIMEOUT_S = 20


@dataclass(frozen=True)
class Probe:
    usable: bool
    reason: str


def probe_kvm(kernel: Path | None, *, use_cache: bool = True) -> Probe:
    if not os.path.exists("/dev/kvm"):
        return Probe(False, "/dev/kvm does not exist (no hardware virtualisation, or the kvm module is not loaded)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Probe(False, "/dev/kvm is not accessible to this user (add it to the 'kvm' group)")
    if kernel is None or not kernel.is_file():
        return Probe(False, "not probed yet: a guest kernel is needed to probe KVM (build the image)")
    cache = paths.cache_dir() / "kvm-probe.json"
    key = f"{_boot_id()}:{kernel.stat().st_size}"
    if use_cache and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return Probe(data["usable"], data["reason"])
    result = _boot_probe(kernel)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, **asdict(result)}))
    return result


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _boot_probe(kernel: Path) -> Probe:
    """Boot the kernel with no root disk: under a working KVM it panics
    ('VFS: Unable to mount root fs') within seconds and QEMU exits (-no-reboot)."""
    with tempfile.TemporaryDirectory() as tmp:
        serial = Path(tmp) / "serial.log"
        argv = ["qemu-system-x86_64", "-machine", "q35,accel=kvm", "-cpu", "host,hypervisor=off", "-m", "256",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", f"file:{serial}", "-kernel", str(kernel),
                "-append", "console=ttyS0 panic=-1 loglevel=4"]
        start = time.monotonic()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
            out = r.stdout + r.stderr
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            r = None
        console = serial.read_text(errors="replace") if serial.exists() else ""
    took = time.monotonic() - start
    if "KVM internal error" in out:
        return Probe(False, "KVM stops the guest with 'KVM internal error' (emulation failure; nested KVM)")
    if r is None:
        return Probe(False, f"a guest kernel under KVM did not finish booting in {PROBE_TIMEOUT_S} s")
    if r.returncode != 0:
        first = next((l for l in out.splitlines() if "error" in l.lower()), out.strip().splitlines()[-1:] or ["?"])
        first = first if isinstance(first, str) else first[0]
        return Probe(False, f"QEMU with KVM failed (exit {r.returncode}): {first.strip()}")
    if "Kernel panic" in console or "VFS" in console:
        return Probe(True, f"a guest kernel booted under KVM ({took:.1f} s)")
    return Probe(False, "a guest kernel under KVM exited without reaching its root-mount step")


def choose(requested: str, kernel: Path | None) -> tuple[str, str]:
    """Returns (accel, notice)."""
    if requested in ("tcg", "kvm"):
        return requested, f"accelerator {requested} (forced)"
    p = probe_kvm(kernel)
    if p.usable:
        return "kvm", f"accelerator kvm ({p.reason})"
    return "tcg", f"accelerator tcg: KVM unusable ({p.reason})"
