"""`beluga-testbed`: thin commands over the library. Data on stdout, progress on stderr."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from . import image as image_mod
from . import names
from .log import TestbedError, info
from .topology import TopologyError


def _sigterm_to_interrupt(signum, frame):
    # SIGTERM and SIGHUP become one KeyboardInterrupt, so every `finally` runs.
    raise KeyboardInterrupt


def _testbed_name(value: str) -> str:
    """argparse type of every testbed NAME: `down ..` once deleted other applications'
    folders. argparse names the command and argument: 'beluga-testbed down: error:
    argument NAME: invalid name '..': use ...'."""
    if (why := names.problem(value)) is not None:
        raise argparse.ArgumentTypeError(why)
    return value


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


def cmd_topology_validate(args) -> int:
    from . import topology
    for f in args.files:
        t = topology.load(f)
        print(f"{f}: ok ({t.name}: {len(t.hosts)} host(s), {len(t.devices)} device(s), "
              f"{len(t.pool.devices)}-way pool of {t.pool_size_bytes >> 20} MiB)")
    return 0


def cmd_topology_show(args) -> int:
    from . import topology
    if args.name is None:
        for n in topology.builtin_names():
            print(f"{n:20} {topology.load(n).description}")
        return 0
    print(topology.draw(topology.load(args.name)))
    return 0


def cmd_up(args) -> int:
    from . import lifecycle, ssh
    if args.dry_run:
        t, name, argvs = lifecycle.plan(args.topology, args.name, accel="tcg" if args.accel == "auto" else args.accel,
                                        provision=not args.no_provision)
        for host, argv in argvs.items():
            print(f"# {name}/{host}")
            print(shlex.join(argv))
        return 0
    tb = lifecycle.up(args.topology, name=args.name, accel=args.accel, retain=args.retain,
                      provision=not args.no_provision)
    for h in tb.hosts:
        print(f"{h.name}\t{shlex.join(ssh.ssh_argv(h.ssh_port, tb.key))}")
    return 0


def cmd_down(args) -> int:
    from . import lifecycle
    targets = lifecycle.names() if args.all else [args.name]
    if not args.all and not args.name:
        raise TestbedError("name a testbed, or --all")
    for n in targets:
        found = lifecycle.down(n)
        info(f"✓ {n} is down" if found else f"✓ {n} was not running (nothing to do)")
    return 0


def cmd_status(args) -> int:
    from . import lifecycle
    targets = [args.name] if args.name else lifecycle.names()
    out = [lifecycle.status(n) for n in targets]
    if args.json:
        print(json.dumps(out if not args.name else out[0], indent=2))
        return 0
    if not out:
        info("no testbeds are up")
    for s in out:
        print(f"{s['name']} (topology {s['topology']}, accel {s['accel']}, image {s['image']}, since {s['created_at']})")
        print(f"  {'HOST':10} {'STATE':8} {'PID':>8} {'SSH':>6}  POOL")
        for h in s["hosts"]:
            pool = h["pool"] + (f" ({h['dax']})" if h.get("dax") else "")
            print(f"  {h['name']:10} {h['state']:8} {h['pid'] or '-':>8} {h['ssh_port']:>6}  {pool}")
    return 0


def cmd_list(args) -> int:
    from . import lifecycle
    for n in lifecycle.names():
        print(n)
    return 0


def cmd_ssh(args) -> int:
    from . import lifecycle, ssh
    tb = lifecycle.find(args.name)
    h = tb.host(args.host)
    argv = ssh.ssh_argv(h.ssh_port, tb.key, args.command or None)
    os.execvp(argv[0], argv)


def cmd_exec(args) -> int:
    from . import lifecycle
    command = args.command
    if not command:
        raise TestbedError("no command given", hint="beluga-testbed exec NAME HOST|--all -- CMD ...")
    tb = lifecycle.find(args.name)
    hosts = lifecycle.resolve_hosts(tb, args.host, args.all)
    results = lifecycle.exec_on(tb, hosts, shlex.join(command) if len(command) > 1 else command[0],
                                timeout_s=args.timeout)
    failed = 0
    for r in results:
        if len(results) > 1:
            print(f"=== {r.host} (exit {r.exit_code if r.error is None else 'error'})", flush=True)
        sys.stdout.write(r.stdout)
        sys.stdout.flush()
        if r.stderr:
            sys.stderr.write(r.stderr)
        if r.error:
            print(f"✗ {r.host}: {r.error}", file=sys.stderr)
        if not r.ok:
            failed += 1
    if failed:
        print(f"✗ failed on {failed} of {len(results)} host(s): "
              + ", ".join(r.host for r in results if not r.ok), file=sys.stderr)
        return 1
    return 0


