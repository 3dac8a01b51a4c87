"""Your kernel, your QEMU: `up --kernel PATH [--initrd PATH] [--modules DIR] [--qemu PATH]`.

A user's kernel boots with the image's root disk. What changes:

- the kernel: a bzImage is unpacked to its uncompressed ELF (image._extract_vmlinux) in
  the testbed's state folder, so QEMU starts it in PVH mode as it starts the image's;
  a bzImage without a PVH entry point boots as it is (slower under TCG: the decompressor
  runs in the guest). A vmlinux is used as it is and needs the PVH note.
- the initrd: the image's tiny initrd with a second cpio appended (the kernel unpacks
  both; files of the second replace those of the first): kernel_init.sh as /init, and
  the initrd modules of the recipe taken from the user's modules tree, plus 9p to mount
  that tree. `--initrd` replaces all of this with the user's own initrd, used as given.
- the modules: the `make modules_install INSTALL_MOD_PATH=DIR` tree's
  DIR/lib/modules/<version> is a read-only virtio-9p share (tag beluga-modules) that the
  initrd mounts at /lib/modules/<version> in every guest before the hand-over, so the
  boot script's `modprobe cxl_acpi ...` loads this kernel's drivers. <version> must be
  the kernel's `uname -r`: checked here from the kernel's own version string, and again
  by the guest's initrd.
- the QEMU binary: `--qemu`, else the topology's `kernel.qemu`, else
  $BELUGA_TESTBED_QEMU, else qemu-system-x86_64 on PATH.
"""
from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import image as image_mod
from . import paths
from .initrd import CpioWriter
from .log import TestbedError
from .shares import Share

QEMU_ENV = "BELUGA_TESTBED_QEMU"
MODULES_TAG = "beluga-modules"
INIT_SCRIPT = Path(__file__).with_name("kernel_init.sh")
# What the initrd loads to mount the modules share: 9p needs 9pnet (and netfs), which
# modules.dep names.
SHARE_MODULES = ("9pnet_virtio", "9p")
FIELDS = ("kernel", "initrd", "modules", "qemu")
# In the testbed's state folder, beside the hosts' folders: no name (names.py) starts with "_".
KERNEL_DIR = "_kernel"


@dataclass(frozen=True)
class UserKernel:
    """What the user gave (CLI options or the topology's `kernel:` mapping); all optional."""
    kernel: Path | None = None
    initrd: Path | None = None
    modules: Path | None = None
    qemu: Path | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, f) is not None for f in FIELDS)

    def over(self, base: UserKernel | None) -> UserKernel:
        """Each field of self where given, else base's (the CLI over the topology)."""
        if base is None:
            return self
        return UserKernel(*(getattr(self, f) if getattr(self, f) is not None else getattr(base, f) for f in FIELDS))

    def to_state(self) -> dict:
        return {f: str(getattr(self, f)) if getattr(self, f) is not None else None for f in FIELDS}


@dataclass(frozen=True)
class Boot:
    """What QEMU is given: the files that `prepare` wrote (or would write)."""
    qemu: str
    kernel: Path
    initrd: Path
    version: str | None  # of the user's kernel, where one is given
    modules_share: Share | None

    def to_state(self, given: UserKernel) -> dict:
        return {"given": given.to_state(), "qemu": self.qemu, "kernel": str(self.kernel), "initrd": str(self.initrd),
                "version": self.version,
                "modules": str(self.modules_share.host_dir) if self.modules_share else None}


def problems(uk: UserKernel, *, whole: bool = True) -> dict[str, str]:
    """Why each given path cannot be used, by field (empty when all can). `whole=False`:
    part of what is given (a topology's fields, which the CLI's options complete)."""
    out: dict[str, str] = {}
    for f, want_dir in (("kernel", False), ("initrd", False), ("modules", True), ("qemu", False)):
        p = getattr(uk, f)
        if p is None:
            continue
        if not p.exists():
            out[f] = f"{p}: no such {'folder' if want_dir else 'file'}"
        elif want_dir and not p.is_dir():
            out[f] = f"{p}: not a folder (expected a `make modules_install INSTALL_MOD_PATH=` tree)"
        elif not want_dir and not p.is_file():
            out[f] = f"{p}: not a file"
        elif f == "qemu" and not os.access(p, os.X_OK):
            out[f] = f"{p}: not executable"
        elif f == "modules" and (why := _modules_problem(p)):
            out[f] = why
    if whole and uk.modules is not None and uk.kernel is None and "modules" not in out:
        out["modules"] = "modules given without a kernel: they are for a user's kernel (--kernel)"
    if whole and uk.initrd is not None and uk.kernel is None and "initrd" not in out:
        out["initrd"] = "an initrd given without a kernel: it is for a user's kernel (--kernel)"
    return out


