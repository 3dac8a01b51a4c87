"""The boot benchmark's floor: its initrd member and its cut-down QEMU argv."""
from __future__ import annotations

from pathlib import Path

from benchmarks.floor import FLOOR_INIT, cpio_newc, floor_argv

GOLDEN = Path(__file__).parent / "golden" / "2hosts-1switch.argv"


def golden_host0() -> list[str]:
    import shlex
    text = GOLDEN.read_text().split("# host1")[0].replace("# host0", "").replace("\\\n", " ")
    return shlex.split(text)


def test_the_floor_member_is_a_newc_cpio_with_a_trailer():
    """Read back by the format's definition (the kernel's reader: 110-byte ASCII-hex
    header, name and data each padded to 4 bytes); the boot benchmark proves the kernel
    unpacks it."""
    archive = cpio_newc([("floor", 0o100755, FLOOR_INIT)])
    members, pos = [], 0
    while True:
        assert archive[pos:pos + 6] == b"070701"
        fields = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = pos + 110
        name = archive[name_at:name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            break
        members.append((name, mode, archive[data_at:data_at + size]))
        pos = data_at + size + (-size % 4)
    assert members == [("floor", 0o100755, FLOOR_INIT)]
    assert len(archive) % 4 == 0


def test_the_floor_keeps_cpu_memory_and_kernel_and_drops_the_testbed(tmp_path):
    host = golden_host0()
    argv = floor_argv(host, tmp_path / "floor.img", tmp_path / "serial.log")
    opts = dict(zip(argv, argv[1:]))  # option -> the word after it
    assert argv[0] == host[0]
    assert (opts["-cpu"], opts["-smp"], opts["-m"], opts["-kernel"]) == ("max,hypervisor=off", "1", "1024M", "/img/vmlinux")
    assert opts["-machine"] == "q35,accel=tcg"  # no cxl=on, no fixed memory windows
    assert opts["-append"] == "console=ttyS0 no_timer_check rdinit=/floor"
    joined = " ".join(argv)
    for gone in ("cxl-type3", "memory-backend-file", "virtio-blk", "netdev", "fw_cfg", "qmp"):
        assert gone not in joined
