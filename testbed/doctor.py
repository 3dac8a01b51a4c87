"""`beluga-testbed doctor`: one line per check, ✓ or ✗, and a hint that says how to fix it."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import accel, image, kernel, paths

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


def check_qemu(which: Callable[[str], str | None] = shutil.which, run: Callable[[list[str]], str] = _run,
               exe: str | None = None) -> Check:
    """The QEMU that `up` runs: `exe` (doctor --qemu), else $BELUGA_TESTBED_QEMU, else
    qemu-system-x86_64 on PATH."""
    given = exe or os.environ.get(kernel.QEMU_ENV)
    wanted = given or "qemu-system-x86_64"
    exe = which(wanted)
    if not exe:
        if given:
            return Check("qemu", False, f"{wanted}: no such executable",
                         "give the path of a QEMU binary (qemu-system-x86_64) built with CXL support")
        return Check("qemu", False, "qemu-system-x86_64 not found",
                     "run 'make setup' (Debian 12: qemu-system-x86 from bookworm-backports)")
    version_text = run([exe, "--version"])
    m = re.search(r"version (\d+)\.(\d+)\.?(\d*)", version_text)
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
        where = f" at {exe}" if given else ""
        return Check("qemu", False, f"QEMU {m.group(0).split()[-1]}{where} lacks {', '.join(missing)}",
                     "install a QEMU built with CXL support (Debian's qemu-system-x86 >= 10)")
    if not which("qemu-img"):
        return Check("qemu", False, "qemu-img not found", "run 'make setup' (package qemu-utils)")
    where = f" at {exe}" if given else ""
    # A QEMU that qemu/build.sh built says which recipe: "version 10.2.2 (beluga-<key>)".
    recipe = re.search(r"version \S+ \((beluga-[0-9a-f]+)\)", version_text)
    built = f" ({recipe.group(1)}, built by qemu/build.sh)" if recipe else ""
    return Check("qemu", True, f"QEMU {m.group(0).split()[-1]}{built}{where} with {', '.join(QEMU_DEVICES)} "
                 "(volatile-memdev)")


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


def checks(qemu: Path | None = None, kernel_path: Path | None = None, modules: Path | None = None) -> list[Check]:
    """Every check of this machine; with `kernel_path`, that kernel's options too."""
    extra = check_kernel(kernel_path, modules) if kernel_path is not None else []
    return [
        check_qemu(exe=str(qemu) if qemu is not None else None),
        check_accel(),
        check_tool("debootstrap", "debootstrap"),
        check_tool("mkfs.ext4", "e2fsprogs"),
        check_tool("ssh", "openssh-client"),
        check_space("cache", paths.cache_dir(), MIN_FREE_BYTES["cache"]),
        check_space("state", paths.state_dir(), MIN_FREE_BYTES["state"]),
        check_space("pools", paths.pool_dir(), MIN_FREE_BYTES["pools"]),
        check_image(),
        *extra,
    ]


def main(json_out: bool = False, qemu: Path | None = None, kernel: Path | None = None,
         modules: Path | None = None) -> int:
    results = checks(qemu, kernel, modules)
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


# What a guest kernel needs: (option, its module where it can be one, what it is for).
# The boot needs the virtio, ext4 and fw_cfg ones (the tiny initrd loads them), the pool
# the CXL and DAX ones (the boot script's modprobe), --modules the 9p ones (the share
# that holds them).
KERNEL_OPTIONS: tuple[tuple[str, str | None, str], ...] = (
    ("CXL_BUS", "cxl_core", "the CXL core: ports, decoders, regions"),
    ("CXL_PCI", "cxl_pci", "the driver of the type-3 memory devices (cxl-type3)"),
    ("CXL_ACPI", "cxl_acpi", "the CXL root from the ACPI CEDT (the fixed memory windows)"),
    ("CXL_PORT", "cxl_port", "the driver of host bridges, root ports and switch ports"),
    ("CXL_MEM", "cxl_mem", "the memdev driver that regions are built on"),
    ("CXL_REGION", None, "regions (cxl create-region), the shared pool itself"),
    ("DEV_DAX", "device_dax", "/dev/daxX.Y, how the pool is mapped"),
    ("DEV_DAX_CXL", "dax_cxl", "the DAX device of a CXL RAM region"),
    ("VIRTIO_PCI", "virtio_pci", "the virtio devices (disk, NIC, 9p)"),
    ("VIRTIO_BLK", "virtio_blk", "the root disk"),
    ("EXT4_FS", "ext4", "the root file system"),
    ("VIRTIO_NET", "virtio_net", "the NIC that SSH goes through"),
    ("FW_CFG_SYSFS", "qemu_fw_cfg", "the SSH key and the pool's parameters (fw_cfg)"),
    ("NET_9P_VIRTIO", "9pnet_virtio", "the virtio-9p shares (--modules, --share)"),
    ("9P_FS", "9p", "the 9p file system (--modules, --share)"),
)
OPTIONAL_OPTIONS = (("PVH", "a direct boot of the uncompressed kernel (without it the bzImage's "
                             "decompressor runs in every guest: seconds under TCG)"),)


