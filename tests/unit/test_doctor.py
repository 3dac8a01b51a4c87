"""Each doctor check's failure message and hint, with the machine's answers faked."""
from pathlib import Path

from testbed import accel, doctor, image


def fake_run(version="10.0.2", devices=doctor.QEMU_DEVICES, volatile=True, pkg="Debian"):
    def run(argv):
        if argv[1] == "--version":
            return f"QEMU emulator version {version} ({pkg})\n"
        if argv[2] == "help":
            return "".join(f'name "{d}", bus PCI\n' for d in devices)
        return "  volatile-memdev=<link<memory-backend>>\n" if volatile else "  persistent-memdev=<link>\n"
    return run


def which_all(name):
    return f"/usr/bin/{name}"


def test_qemu_ok():
    c = doctor.check_qemu(which_all, fake_run())
    assert c.ok and c.detail.startswith("QEMU 10.0.2 with pxb-cxl")


def test_qemu_built_by_the_recipe_says_which():
    """qemu/build.sh marks its builds (--with-pkgversion=beluga-<key>): doctor names the key."""
    which = lambda n: n if n.startswith("/") else f"/usr/bin/{n}"  # noqa: E731
    c = doctor.check_qemu(which, fake_run("10.2.2", pkg="beluga-dda60a9c68e34143"), exe="/q/bin/qemu-system-x86_64")
    assert c.ok
    assert c.detail.startswith("QEMU 10.2.2 (beluga-dda60a9c68e34143, built by qemu/build.sh) "
                               "at /q/bin/qemu-system-x86_64 with pxb-cxl")


def test_qemu_missing():
    c = doctor.check_qemu(lambda n: None, fake_run())
    assert not c.ok and c.detail == "qemu-system-x86_64 not found"
    assert "make setup" in c.hint and "bookworm-backports" in c.hint


def test_qemu_too_old():
    c = doctor.check_qemu(which_all, fake_run("7.2.15"))
    assert not c.ok
    assert c.detail == "QEMU 7.2.15 at /usr/bin/qemu-system-x86_64 is too old (need >= 10.0 for the CXL switch devices)"
    assert c.hint == "run 'make setup' to install QEMU 10 from bookworm-backports"


def test_qemu_without_cxl_devices():
    c = doctor.check_qemu(which_all, fake_run(devices=("pxb-cxl", "cxl-rp")))
    assert not c.ok and c.detail == "QEMU 10.0.2 lacks cxl-upstream, cxl-downstream, cxl-type3"
    c = doctor.check_qemu(which_all, fake_run(volatile=False))
    assert not c.ok and c.detail == "QEMU 10.0.2 lacks cxl-type3.volatile-memdev"


def test_qemu_img_missing():
    c = doctor.check_qemu(lambda n: None if n == "qemu-img" else f"/usr/bin/{n}", fake_run())
    assert not c.ok and c.detail == "qemu-img not found" and "qemu-utils" in c.hint


def test_accel_unusable_says_why_and_tcg(monkeypatch):
    monkeypatch.setattr(image, "find_image", lambda key=None: None)
    c = doctor.check_accel(lambda k: accel.Probe(False, "KVM stops the guest with 'KVM internal error'"))
    assert not c.ok and not c.required
    assert c.detail == "KVM unusable: KVM stops the guest with 'KVM internal error'; TCG will be used (slower, fully supported)"


def test_accel_usable(monkeypatch):
    monkeypatch.setattr(image, "find_image", lambda key=None: None)
    c = doctor.check_accel(lambda k: accel.Probe(True, "a guest kernel booted under KVM (1.0 s)"))
    assert c.ok and "KVM works" in c.detail


def test_kvm_probe_without_dev_kvm(monkeypatch):
    monkeypatch.setattr(accel.os.path, "exists", lambda p: False)
    p = accel.probe_kvm(Path("/nonexistent"))
    assert not p.usable and p.reason.startswith("/dev/kvm does not exist")


def test_tool_missing():
    c = doctor.check_tool("debootstrap", "debootstrap", lambda n: None)
    assert not c.ok and c.detail == "debootstrap not found" and c.hint == "run 'make setup' (package debootstrap)"


def test_space_low(tmp_path):
    class Usage:
        free = 1 << 29
    c = doctor.check_space("cache", tmp_path / "not" / "yet", 3 << 30, lambda p: Usage)
    assert not c.ok
    assert c.detail == f"{tmp_path / 'not' / 'yet'}: 0.5 GiB free, need 3 GiB"
    assert c.hint == "free space there, or point BELUGA_TESTBED_CACHE elsewhere"


def test_image_missing_and_stale(monkeypatch):
    c = doctor.check_image(lambda: None, lambda: [])
    assert not c.ok and c.detail == f"no guest image (recipe key {image.recipe_key()})"
    assert c.hint.startswith("run 'beluga-testbed image build'")
    old = image.Image("0123456789abcdef", Path("/x"), {})
    c = doctor.check_image(lambda: None, lambda: [old])
    assert not c.ok and "built from an older recipe" in c.detail and "0123456789abcdef" in c.detail


def test_exit_status_follows_required_checks(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "checks", lambda *a: [doctor.Check("qemu", True, "ok"),
                                                   doctor.Check("accelerator", False, "no KVM", required=False)])
    assert doctor.main() == 0
    monkeypatch.setattr(doctor, "checks", lambda *a: [doctor.Check("image", False, "no guest image", "build it")])
    assert doctor.main() == 1
    out = capsys.readouterr().out
    assert "✗ image        no guest image" in out and "hint: build it" in out
    assert doctor.main(json_out=True) == 1
    assert '"ok": false' in capsys.readouterr().out


