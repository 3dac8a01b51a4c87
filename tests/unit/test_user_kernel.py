"""A user's kernel, modules and QEMU: the paths checked (options and topology fields), the
kernel's version read from the file, the initrd made for it, and the QEMU argv."""
import json
import os
import textwrap
from pathlib import Path

import pytest

from testbed import cli, image, kernel, lifecycle
from testbed import topology as T
from testbed.initrd import CpioWriter
from testbed.kernel import UserKernel
from testbed.log import TestbedError
from testbed.qemucmd import HostFiles, host_argv


def fake_bzimage(path: Path, release: str) -> Path:
    """The bytes of an x86 boot header that say where the version string is."""
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    data[0x206:0x208] = (0x20F).to_bytes(2, "little")
    data[0x20E:0x210] = (0x600 - 0x200).to_bytes(2, "little")
    s = f"{release} (me@box) #1 SMP PREEMPT_DYNAMIC".encode() + b"\0"
    data[0x600:0x600 + len(s)] = s
    path.write_bytes(bytes(data))
    return path


def modules_tree(root: Path, release: str, modules: dict[str, list[str]] | None = None,
                 builtin: list[str] = ()) -> Path:
    """DIR/lib/modules/<release> as `make modules_install INSTALL_MOD_PATH=DIR` leaves it;
    `modules` maps a module's path to its dependencies' paths."""
    d = root / "lib" / "modules" / release
    d.mkdir(parents=True)
    modules = modules or {}
    for rel in modules:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(f"ELF of {rel}".encode())
    (d / "modules.dep").write_text("".join(f"{m}: {' '.join(deps)}\n" for m, deps in modules.items()))
    (d / "modules.builtin").write_text("".join(f"{b}\n" for b in builtin))
    return root


def test_version_read_from_a_bzimage_and_from_a_vmlinux(tmp_path):
    assert kernel.kernel_version(fake_bzimage(tmp_path / "bzImage", "6.13.0-rc2-cxl+")) == "6.13.0-rc2-cxl+"
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF\x02\x01" + b"\0" * 100 + b"Linux version 6.12.0-dev (gcc 14) #3\0" + b"\0" * 10)
    assert kernel.kernel_version(elf) == "6.12.0-dev"
    (tmp_path / "junk").write_bytes(b"nothing here")
    assert kernel.kernel_version(tmp_path / "junk") is None


def test_each_unusable_path_is_named_by_its_option(tmp_path):
    (tmp_path / "not-exec").write_text("#!/bin/sh\n")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    uk = UserKernel(kernel=tmp_path / "nope", initrd=tmp_path / "empty", modules=tmp_path / "file",
                    qemu=tmp_path / "not-exec")
    with pytest.raises(TestbedError) as e:
        kernel.check(uk)
    assert str(e.value).splitlines()[:4] == [
        f"--kernel: {tmp_path}/nope: no such file",
        f"--initrd: {tmp_path}/empty: not a file",
        f"--modules: {tmp_path}/file: not a folder (expected a `make modules_install INSTALL_MOD_PATH=` tree)",
        f"--qemu: {tmp_path}/not-exec: not executable",
    ]
    bad = kernel.problems(UserKernel(modules=tmp_path / "empty"))
    assert bad == {"modules": f"{tmp_path}/empty: no lib/modules/<version>/modules.dep (expected the folder "
                              "given to `make modules_install INSTALL_MOD_PATH=`)"}
    assert kernel.problems(UserKernel(modules=modules_tree(tmp_path / "m", "6.1"))) == {
        "modules": "modules given without a kernel: they are for a user's kernel (--kernel)"}


def test_modules_of_another_kernel_version_are_refused_before_boot(tmp_path):
    bz = fake_bzimage(tmp_path / "bzImage", "6.13.0")
    mods = modules_tree(tmp_path / "mods", "6.12.1")
    with pytest.raises(TestbedError) as e:
        kernel.plan(UserKernel(kernel=bz, modules=mods), None, tmp_path / "state")
    assert str(e.value).startswith(f"--modules {mods}: no modules for the kernel's version 6.13.0 "
                                   f"(it has lib/modules/6.12.1); --kernel {bz} is 6.13.0")
    assert "make kernelrelease" in e.value.hint