def kernel_config(kernel_path: Path, modules: Path | None = None) -> tuple[dict[str, str], str] | None:
    """The kernel's configuration (option without CONFIG_ -> y/m/value) and where it was
    read: a .config beside it or at the top of the build tree it is in, config-<version>
    beside it, /boot/config-<version>, the modules tree's build/.config. None if none."""
    ver = kernel.kernel_version(kernel_path) if kernel_path.is_file() else None
    candidates = [kernel_path.parent / ".config"]
    if kernel_path.parent.name == "boot" and kernel_path.parent.parent.parent.name == "arch":
        candidates.append(kernel_path.parents[3] / ".config")  # arch/x86/boot/bzImage
    if ver:
        candidates += [kernel_path.parent / f"config-{ver}", Path("/boot") / f"config-{ver}"]
        if modules is not None:
            candidates.append(modules / "lib" / "modules" / ver / "build" / ".config")
    for f in candidates:
        if f.is_file():
            return parse_config(f.read_text(errors="replace")), str(f)
    return None


def parse_config(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"CONFIG_([A-Za-z0-9_]+)=(.*)", line.strip())
        if m and m.group(2) != "n":
            out[m.group(1)] = m.group(2)
    return out


def check_kernel(kernel_path: Path, modules: Path | None = None) -> list[Check]:
    """One check per option a guest kernel lacks (each with what it is for), or one that
    says all are there. Read from its configuration, else from the modules tree's lists."""
    if not kernel_path.is_file():
        return [Check("kernel", False, f"{kernel_path}: no such file", "give the bzImage or vmlinux of the build")]
    ver = kernel.kernel_version(kernel_path)
    found = kernel_config(kernel_path, modules)
    if found is not None:
        config, source = found
        have = lambda opt, mod: opt in config  # noqa: E731
    else:
        versions = kernel.module_versions(modules) if modules is not None else []
        v = ver if ver in versions else (versions[0] if len(versions) == 1 else None)
        if v is None:
            where = f"{kernel_path.parent}/.config, {kernel_path.parent}/config-{ver or '<version>'}, " \
                    f"/boot/config-{ver or '<version>'}"
            return [Check("kernel", False, f"{kernel_path} (version {ver or 'unknown'}): no configuration found "
                          f"(looked for {where})",
                          "put the build's .config beside the kernel, or give its modules tree with --modules")]
        moddir = modules / "lib" / "modules" / v  # type: ignore[operator]
        source = f"{moddir}/modules.builtin and modules.dep"
        names = set()
        for f in ("modules.builtin", "modules.dep"):
            if (moddir / f).is_file():
                names |= {image._modname(line.split(":", 1)[0].strip())
                          for line in (moddir / f).read_text().splitlines() if line.strip()}
        have = lambda opt, mod: mod is None or mod in names  # noqa: E731 - options with no module: unknown
    out = []
    for opt, mod, why in KERNEL_OPTIONS:
        if not have(opt, mod):
            out.append(Check(f"kernel:{opt}", False, f"CONFIG_{opt} is not set ({source})",
                             f"set CONFIG_{opt}=y" + (" or =m" if mod else "") + f": {why}"))
    for opt, why in OPTIONAL_OPTIONS:
        if found is not None and not have(opt, None):
            out.append(Check(f"kernel:{opt}", False, f"CONFIG_{opt} is not set ({source})",
                             f"set CONFIG_{opt}=y: {why}", required=False))
    if not [c for c in out if c.required]:
        out.insert(0, Check("kernel", True, f"{kernel_path} (version {ver or 'unknown'}): the CXL, DAX, virtio "
                            f"and 9p options are set ({source})"))
    return out