def from_yaml(c, value, path: tuple = ("kernel",), *, check_paths: bool = True) -> UserKernel | None:
    """The `kernel: {kernel: PATH, initrd: PATH, modules: DIR, qemu: PATH}` mapping of a
    topology or a scenario file, read with its yamlcheck.Checker `c`: every field
    optional, a relative path relative to that file's folder, each path checked (located
    errors: `file:line: kernel.modules: /src/mods: no such folder`)."""
    data = c.mapping(value, path, {}, {f: str for f in FIELDS})
    if not data:
        return None
    base = Path(c.doc.file).parent
    uk = UserKernel(**{f: base / Path(v).expanduser() for f, v in data.items()})
    if check_paths:
        for f, why in problems(uk, whole=False).items():
            c.err(path + (f,), why)
    return uk


def differences(state: dict | None, want: UserKernel) -> list[str]:
    """How a running testbed's kernel and QEMU (the `kernel` of its state: None when it
    booted the image's with the default QEMU) differ from `want`, for each field `want`
    gives: ["kernel: /a/bzImage, not /b/bzImage", ...]; empty when they agree."""
    state = state or {}
    given = state.get("given") or {}
    out = []
    for f in FIELDS:
        w = getattr(want, f)
        if w is None:
            continue
        if f == "qemu":
            from .qemucmd import QEMU
            have = state.get("qemu") or QEMU
        else:
            have = given.get(f)
        if have is None or _real(have) != _real(str(w)):
            out.append(f"{f}: {have or 'the image' + chr(39) + 's'}, not {w}")
    return out


def _real(p: str) -> Path:
    return Path(shutil.which(p) if "/" not in p and shutil.which(p) else p).resolve()


def check(uk: UserKernel, option: dict[str, str] | None = None, *, whole: bool = True) -> None:
    """A TestbedError naming every unusable path by its option (`--kernel`, ...); `whole`
    as for problems()."""
    bad = problems(uk, whole=whole)
    if bad:
        option = option or {f: f"--{f}" for f in FIELDS}
        raise TestbedError("\n".join(f"{option[f]}: {why}" for f, why in bad.items()),
                           hint="give existing paths: a bzImage or vmlinux, an initrd file, the folder given to "
                                "`make modules_install INSTALL_MOD_PATH=`, an executable QEMU")


def _modules_problem(d: Path) -> str | None:
    root = d / "lib" / "modules"
    versions = module_versions(d)
    if not versions:
        return f"{d}: no {root.relative_to(d)}/<version>/modules.dep (expected the folder given to " \
               "`make modules_install INSTALL_MOD_PATH=`)"
    return None


def module_versions(d: Path) -> list[str]:
    """The versions that DIR/lib/modules holds modules for (a folder with modules.dep)."""
    root = d / "lib" / "modules"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "modules.dep").is_file())


def kernel_version(path: Path) -> str | None:
    """The kernel's `uname -r`, read from the file: a bzImage's header points at its version
    string (boot protocol >= 2.00, `kernel_version`); a vmlinux carries the banner
    'Linux version <release> (...'. None when neither is found."""
    data = path.read_bytes()
    if data[0x202:0x206] == b"HdrS":
        ptr = int.from_bytes(data[0x20E:0x210], "little")
        if ptr:
            raw = data[ptr + 0x200:ptr + 0x200 + 256].split(b"\0", 1)[0]
            words = raw.split()
            if words:
                return words[0].decode(errors="replace")
    m = re.search(rb"Linux version (\S+) \(", data)
    return m.group(1).decode(errors="replace") if m else None


