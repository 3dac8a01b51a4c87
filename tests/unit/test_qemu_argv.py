"""Golden QEMU command lines for every built-in topology (UPDATE_GOLDEN=1 rewrites them)."""
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
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


def _qemu_parts(value: str) -> list[str]:
    """Split an option list as QEMU does: ',' separates, ',,' is a comma in a value."""
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == "," and value[i + 1:i + 2] == ",":
            cur, i = cur + ",", i + 2
        elif value[i] == ",":
            parts.append(cur)
            cur, i = "", i + 1
        else:
            cur, i = cur + value[i], i + 1
    return parts + [cur]


def _qemu_opts(value: str) -> list[tuple[str, str]]:
    return [tuple(p.partition("=")[::2]) for p in _qemu_parts(value)]


def _evil_argv(pools: Path) -> list[str]:
    # Names are checked long before (names.py); commas in paths are legal, and an old state
    # file or a bypassed check must still not turn a value into extra properties.
    t = T.load("1host-1switch")
    t = dataclasses.replace(t, name="tb,debug-threads", hosts=(dataclasses.replace(t.hosts[0], name="host0,x"),))
    h = t.hosts[0]
    return host_argv(t, h, kernel=Path("/img/vmlinux"), initrd=Path("/img/initrd.img"), cmdline="console=ttyS0",
                     files=HostFiles(Path("/state/a,logfile=/etc/shadow/host0")), ssh_port=10022,
                     pool_files={d.id: pools / f"{d.id}.raw" for d in t.devices},
                     authorized_keys=Path("/state/a,file=/etc/passwd/id_ed25519.pub"))


def test_a_comma_in_a_name_or_path_cannot_add_a_qemu_property():
    pools = Path("/pools/x,share=off,mem-path=/etc/passwd")
    argv = _evil_argv(pools)
    value = {opt: [v for o, v in zip(argv, argv[1:]) if o == opt] for opt in ("-object", "-chardev", "-name",
                                                                              "-fw_cfg", "-drive", "-qmp")}
    obj = dict(_qemu_opts(value["-object"][0]))
    assert list(obj) == ["memory-backend-file", "id", "share", "mem-path", "size"]
    assert obj["share"] == "on" and obj["mem-path"] == f"{pools}/mem0.raw"
    chardev = _qemu_opts(value["-chardev"][0])
    assert [k for k, _ in chardev] == ["socket", "id", "path", "server", "wait", "logfile"]
    assert dict(chardev)["logfile"] == "/state/a,logfile=/etc/shadow/host0/serial.log"
    assert _qemu_opts(value["-name"][0]) == [("tb,debug-threads/host0,x", ""), ("debug-threads", "on")]
    assert dict(_qemu_opts(value["-fw_cfg"][0]))["file"] == "/state/a,file=/etc/passwd/id_ed25519.pub"
    assert [k for k, _ in _qemu_opts(value["-drive"][0])] == ["file", "if", "id", "format", "cache", "discard"]
    assert _qemu_parts(value["-qmp"][0]) == ["unix:/state/a,logfile=/etc/shadow/host0/qmp.sock", "server=on",
                                            "wait=off"]


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="QEMU not installed")
def test_qemu_itself_reads_the_doubled_comma_as_part_of_the_path(tmp_path):
    pools = tmp_path / "x,share=off,size=1M"
    pools.mkdir()
    argv = _evil_argv(pools)
    obj = next(v for o, v in zip(argv, argv[1:]) if o == "-object")
    qmp = "".join(json.dumps(m) for m in (
        {"execute": "qmp_capabilities"},
        {"execute": "qom-get", "arguments": {"path": "/objects/mem0-backend", "property": "share"}},
        {"execute": "qom-get", "arguments": {"path": "/objects/mem0-backend", "property": "size"}},
        {"execute": "quit"}))
    r = subprocess.run(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                        "-qmp", "stdio", "-object", obj], input=qmp, capture_output=True, text=True, timeout=60)
    returns = [m["return"] for m in map(json.loads, r.stdout.splitlines()) if "return" in m]
    assert returns[1:3] == [True, 256 << 20], r.stdout + r.stderr
    assert (pools / "mem0.raw").stat().st_size == 256 << 20
