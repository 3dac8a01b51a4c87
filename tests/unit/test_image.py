"""Recipe key, recipe errors, up-to-date detection and no half-built image after a failure."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest

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
    assert f"{r}: disk_size_mb: unknown field" in str(e.value)
    assert f"{r}: disk_size_mib: missing (expected a int)" in str(e.value)


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
    start = time.monotonic()
    img, built = image.build()
    assert not built and img.key == image.recipe_key()
    assert time.monotonic() - start < 5


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
    assert sorted(i.key for i in image.list_images()) == sorted(["0123456789abcdef", image.recipe_key()])
    assert image.remove_images(["0123456789abcdef"]) == ["0123456789abcdef"]
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