def cmd_logs_export(args) -> int:
    from . import lifecycle
    print(lifecycle.export_logs(args.name, Path(args.dest) if args.dest else None))
    return 0


def cmd_provision(args) -> int:
    from . import lifecycle, provision
    tb = lifecycle.find(args.name)
    provision.provision(tb)
    info(f"✓ pool ready on {len(tb.hosts)} host(s)")
    return 0


def cmd_pool(args) -> int:
    from . import lifecycle, provision
    p = provision.pool_table(lifecycle.find(args.name))
    if args.json:
        print(json.dumps(p, indent=2))
        return 0
    print(f"pool of {p['name']}: {p['size_bytes'] >> 20} MiB, {p['ways']}-way, granularity {p['granularity_bytes']} B "
          f"(stripe {p['stripe_bytes']} B), window {p['window']}")
    print(f"rule: {p['rule']}")
    if not p["hosts"]:
        print("hosts: pool not provisioned yet ('beluga-testbed provision NAME')")
    for h, r in p["hosts"].items():
        print(f"  {h:8} {r['dax'] or '-':14} {r['region'] or '-':9} {r['dax_mode'] or '-':8} "
              f"{'ready' if r['ready'] else 'NOT READY'}  guest memdevs in position order: {' '.join(r['targets'] or [])}")
    print(f"{'REGION OFFSET':>14}  {'POS':>3}  {'DEVICE':8} {'SERIAL':>7}  {'FILE OFFSET':>11}  FILE")
    for r in p["map"]:
        print(f"{r['region_offset']:#14x}  {r['position']:>3}  {r['device']:8} {r['serial']:#7x}  "
              f"{r['file_offset']:#11x}  {r['file']}")
    print(f"(repeats every {p['stripe_bytes']} B: offset + k*{p['stripe_bytes']} is at file offset + k*{p['granularity_bytes']})")
    return 0


