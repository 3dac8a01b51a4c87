"""Each doctor check's failure message and hint, with the machine's answers faked."""
from pathlib import Path

from testbed import accel, doctor, image


def fake_run(version="10.0.2", devices=doctor.QEMU_DEVICES, volatile=True):
    def run(argv):
        if argv[1] == "--version":
            return f"QEMU emulator version {version} (Debian)\n"
        if argv[2] == "help":
            return "".join(f'name "{d}", bus PCI\n' for d in devices)
        return "  volatile-memdev=<link<memory-backend>>\n" if volatile else "  persistent-memdev=<link>\n"
    return run


def which_all(name):
    return f"/usr/bin/{name}"


def test_qemu_ok():
    c = doctor.check_qemu(which_all, fake_run())
    assert c.ok and c.detail.startswith("QEMU 10.0.2 with pxb-cxl")


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
    monkeypatch.setattr(doctor, "checks", lambda: [doctor.Check("qemu", True, "ok"),
                                                   doctor.Check("accelerator", False, "no KVM", required=False)])
    assert doctor.main() == 0
    monkeypatch.setattr(doctor, "checks", lambda: [doctor.Check("image", False, "no guest image", "build it")])
    assert doctor.main() == 1
    out = capsys.readouterr().out
    assert "✗ image        no guest image" in out and "hint: build it" in out
    assert doctor.main(json_out=True) == 1
    assert '"ok": false' in capsys.readouterr().out