def fake_qemu(tmp_path, version="10.1.0", devices=doctor.QEMU_DEVICES):
    """A QEMU binary that answers --version, -device help and -device cxl-type3,help."""
    q = tmp_path / "my-qemu"
    listing = "".join(f'name "{d}", bus PCI, desc "x"\\n' for d in devices)
    q.write_text("#!/bin/sh\n"
                 f'[ "$1" = --version ] && {{ echo "QEMU emulator version {version}"; exit 0; }}\n'
                 f'[ "$2" = help ] && {{ printf \'{listing}\'; exit 0; }}\n'
                 'echo "  volatile-memdev=<link<memory-backend>>"\n')
    q.chmod(0o755)
    return q


def test_a_given_qemu_is_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("BELUGA_TESTBED_QEMU", raising=False)
    q = fake_qemu(tmp_path)
    c = doctor.check_qemu(exe=str(q))
    assert c.ok and c.detail == f"QEMU 10.1.0 at {q} with {', '.join(doctor.QEMU_DEVICES)} (volatile-memdev)"
    c = doctor.check_qemu(exe=str(fake_qemu(tmp_path, devices=("pxb-cxl", "cxl-rp", "cxl-type3"))))
    assert not c.ok and c.detail == f"QEMU 10.1.0 at {q} lacks cxl-upstream, cxl-downstream"
    c = doctor.check_qemu(exe=str(fake_qemu(tmp_path, version="9.2.0")))
    assert not c.ok and c.detail.startswith(f"QEMU 9.2.0 at {q} is too old (need >= 10.0")
    c = doctor.check_qemu(exe=str(tmp_path / "none"))
    assert not c.ok and c.detail == f"{tmp_path}/none: no such executable"
    # $BELUGA_TESTBED_QEMU is the QEMU that `up` runs when none is given.
    monkeypatch.setenv("BELUGA_TESTBED_QEMU", str(fake_qemu(tmp_path, version="11.0.0")))
    assert doctor.check_qemu().detail.startswith(f"QEMU 11.0.0 at {q} ")


FULL_CONFIG = """\
CONFIG_PVH=y
CONFIG_CXL_BUS=y
CONFIG_CXL_PCI=m
CONFIG_CXL_ACPI=m
CONFIG_CXL_PORT=m
CONFIG_CXL_MEM=m
CONFIG_CXL_REGION=y
CONFIG_DEV_DAX=m
CONFIG_DEV_DAX_CXL=m
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_BLK=y
CONFIG_EXT4_FS=y
CONFIG_VIRTIO_NET=y
CONFIG_FW_CFG_SYSFS=y
CONFIG_NET_9P_VIRTIO=y
CONFIG_9P_FS=y
"""


def test_kernel_options_from_the_build_trees_config(tmp_path):
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)
    bz = tree / "arch/x86/boot/bzImage"
    bz.write_bytes(b"not really")
    (tree / ".config").write_text(FULL_CONFIG)
    checks = doctor.check_kernel(bz)
    assert [(c.name, c.ok) for c in checks] == [("kernel", True)]
    (tree / ".config").write_text(FULL_CONFIG.replace("CONFIG_CXL_REGION=y\n", "# CONFIG_CXL_REGION is not set\n")
                                  .replace("CONFIG_DEV_DAX_CXL=m", "CONFIG_DEV_DAX_CXL=n")
                                  .replace("CONFIG_PVH=y\n", ""))
    checks = doctor.check_kernel(bz)
    assert [(c.name, c.ok, c.required) for c in checks] == [
        ("kernel:CXL_REGION", False, True), ("kernel:DEV_DAX_CXL", False, True), ("kernel:PVH", False, False)]
    assert checks[0].detail == f"CONFIG_CXL_REGION is not set ({tree}/.config)"
    assert checks[0].hint == "set CONFIG_CXL_REGION=y: regions (cxl create-region), the shared pool itself"
    assert checks[1].hint == "set CONFIG_DEV_DAX_CXL=y or =m: the DAX device of a CXL RAM region"


def test_kernel_options_from_config_beside_it_or_the_modules_lists(tmp_path):
    boot = tmp_path / "boot"
    boot.mkdir()
    data = bytearray(0x800)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x400).to_bytes(2, "little")
    data[0x600:0x60A] = b"6.13.0 #1\0"
    bz = boot / "vmlinuz-6.13.0"
    bz.write_bytes(bytes(data))
    (boot / "config-6.13.0").write_text(FULL_CONFIG.replace("CONFIG_CXL_ACPI=m\n", ""))
    assert [c.name for c in doctor.check_kernel(bz) if not c.ok] == ["kernel:CXL_ACPI"]
    (boot / "config-6.13.0").unlink()
    c, = doctor.check_kernel(bz)
    assert not c.ok and c.detail.startswith(f"{bz} (version 6.13.0): no configuration found")
    assert "--modules" in c.hint
    # The modules tree's lists: a module or built in counts; an option that is no module
    # (CXL_REGION) cannot be told from them and is not reported.
    mods = tmp_path / "mods"
    d = mods / "lib/modules/6.13.0"
    d.mkdir(parents=True)
    names = [m for _, m, _ in doctor.KERNEL_OPTIONS if m and m != "dax_cxl"]
    (d / "modules.dep").write_text("".join(f"kernel/x/{m}.ko.zst:\n" for m in names[:5]))
    (d / "modules.builtin").write_text("".join(f"kernel/y/{m}.ko\n" for m in names[5:]))
    checks = doctor.check_kernel(bz, mods)
    assert [(c.name, c.detail) for c in checks] == [
        ("kernel:DEV_DAX_CXL", f"CONFIG_DEV_DAX_CXL is not set ({d}/modules.builtin and modules.dep)")]