def cmd_run(args) -> int:
    from . import runner, scenario
    if args.list:
        for name, path in scenario.builtin().items():
            sc = scenario.parse(path.read_text(), str(path))
            print(f"{name:34} {sc.description}")
        return 0
    if not args.scenario:
        raise TestbedError("name a scenario (a file or a built-in name)", hint="'beluga-testbed run --list'")
    sc = scenario.load(args.scenario)
    report, html = runner.run(sc, topology=args.topology, testbed=args.testbed, keep=args.keep,
                              report_dir=Path(args.report_dir) if args.report_dir else None)
    failed = [e for e in report["expectations"] if not e["passed"]]
    verdict = "passed" if report["passed"] else "FAILED"
    info(f"{'✓' if report['passed'] else '✗'} scenario {sc.name} {verdict} in {report['duration_s']} s: "
         f"{len(report['expectations']) - len(failed)}/{len(report['expectations'])} expectations hold")
    for e in failed:
        info(f"  ✗ {e['kind']} {json.dumps(e['args'])} (line {e['line']}): {e['evidence']}")
    print(html)
    return 0 if report["passed"] else 1


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

    tp = sub.add_parser("topology", help="validate and draw topologies")
    tsub = tp.add_subparsers(dest="topology_cmd", required=True, metavar="ACTION")
    v = tsub.add_parser("validate", help="check topology files; every error with file:line")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_topology_validate)
    sh = tsub.add_parser("show", help="draw a topology's tree (no NAME: list the built-in ones)")
    sh.add_argument("name", nargs="?", metavar="NAME|FILE")
    sh.set_defaults(func=cmd_topology_show)

    u = sub.add_parser("up", help="boot a topology's hosts and configure the shared pool")
    u.add_argument("topology", metavar="TOPOLOGY", help="a built-in name (see 'topology show') or a YAML file")
    u.add_argument("--name", type=_testbed_name,
                   help="testbed name (default: the topology's); lets several run at once")
    u.add_argument("--accel", choices=["auto", "tcg", "kvm"], default="auto",
                   help="auto: KVM where a probe guest really runs under it, else TCG")
    u.add_argument("--retain", action="store_true", help="on failure, keep VMs and files for inspection")
    u.add_argument("--dry-run", action="store_true", help="print each host's QEMU command line and exit")
    u.add_argument("--no-provision", action="store_true", help="boot only; do not configure the pool")
    u.set_defaults(func=cmd_up)

    dn = sub.add_parser("down", help="stop a testbed and remove all its files (idempotent)")
    dn.add_argument("name", type=_testbed_name, nargs="?", metavar="NAME")
    dn.add_argument("--all", action="store_true", help="every testbed")
    dn.set_defaults(func=cmd_down)

    st = sub.add_parser("status", help="hosts, pids, ports, state")
    st.add_argument("name", type=_testbed_name, nargs="?", metavar="NAME")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    ls2 = sub.add_parser("list", help="names of the testbeds that are up")
    ls2.set_defaults(func=cmd_list)

    s2 = sub.add_parser("ssh", help="a shell (or a command) on one host")
    s2.add_argument("name", type=_testbed_name, metavar="NAME")
    s2.add_argument("host", metavar="HOST")
    # Anything after `--` is the command to run (split off in main()).
    s2.set_defaults(func=cmd_ssh)

    ex = sub.add_parser("exec", help="run a command on one host or all, in parallel")
    ex.add_argument("name", type=_testbed_name, metavar="NAME")
    ex.add_argument("host", nargs="?", metavar="HOST")
    ex.add_argument("--all", action="store_true", help="every host of the testbed")
    ex.add_argument("--timeout", type=float, default=120, help="seconds per host (default 120)")
    # The command after `--` is split off in main(): argparse's REMAINDER after an
    # optional positional swallows flags like --all.
    ex.set_defaults(func=cmd_exec)

    pv = sub.add_parser("provision", help="(re)create and verify the shared pool in every guest")
    pv.add_argument("name", type=_testbed_name, metavar="NAME")
    pv.set_defaults(func=cmd_provision)

    po = sub.add_parser("pool", help="pool geometry, per-host dax devices, region offset -> device -> file")
    po.add_argument("name", type=_testbed_name, metavar="NAME")
    po.add_argument("--json", action="store_true")
    po.set_defaults(func=cmd_pool)

    rn = sub.add_parser("run", help="run a scenario: deploy the store, play steps and faults, check expectations")
    rn.add_argument("scenario", nargs="?", metavar="SCENARIO", help="a YAML file or a built-in name (see --list)")
    rn.add_argument("--list", action="store_true", help="list the built-in scenarios")
    rn.add_argument("--topology", help="run on this topology instead of the scenario's")
    rn.add_argument("--testbed", type=_testbed_name,
                    help="use this running testbed instead of bringing one up (and down)")
    rn.add_argument("--keep", action="store_true", help="leave the testbed up afterwards")
    rn.add_argument("--report-dir", help="where report.json and report.html go (default ./reports/NAME-TIME)")
    rn.set_defaults(func=cmd_run)

    lg = sub.add_parser("logs", help="collect logs")
    lsub = lg.add_subparsers(dest="logs_cmd", required=True, metavar="ACTION")
    le = lsub.add_parser("export", help="serial logs, QEMU logs and each guest's dmesg in one folder")
    le.add_argument("name", type=_testbed_name, metavar="NAME")
    le.add_argument("--dest", help="folder to write (default: ./beluga-logs-NAME-TIME)")
    le.set_defaults(func=cmd_logs_export)
    return p


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    signal.signal(signal.SIGHUP, _sigterm_to_interrupt)
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    args.command = rest
    try:
        return args.func(args) or 0
    except TestbedError as e:
        print(f"✗ {e}", file=sys.stderr)
        return 1
    except TopologyError as e:
        print("✗ invalid topology:\n" + "\n".join(f"  {x}" for x in e.errors), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("✗ interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