def is_bzimage(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(0x210)
    return head[0x202:0x206] == b"HdrS"


def qemu_binary(uk: UserKernel) -> str:
    if uk.qemu is not None:
        return str(uk.qemu)
    env = os.environ.get(QEMU_ENV)
    if env:
        p = Path(env)
        if not (p.is_file() and os.access(p, os.X_OK)) and not shutil.which(env):
            raise TestbedError(f"{QEMU_ENV}={env}: no such executable",
                               hint=f"point {QEMU_ENV} at a QEMU binary, or unset it")
        return env
    from .qemucmd import QEMU
    return QEMU


def modules_version(uk: UserKernel, version: str | None) -> str:
    """The folder of DIR/lib/modules that is the kernel's; located errors otherwise."""
    assert uk.modules is not None
    have = module_versions(uk.modules)
    if version is None:
        if len(have) == 1:
            return have[0]
        raise TestbedError(f"--modules {uk.modules}: holds modules for {', '.join(have)}, and the version of "
                           f"--kernel {uk.kernel} cannot be read from it to choose",
                           hint="give a modules tree with one lib/modules/<version> folder")
    if version not in have:
        raise TestbedError(f"--modules {uk.modules}: no modules for the kernel's version {version} "
                           f"(it has lib/modules/{', lib/modules/'.join(have)}); --kernel {uk.kernel} is {version}",
                           hint="give the tree that `make modules_install INSTALL_MOD_PATH=DIR` wrote for this "
                                "kernel build (its `make kernelrelease` is the folder's name)")
    return version


def plan(uk: UserKernel, img: image_mod.Image | None, state_dir: Path) -> Boot:
    """The files QEMU will be given, without writing anything (for --dry-run and `up`)."""
    qemu = qemu_binary(uk)
    default_kernel = img.kernel if img else Path("<image>/vmlinux")
    default_initrd = img.initrd if img else Path("<image>/initrd.img")
    if uk.kernel is None:
        return Boot(qemu, default_kernel, default_initrd, None, None)
    check(uk)
    version = kernel_version(uk.kernel)
    share = None
    if uk.modules is not None:
        v = modules_version(uk, version)
        version = version or v
        share = Share(uk.modules / "lib" / "modules" / v, f"/lib/modules/{v}", False, MODULES_TAG)
    folder = state_dir / KERNEL_DIR
    kernel = folder / image_mod.KERNEL_FILE if is_bzimage(uk.kernel) else uk.kernel
    initrd = uk.initrd if uk.initrd is not None else folder / "initrd.img"
    return Boot(qemu, kernel, initrd, version, share)


def prepare(uk: UserKernel, img: image_mod.Image, state_dir: Path) -> Boot:
    """Write the files of `plan` into `<state>/<name>/_kernel/`."""
    boot = plan(uk, img, state_dir)
    if uk.kernel is None:
        return boot
    folder = paths.make_child_dir(state_dir, KERNEL_DIR)
    kernel = boot.kernel
    if kernel != uk.kernel:
        try:
            image_mod._extract_vmlinux(uk.kernel, kernel)
        except TestbedError as e:
            if "no PVH entry point" not in str(e):
                raise
            kernel = uk.kernel  # QEMU boots the bzImage itself, decompressor and all
    elif image_mod.XEN_ELFNOTE_PHYS32_ENTRY not in image_mod._elf_note_types(uk.kernel.read_bytes(), b"Xen"):
        # QEMU's own words otherwise: "Error loading uncompressed kernel without PVH ELF Note".
        raise TestbedError(f"--kernel {uk.kernel}: an ELF kernel without a PVH entry point; QEMU cannot boot it",
                           hint="give the bzImage (arch/x86/boot/bzImage), or build with CONFIG_PVH=y")
    if uk.initrd is None:
        write_initrd(img, uk.modules / "lib" / "modules" / boot.version if uk.modules and boot.version else None,
                     boot.version if uk.modules else None, folder / "initrd.img")
    return Boot(boot.qemu, kernel, boot.initrd, boot.version, boot.modules_share)


def write_initrd(img: image_mod.Image, moddir: Path | None, version: str | None, out: Path) -> None:
    """The image's initrd, then a cpio with kernel_init.sh as /init and the user kernel's
    initrd modules (the recipe's, and 9p for the modules share) in load order."""
    rels = initrd_modules(moddir, list(image_mod.load_recipe().initrd_modules) + list(SHARE_MODULES)) \
        if moddir else []
    extra = out.with_suffix(".extra")
    with CpioWriter(extra) as cpio:
        cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
        names = []
        for rel in rels:
            name = image_mod._modname(rel) + ".ko"
            cpio.file(f"lib/modules/{name}", read_module(moddir / rel), 0o644)  # type: ignore[operator]
            names.append(name)
        cpio.file("modules.order", ("".join(n + "\n" for n in names)).encode(), 0o644)
        cpio.file("modules.version", f"{version}\n".encode() if version else b"", 0o644)
    fd = paths.create_private(out, exclusive=True)
    with os.fdopen(fd, "wb") as f, open(img.initrd, "rb") as base, open(extra, "rb") as tail:
        shutil.copyfileobj(base, f)
        # Each cpio archive starts on a 4-byte boundary (the kernel skips zero padding).
        f.write(b"\0" * (-f.tell() % 4))
        shutil.copyfileobj(tail, f)
    extra.unlink()


def initrd_modules(moddir: Path, wanted: list[str]) -> list[str]:
    """The modules.dep paths of `wanted` and their dependencies, in load order; built-in
    ones are skipped, and one that is neither is an error naming the kernel option."""
    deps = image_mod._modules_dep(moddir / "modules.dep")
    by_name = {image_mod._modname(p): p for p in deps}
    builtin_file = moddir / "modules.builtin"
    builtin = {image_mod._modname(line.strip()) for line in builtin_file.read_text().splitlines()} \
        if builtin_file.is_file() else set()
    order: list[str] = []

    def visit(rel: str) -> None:
        for d in deps.get(rel, []):
            visit(d)
        if rel not in order:
            order.append(rel)

    missing = []
    for name in wanted:
        n = name.replace("-", "_")
        if n in by_name:
            visit(by_name[n])
        elif n not in builtin:
            missing.append(name)
    if missing:
        raise TestbedError(f"--modules {moddir}: no module {', '.join(missing)} (neither in modules.dep nor "
                           "in modules.builtin)",
                           hint="the guests need them to boot: build them (=m) or into the kernel (=y); "
                                "'beluga-testbed doctor --kernel PATH' lists the options")
    return order


def read_module(p: Path) -> bytes:
    """A module's bytes, decompressed: busybox insmod hands them to init_module()."""
    data = p.read_bytes()
    if p.name.endswith(".ko.zst"):
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if p.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if p.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    return image_mod._read_module(p)
