"""`beluga-testbed doctor`: one line per check, ✓ or ✗, and a hint that says how to fix it."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import accel, image, paths

QEMU_MIN = (10, 0)
# The devices the topologies use, and the type-3 property the pool needs.
QEMU_DEVICES = ("pxb-cxl", "cxl-rp", "cxl-upstream", "cxl-downstream", "cxl-type3")
MIN_FREE_BYTES = {"cache": 3 << 30, "state": 2 << 30, "pools": 1 << 30}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""
    required: bool = True


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL).stdout


def check_qemu(which: Callable[[str], str | None] = shutil.which, run: Callable[[list[str]], str] = _run) -> Check:
    exe = which("qemu-system-x86_64")
    if not exe:
        return Check("qemu", False, "qemu-system-x86_64 not found",
                     "run 'make setup' (Debian 12: qemu-system-x86 from bookworm-backports)")
    m = re.search(r"version (\d+)\.(\d+)\.?(\d*)", run([exe, "--version"]))
    if not m:
        return Check("qemu", False, f"{exe}: cannot read its version", "reinstall qemu-system-x86")
    ver = (int(m.group(1)), int(m.group(2)))
    if ver < QEMU_MIN:
        return Check("qemu", False, f"QEMU {m.group(0).split()[-1]} at {exe} is too old (need >= {QEMU_MIN[0]}.{QEMU_MIN[1]} "
                     "for the CXL switch devices)", "run 'make setup' to install QEMU 10 from bookworm-backports")
    devices = run([exe, "-device", "help"])
    missing = [d for d in QEMU_DEVICES if f'"{d}"' not in devices]
    if not missing:
        props = run([exe, "-device", "cxl-type3,help"])
        if "volatile-memdev" not in props:
            missing.append("cxl-type3.volatile-memdev")
    if missing:
        return Check("qemu", False, f"QEMU {m.group(0).split()[-1]} lacks {', '.join(missing)}",
                     "install a QEMU built with CXL support (Debian's qemu-system-x86 >= 10)")
    if not which("qemu-img"):
        return Check("qemu", False, "qemu-img not found", "run 'make setup' (package qemu-utils)")
    return Check("qemu", True, f"QEMU {m.group(0).split()[-1]} with {', '.join(QEMU_DEVICES)} (volatile-memdev)")


def check_accel(probe: Callable[[Path | None], accel.Probe] = accel.probe_kvm) -> Check:
    img = image.find_image()
    p = probe(img.kernel if img else None)
    if p.usable:
        return Check("accelerator", True, f"KVM works: {p.reason}", required=False)
    return Check("accelerator", False, f"KVM unusable: {p.reason}; TCG will be used (slower, fully supported)",
                 "nothing to do: TCG is the supported accelerator for the CXL data path", required=False)


def check_tool(name: str, package: str, which: Callable[[str], str | None] = shutil.which) -> Check:
    exe = which(name)
    if not exe:
        return Check(name, False, f"{name} not found", f"run 'make setup' (package {package})")
    return Check(name, True, exe)


def check_space(label: str, path: Path, need: int, disk_usage=shutil.disk_usage) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = disk_usage(probe).free
    if free < need:
        return Check(f"space:{label}", False, f"{path}: {free / 2**30:.1f} GiB free, need {need / 2**30:.0f} GiB",
                     f"free space there, or point BELUGA_TESTBED_{label.upper()} elsewhere")
    return Check(f"space:{label}", True, f"{path}: {free / 2**30:.1f} GiB free")


def check_image(find: Callable[[], image.Image | None] = image.find_image,
                listing: Callable[[], list[image.Image]] = image.list_images) -> Check:
    img = find()
    if img is not None:
        return Check("image", True, f"{img.key} (current recipe; kernel {img.manifest.get('kernel_version')}, "
                     f"built {img.manifest.get('built_at')})")
    others = listing()
    if others:
        return Check("image", False, f"the images present ({', '.join(i.key for i in others)}) were built from an "
                     f"older recipe; the current one is {image.recipe_key()}", "run 'beluga-testbed image build'")
    return Check("image", False, f"no guest image (recipe key {image.recipe_key()})",
                 "run 'beluga-testbed image build' (about 2 minutes)")


def checks() -> list[Check]:
    return [
        check_qemu(),
        check_accel(),
        check_tool("debootstrap", "debootstrap"),
        check_tool("mkfs.ext4", "e2fsprogs"),
        check_tool("ssh", "openssh-client"),
        check_space("cache", paths.cache_dir(), MIN_FREE_BYTES["cache"]),
        check_space("state", paths.state_dir(), MIN_FREE_BYTES["state"]),
        check_space("pools", paths.pool_dir(), MIN_FREE_BYTES["pools"]),
        check_image(),
    ]


def main(json_out: bool = False) -> int:
    results = checks()
    failed = [c for c in results if not c.ok and c.required]
    if json_out:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in results]}, indent=2))
    else:
        for c in results:
            mark = "✓" if c.ok else "✗"
            print(f"{mark} {c.name:12} {c.detail}{'' if c.ok or c.required else ' (not required)'}")
            if not c.ok and c.hint:
                print(f"  {'':12} hint: {c.hint}")
        print(("✓ ready" if not failed else f"✗ {len(failed)} required check(s) failed"), file=sys.stderr)
    return 1 if failed else 0