def test_qemu_from_the_environment_and_the_option(tmp_path, monkeypatch):
    monkeypatch.delenv(kernel.QEMU_ENV, raising=False)
    assert kernel.qemu_binary(UserKernel()) == "qemu-system-x86_64"
    monkeypatch.setenv(kernel.QEMU_ENV, str(tmp_path / "missing-qemu"))
    with pytest.raises(TestbedError, match=f"{kernel.QEMU_ENV}={tmp_path}/missing-qemu: no such executable"):
        kernel.qemu_binary(UserKernel())
    q = tmp_path / "q"
    q.write_text("#!/bin/sh\n")
    q.chmod(0o755)
    monkeypatch.setenv(kernel.QEMU_ENV, str(q))
    assert kernel.qemu_binary(UserKernel()) == str(q)
    assert kernel.qemu_binary(UserKernel(qemu=Path("/opt/other/qemu"))) == "/opt/other/qemu"


TOPO = (Path(T.__file__).parent / "topologies" / "1host-1switch.yaml").read_text()


def test_topology_kernel_fields_are_checked_with_their_lines(tmp_path):
    (tmp_path / "bzImage").write_bytes(b"x")
    f = tmp_path / "mine.yaml"
    f.write_text(TOPO + textwrap.dedent("""\
        kernel:
          kernel: bzImage
          modules: no-such-folder
          qmeu: /usr/bin/true
        """))
    with pytest.raises(T.TopologyError) as e:
        T.load(str(f))
    n = len(TOPO.splitlines())
    assert e.value.errors == [
        f"{f}:{n + 3}: kernel.modules: {tmp_path}/no-such-folder: no such folder",
        f"{f}:{n + 4}: kernel.qmeu: unknown key (did you mean 'qemu'?)",
    ]


def test_topology_kernel_paths_are_relative_to_its_file(tmp_path):
    fake_bzimage(tmp_path / "bzImage", "6.13.0")
    f = tmp_path / "mine.yaml"
    f.write_text(TOPO + "kernel:\n  kernel: bzImage\n  qemu: /bin/sh\n")
    t = T.load(str(f))
    assert t.kernel == UserKernel(kernel=tmp_path / "bzImage", qemu=Path("/bin/sh"))
    # A running testbed's topology is read back without the paths: they may be gone by then.
    (tmp_path / "bzImage").unlink()
    assert T.parse(f.read_text(), str(f), check_paths=False).kernel.kernel == tmp_path / "bzImage"
    # The options win over the topology's fields, one by one.
    uk = UserKernel(qemu=Path("/usr/bin/qemu")).over(t.kernel)
    assert uk == UserKernel(kernel=tmp_path / "bzImage", qemu=Path("/usr/bin/qemu"))


def test_argv_runs_the_given_qemu():
    t = T.load("1host-1switch")
    h = t.hosts[0]
    argv = host_argv(t, h, kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd.img"), cmdline="console=ttyS0",
                     files=HostFiles(Path("/state/x/host0")), ssh_port=10022,
                     pool_files={d.id: Path(f"/pools/{d.id}.raw") for d in t.devices},
                     authorized_keys=Path("/state/x/id_ed25519.pub"), qemu="/opt/qemu,new/bin/qemu-system-x86_64")
    assert argv[0] == "/opt/qemu,new/bin/qemu-system-x86_64"


