"""The guest image: a recipe in images/, built into a cache folder keyed by the recipe's hash.

A built image is a folder `<cache>/images/<key>/` holding the kernel (`vmlinux`, see
`_extract_vmlinux`), `initrd.img`, `rootfs.raw` and `manifest.json`. It is built in a temporary folder next to it and
renamed into place only when complete, so an interrupted build never looks good.
"""
from __future__ import annotations

import hashlib
import json
import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path


from . import paths, yamlcheck
from .initrd import CpioWriter
from .log import TestbedError, step

# Bump when the build logic changes in a way that changes the image: it is part
# of the key, like the files of the recipe.
BUILDER_VERSION = "3"
API_VERSION = "beluga.testbed/v1alpha1"
RECIPE_FILE = "recipe.yaml"


@dataclass(frozen=True)
class Recipe:
    name: str
    suite: str
    variant: str
    packages: tuple[str, ...]
    strip: tuple[str, ...]
    disk_size_mib: int
    initrd_modules: tuple[str, ...]
    kernel_cmdline: str
    source: Path

    @property
    def key(self) -> str:
        return recipe_key(self.source)


@dataclass(frozen=True)
class Image:
    key: str
    path: Path
    manifest: dict

    @property
    def kernel(self) -> Path:
        # Images from builder 2 and earlier carry only the compressed bzImage.
        return self.path / self.manifest.get("kernel_file", "vmlinuz")

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def disk(self) -> Path:
        return self.path / "rootfs.raw"

    @property
    def kernel_cmdline(self) -> str:
        return self.manifest["kernel_cmdline"]


_FIELDS = {
    "apiVersion": str, "kind": str, "name": str, "suite": str, "variant": str,
    "packages": list, "strip": list, "disk_size_mib": int, "initrd_modules": list,
    "kernel_cmdline": str,
}
# Package names go to debootstrap's comma-separated --include (Debian policy 5.6.1);
# module names become file lookups in the initrd; strip patterns are globbed below the
# rootfs and removed as root, so they stay below it.
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_MODULE = re.compile(r"[A-Za-z0-9_-]+")


def load_recipe(src: Path | None = None) -> Recipe:
    src = src or paths.images_src()
    file = src / RECIPE_FILE
    doc = yamlcheck.read(file, "image recipe")
    c = yamlcheck.Checker(doc, "image recipe")
    data = c.mapping(doc.data, (), _FIELDS, {})
    if data is None:
        c.raise_errors()
    if data.get("apiVersion", API_VERSION) != API_VERSION:
        c.err(("apiVersion",), f"expected {API_VERSION!r}, got {data['apiVersion']!r}")
    if data.get("kind", "ImageRecipe") != "ImageRecipe":
        c.err(("kind",), f"expected 'ImageRecipe', got {data['kind']!r}")
    for field, pattern, what in (("packages", _PACKAGE, "a Debian package name"),
                                 ("initrd_modules", _MODULE, "a kernel module name")):
        for i, v in enumerate(data.get(field, [])):
            if not isinstance(v, str) or not pattern.fullmatch(v):
                c.err((field, i), f"expected {what}, got {yamlcheck.typename(v)} {v!r}")
    for i, v in enumerate(data.get("strip", [])):
        if not isinstance(v, str) or not v or v.startswith("/") or ".." in v.split("/"):
            c.err(("strip", i), f"expected a path pattern inside the rootfs (relative, no '..'), got {v!r}")
    if "disk_size_mib" in data and not 512 <= data["disk_size_mib"] <= 65536:
        c.err(("disk_size_mib",), f"expected 512 to 65536 MiB (a sparse ext4 file in the image cache), got {data['disk_size_mib']}")
    c.raise_errors()
    return Recipe(
        name=data["name"], suite=data["suite"], variant=data["variant"],
        packages=tuple(data["packages"]), strip=tuple(data["strip"]),
        disk_size_mib=data["disk_size_mib"], initrd_modules=tuple(data["initrd_modules"]),
        kernel_cmdline=" ".join(data["kernel_cmdline"].split()), source=src,
    )


