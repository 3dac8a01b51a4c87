"""Runs INSIDE a guest (python3 of Debian trixie, stdlib only), sent over SSH.

    python3 -S guest_pool.py create  '<json args>'   # region + devdax, prints JSON
    python3 -S guest_pool.py write   '<json args>'   # writes signatures at offsets
    python3 -S guest_pool.py read    '<json args>'   # reads bytes at offsets, prints hex
    python3 -S guest_pool.py clear   '<json args>'   # zeroes the given offsets
    python3 -S guest_pool.py report  '<json args>'   # the region made at boot, and the bytes at offsets

`@FILE` instead of the JSON reads it from FILE; `--out FILE` writes the result there
(atomically) instead of to stdout. The boot script uses both, reading fw_cfg.

Imports nothing of the project: this file's text is what travels.
"""
import json
import mmap
import os
import subprocess
import sys
import time

ALIGN = 2 << 20  # devdax maps in 2 MiB units


def sh(*argv):
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def cxl_json(*argv):
    out = sh("cxl", *argv).strip()
    return json.loads(out) if out else []


def wait_endpoints(serials, timeout_s):
    """cxl_pci probes asynchronously: wait until every device of the topology is an
    enabled memdev with an endpoint before creating a region."""
    deadline = time.monotonic() + timeout_s
    while True:
        mods = os.path.exists("/proc/modules") and "cxl_mem" in open("/proc/modules").read()
        if not mods:
            subprocess.run(["modprobe", "-a", "cxl_acpi", "cxl_pci", "cxl_port", "cxl_mem", "dax_cxl", "device_dax"],
                           capture_output=True)
        try:
            mems = cxl_json("list", "-M")
        except SystemExit:
            mems = []
        by_serial = {m.get("serial"): m["memdev"] for m in mems}
        eps = [e for e in os.listdir("/sys/bus/cxl/devices") if e.startswith("endpoint")] \
            if os.path.isdir("/sys/bus/cxl/devices") else []
        if all(s in by_serial for s in serials) and len(eps) >= len(serials):
            return by_serial
        if time.monotonic() > deadline:
            raise SystemExit(f"CXL devices not ready after {timeout_s} s: serials found "
                             f"{sorted(by_serial)}, wanted {sorted(serials)}; endpoints {len(eps)}")
        time.sleep(0.2)


def dax_of_region(region):
    out = sh("daxctl", "list", "-r", region.removeprefix("region"), "-D").strip()
    devs = json.loads(out) if out else []
    if isinstance(devs, dict):
        devs = [devs]
    return devs


def create(args):
    by_serial = wait_endpoints(args["serials"], args.get("timeout_s", 60))
    order = [by_serial[s] for s in args["serials"]]
    regions = cxl_json("list", "-R")
    region = None
    for r in regions if isinstance(regions, list) else [regions]:
        region = r  # re-run of provision: keep the existing region
    if region is None:
        decoders = cxl_json("list", "-D", "-d", "root")
        decoders = decoders if isinstance(decoders, list) else [decoders]
        ram = [d for d in decoders if d.get("volatile_capable") or "volatile_capable" not in d]
        if not ram:
            raise SystemExit(f"no root decoder that can hold RAM: {decoders}")
        decoder = sorted(ram, key=lambda d: d["decoder"])[args.get("window_index", 0)]["decoder"]
        out = sh("cxl", "create-region", "-m", "-t", "ram", "-d", decoder, "-w", str(len(order)),
                 "-g", str(args["granularity"]), *order)
        region = json.loads(out)
    name = region["region"]
    devs = []
    for _ in range(100):
        devs = dax_of_region(name)
        if devs:
            break
        time.sleep(0.1)
    if not devs:
        raise SystemExit(f"{name}: no dax device appeared")
    dev = devs[0]
    # With kmem blocked, the new dax device is left unbound ("state": "disabled"):
    # opening it fails with ENXIO until device_dax takes it.
    if dev.get("mode") != "devdax" or dev.get("state") == "disabled":
        sh("daxctl", "reconfigure-device", "--mode=devdax", "-f", dev["chardev"])
        dev = dax_of_region(name)[0]
    iomem = open("/proc/iomem").read()
    signed = 0
    sign = args.get("sign")
    if sign and sign["host"] == open("/proc/sys/kernel/hostname").read().strip():
        # This host writes the signatures that the others read back (testbed/provision.py verify).
        signed = _write("/dev/" + dev["chardev"], sign["offsets"], sign["length"], sign["data"])
    return {
        "region": name, "size_bytes": region.get("size"), "ways": region.get("interleave_ways"),
        "granularity_bytes": region.get("interleave_granularity"), "dax": "/dev/" + dev["chardev"],
        "dax_mode": dev.get("mode"), "targets": order, "decoder": region.get("decoder"),
        "system_ram_cxl": "System RAM (kmem)" in iomem, "signed": signed,
    }


def _map(dax, size):
    fd = os.open(dax, os.O_RDWR)
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _span(offsets, length):
    end = max(offsets) + length
    return (end + ALIGN - 1) // ALIGN * ALIGN


def _write(dax, offsets, length, data):
    m = _map(dax, _span(offsets, length))
    for off, hexdata in zip(offsets, data):
        m[off:off + length] = bytes.fromhex(hexdata)
    # No m.flush(): msync() on a devdax mapping fails with EINVAL, and there is no
    # page cache in between to flush; the stores go straight to the device.
    m.close()
    return len(offsets)


def write(args):
    return {"written": _write(args["dax"], args["offsets"], args["length"], args["data"])}


def read(args):
    m = _map(args["dax"], _span(args["offsets"], args["length"]))
    out = [m[off:off + args["length"]].hex() for off in args["offsets"]]
    m.close()
    return {"data": out}


def clear(args):
    return write(dict(args, data=["00" * args["length"]] * len(args["offsets"])))


def report(args):
    """The region that the boot script made (its `create --out` file) and, given offsets,
    the bytes at them: what the host collects from each guest in one SSH call."""
    with open(args.get("result", "/run/beluga/pool.json")) as f:
        region = json.load(f)
    out = {"region": region}
    if args.get("offsets"):
        out["data"] = read(dict(args, dax=region["dax"]))["data"]
    return out


def main(argv):
    verb, raw = argv[0], argv[1]
    if raw.startswith("@"):
        with open(raw[1:]) as f:
            raw = f.read()
    out = json.dumps({"create": create, "write": write, "read": read, "clear": clear, "report": report}[verb](json.loads(raw)))
    if argv[2:3] == ["--out"]:
        tmp = argv[3] + ".tmp"
        with open(tmp, "w") as f:
            f.write(out + "\n")
        os.replace(tmp, argv[3])
    else:
        print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
