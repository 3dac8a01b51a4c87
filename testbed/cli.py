"""`beluga-testbed`: thin commands over the library. Data on stdout, progress on stderr.

Everything about running testbeds goes through the public API (api.py: `Testbed`); this
module parses arguments and prints (tests/unit/test_cli_thin.py holds it to that)."""
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


def _seconds(value: str) -> float:
    """argparse type of a timeout: a positive number of seconds (-1 or 'nan' is no timeout)."""
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 < s < float("inf"):
        raise argparse.ArgumentTypeError(f"expected more than 0 seconds, got {value}")
    return s


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
        raise TestbedError("name the image keys to remove, or --all", hint="'beluga-testbed image list' shows the keys")
    for k in image_mod.remove_images(args.keys, all_=args.all):
        print(k)
    return 0


def cmd_doctor(args) -> int:
    from . import doctor
    if args.modules is not None and args.kernel is None:  # checked with the kernel's configuration, or not at all
        raise TestbedError("--modules without --kernel checks nothing",
                           hint="beluga-testbed doctor --kernel PATH --modules DIR")
    return doctor.main(json_out=args.json, qemu=args.qemu, kernel=args.kernel, modules=args.modules)


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
    from .api import Testbed
    opts = dict(name=args.name, shares=args.share or [], accel=args.accel, provision=not args.no_provision,
                kernel=args.kernel, initrd=args.initrd, modules=args.modules, qemu=args.qemu)
    if args.dry_run:
        plan = Testbed.plan(args.topology, **opts)
        for host, argv in plan.argv.items():
            print(f"# {plan.name}/{host}")
            print(shlex.join(argv))
        return 0
    tb = Testbed.up(args.topology, retain=args.retain, keep=True, **opts)
    for h in tb.hosts:
        print(f"{h.name}\t{shlex.join(tb.ssh_argv(h))}")
    return 0


def cmd_down(args) -> int:
    from .api import Testbed
    if not args.all and not args.name:
        running = Testbed.running()
        raise TestbedError("name a testbed, or --all",
                           hint=f"running: {', '.join(running)}" if running else "none is running")
    targets = Testbed.running() if args.all else [args.name]
    for n in targets:
        found = Testbed.down_named(n)
        info(f"✓ {n} is down" if found else f"✓ {n} was not running (nothing to do)")
    return 0


def cmd_status(args) -> int:
    from .api import Testbed
    targets = [args.name] if args.name else Testbed.running()
    out = [Testbed.attach(n).status() for n in targets]
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
        for sh in s.get("shares") or []:
            print(f"  share {sh['host_dir']} -> {sh['guest_dir']} ({'rw' if sh['rw'] else 'read-only'}, "
                  f"tag {sh['tag']}) on every host")
        k = s.get("kernel")
        if k:
            given = k.get("given") or {}
            if given.get("kernel"):
                print(f"  kernel {given['kernel']} ({k.get('version') or 'version unknown'}; booted as {k['kernel']}, "
                      f"initrd {k['initrd']})")
            if k.get("modules"):
                print(f"  modules {k['modules']} -> /lib/modules/{k.get('version')} (read-only) on every host")
            print(f"  qemu {k['qemu']}")
    return 0


def cmd_list(args) -> int:
    from .api import Testbed
    for n in Testbed.running():
        print(n)
    return 0


def cmd_ssh(args) -> int:
    from .api import Testbed
    argv = Testbed.attach(args.name).ssh_argv(args.host, args.command or None)
    os.execvp(argv[0], argv)


def cmd_exec(args) -> int:
    from .api import Testbed
    command = args.command
    line = shlex.join(command) if len(command) > 1 else "".join(command)  # one word: a shell line as typed
    Testbed.check_shell(line, args.host, args.all)
    tb = Testbed.attach(args.name)
    results = list(tb.shell(tb.select(args.host, args.all), line, timeout_s=args.timeout,
                            pool_env=args.pool_env).values())
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