def recipe_key(src: Path | None = None) -> str:
    """sha256 over every file of the recipe folder (path, mode's exec bit, bytes) and
    the builder version; the first 16 hex digits name the image."""
    src = src or paths.images_src()
    h = hashlib.sha256(f"builder {BUILDER_VERSION}\n".encode())
    for f in sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = f.relative_to(src).as_posix()
        if rel == "README.md":
            continue
        h.update(f"{rel}\0{'x' if os.access(f, os.X_OK) else '-'}\0{f.stat().st_size}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def images_dir() -> Path:
    return paths.cache_dir() / "images"


def list_images() -> list[Image]:
    out = []
    d = images_dir()
    if not d.is_dir():
        return out
    for p in sorted(d.iterdir()):
        m = p / "manifest.json"
        if p.is_dir() and not p.name.startswith(".") and m.is_file():
            out.append(Image(key=p.name, path=p, manifest=json.loads(m.read_text())))
    return out


def find_image(key: str | None = None) -> Image | None:
    """The image built from the current recipe (or the given key), if present and complete."""
    key = key or recipe_key()
    p = images_dir() / key
    m = p / "manifest.json"
    if not m.is_file():
        return None
    img = Image(key=key, path=p, manifest=json.loads(m.read_text()))
    if not all(f.is_file() for f in (img.kernel, img.initrd, img.disk)):
        return None
    return img


def require_image() -> Image:
    img = find_image()
    if img is None:
        raise TestbedError(
            f"no guest image for the current recipe (key {recipe_key()})",
            hint="run 'beluga-testbed image build' (about 2 minutes)",
        )
    return img


def remove_images(keys: list[str], all_: bool = False) -> list[str]:
    removed = []
    d = images_dir()
    targets = [i.key for i in list_images()] if all_ else keys
    for k in targets:
        p = d / k
        if not p.is_dir() or not re.fullmatch(r"[0-9a-f]{16}", k):
            raise TestbedError(f"no image {k!r}", hint="'beluga-testbed image list' shows the keys")
        shutil.rmtree(p)
        (d / f"build-{k}.log").unlink(missing_ok=True)
        removed.append(k)
    # Leftovers of interrupted builds.
    if all_ and d.is_dir():
        for p in d.glob(".build-*"):
            shutil.rmtree(p, ignore_errors=True)
    return removed


# Suites of Debian's main archive (not security, not third-party repositories such as
# nodesource's "nodistro" or Google's "cloud-sdk-bookworm").
_DEBIAN_SUITE = re.compile(r"(bullseye|bookworm|trixie|forky|duke|sid|oldstable|stable|testing|unstable)"
                           r"(-updates|-backports)?")


def apt_entries(etc_apt: Path) -> list[tuple[str, str]]:
    """Every enabled `deb` entry in the apt folder `etc_apt` as (URI, suite) pairs, in
    apt's order: sources.list, then sources.list.d/ by file name, one-line `*.list` and
    deb822 `*.sources` files alike. Missing files are no error: Debian's own container
    images have no sources.list at all. scripts/apt-sources.sh reads them the same way
    (tests/unit/test_apt_sources.py holds both to the same fixtures)."""
    files = [etc_apt / "sources.list"]
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    out: list[tuple[str, str]] = []
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            out += _deb822_entries(text)
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            i = 1
            if i < len(words) and words[i].startswith("["):
                while i < len(words) and not words[i].endswith("]"):
                    i += 1
                i += 1
            if i + 1 < len(words):
                out.append((words[i], words[i + 1]))
    return out


def _deb822_entries(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for stanza in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, str] = {}
        last = None
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and last:
                fields[last] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            last = key.strip().lower()
            fields[last] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        out += [(u, s) for u in fields.get("uris", "").split() for s in fields.get("suites", "").split()]
    return out


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror: `BELUGA_TESTBED_MIRROR`, else the first one the host's apt
    uses for a suite of Debian's main archive."""
    if env := os.environ.get("BELUGA_TESTBED_MIRROR"):
        return env
    for uri, suite in apt_entries(etc_apt):
        if _DEBIAN_SUITE.fullmatch(suite):
            return uri.rstrip("/")
    raise TestbedError(
        f"no Debian mirror found in {etc_apt}/sources.list or {etc_apt}/sources.list.d/*.list, *.sources",
        hint="set BELUGA_TESTBED_MIRROR to a Debian mirror URL (for example http://deb.debian.org/debian)",
    )


def build(*, force: bool = False, log_path: Path | None = None) -> tuple[Image, bool]:
    """Build the image of the current recipe unless it is up to date.
    Returns the image and whether it was built now."""
    recipe = load_recipe()
    key = recipe.key
    if not force and (img := find_image(key)):
        return img, False
    if os.geteuid() != 0:
        raise TestbedError("building the guest image needs root (debootstrap, device nodes)",
                           hint="run it as root, or 'sudo make image'")
    for tool in ("debootstrap", "mkfs.ext4"):
        if not shutil.which(tool):
            raise TestbedError(f"{tool} not found", hint="run 'make setup'")
    images_dir().mkdir(parents=True, exist_ok=True)
    work = images_dir() / f".build-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    # The log lives beside the build folder, so it survives a failed build.
    log_path = log_path or images_dir() / f"build-{key}.log"
    log_path.unlink(missing_ok=True)
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    try:
        rootfs = work / "rootfs"
        with open(log_path, "a") as log:
            mirror = apt_mirror()
            t = time.monotonic()
            with step(f"debootstrap {recipe.suite} ({len(recipe.packages)} packages, from {mirror}; log {log_path})"):
                debs = paths.cache_dir() / "debs"
                debs.mkdir(parents=True, exist_ok=True)
                _run(["debootstrap", f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}",
                      f"--cache-dir={debs}", recipe.suite, str(rootfs), mirror], log)
            timings["debootstrap_s"] = time.monotonic() - t
            t = time.monotonic()
            with step("configure the guest (init, sshd, kmem blocked)"):
                kver = _configure(recipe, rootfs)
            timings["configure_s"] = time.monotonic() - t
            t = time.monotonic()
            with step(f"tiny initrd ({', '.join(recipe.initrd_modules)})"):
                _write_initrd(recipe, rootfs, kver, work / "initrd.img")
            timings["initrd_s"] = time.monotonic() - t
            t = time.monotonic()
            with step("uncompressed kernel for a direct PVH boot"):
                _extract_vmlinux(rootfs / "boot" / f"vmlinuz-{kver}", work / KERNEL_FILE)
            timings["kernel_s"] = time.monotonic() - t
            versions = _package_versions(rootfs, ["linux-image-amd64", "cxl", "ndctl", "daxctl", "python3", "python3-numpy", "openssh-server"])
            rootfs_bytes = _du(rootfs)
            t = time.monotonic()
            with step(f"disk image ({recipe.disk_size_mib} MiB ext4, {rootfs_bytes / 2**20:.0f} MiB used)"):
                _run(["mkfs.ext4", "-q", "-F", "-L", "beluga-root", "-d", str(rootfs),
                      "-E", "root_owner=0:0", str(work / "rootfs.raw"), f"{recipe.disk_size_mib}M"], log)
            timings["mkfs_s"] = time.monotonic() - t
            shutil.rmtree(rootfs)
        manifest = {
            "key": key,
            "name": recipe.name,
            "suite": recipe.suite,
            "kernel_version": kver,
            "kernel_file": KERNEL_FILE,
            "kernel_cmdline": recipe.kernel_cmdline,
            "packages": versions,
            "rootfs_bytes": rootfs_bytes,
            "disk_allocated_bytes": (work / "rootfs.raw").stat().st_blocks * 512,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_s": round(time.monotonic() - t_all, 1),
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        dest = images_dir() / key
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return find_image(key), True  # type: ignore[return-value]


def _run(argv: list[str], log) -> None:
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    r = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise TestbedError(f"{argv[0]} failed (exit {r.returncode})", hint=f"see {log.name}")


def _configure(recipe: Recipe, rootfs: Path) -> str:
    """Copy the recipe's rootfs overlay in, make busybox PID 1, strip what guests never read."""
    overlay = recipe.source / "rootfs"
    for f in sorted(overlay.rglob("*")):
        dest = rootfs / f.relative_to(overlay)
        if f.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
    init = rootfs / "usr/lib/beluga/init"
    init.unlink(missing_ok=True)
    # busybox picks the applet from argv[0]'s basename: this link runs `init`.
    init.symlink_to("/bin/busybox")
    ssh_dir = rootfs / "root/.ssh"  # the boot script writes the testbed's key here
    ssh_dir.mkdir(parents=True, exist_ok=True)
    ssh_dir.chmod(0o700)
    (rootfs / "etc/hostname").write_text("beluga\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    for pattern in recipe.strip:
        for p in rootfs.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                p.mkdir()
            else:
                p.unlink()
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise TestbedError(f"expected one kernel in the rootfs' /boot, found {[k.name for k in kernels]}")
    return kernels[0].name.removeprefix("vmlinuz-")


# The busybox applets that images/initrd/init runs.
INITRD_APPLETS = ("sh", "mkdir", "mount", "umount", "insmod", "sleep", "switch_root")


def _write_initrd(recipe: Recipe, rootfs: Path, kver: str, out: Path) -> None:
    moddir = rootfs / "lib/modules" / kver
    deps = _modules_dep(moddir / "modules.dep")
    by_name = {_modname(p): p for p in deps}
    order: list[str] = []

    def visit(rel: str) -> None:
        for d in deps[rel]:
            visit(d)
        if rel not in order:
            order.append(rel)

    for name in recipe.initrd_modules:
        rel = by_name.get(name.replace("-", "_"))
        if rel is None:
            # Built into the kernel: nothing to load.
            if name in (moddir / "modules.builtin").read_text():
                continue
            raise TestbedError(f"initrd module {name!r} not found in {moddir}")
        visit(rel)
    with CpioWriter(out) as cpio:
        for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
            cpio.directory(d)
        cpio.char_device("dev/console", 5, 1)
        cpio.file("bin/busybox", (rootfs / "bin/busybox").read_bytes(), 0o755)
        for applet in INITRD_APPLETS:
            cpio.symlink(f"bin/{applet}", "busybox")
        cpio.file("init", (recipe.source / "initrd/init").read_bytes(), 0o755)
        names = []
        for rel in order:
            name = _modname(rel) + ".ko"
            cpio.file(f"lib/modules/{name}", _read_module(moddir / rel), 0o644)
            names.append(name)
        cpio.file("modules.order", ("\n".join(names) + "\n").encode(), 0o644)


def _modules_dep(path: Path) -> dict[str, list[str]]:
    deps = {}
    for line in path.read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    return deps


def _modname(rel: str) -> str:
    base = rel.rsplit("/", 1)[-1]
    return base.split(".ko")[0].replace("-", "_")


def _read_module(p: Path) -> bytes:
    # busybox insmod hands the bytes to init_module(): decompress here.
    data = p.read_bytes()
    if p.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if p.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if p.name.endswith(".ko"):
        return data
    raise TestbedError(f"{p}: unsupported module compression")


KERNEL_FILE = "vmlinux"
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the note that marks a PVH entry point


def _extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the ELF kernel that `bzimage` carries, uncompressed.

    QEMU starts an ELF kernel with a PVH note directly in 32-bit mode: no real-mode
    setup and, above all, no decompressor, which under TCG spends ~1.2 s of every boot
    unpacking Debian's zstd kernel (measured with earlyprintk). Where the payload is
    found is fixed by the x86 boot protocol (>= 2.08): the protected-mode part starts
    after (setup_sects + 1) sectors, the payload at payload_offset within it."""
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS" or int.from_bytes(data[0x206:0x208], "little") < 0x208:
        raise TestbedError(f"{bzimage}: not an x86 bzImage of boot protocol >= 2.08")
    setup_sects = data[0x1F1] or 4
    offset = (setup_sects + 1) * 512 + int.from_bytes(data[0x248:0x24C], "little")
    payload = data[offset:offset + int.from_bytes(data[0x24C:0x250], "little")]
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard
        elf = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    elif payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor().decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        elf = zlib.decompressobj(wbits=31).decompress(payload)
    else:
        raise TestbedError(f"{bzimage}: kernel payload compressed with an unsupported method "
                           f"(magic {payload[:4].hex()}); zstd, xz and gzip are supported")
    if not elf.startswith(b"\x7fELF\x02\x01"):
        raise TestbedError(f"{bzimage}: its payload is not a 64-bit ELF kernel")
    if XEN_ELFNOTE_PHYS32_ENTRY not in _elf_note_types(elf, b"Xen"):
        raise TestbedError(f"{bzimage}: the kernel has no PVH entry point (CONFIG_PVH); "
                           "QEMU cannot boot it uncompressed")
    out.write_bytes(elf)


def _elf_note_types(elf: bytes, owner: bytes) -> set[int]:
    """The types of the notes of `owner` in a 64-bit little-endian ELF's PT_NOTE segments."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    types = set()
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == owner:
                types.add(ntype)
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return types


def _package_versions(rootfs: Path, names: list[str]) -> dict[str, str]:
    status = (rootfs / "var/lib/dpkg/status").read_text()
    out = {}
    for block in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", block, re.M))
        if fields.get("Package") in names and "installed" in fields.get("Status", ""):
            out[fields["Package"]] = fields.get("Version", "?")
    return out


def _du(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def describe(img: Image) -> dict:
    m = dict(img.manifest)
    m["path"] = str(img.path)
    m["current"] = img.key == recipe_key()
    return m


