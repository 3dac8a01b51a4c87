"""`beluga-testbed`: thin commands over the library. Data on stdout, progress on stderr."""
from __future__ import annotations

import argparse
import json
import signal
import sys

from . import image as image_mod
from .log import TestbedError, info


def _sigterm_to_interrupt(signum, frame):
    # SIGTERM and SIGHUP become one KeyboardInterrupt, so every `finally` runs.
    raise KeyboardInterrupt


def cmd_image_build(args) -> int:
    img, built = image_mod.build(force=args.force)
    if built:
        m = img.manifest
        info(f"✓ image {img.key} built in {m['build_s']} s "
             f"(rootfs {m['rootfs_bytes'] / 2**20:.0f} MiB, disk {m['disk_allocated_bytes'] / 2**20:.0f} MiB allocated)")
    else:
        info(f"✓ image {img.key} is up to date (built {img.manifest['built_at']}); --force rebuilds it")
    print(img.path)
    return 0


def cmd_image_list(args) -> int:
    imgs = [image_mod.describe(i) for i in image_mod.list_images()]
    if args.json:
        print(json.dumps(imgs, indent=2))
        return 0
    if not imgs:
        info("no images; 'beluga-testbed image build' builds one")
        return 0
    print(f"{'KEY':16}  {'CURRENT':7}  {'KERNEL':22}  {'ROOTFS':>8}  BUILT")
    for m in imgs:
        print(f"{m['key']:16}  {'yes' if m['current'] else 'no':7}  {m['kernel_version']:22}  "
              f"{m['rootfs_bytes'] / 2**20:6.0f}Mi  {m['built_at']}")
    return 0


def cmd_image_rm(args) -> int:
    if not args.keys and not args.all:
        raise TestbedError("name the image keys to remove, or --all")
    for k in image_mod.remove_images(args.keys, all_=args.all):
        print(k)
    return 0


def cmd_doctor(args) -> int:
    from . import doctor
    return doctor.main(json_out=args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beluga-testbed",
                                description="Emulated CXL memory pools shared by several QEMU hosts.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    d = sub.add_parser("doctor", help="check that this machine can run testbeds")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_doctor)

    im = sub.add_parser("image", help="build, list and remove guest images")
    isub = im.add_subparsers(dest="image_cmd", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build the guest image of the current recipe (images/)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.set_defaults(func=cmd_image_build)
    ls = isub.add_parser("list", help="list built images")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_image_list)
    rm = isub.add_parser("rm", help="remove built images")
    rm.add_argument("keys", nargs="*", metavar="KEY")
    rm.add_argument("--all", action="store_true")
    rm.set_defaults(func=cmd_image_rm)
    return p


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    signal.signal(signal.SIGHUP, _sigterm_to_interrupt)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except TestbedError as e:
        print(f"✗ {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("✗ interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
