"""Recipe key, recipe errors, up-to-date detection, no half-built image after a failure,
and the uncompressed PVH kernel taken out of the bzImage."""
import gzip
import json
import lzma
import os
import shutil
import struct
from pathlib import Path

import pytest
import zstandard

from testbed import image, paths
from testbed.log import TestbedError


@pytest.fixture
def recipe(tmp_path):
    src = tmp_path / "images"
    shutil.copytree(paths.images_src(), src)
    return src


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("BELUGA_TESTBED_CACHE", str(d))
    return d


def test_key_is_stable_and_follows_every_recipe_file(recipe):
    k = image.recipe_key(recipe)
    assert k == image.recipe_key(recipe) and len(k) == 16
    boot = recipe / "rootfs/usr/lib/beluga/boot"
    boot.write_text(boot.read_text() + "\n# changed\n")
    k2 = image.recipe_key(recipe)
    assert k2 != k
    boot.chmod(0o644)  # the exec bit is part of the recipe too
    assert image.recipe_key(recipe) not in (k, k2)


def test_key_ignores_readme(recipe):
    k = image.recipe_key(recipe)
    (recipe / "README.md").write_text("notes")
    assert image.recipe_key(recipe) == k


def test_key_changes_with_packages(recipe):
    k = image.recipe_key(recipe)
    r = recipe / "recipe.yaml"
    r.write_text(r.read_text().replace("  - python3-yaml\n", "  - python3-yaml\n  - python3-torch\n"))
    assert image.recipe_key(recipe) != k


def test_recipe_errors_name_file_and_field(recipe):
    r = recipe / "recipe.yaml"
    r.write_text(r.read_text().replace("disk_size_mib: 2048", "disk_size_mb: 2048"))
    with pytest.raises(TestbedError) as e:
        image.load_recipe(recipe)
    assert e.value.errors == [f"{r}:3: (top): missing required key 'disk_size_mib'",  # in the file's order
                              f"{r}:29: disk_size_mb: unknown key (did you mean 'disk_size_mib'?)"]
    assert str(e.value).startswith("invalid image recipe:\n  ")


def test_recipe_values_stay_inside_the_rootfs_and_debootstrap_argument(recipe):
    """A strip pattern is removed as root below the rootfs; package names are joined with
    commas for debootstrap: neither may reach outside."""
    r = recipe / "recipe.yaml"
    r.write_text(r.read_text().replace("  - usr/share/doc\n", "  - ../../home\n")
                 .replace("  - kmod\n", "  - kmod,evil\n").replace("disk_size_mib: 2048", "disk_size_mib: 1e9"))
    with pytest.raises(TestbedError) as e:
        image.load_recipe(recipe)
    assert e.value.errors == [
        f"{r}:13: packages[4]: expected a Debian package name, got a string 'kmod,evil'",
        f"{r}:23: strip[0]: expected a path pattern inside the rootfs (relative, no '..'), got '../../home'",
        f"{r}:29: disk_size_mib: expected an integer, got a string '1e9'"]


def _fake_image(cache: Path, key: str) -> Path:
    d = cache / "images" / key
    d.mkdir(parents=True)
    for f in ("vmlinuz", "initrd.img", "rootfs.raw"):
        (d / f).write_bytes(b"x")
    (d / "manifest.json").write_text(json.dumps({"key": key, "built_at": "then", "kernel_cmdline": "console=ttyS0",
                                                 "kernel_version": "6.12", "rootfs_bytes": 1}))
    return d


def test_up_to_date_image_is_not_rebuilt(cache, monkeypatch):
    _fake_image(cache, image.recipe_key())
    monkeypatch.setattr(image, "_run", lambda *a: pytest.fail("must not run debootstrap"))
    img, built = image.build()
    assert not built and img.key == image.recipe_key()


def test_incomplete_image_does_not_count(cache):
    d = _fake_image(cache, image.recipe_key())
    (d / "rootfs.raw").unlink()
    assert image.find_image() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="image.build checks for root before it starts")
def test_failed_build_leaves_nothing(cache, monkeypatch):
    def fail(argv, log):
        raise TestbedError("debootstrap failed (exit 1)")
    monkeypatch.setattr(image, "_run", fail)
    with pytest.raises(TestbedError):
        image.build()
    assert image.find_image() is None
    assert not list((cache / "images").glob(".build-*"))
    assert (cache / "images" / f"build-{image.recipe_key()}.log").exists()  # the log survives for the user


