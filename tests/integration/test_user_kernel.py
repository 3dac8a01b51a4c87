"""`up --kernel --modules --qemu`: the image's own kernel given as a user's kernel (its
bzImage, unpacked by `up`), a copy of its modules in a folder of this test, and a QEMU
wrapper that records its argv and execs the real QEMU."""
import json
import shutil
import subprocess

import pytest

from testbed import image

from .conftest import cli, qemu_processes_under


def _debugfs(img: image.Image, request: str) -> None:
    r = subprocess.run(["debugfs", "-R", request, str(img.disk)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_user_kernel_modules_and_qemu(isolated_dirs, tmp_path):
    state, _ = isolated_dirs
    if not shutil.which("debugfs"):
        pytest.skip("debugfs not installed (e2fsprogs): it copies the image's kernel and modules out")
    img = image.find_image()
    ver = img.manifest["kernel_version"]
    bzimage = tmp_path / f"vmlinuz-{ver}"
    _debugfs(img, f"dump /boot/vmlinuz-{ver} {bzimage}")
    mods = tmp_path / "mods"
    (mods / "lib").mkdir(parents=True)
    _debugfs(img, f"rdump /lib/modules {mods / 'lib'}")
    assert (mods / "lib/modules" / ver / "modules.dep").is_file()
    argv_log = tmp_path / "qemu-argv.txt"
    wrapper = tmp_path / "my-qemu"
    wrapper.write_text("#!/bin/sh\n"
                       f"printf '%s\\n' \"$@\" > '{argv_log}'\n"
                       f"exec '{shutil.which('qemu-system-x86_64')}' \"$@\"\n")
    wrapper.chmod(0o700)

    cli("up", "1host-1switch", "--name", "ukernel", "--kernel", str(bzimage), "--modules", str(mods),
        "--qemu", str(wrapper))
    try:
        st = json.loads(cli("status", "ukernel", "--json").stdout)
        assert [h["pool"] for h in st["hosts"]] == ["ready"]
        assert st["kernel"]["given"]["kernel"] == str(bzimage) and st["kernel"]["qemu"] == str(wrapper)
        assert st["kernel"]["version"] == ver
        # The wrapper ran QEMU with the kernel that `up` unpacked from the bzImage given,
        # the initrd it made, and the modules folder shared.
        argv = argv_log.read_text().splitlines()
        assert argv[argv.index("-kernel") + 1] == str(state / "ukernel" / "_kernel" / "vmlinux")
        assert argv[argv.index("-initrd") + 1] == str(state / "ukernel" / "_kernel" / "initrd.img")
        assert any(f"path={mods}/lib/modules/{ver}," in a for a in argv)
        # In the guest: this kernel, its modules from the share, the CXL drivers loaded from it.
        # (/lib is a link to usr/lib in the image: the mount point reads /usr/lib/modules/...)
        r = cli("exec", "ukernel", "host0", "--", "uname -r; grep '^beluga-modules ' /proc/mounts; "
                "grep -c '^cxl_pci ' /proc/modules")
        lines = r.stdout.splitlines()
        assert lines[0] == ver
        source, where, fstype, options = lines[1].split()[:4]
        assert where.endswith(f"/lib/modules/{ver}") and fstype == "9p" and options.startswith("ro,")
        assert lines[2] == "1"
        assert "modules" in cli("status", "ukernel").stdout
        # A scenario that asks for another QEMU does not run on this testbed: it stops
        # before its first step, naming what differs.
        sc = tmp_path / "other-qemu.yaml"
        sc.write_text("apiVersion: beluga.testbed/v1alpha1\nkind: Scenario\nname: other-qemu\n"
                      "topology: 1host-1switch\nroles: {service: host0, writers: [host0]}\n"
                      "kernel: {qemu: /bin/true}\nsteps:\n  - put: {on: writers, set: a, blocks: 1}\n")
        r = cli("run", str(sc), "--testbed", "ukernel", "--report-dir", str(tmp_path / "report"), check=False)
        assert r.returncode != 0
        assert f"runs another kernel or QEMU than the run asks for: qemu: {wrapper}, not /bin/true" in r.stderr
    finally:
        cli("down", "ukernel")
    assert qemu_processes_under(state / "ukernel") == []