def cmd_reset(args) -> int:
    from .api import Testbed
    report = Testbed.attach(args.name).reset(poison=not args.keep_poison)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    for h in report.hosts:
        done = [f"{len(h.killed)} process(es) killed"]
        if h.continued:
            done.append("resumed (it was stopped)")
        if h.poison_cleared:
            done.append(f"poison cleared: {', '.join(h.poison_cleared)}")
        info(f"  {h.host}: " + "; ".join(done))
    info(f"  pool: {report.pool_bytes_zeroed >> 20} MiB zeroed")
    if not report.complete:
        info(f"✗ {report.name} reset in {report.seconds:.1f} s, but these could not be undone:")
        for line in report.not_undone:
            info(f"  ✗ {line}")
        return 1
    info(f"✓ {report.name} reset in {report.seconds:.1f} s")
    return 0


def cmd_cp(args) -> int:
    from .api import Testbed
    Testbed.check_copy(args.src, args.dst, all_hosts=args.all, recursive=args.recursive)
    for where in Testbed.attach(args.name).copy(args.src, args.dst, all_hosts=args.all, recursive=args.recursive):
        print(where)
    return 0


def cmd_logs_export(args) -> int:
    from .api import Testbed
    dest = Path(args.dest) if args.dest else None
    if dest is not None and dest.exists() and not dest.is_dir():  # named as the option, before the lookup
        raise TestbedError(f"--dest {dest}: not a folder", hint="name a folder to write (made if missing)")
    print(Testbed.attach(args.name).export_logs(dest))
    return 0


def cmd_provision(args) -> int:
    from .api import Testbed
    tb = Testbed.attach(args.name)
    tb.provision()
    info(f"✓ pool ready on {len(tb.hosts)} host(s)")
    return 0


def cmd_pool(args) -> int:
    from .api import Testbed
    p = Testbed.attach(args.name).pool_table()
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


def cmd_scenario_validate(args) -> int:
    """Every scenario file against its topology (or --topology), all errors of all files."""
    from . import scenario, topology
    from .yamlcheck import ConfigError
    if args.topology:
        topology.load(args.topology)  # its mistakes once, as the topology's, not once per file
    errors: list[str] = []
    for f in args.files:
        try:
            sc, t = scenario.load_checked(f, args.topology)
        except ConfigError as e:  # the scenario's, or its topology's
            errors += e.errors
            continue
        print(f"{f}: ok ({sc.name}: {len(sc.steps)} step(s), {len(sc.expect)} expectation(s), "
              f"on {t.name} with {len(t.hosts)} host(s))")
    if errors:
        raise scenario.ScenarioError(errors)
    return 0


def cmd_scenario_list(args) -> int:
    from . import scenario
    for name, path in scenario.builtin().items():
        sc = scenario.parse(path.read_text(), str(path))
        print(f"{name:34} {sc.description}")
    return 0


def _copy_junit(report_dir: Path, dest: Path) -> None:
    src = report_dir / "junit.xml"
    if src.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
        info(f"JUnit XML: {dest}")


def cmd_image_key(args) -> int:
    """The current recipe's key: what a CI cache of the image is keyed by."""
    print(image_mod.recipe_key())
    return 0


