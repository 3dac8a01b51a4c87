"""The boot floor: the same guests, kernel and CPU flags as a topology's hosts, booting
to an init that only says so on the console and powers off.

The machine this runs on is shared and its speed drifts (the same `up` took 20.5 s and
26 s minutes apart), so boot figures are stated as ratios to this floor, measured in the
same run and interleaved with the real boots: the floor moves with the machine, the
ratio shows what the testbed itself adds (disk, network, sshd, CXL drivers, the pool).

The floor's initrd is the image's own initrd with one more cpio member appended
(`/floor`; the kernel unpacks concatenated archives, later members win) and booted
with `rdinit=/floor`: nothing of the image is rebuilt.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

MARKER = b"beluga: floor"
FLOOR_INIT = b"""#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
echo 'beluga: floor' > /dev/ttyS0
/bin/busybox poweroff -f
"""


def cpio_newc(members: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) members, with its trailer."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*members, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def floor_initrd(image_initrd: Path, dest: Path) -> Path:
    """The image's initrd plus `/floor` (mode 0755)."""
    dest.write_bytes(image_initrd.read_bytes() + cpio_newc([("floor", 0o100755, FLOOR_INIT)]))
    return dest


def floor_argv(host_argv: list[str], initrd: Path, serial_log: Path) -> list[str]:
    """A host's argv cut down to the floor: its QEMU binary, accelerator, CPU, vCPUs,
    memory and kernel; no disk, network, CXL devices or pool; the floor's initrd and init."""
    opts = {o: v for o, v in zip(host_argv, host_argv[1:]) if o in ("-machine", "-cpu", "-smp", "-m", "-kernel")}
    accel = next((p for p in opts["-machine"].split(",") if p.startswith("accel=")), "accel=tcg")
    return [host_argv[0],
            "-machine", f"q35,{accel}",
            "-cpu", opts["-cpu"],
            "-smp", opts["-smp"],
            "-m", opts["-m"],
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", opts["-kernel"],
            "-initrd", str(initrd),
            "-append", "console=ttyS0 no_timer_check rdinit=/floor",  # as the hosts (qemucmd.py)
            "-serial", f"file:{serial_log}"]


def boot_floor(host_argvs: list[list[str]], image_initrd: Path, *, timeout_s: float = 300) -> float:
    """Seconds from starting every guest at once to the last one saying it booted."""
    with tempfile.TemporaryDirectory(prefix="bt-floor-") as tmp:
        d = Path(tmp)
        initrd = floor_initrd(image_initrd, d / "floor.img")
        logs = [d / f"serial{i}.log" for i in range(len(host_argvs))]
        start = time.monotonic()
        procs = [subprocess.Popen(floor_argv(a, initrd, log), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for a, log in zip(host_argvs, logs)]
        try:
            pending = set(range(len(procs)))
            while pending:
                for i in list(pending):
                    if logs[i].exists() and MARKER in logs[i].read_bytes():
                        pending.discard(i)
                    elif procs[i].poll() is not None:
                        raise RuntimeError(f"floor guest {i} exited (status {procs[i].returncode}) without "
                                           f"saying it booted: {procs[i].stderr.read().decode(errors='replace')[-500:]}")
                if time.monotonic() - start > timeout_s:
                    raise RuntimeError(f"floor guests {sorted(pending)} did not boot within {timeout_s:.0f} s")
                time.sleep(0.02)
            return time.monotonic() - start
        finally:
            for p in procs:
                try:
                    p.wait(timeout=10)  # they power off by themselves
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                if p.stderr:
                    p.stderr.close()


if __name__ == "__main__":  # a quick look: python benchmarks/floor.py [TOPOLOGY]
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from testbed import image, lifecycle
    _, _, plan = lifecycle.plan(sys.argv[1] if len(sys.argv) > 1 else "1host-1switch", None, provision=False)
    img = image.require_image()
    print(f"{boot_floor(list(plan.values()), img.initrd):.2f} s ({os.cpu_count()} CPUs)")