def test_dry_run_shows_the_unpacked_kernel_its_initrd_and_the_modules_share(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(tmp_path / "state"))
    monkeypatch.delenv(kernel.QEMU_ENV, raising=False)
    bz = fake_bzimage(tmp_path / "bzImage", "6.13.0")
    mods = modules_tree(tmp_path / "mods", "6.13.0")
    q = tmp_path / "my-qemu"
    q.write_text("#!/bin/sh\n")
    q.chmod(0o755)
    assert cli.main(["up", "1host-1switch", "--name", "uk", "--dry-run", "--kernel", str(bz),
                     "--modules", str(mods), "--qemu", str(q)]) == 0
    argv = capsys.readouterr().out.splitlines()[1].split()
    state = tmp_path / "state" / "uk"
    assert argv[0] == str(q)
    assert argv[argv.index("-kernel") + 1] == f"{state}/_kernel/vmlinux"
    assert argv[argv.index("-initrd") + 1] == f"{state}/_kernel/initrd.img"
    assert f"local,id=beluga-modules,path={mods}/lib/modules/6.13.0,security_model=none,readonly=on" in argv
    # A bad path: one located line, no traceback, nothing started.
    assert cli.main(["up", "1host-1switch", "--name", "uk", "--dry-run", "--kernel", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert f"--kernel: {tmp_path}/nope: no such file" in err and "Traceback" not in err


def read_cpios(data: bytes) -> dict[str, bytes]:
    """Every file of concatenated newc archives; a later one replaces an earlier one, as
    the kernel's initramfs unpacking does."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos:pos + 6] != b"070701":
            pos += 1  # zero padding between archives
            continue
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name != "TRAILER!!!":
            out[name] = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
    return out


def test_initrd_for_a_user_kernel(tmp_path):
    base = tmp_path / "img"
    base.mkdir()
    with CpioWriter(base / "initrd.img") as c:
        c.file("init", b"#!/bin/busybox sh\n# the image's\n", 0o755)
        c.file("lib/modules/ext4.ko", b"the image kernel's ext4")
        c.file("modules.order", b"ext4.ko\n")
    img = image.Image(key="k", path=base, manifest={"kernel_file": "vmlinux"})
    mods = modules_tree(tmp_path / "mods", "6.13.0", {
        "kernel/drivers/virtio/virtio_pci.ko": ["kernel/drivers/virtio/virtio_ring.ko"],
        "kernel/drivers/virtio/virtio_ring.ko": [],
        "kernel/fs/ext4/ext4.ko": ["kernel/fs/jbd2/jbd2.ko"],
        "kernel/fs/jbd2/jbd2.ko": [],
        "kernel/net/9p/9pnet_virtio.ko": ["kernel/net/9p/9pnet.ko", "kernel/drivers/virtio/virtio_ring.ko"],
        "kernel/net/9p/9pnet.ko": [],
        "kernel/fs/9p/9p.ko": ["kernel/net/9p/9pnet.ko"],
    }, builtin=["kernel/drivers/block/virtio_blk.ko", "kernel/crypto/crc32c_generic.ko",
                "kernel/drivers/net/virtio_net.ko", "kernel/drivers/firmware/qemu_fw_cfg.ko"])
    moddir = mods / "lib/modules/6.13.0"
    out = tmp_path / "initrd.img"
    kernel.write_initrd(img, moddir, "6.13.0", out)
    files = read_cpios(out.read_bytes())
    assert files["init"] == kernel.INIT_SCRIPT.read_bytes()
    assert files["modules.order"].decode().split() == [
        "virtio_ring.ko", "virtio_pci.ko", "jbd2.ko", "ext4.ko", "9pnet.ko", "9pnet_virtio.ko", "9p.ko"]
    assert files["lib/modules/ext4.ko"] == b"ELF of kernel/fs/ext4/ext4.ko"
    assert files["modules.version"] == b"6.13.0\n"
    # A module the guests need, neither built nor built in: named, before anything boots.
    (moddir / "modules.builtin").write_text("kernel/drivers/block/virtio_blk.ko\n")
    with pytest.raises(TestbedError) as e:
        kernel.write_initrd(img, moddir, "6.13.0", tmp_path / "again.img")
    assert str(e.value).splitlines()[0] == (f"--modules {moddir}: no module crc32c_generic, virtio_net, qemu_fw_cfg "
                            "(neither in modules.dep nor in modules.builtin)")


def test_status_shows_the_kernel_and_qemu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(tmp_path / "state"))
    d = tmp_path / "state" / "uk"
    d.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path / "state", 0o700)
    k = {"given": {"kernel": "/src/bzImage", "initrd": None, "modules": "/src/mods", "qemu": "/opt/q"},
         "qemu": "/opt/q", "kernel": f"{d}/_kernel/vmlinux", "initrd": f"{d}/_kernel/initrd.img", "version": "6.13.0",
         "modules": "/src/mods/lib/modules/6.13.0"}
    (d / "state.json").write_text(json.dumps({
        "name": "uk", "topology": "1host-1switch", "accel": "tcg", "image": "k", "created_at": "now",
        "hosts": [], "pool": None, "shares": [], "kernel": k}))
    assert lifecycle.status("uk")["kernel"] == k
    assert cli.main(["status", "uk"]) == 0
    out = capsys.readouterr().out
    assert f"kernel /src/bzImage (6.13.0; booted as {d}/_kernel/vmlinux, initrd {d}/_kernel/initrd.img)" in out
    assert "modules /src/mods/lib/modules/6.13.0 -> /lib/modules/6.13.0 (read-only) on every host" in out
    assert "qemu /opt/q" in out


def test_the_guests_own_version_check_fails_the_boot_with_its_line(tmp_path):
    """kernel_init.sh says why on the console; `up` stops waiting and shows that line."""
    h = lifecycle.HostState("host0", None, 10022, tmp_path, [])
    h.files.serial_log.write_text("[    1.2] Run /init as init process\n"
                                  "beluga: boot failed: the kernel is 6.13.0 but the modules given (--modules) "
                                  "are for 6.12.1 (lib/modules/6.12.1)\n~ # ")
    with pytest.raises(TestbedError) as e:
        h.wait_said(lifecycle.SSHD_STARTED, timeout_s=60, failed=lifecycle.BOOT_FAILED)
    assert str(e.value) == ("host0: the guest said 'beluga: boot failed: the kernel is 6.13.0 but the modules "
                            "given (--modules) are for 6.12.1 (lib/modules/6.12.1)'")
    script = kernel.INIT_SCRIPT.read_bytes()
    assert b'echo "' + lifecycle.BOOT_FAILED + b': $*"' in script
    assert b'fail "the kernel is $release but the modules given (--modules) are for $want' in script


# ---------------------------------------------------------------- scenario fields and the runner
SCENARIO = (Path(T.__file__).parents[1] / "scenarios" / "functional" / "cross-host-put-get.yaml").read_text()


def test_scenario_kernel_fields_are_checked_with_their_lines_and_relative_to_its_file(tmp_path):
    from testbed import scenario
    fake_bzimage(tmp_path / "bzImage", "6.13.0")
    f = tmp_path / "mine.yaml"
    f.write_text(SCENARIO + "kernel:\n  kernel: bzImage\n  qemu: /bin/sh\n")
    assert scenario.load(str(f)).kernel == UserKernel(kernel=tmp_path / "bzImage", qemu=Path("/bin/sh"))
    f.write_text(SCENARIO + "kernel:\n  kernel: no-such-bzImage\n  initrd: .\n  qemu: /bin/sh\n  modlues: m\n")
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.load(str(f))
    n = len(SCENARIO.splitlines())
    assert e.value.errors == [
        f"{f}:{n + 2}: kernel.kernel: {tmp_path}/no-such-bzImage: no such file",
        f"{f}:{n + 3}: kernel.initrd: {tmp_path}: not a file",
        f"{f}:{n + 5}: kernel.modlues: unknown key (did you mean 'modules'?)",
    ]


def test_scenario_modules_without_a_kernel_from_it_or_its_topology_is_a_located_error(tmp_path):
    from testbed import scenario
    modules_tree(tmp_path / "mods", "6.13.0")
    f = tmp_path / "mine.yaml"
    f.write_text(SCENARIO + "kernel:\n  modules: mods\n")
    sc = scenario.load(str(f))
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.check(sc, T.load("4hosts-1switch"))
    n = len(SCENARIO.splitlines())
    assert e.value.errors == [
        f"{f}:{n + 2}: kernel.modules: modules given without a kernel: they are for a user's kernel (--kernel)"]
    # The topology's kernel completes the scenario's modules.
    fake_bzimage(tmp_path / "bzImage", "6.13.0")
    (tmp_path / "topo.yaml").write_text((Path(T.__file__).parent / "topologies" / "4hosts-1switch.yaml").read_text()
                                        + "kernel:\n  kernel: bzImage\n")
    scenario.check(sc, T.load(str(tmp_path / "topo.yaml")))


@pytest.fixture
def runner_up(monkeypatch, tmp_path):
    """The runner up to `up`: what it passes there (the boot stops the run)."""
    from testbed.scenario import runner
    seen = {}

    def up(topo, name=None, **kw):
        seen.update(kw, topology=topo)
        raise TestbedError("stop here")
    monkeypatch.setattr(lifecycle, "up", up)
    monkeypatch.setattr(lifecycle, "down", lambda name: True)
    monkeypatch.setattr(lifecycle, "export_logs", lambda name, dest: dest)
    return runner, seen


def test_the_runner_boots_the_scenarios_kernel_with_the_run_options_over_it(runner_up, tmp_path):
    from testbed import scenario
    runner, seen = runner_up
    bz, other, q = fake_bzimage(tmp_path / "bzImage", "6.13.0"), fake_bzimage(tmp_path / "other", "6.14.0"), tmp_path / "q"
    q.write_text("#!/bin/sh\n")
    q.chmod(0o755)
    f = tmp_path / "mine.yaml"
    f.write_text(SCENARIO + "kernel:\n  kernel: bzImage\n  qemu: q\n")
    sc = scenario.load(str(f))
    report, _ = runner.run(sc, report_dir=tmp_path / "r1")
    assert report["error"] == "stop here"
    assert seen == {"topology": "4hosts-1switch", "kernel": bz, "qemu": q}
    seen.clear()
    runner.run(sc, report_dir=tmp_path / "r2", kernel=UserKernel(kernel=other))
    assert seen == {"topology": "4hosts-1switch", "kernel": other, "qemu": q}
    with pytest.raises(TestbedError) as e:  # a run option's path: named by its option, before the boot
        runner.run(sc, report_dir=tmp_path / "r3", kernel=UserKernel(qemu=tmp_path / "nope"))
    assert e.value.message == f"--qemu: {tmp_path}/nope: no such file"


def test_run_options_reach_the_runner(monkeypatch, tmp_path):
    from testbed.scenario import runner
    got = {}

    def run(sc, **kw):
        got.update(kw)
        raise TestbedError("stop here")
    monkeypatch.setattr(runner, "run", run)
    assert cli.main(["run", "functional/cross-host-put-get", "--kernel", "/k", "--modules", "/m",
                     "--qemu", "/q"]) != 0
    assert got["kernel"] == UserKernel(kernel=Path("/k"), modules=Path("/m"), qemu=Path("/q"))


def test_a_running_testbed_with_another_kernel_or_qemu_is_named_field_by_field(tmp_path):
    bz = fake_bzimage(tmp_path / "bzImage", "6.13.0")
    state = {"given": {"kernel": str(bz), "initrd": None, "modules": None, "qemu": None},
             "qemu": "/usr/bin/qemu-a", "kernel": "/state/_kernel/vmlinux", "initrd": "x", "version": "6.13.0"}
    assert kernel.differences(state, UserKernel(kernel=bz)) == []
    assert kernel.differences(state, UserKernel(kernel=tmp_path / "other", qemu=Path("/usr/bin/qemu-b"))) == [
        f"kernel: {bz}, not {tmp_path}/other", "qemu: /usr/bin/qemu-a, not /usr/bin/qemu-b"]
    assert kernel.differences(None, UserKernel(kernel=bz)) == [f"kernel: the image's, not {bz}"]
    assert kernel.differences(None, UserKernel()) == []