def cmd_run(args) -> int:
    from . import scenario
    from .scenario import runner
    if args.list:
        return cmd_scenario_list(args)
    if not args.scenario:
        raise TestbedError("name a scenario (a file or a built-in name)", hint="'beluga-testbed run --list'")
    if args.check:
        if args.testbed:  # what the run would check: the running testbed's topology
            from .api import Testbed
            sc, t = scenario.load(args.scenario), Testbed.attach(args.testbed).state.topology
            scenario.check(sc, t)
        else:
            sc, t = scenario.load_checked(args.scenario, args.topology)
        info(f"✓ {sc.name}: valid on {t.name} ({len(sc.steps)} step(s), {len(sc.expect)} expectation(s)); "
             "nothing was started")
        return 0
    sc = scenario.load(args.scenario)
    junit = Path(args.junit) if args.junit else None
    if junit is not None and junit.is_dir():  # found now, not after the run
        raise TestbedError(f"--junit {junit}: is a folder", hint=f"name the file to write, e.g. {junit / 'junit.xml'}")
    try:
        report, html = runner.run(sc, topology=args.topology, testbed=args.testbed, keep=args.keep,
                                  report_dir=Path(args.report_dir) if args.report_dir else None,
                                  kernel=runner.UserKernel(args.kernel, args.initrd, args.modules, args.qemu))
    except KeyboardInterrupt:
        if junit is not None and args.report_dir:  # the interrupted run's report was written: pass it on
            _copy_junit(Path(args.report_dir), junit)
        raise
    if junit is not None:
        _copy_junit(html.parent, junit)
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
    d.add_argument("--qemu", type=Path, metavar="PATH",
                   help="check this QEMU binary (default: $BELUGA_TESTBED_QEMU, else qemu-system-x86_64 on PATH)")
    d.add_argument("--kernel", type=Path, metavar="PATH",
                   help="check this kernel's configuration for the CXL options (read from a .config or "
                        "config-<version> beside it, /boot/config-<version>, or --modules)")
    d.add_argument("--modules", type=Path, metavar="DIR", help="the kernel's `make modules_install INSTALL_MOD_PATH=` tree")
    d.set_defaults(func=cmd_doctor)

    im = sub.add_parser("image", help="build, list and remove guest images")
    isub = im.add_subparsers(dest="image_cmd", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build the guest image of the current recipe (images/)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.set_defaults(func=cmd_image_build)
    ls = isub.add_parser("list", help="list built images")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_image_list)
    ik = isub.add_parser("key", help="print the current recipe's key (a CI cache key for the built image)")
    ik.set_defaults(func=cmd_image_key)
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
    u.add_argument("--share", action="append", metavar="HOST_DIR[:GUEST_DIR[:rw]]",
                   help="mount a host folder in every guest (virtio-9p; default GUEST_DIR /mnt/<folder name>; "
                        "read-only unless ':rw'); repeatable")
    u.add_argument("--kernel", type=Path, metavar="PATH",
                   help="boot this kernel (bzImage or vmlinux) instead of the image's (also the topology's kernel.kernel)")
    u.add_argument("--initrd", type=Path, metavar="PATH",
                   help="with --kernel: this initrd instead of the image's tiny one with the kernel's modules")
    u.add_argument("--modules", type=Path, metavar="DIR",
                   help="with --kernel: its `make modules_install INSTALL_MOD_PATH=DIR` tree, mounted read-only "
                        "at /lib/modules/<version> in every guest")
    u.add_argument("--qemu", type=Path, metavar="PATH",
                   help="this QEMU binary (default: the topology's kernel.qemu, $BELUGA_TESTBED_QEMU, qemu-system-x86_64)")
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

    s2 = sub.add_parser("ssh", help="a shell (or a command) on one host", usage="%(prog)s [-h] NAME HOST [-- CMD ...]")
    s2.add_argument("name", type=_testbed_name, metavar="NAME")
    s2.add_argument("host", metavar="HOST")
    # Anything after `--` is the command to run (split off in main()).
    s2.set_defaults(func=cmd_ssh)

    ex = sub.add_parser("exec", help="run a command on one host or all, in parallel",
                        usage="%(prog)s [-h] [--all] [--timeout S] [--pool-env] NAME [HOST] -- CMD ...")
    ex.add_argument("name", type=_testbed_name, metavar="NAME")
    ex.add_argument("host", nargs="?", metavar="HOST")
    ex.add_argument("--all", action="store_true", help="every host of the testbed")
    ex.add_argument("--timeout", type=_seconds, default=120, help="seconds per host (default 120)")
    ex.add_argument("--pool-env", action="store_true",
                    help="set BELUGA_DAX, BELUGA_POOL_SIZE, BELUGA_HOST_INDEX, ... as a scenario's run step does")
    # The command after `--` is split off in main(): argparse's REMAINDER after an
    # optional positional swallows flags like --all.
    ex.set_defaults(func=cmd_exec)

    cp = sub.add_parser("cp", help="copy files into or out of guests over SFTP (scp-style HOST:PATH)",
                        description="One side is remote: HOST:PATH, or :PATH with --all (every host). "
                                    "Out of several hosts, DST is a folder with one subfolder per host.")
    cp.add_argument("name", type=_testbed_name, metavar="NAME")
    cp.add_argument("src", metavar="SRC", help="a local path, or HOST:PATH (:PATH with --all)")
    cp.add_argument("dst", metavar="DST", help="a local path, or HOST:PATH (:PATH with --all)")
    cp.add_argument("--all", action="store_true", help="every host of the testbed (remote side written :PATH)")
    cp.add_argument("-r", "--recursive", action="store_true", help="copy folders and what they hold")
    cp.set_defaults(func=cmd_cp)

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
    rn.add_argument("--junit", metavar="FILE", help="also write JUnit XML there (one test case per expectation; "
                                                    "report-dir/junit.xml is always written)")
    rn.add_argument("--kernel", type=Path, metavar="PATH",
                    help="boot this kernel (as 'up --kernel'; over the scenario's and the topology's kernel.kernel)")
    rn.add_argument("--initrd", type=Path, metavar="PATH", help="with a kernel: this initrd (as 'up --initrd')")
    rn.add_argument("--modules", type=Path, metavar="DIR", help="with a kernel: its modules tree (as 'up --modules')")
    rn.add_argument("--qemu", type=Path, metavar="PATH", help="this QEMU binary (as 'up --qemu')")
    rn.add_argument("--check", action="store_true",
                    help="validate the scenario against its topology (or the --testbed's) and exit; boots nothing")
    rn.set_defaults(func=cmd_run)

    rs = sub.add_parser("reset", help="back to the state right after 'up', without rebooting (seconds)",
                        description="Resumes hung hosts and sets NIC links up, kills every process started "
                                    "after boot, clears injected poison through the devices' mailboxes, "
                                    "empties trace buffers, /tmp and /dev/shm, and zeroes the pool. Exits 1 "
                                    "and lists what it could not undo (e.g. a killed host).")
    rs.add_argument("name", type=_testbed_name, metavar="NAME")
    rs.add_argument("--keep-poison", action="store_true", help="do not read and clear the devices' poison lists")
    rs.add_argument("--json", action="store_true", help="the full report on stdout")
    rs.set_defaults(func=cmd_reset)

    sc = sub.add_parser("scenario", help="validate and list scenarios")
    scsub = sc.add_subparsers(dest="scenario_cmd", required=True, metavar="ACTION")
    sv = scsub.add_parser("validate", help="check scenario files against their topology; every error with "
                                           "file:line; boots nothing")
    sv.add_argument("files", nargs="+", metavar="FILE", help="a YAML file or a built-in name")
    sv.add_argument("--topology", help="check against this topology instead of each scenario's")
    sv.set_defaults(func=cmd_scenario_validate)
    sl = scsub.add_parser("list", help="the built-in scenarios")
    sl.set_defaults(func=cmd_scenario_list)

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
    parser = build_parser()
    args = parser.parse_args(argv)
    if rest and args.cmd not in ("ssh", "exec"):  # it was dropped without a word
        parser.error(f"'-- {shlex.join(rest)}': a command after '--' is for 'ssh' and 'exec' only")
    args.command = rest
    try:
        rc = args.func(args) or 0
        sys.stdout.flush()  # here, where a reader that left is caught, not at exit
        return rc
    except BrokenPipeError:
        # `beluga-testbed run --list | head`: the reader left before the end, as with any
        # Unix tool; exit as one killed by SIGPIPE would, and with nothing more to say
        # (Python would print a traceback, then once more while flushing at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except TestbedError as e:
        print(f"✗ {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("✗ interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
