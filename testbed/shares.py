"""Host folders shared into every guest: `up --share HOST_DIR[:GUEST_DIR[:rw]]`.

Each share is a virtio-9p device (`-fsdev local,...` + `-device virtio-9p-pci,...`) that
every host's QEMU exports, and that each guest mounts over SSH once it is up: the guest
image already has the 9p modules (9p, 9pnet, 9pnet_virtio) in its rootfs, so nothing in
the image recipe changes. Read-only unless `rw`, twice over: QEMU's fsdev refuses writes
(`readonly=on`) and the guest mounts it `ro`.
"""
from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass
from pathlib import Path

from .log import TestbedError

MOUNT_OPTIONS = "trans=virtio,version=9p2000.L"
# Folders a share may never hide: the guest's own system (a share over /etc or /usr
# replaces what the guest runs on; over /root it hides root's SSH key and every later
# SSH call fails).
SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root",
               "/run", "/sbin", "/sys", "/tmp", "/usr", "/var", "/usr/local", "/var/tmp")
# ... nor anything under these (kernel file systems, the guest's configuration, the
# testbed's own run files, the programs installed).
SYSTEM_TREES = ("/proc", "/sys", "/dev", "/etc", "/boot", "/run", "/bin", "/sbin", "/lib", "/lib64", "/root/.ssh",
                "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/share", "/usr/include", "/usr/libexec")
EXAMPLE = "--share ./my-program:/mnt/my-program (add ':rw' to let the guests write)"


@dataclass(frozen=True)
class Share:
    """One shared folder. `tag` (share0, share1, ...) is the 9p mount tag and the QEMU id."""
    host_dir: Path
    guest_dir: str
    rw: bool
    tag: str

    @property
    def spec(self) -> str:
        return f"{self.host_dir}:{self.guest_dir}" + (":rw" if self.rw else "")

    def to_state(self) -> dict:
        return {"host_dir": str(self.host_dir), "guest_dir": self.guest_dir, "rw": self.rw, "tag": self.tag}

    @classmethod
    def from_state(cls, d: dict) -> Share:
        return cls(Path(d["host_dir"]), d["guest_dir"], bool(d["rw"]), d["tag"])


def guest_dir_problem(g: str) -> str | None:
    """Why `g` cannot be where a share is mounted in the guests, or None."""
    if not g.startswith("/"):
        return f"guest folder {g!r} is not an absolute path"
    if any(ord(c) < 32 or c == "\x7f" for c in g):
        return f"guest folder {g!r} contains control characters"
    norm = posixpath.normpath(g)
    if norm.startswith("//"):
        norm = norm[1:]
    if norm != g.rstrip("/") and g != "/":
        return f"guest folder {g!r} is not in normal form (use {norm!r})"
    if norm in SYSTEM_DIRS or any(norm.startswith(t + "/") for t in SYSTEM_TREES):
        return f"guest folder {norm!r} is a system folder of the guest; a share there would hide it"
    return None


def parse(spec: str, index: int, base: Path | None = None, where: str | None = None) -> Share:
    """`HOST_DIR[:GUEST_DIR[:rw|ro]]`. A relative HOST_DIR is taken from `base` (a
    scenario's folder) or the current folder. GUEST_DIR defaults to /mnt/<folder name>.
    Errors start with `where` (default `--share 'SPEC'`; a scenario passes its
    `file:line: shares[i]`)."""
    where = where or f"--share {spec!r}"
    parts = spec.split(":")
    if len(parts) > 3:
        raise TestbedError(f"{where}: too many ':' (expected HOST_DIR[:GUEST_DIR[:rw]])", hint=EXAMPLE)
    host_s, guest, mode = parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "ro"
    if not host_s:
        raise TestbedError(f"{where}: no host folder given", hint=EXAMPLE)
    if mode not in ("rw", "ro"):
        raise TestbedError(f"{where}: unknown mode {mode!r} (expected 'rw' or 'ro'; read-only is the default)",
                           hint=EXAMPLE)
    host = Path(host_s).expanduser()
    if not host.is_absolute():
        host = (base or Path.cwd()) / host
    if not host.exists():
        raise TestbedError(f"{where}: host folder {host} does not exist", hint=EXAMPLE)
    if not host.is_dir():
        raise TestbedError(f"{where}: {host} is not a folder (a share is a whole folder)",
                           hint="share the folder that holds it, or copy the file with 'beluga-testbed cp'")
    host = host.resolve()
    if not guest:
        if host.name in ("", ".", ".."):
            raise TestbedError(f"{where}: name the guest folder for {host}", hint=EXAMPLE)
        guest = f"/mnt/{host.name}"
    if (why := guest_dir_problem(guest)) is not None:
        raise TestbedError(f"{where}: {why}", hint=EXAMPLE)
    return Share(host, posixpath.normpath(guest), mode == "rw", f"share{index}")


def parse_all(specs: list[str], base: Path | None = None) -> list[Share]:
    """Every spec, then the checks across them: no guest folder twice, none inside another."""
    shares = [parse(s, i, base) for i, s in enumerate(specs)]
    for i, a in enumerate(shares):
        for b in shares[i + 1:]:
            if a.guest_dir == b.guest_dir:
                raise TestbedError(f"two shares are mounted at {a.guest_dir} ({a.host_dir} and {b.host_dir})")
            for x, y in ((a, b), (b, a)):
                if y.guest_dir.startswith(x.guest_dir.rstrip("/") + "/"):
                    raise TestbedError(f"share {y.host_dir} at {y.guest_dir} would be inside share {x.host_dir} "
                                       f"at {x.guest_dir}", hint="mount them side by side, e.g. under /mnt")
    return shares


def mount_command(shares: list[Share]) -> str:
    """One shell command that mounts every share in a guest (the 9p modules come from
    the guest's rootfs; the tiny initrd does not load them)."""
    cmds = ["modprobe -a 9pnet_virtio 9p"]
    for s in shares:
        g = shlex.quote(s.guest_dir)
        cmds.append(f"mkdir -p {g} && mount -t 9p -o {MOUNT_OPTIONS},{'rw' if s.rw else 'ro'} {s.tag} {g}")
    return " && ".join(cmds)


def mount(tb, shares: list[Share]) -> None:
    """Mount the shares on every host of a running testbed; a failure names the host."""
    from . import lifecycle
    if not shares:
        return
    failed = [r for r in lifecycle.exec_on(tb, tb.hosts, mount_command(shares), timeout_s=60) if not r.ok]
    if failed:
        raise TestbedError("mounting the shared folders failed: "
                           + "; ".join(f"{r.host}: {r.why}" for r in failed))


def missing(tb, wanted: list[Share]) -> list[Share]:
    """The shares in `wanted` that running testbed `tb` does not have (same host folder at
    the same guest folder, writable if wanted so): a scenario run on an existing testbed
    (`run --testbed`) checks this before its first step."""
    have = {(s.host_dir, s.guest_dir): s.rw for s in tb.shares}
    return [w for w in wanted if (w.host_dir, w.guest_dir) not in have or (w.rw and not have[(w.host_dir, w.guest_dir)])]