def test_interrupted_build_leaves_nothing(cache, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("image.build checks for root before it starts")
    def interrupt(argv, log):
        raise KeyboardInterrupt
    monkeypatch.setattr(image, "_run", interrupt)
    with pytest.raises(KeyboardInterrupt):
        image.build()
    assert image.find_image() is None and not list((cache / "images").glob(".build-*"))


def test_list_and_remove(cache):
    _fake_image(cache, "0123456789abcdef")
    _fake_image(cache, image.recipe_key())
    (cache / "images" / "build-0123456789abcdef.log").write_text("debootstrap ...")
    assert sorted(i.key for i in image.list_images()) == sorted(["0123456789abcdef", image.recipe_key()])
    assert image.remove_images(["0123456789abcdef"]) == ["0123456789abcdef"]
    assert not (cache / "images" / "build-0123456789abcdef.log").exists()  # its build log goes with it
    with pytest.raises(TestbedError, match="no image 'ffffffffffffffff'"):
        image.remove_images(["ffffffffffffffff"])
    assert [i.key for i in image.list_images()] == [image.recipe_key()]


def test_cpio_newc_round_trip(tmp_path):
    from testbed.initrd import CpioWriter
    out = tmp_path / "a.cpio"
    with CpioWriter(out) as c:
        c.directory("bin")
        c.file("bin/x", b"hello", 0o755)
        c.char_device("dev/console", 5, 1)
    data = out.read_bytes()
    names, pos = [], 0
    while True:
        h = data[pos:pos + 110]
        assert h[:6] == b"070701"
        fields = [int(h[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            break
        names.append((name, oct(fields[1]), body, fields[9], fields[10]))
    assert names == [("bin", "0o40755", b"", 0, 0), ("bin/x", "0o100755", b"hello", 0, 0),
                     ("dev/console", "0o20600", b"", 5, 1)]


def _elf_with_notes(notes: list[tuple[bytes, int]]) -> bytes:
    """A 64-bit little-endian ELF whose one program header is a PT_NOTE segment."""
    body = b""
    for owner, ntype in notes:
        name = owner + b"\0"
        body += struct.pack("<III", len(name), 4, ntype) + name.ljust((len(name) + 3) // 4 * 4, b"\0") + b"\0" * 4
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 64 + 56, 0, 0, len(body), len(body), 4)
    return ehdr + phdr + body + b"kernel text" * 100


def _bzimage(payload: bytes, setup_sects: int = 2) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    setup[0x206:0x208] = (0x020F).to_bytes(2, "little")
    setup[0x248:0x24C] = (100).to_bytes(4, "little")  # payload_offset within the protected-mode part
    setup[0x24C:0x250] = len(payload).to_bytes(4, "little")
    return bytes(setup) + bytes(100) + payload + b"trailing decompressor code"


@pytest.mark.parametrize("compress", [
    lambda b: zstandard.ZstdCompressor().compress(b) + len(b).to_bytes(4, "little"),  # Debian's: zstd + size
    lambda b: lzma.compress(b, format=lzma.FORMAT_XZ),
    lambda b: gzip.compress(b),
], ids=["zstd", "xz", "gzip"])
def test_pvh_kernel_is_unpacked_from_the_bzimage(tmp_path, compress):
    elf = _elf_with_notes([(b"GNU", 3), (b"Xen", image.XEN_ELFNOTE_PHYS32_ENTRY)])
    src, out = tmp_path / "vmlinuz", tmp_path / "vmlinux"
    src.write_bytes(_bzimage(compress(elf)))
    image._extract_vmlinux(src, out)
    assert out.read_bytes() == elf


def test_kernel_without_pvh_entry_is_refused(tmp_path):
    src = tmp_path / "vmlinuz"
    src.write_bytes(_bzimage(gzip.compress(_elf_with_notes([(b"Xen", 5)]))))
    with pytest.raises(TestbedError, match=r"vmlinuz: the kernel has no PVH entry point \(CONFIG_PVH\)"):
        image._extract_vmlinux(src, tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


def test_not_a_bzimage_is_refused(tmp_path):
    src = tmp_path / "vmlinuz"
    src.write_bytes(b"\x7fELF" + bytes(2000))
    with pytest.raises(TestbedError, match="not an x86 bzImage of boot protocol >= 2.08"):
        image._extract_vmlinux(src, tmp_path / "vmlinux")


def test_unknown_kernel_compression_is_named(tmp_path):
    src = tmp_path / "vmlinuz"
    src.write_bytes(_bzimage(b"\x02\x21\x4c\x18" + bytes(64)))  # lz4 legacy
    with pytest.raises(TestbedError, match="unsupported method \\(magic 02214c18\\); zstd, xz and gzip"):
        image._extract_vmlinux(src, tmp_path / "vmlinux")


def test_the_manifest_names_the_kernel_file(cache):
    d = _fake_image(cache, image.recipe_key())
    img = image.find_image()
    assert img.kernel == d / "vmlinuz"
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "kernel_file": "vmlinux"}))
    assert image.find_image() is None  # the manifest names a kernel file that is not there
    (d / "vmlinux").write_bytes(b"x")
    assert image.find_image().kernel == d / "vmlinux"
