"""The QEMU command line of one host, built in code from the topology: one option per line.

Ids come from the topology (hb0, hb0-rp0, sw0, sw0-dsp3, mem2), so QOM paths read
naturally: /machine/peripheral/mem2 is the device the topology calls mem2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .shares import Share
from .topology import Host, Topology

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class HostFiles:
    """Where one host's files live (all under the testbed's state folder)."""
    dir: Path

    @property
    def overlay(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def serial_sock(self) -> Path:
        return self.dir / "serial.sock"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"


def _v(value: object) -> str:
    """One value inside a QEMU option list (`key=value,key=value`), commas doubled: QEMU
    reads ",," as a comma in the value. Names are checked against names.py long before
    this; here a comma that got through (a path, a name from an old state file) still
    cannot add a property: `id=mem0,share=off,mem-path=/etc/passwd` once did."""
    return str(value).replace(",", ",,")


def _mib(n: int) -> str:
    return f"{n}M"


def _granularity(g: int) -> str:
    return f"{g // 1024}k" if g >= 1024 else str(g)


def host_argv(t: Topology, host: Host, *, kernel: Path, initrd: Path, cmdline: str, files: HostFiles,
              ssh_port: int, pool_files: dict[str, Path], authorized_keys: Path, accel: str = "tcg",
              pool_args: Path | None = None, guest_script: Path | None = None,
              shares: tuple[Share, ...] | list[Share] = (), qemu: str = QEMU) -> list[str]:
    """`qemu`: the binary (kernel.qemu_binary: --qemu, the topology's, $BELUGA_TESTBED_QEMU)."""
    machine = ["q35", "cxl=on", f"accel={accel}"]
    for wi, w in enumerate(t.windows):
        for ti, target in enumerate(w.targets):
            machine.append(f"cxl-fmw.{wi}.targets.{ti}={_v(target)}")
        machine.append(f"cxl-fmw.{wi}.size={_mib(w.size_mib)}")
        machine.append(f"cxl-fmw.{wi}.interleave-granularity={_granularity(w.granularity_bytes)}")
    # `hypervisor=off`: stock kernels refuse to commit a CXL region when they see
    # the hypervisor CPUID bit ("Failed to synchronize CPU cache state").
    cpu = "max,hypervisor=off" if accel == "tcg" else "host,hypervisor=off"
    argv = [
        qemu,
        "-name", f"{_v(t.name)}/{_v(host.name)},debug-threads=on",
        "-machine", ",".join(machine),
        "-cpu", cpu,
        "-smp", str(host.vcpus),
        "-m", _mib(host.memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        # no_timer_check: on a starved host (CI running four TCG guests on two cores) the
        # kernel's IO-APIC timer check can miss its ticks and panic the guest at boot:
        # "Kernel panic - not syncing: IO-APIC + timer doesn't work!" (seen in CI here).
        "-append", f"{cmdline} no_timer_check beluga.hostname={host.name}",
        # Virtio devices name bus=pcie.0, or QEMU may try the pxb-cxl bus:
        # "Only PCI/PCIe bridges can be plugged into pxb-cxl".
        "-drive", f"file={_v(files.overlay)},if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap",
        "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev,bus=pcie.0",
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        # romfile=: no iPXE option ROM for the firmware to run; the kernel is loaded directly.
        "-device", "virtio-net-pci,netdev=net0,id=nic0,bus=pcie.0,romfile=",
        "-fw_cfg", f"name=opt/beluga/authorized_keys,file={_v(authorized_keys)}",
    ]
    # Host folders shared into the guest (virtio-9p): --share ones are mounted over SSH
    # after boot, a user kernel's modules (tag beluga-modules) by its initrd.
    for sh in shares:
        argv += ["-fsdev", f"local,id={sh.tag},path={_v(sh.host_dir)},security_model=none"
                           + ("" if sh.rw else ",readonly=on"),
                 "-device", f"virtio-9p-pci,fsdev={sh.tag},mount_tag={sh.tag},bus=pcie.0,id={sh.tag}-dev"]
    if pool_args and guest_script:
        # The guest creates its region at boot, while the host connects over SSH.
        argv += ["-fw_cfg", f"name=opt/beluga/pool.json,file={_v(pool_args)}",
                 "-fw_cfg", f"name=opt/beluga/guest_pool.py,file={_v(guest_script)}"]
    argv += [
        "-chardev", f"socket,id=serial0,path={_v(files.serial_sock)},server=on,wait=off,"
                    f"logfile={_v(files.serial_log)}",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{_v(files.qmp)},server=on,wait=off",
        "-pidfile", str(files.pidfile),
    ]
    for d in t.devices:
        argv += ["-object", f"memory-backend-file,id={_v(d.id)}-backend,share=on,mem-path={_v(pool_files[d.id])},"
                            f"size={_mib(d.size_mib)}"]
    slot = 0
    for hb in t.host_bridges:
        argv += ["-device", f"pxb-cxl,bus_nr={hb.bus_nr},bus=pcie.0,id={_v(hb.id)}"]
        for rp in hb.root_ports:
            argv += ["-device", f"cxl-rp,port={rp.index},bus={_v(hb.id)},id={_v(rp.id)},chassis=0,slot={slot}"]
            slot += 1
            if rp.device:
                argv += ["-device", _type3(t, rp.device, rp.id)]
                continue
            sw = rp.switch
            assert sw is not None
            argv += ["-device", f"cxl-upstream,bus={_v(rp.id)},id={_v(sw.id)}"]
            for p in sw.ports:
                argv += ["-device", f"cxl-downstream,port={p.index},bus={_v(sw.id)},id={_v(p.id)},chassis=0,slot={slot}"]
                slot += 1
                if p.device:
                    argv += ["-device", _type3(t, p.device, p.id)]
    return argv


def _type3(t: Topology, dev_id: str, bus: str) -> str:
    d = t.device(dev_id)
    return f"cxl-type3,bus={_v(bus)},volatile-memdev={_v(d.id)}-backend,id={_v(d.id)},sn={d.serial}"
