"""Golden QEMU command lines for every built-in topology (UPDATE_GOLDEN=1 rewrites them)."""
import os
import shlex
from pathlib import Path

import pytest

from testbed import topology as T
from testbed.qemucmd import HostFiles, host_argv

GOLDEN = Path(__file__).parent / "golden"


def argv_for(name: str) -> str:
    t = T.load(name)
    out = []
    for i, h in enumerate(t.hosts):
        argv = host_argv(t, h, kernel=Path("/img/vmlinux"), initrd=Path("/img/initrd.img"),
                         cmdline="console=ttyS0", files=HostFiles(Path(f"/state/{name}/{h.name}")),
                         ssh_port=10022 + i, pool_files={d.id: Path(f"/pools/{name}/{d.id}.raw") for d in t.devices},
                         authorized_keys=Path(f"/state/{name}/id_ed25519.pub"),
                         pool_args=Path(f"/state/{name}/pool-args.json"), guest_script=Path("/repo/guest_pool.py"))
        # One option and its value per line.
        lines, i = [shlex.quote(argv[0])], 1
        while i < len(argv):
            if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                lines.append(f"{argv[i]} {shlex.quote(argv[i + 1])}")
                i += 2
            else:
                lines.append(argv[i])
                i += 1
        out.append(f"# {h.name}\n" + " \\\n  ".join(lines) + "\n")
    return "".join(out)


@pytest.mark.parametrize("name", T.builtin_names())
def test_golden_argv(name):
    got = argv_for(name)
    f = GOLDEN / f"{name}.argv"
    if os.environ.get("UPDATE_GOLDEN"):
        f.write_text(got)
    assert got == f.read_text(), f"QEMU argv of {name} changed; if intended, rerun with UPDATE_GOLDEN=1"


def test_argv_essentials():
    text = argv_for("2hosts-2switches")
    # Virtio devices pinned to pcie.0, CPU without the hypervisor bit, SSH on loopback only.
    assert "virtio-net-pci,netdev=net0,id=nic0,bus=pcie.0,romfile=" in text
    assert "max,hypervisor=off" in text
    assert "hostfwd=tcp:127.0.0.1:10022-:22" in text
    assert "cxl-fmw.0.targets.0=hb0,cxl-fmw.0.targets.1=hb1" in text
    assert "memory-backend-file,id=mem2-backend,share=on,mem-path=/pools/2hosts-2switches/mem2.raw,size=256M" in text
    assert "cxl-type3,bus=sw1-dsp0,volatile-memdev=mem2-backend,id=mem2,sn=4098" in text
