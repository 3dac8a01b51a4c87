"""Run a scenario on a testbed: deploy the store, play the steps, check the expectations,
write the report (JSON + HTML). Exit status non-zero when any expectation failed."""
from __future__ import annotations

import io
import json
import shlex
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from . import deploy, faults, lifecycle, provision, ssh
from .log import TestbedError, info
from .par import map_parallel
from .scenario import Scenario

TEMPLATES = Path(__file__).with_name("templates")
TRACE_FILE = "/sys/kernel/tracing/trace"


@dataclass
class StepRecord:
    index: int
    name: str
    kind: str
    line: int
    start_s: float = 0.0
    end_s: float = 0.0
    outcome: str = "pending"   # ok | failed | running (background) | not run
    details: dict = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None   # for an unexpected exception (a bug, not a user's mistake)

    def fail(self, e: BaseException) -> None:
        """Record `e` as this step's failure: a TestbedError is the message a user acts on;
        anything else (a crash) also keeps its traceback."""
        self.outcome = "failed"
        if isinstance(e, TestbedError):
            self.error = str(e)
        elif isinstance(e, KeyboardInterrupt):
            self.error = "interrupted (Ctrl-C or SIGTERM)"
        else:
            self.error = f"{type(e).__name__}: {e}"
            self.traceback = "".join(traceback.format_exception(e))


class _Lines(io.StringIO):
    """Collects a remote command's stdout as it streams, calling back per line."""

    def __init__(self, on_line) -> None:
        super().__init__()
        self._on_line = on_line
        self._partial = ""

    def write(self, s: str) -> int:
        self._partial += s
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self._on_line(line)
        return super().write(s)


class Run:
    def __init__(self, sc: Scenario, tb) -> None:
        self.sc = sc
        self.tb = tb
        self.topology = tb.topology
        self.hosts = {h.name: h for h in tb.hosts}
        self.killed: set[str] = set()
        self.service_host = sc.service
        self.committed: dict[str, set[int]] = defaultdict(set)
        self.requested: dict[str, tuple[int, int, int]] = {}   # set -> (start, count, size)
        self.gets: list[dict] = []        # every get: host, set, hits, misses, torn, after_step
        self.scans: list[dict] = []
        self.faults_at: dict[str, int] = {}  # "set/index" -> step index of the fault that hit it
        self.background: list[threading.Thread] = []
        self.steps: list[StepRecord] = []
        self.t0 = time.monotonic()
        names = list(self.hosts)
        missing = [n for n in (sc.service, *sc.writers, *(sc.readers if sc.readers != "others" else ())) if n not in names]
        if missing:
            raise TestbedError(f"{sc.source}: roles name host(s) {', '.join(missing)} that topology "
                               f"'{self.topology.name}' does not have (hosts: {', '.join(names)})")
        if sc.readers == "others":
            rest = [n for n in names if n != sc.service and n not in sc.writers]
            self.readers = rest or [sc.service]
        else:
            self.readers = list(sc.readers)
        self.dax = {n: tb.data["pool"]["hosts"][n]["dax"] for n in names}

    # ------------------------------------------------------------ hosts and roles
    def resolve(self, on) -> list[str]:
        if isinstance(on, list):
            out: list[str] = []
            for o in on:
                out += [n for n in self.resolve(o) if n not in out]
            return out
        table = {"service": [self.service_host], "writers": list(self.sc.writers), "readers": self.readers,
                 "survivors": [n for n in self.hosts if n not in self.killed], "all": list(self.hosts)}
        if on in table:
            return table[on]
        if on in self.hosts:
            return [on]
        raise TestbedError(f"unknown host or role {on!r} (roles: {', '.join(table)}; hosts: {', '.join(self.hosts)})")

    def live(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.killed]

    def driver(self, host: str, verb: str, args: dict, timeout_s: float = 600) -> dict:
        return deploy.run_driver(self.tb, self.hosts[host], verb, {"pool": self.dax[host], **args}, timeout_s=timeout_s)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    # ------------------------------------------------------------ deploy
    def deploy(self) -> dict:
        hosts = [self.hosts[n] for n in self.live(list(self.hosts))]
        deploy.install(self.tb, hosts)
        # A testbed reused from an earlier run may still have a service polling the pool.
        for h in hosts:
            deploy.kill_service(self.tb, h)
        for h in hosts:
            deploy.run_driver(self.tb, h, "enable_trace", {})
        st = self.sc.store
        fmt = []
        if "segment_size_bytes" in st:
            fmt += ["--segment-size", str(st["segment_size_bytes"])]
        if "max_clients" in st:
            fmt += ["--max-clients", str(st["max_clients"])]
        svc = self.hosts[self.service_host]
        formatted = deploy.format_pool(self.tb, svc, self.dax[svc.name], fmt)
        ready = deploy.start_service(self.tb, svc, self.dax[svc.name], self.serve_options())
        # Health: every host reaches the service through the pool and sees the same store.
        health = {n: self.driver(n, "stat", {})["service"]["running"] for n in self.live(list(self.hosts))}
        if not all(health.values()):
            raise TestbedError(f"store not healthy: service seen running on {health}")
        return {"formatted": formatted.get("geometry", formatted), "service": ready, "health": health}

    def serve_options(self) -> list[str]:
        st = self.sc.store
        return ["--heartbeat-timeout", str(st.get("heartbeat_timeout_s", 10)),
                "--lease-ttl", str(st.get("lease_ttl_s", 30))]

    # ------------------------------------------------------------ steps
    def step_put(self, rec: StepRecord, a: dict) -> None:
        hosts = self.live(self.resolve(a["on"]))
        size, start, n = self.sc.block_size(a), a.get("start", 0), a["blocks"]
        self.requested[a["set"]] = (start, n, size)
        share = -(-n // len(hosts))
        jobs = []
        for k, host in enumerate(hosts):
            lo, hi = start + k * share, min(start + n, start + (k + 1) * share)
            if lo < hi:
                jobs.append((host, lo, hi - lo))

        def one(host, lo, count):
            def on_line(line):
                if line.startswith("committed "):
                    self.committed[a["set"]].add(int(line.split()[1]))
            args = {"pool": self.dax[host], "set": a["set"], "start": lo, "count": count, "size": size,
                    "delay_s": a.get("delay_s", 0)}
            cmd = f"{deploy.PY} {deploy.GUEST_DIR}/guest_store.py put {shlex.quote(json.dumps(args))}"
            try:
                with ssh.connection(self.hosts[host].ssh_port, self.tb.key) as c:
                    r = c.run(cmd, hide=False, warn=True, out_stream=_Lines(on_line), err_stream=io.StringIO(),
                              timeout=900, in_stream=False)
                rec.details.setdefault("exit", {})[host] = r.exited
            except Exception as e:  # noqa: BLE001 - a crashed writer ends its SSH session
                rec.details.setdefault("exit", {})[host] = f"connection lost ({type(e).__name__})"

        if a.get("background"):
            for job in jobs:
                t = threading.Thread(target=one, args=job, daemon=True)
                t.start()
                self.background.append(t)
            rec.outcome = "running"
            rec.details["writers"] = [j[0] for j in jobs]
            return
        for job in jobs:
            one(*job)
        rec.details.update({"committed": len(self.committed[a["set"]]), "requested": n, "size_bytes": size,
                            "writers": [j[0] for j in jobs]})
        if len(self.committed[a["set"]]) < n:
            raise TestbedError(f"only {len(self.committed[a['set']])} of {n} puts were acknowledged")

    def _get(self, host: str, set_name: str, start: int, count: int, size: int, after: int) -> dict:
        r = self.driver(host, "get", {"set": set_name, "start": start, "count": count, "size": size})
        rec = {"host": host, "set": set_name, "after_step": after, **r}
        self.gets.append(rec)
        return rec

    def step_get(self, rec: StepRecord, a: dict) -> None:
        start, n, size = self.requested.get(a["set"], (0, a.get("blocks", 0), self.sc.block_size(a)))
        start, n, size = a.get("start", start), a.get("blocks", n), a.get("size_bytes", size)
        out = {}
        hosts = self.live(self.resolve(a["on"]))
        for host, g in zip(hosts, map_parallel(lambda h: self._get(h, a["set"], start, n, size, rec.index), hosts)):
            out[host] = {"hits": len(g["hits"]), "misses": len(g["misses"]), "torn": len(g["torn"]),
                         "corrupt_misses": g["corrupt_misses"]}
        rec.details["per_host"] = out
        if any(v["torn"] for v in out.values()):
            raise TestbedError("a torn or corrupted block was returned as valid")

    def _block_location(self, set_name: str, index: int) -> dict:
        start, n, size = self.requested[set_name]
        host = self.live([self.service_host, *self.readers])[0]
        loc = self.driver(host, "locate", {"set": set_name, "index": index, "size": size})
        where = provision.locate(self.topology, self.tb.pool_files, loc["data_offset"])
        return {"data_offset": loc["data_offset"], "length_bytes": loc["length_bytes"], "device": where.device,
                "serial": where.serial, "dpa": where.file_offset, "file": str(where.file),
                "file_offset": where.file_offset}

    def step_fault(self, rec: StepRecord, a: dict) -> None:
        d = rec.details
        if "kill_host" in a:
            for n in self.live(self.resolve(a["kill_host"])):
                faults.kill_host(self.hosts[n])
                self.killed.add(n)
            d["killed"] = sorted(self.killed)
        elif "hang_host" in a:
            names = self.live(self.resolve(a["hang_host"]))
            threads = [threading.Thread(target=faults.hang_host, args=(self.hosts[n], a["seconds"])) for n in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            d.update({"hung": names, "seconds": a["seconds"]})
        elif "nic_down" in a or "nic_up" in a:
            up = "nic_up" in a
            names = self.live(self.resolve(a["nic_up" if up else "nic_down"]))
            for n in names:
                faults.set_link(self.hosts[n], up)
            d.update({"link": "up" if up else "down", "hosts": names})
        elif "poison" in a or "media_event" in a:
            kind = "poison" if "poison" in a else "media_event"
            p = a[kind]
            loc = self._block_location(p["set"], p["index"])
            # Each VM emulates its own copy of the device: the media fault is reported by all of them.
            for n in self.live(list(self.hosts)):
                if kind == "poison":
                    faults.inject_poison(self.hosts[n], loc["device"], loc["dpa"], p.get("length_bytes", 64))
                else:
                    faults.inject_media_event(self.hosts[n], loc["device"], p.get("kind", "general_media"), loc["dpa"])
            self.faults_at[f"{p['set']}/{p['index']}"] = rec.index
            d.update({"block": f"{p['set']}/{p['index']}", **loc})
        elif "bitflip" in a:
            p = a["bitflip"]
            loc = self._block_location(p["set"], p["index"])
            off = loc["data_offset"] + p.get("offset", 100)
            where = provision.locate(self.topology, self.tb.pool_files, off)
            changed = faults.flip_bits(where.file, where.file_offset, p.get("bits", 1))
            self.faults_at[f"{p['set']}/{p['index']}"] = rec.index
            d.update({"block": f"{p['set']}/{p['index']}", "file": str(where.file), "file_offsets": changed,
                      "device": where.device})
        elif "kill_service" in a:
            d["killed_on"] = self.service_host
            d["was_running"] = deploy.kill_service(self.tb, self.hosts[self.service_host])
        elif "start_service" in a:
            host = self.resolve(a["start_service"])[0]
            d["ready"] = deploy.start_service(self.tb, self.hosts[host], self.dax[host],
                                              self.serve_options() + ["--force"])
            self.service_host = host
            d["service_host"] = host

    def step_scan(self, rec: StepRecord, a: dict) -> None:
        for host in self.live(self.resolve(a["on"])):
            r = self.driver(host, "scan", {})
            self.scans.append({"host": host, "after_step": rec.index, **r})
            rec.details[host] = {"events": [f"{e['event']} hpa={e['hpa']:#x}" for e in r["events"]],
                                 "region_base": r["region_base"], "quarantined": r["quarantined"]}

    def step_stat(self, rec: StepRecord, a: dict) -> None:
        for host in self.live(self.resolve(a["on"])):
            r = self.driver(host, "stat", {})
            rec.details[host] = {k: r.get(k) for k in ("blocks", "reserved", "segments", "service")}

    def step_wait(self, rec: StepRecord, a: dict) -> None:
        time.sleep(a["seconds"])

    def step_join(self, rec: StepRecord, a: dict) -> None:
        late = []
        for t in self.background:
            t.join(timeout=900)
            if t.is_alive():
                late.append(t.name)
        self.background.clear()
        if late:
            raise TestbedError(f"background work still running after 900 s: {', '.join(late)}")

    def play(self) -> None:
        """Every step, in order. A step that fails (a crash included) is recorded and the
        next one runs; an interruption is recorded on the step it hit and ends the run."""
        for i, step in enumerate(self.sc.steps):
            rec = StepRecord(i, step.name, step.kind, step.line, start_s=self.now())
            self.steps.append(rec)
            info(f"• step {i + 1}/{len(self.sc.steps)}: {step.name}")
            try:
                getattr(self, f"step_{step.kind}")(rec, step.args)
                if rec.outcome == "pending":
                    rec.outcome = "ok"
            except BaseException as e:
                rec.fail(e)
                if not isinstance(e, Exception):
                    raise
            finally:
                rec.end_s = self.now()
                mark = {"ok": "✓", "running": "…", "failed": "✗"}.get(rec.outcome, "?")
                info(f"{mark} step {i + 1}: {step.name} ({rec.end_s - rec.start_s:.1f} s)"
                     + (f": {rec.error}" if rec.error else ""))
        final = StepRecord(-1, "join", "join", 0)
        try:
            self.step_join(final, {})
        except TestbedError as e:
            final.fail(e)
        for rec in self.steps:
            if rec.outcome == "running":
                rec.outcome = "failed" if final.error else "ok"
                rec.error = final.error
                rec.details["committed"] = {s: len(v) for s, v in self.committed.items()}

    def not_run(self) -> list[StepRecord]:
        """Records for the steps the run never reached (after an interruption or a crash
        before the first step), so the report shows them and the run cannot pass."""
        return [StepRecord(i, s.name, s.kind, s.line, outcome="not run")
                for i, s in enumerate(self.sc.steps) if i >= len(self.steps)]

    # ------------------------------------------------------------ expectations
    def check(self) -> list[dict]:
        out = []
        for e in self.sc.expect:
            tb = None
            try:
                passed, evidence = getattr(self, f"expect_{e.kind}")(e.args)
            except TestbedError as err:
                passed, evidence = False, f"could not be checked: {err}"
            except Exception as err:  # noqa: BLE001 - a crash in a check is a failed check, with its traceback
                passed, evidence = False, f"could not be checked: {type(err).__name__}: {err}"
                tb = "".join(traceback.format_exception(err))
            out.append({"kind": e.kind, "args": e.args, "line": e.line, "passed": passed, "evidence": evidence,
                        "traceback": tb})
            info(f"{'✓' if passed else '✗'} expect {e.kind} {e.args}: {evidence}")
        return out

    def expect_all_readable(self, a: dict):
        set_name = a["set"]
        if set_name not in self.requested:
            return False, f"no put of set '{set_name}' ran"
        start, n, size = self.requested[set_name]
        want = set(range(start, start + n)) if a.get("include_uncommitted") else self.committed[set_name]
        hosts = self.live(self.resolve(a.get("on", "survivors")))
        problems, checked = [], 0
        reads = map_parallel(lambda h: self._get(h, set_name, start, n, size, len(self.steps)), hosts)
        for host, g in zip(hosts, reads):
            hits = set(g["hits"])
            missing = sorted(want - hits)
            checked += len(want)
            if missing:
                problems.append(f"{host}: {len(missing)} of {len(want)} blocks not readable "
                                f"(indices {_ranges(missing)})")
            if g["torn"]:
                problems.append(f"{host}: blocks {_ranges(g['torn'])} returned with wrong bytes")
        what = "requested" if a.get("include_uncommitted") else "acknowledged"
        if problems:
            killed = f"; killed hosts: {', '.join(sorted(self.killed))}" if self.killed else ""
            return False, f"{len(want)} {what} blocks of set '{set_name}': " + "; ".join(problems) + killed
        return True, f"all {len(want)} {what} blocks of '{set_name}' read with the right bytes on {', '.join(hosts)}"

    def expect_no_torn_reads(self, a: dict):
        torn = [(g["host"], g["set"], g["torn"]) for g in self.gets if g["torn"]]
        total = sum(len(g["hits"]) + len(g["misses"]) + len(g["torn"]) for g in self.gets)
        corrupt = sum(g["corrupt_misses"] for g in self.gets)
        if torn:
            return False, "torn or corrupted blocks returned as valid: " + "; ".join(
                f"{h} set {s} indices {_ranges(t)}" for h, s, t in torn)
        return True, (f"{total} block reads in {len(self.gets)} gets, none torn "
                      f"({corrupt} damaged blocks detected and reported as misses)")

    def expect_never_returned(self, a: dict):
        key = f"{a['set']}/{a['index']}"
        after = self.faults_at.get(key)
        if after is None:
            return False, f"no fault step hit block {key}"
        start, n, size = self.requested[a["set"]]
        bad = [g["host"] for g in self.gets if g["set"] == a["set"] and g["after_step"] > after and a["index"] in g["hits"]]
        for host in self.live(self.resolve(a.get("on", "survivors"))):
            g = self._get(host, a["set"], a["index"], 1, size, len(self.steps))
            if g["hits"]:
                bad.append(host)
        if bad:
            return False, f"block {key} was returned as valid after the fault on {', '.join(sorted(set(bad)))}"
        return True, f"block {key} never returned after the fault (step {after + 1}); every later read was a miss"

    def expect_guest_saw(self, a: dict):
        hosts = self.live(self.resolve(a.get("on", "survivors")))
        seen = {}
        for host in hosts:
            h = self.hosts[host]
            r = ssh.run(host, h.ssh_port, self.tb.key, guest_saw_command(a["event"]), timeout_s=60)
            seen[host] = r.stdout.strip()
        missing = [h for h, line in seen.items() if not line]
        if missing:
            return False, f"no {a['event']} trace event on {', '.join(missing)}"
        first = next(iter(seen.values()))
        return True, f"{a['event']} traced on {', '.join(hosts)}, e.g. {first[:200]}"

    def expect_quarantined(self, a: dict):
        key = f"{a['set']}/{a['index']}"
        from beluga.keys import name_key
        hexkey = name_key(key).hex()
        hits = [s["host"] for s in self.scans if any(q["key"] == hexkey for q in s["quarantined"])]
        if not hits:
            events = sum(len(s["events"]) for s in self.scans)
            return False, f"block {key} was not taken out of service by any scan ({events} media events seen)"
        return True, f"block {key} taken out of service by the scan on {', '.join(hits)}"

    def expect_no_reserved_space(self, a: dict):
        host = self.live([self.service_host, *self.readers])[0]
        r = self.driver(host, "stat", {})
        dead = [c for c in r.get("clients", []) if c.get("host") in self.killed]
        if r.get("reserved") or dead:
            return False, (f"{r.get('reserved')} slots still reserved; clients of killed hosts still registered: "
                           f"{[c['host'] for c in dead]}")
        return True, f"0 reserved slots, no client of a killed host left; {r.get('blocks')} committed blocks"

    def expect_evicted(self, a: dict):
        start, n, size = self.requested[a["set"]]
        host = self.live(self.readers)[0]
        g = self._get(host, a["set"], start, n, size, len(self.steps))
        need = a.get("at_least", 1)
        ok = len(g["misses"]) >= need and not g["torn"]
        return ok, (f"{len(g['misses'])} of {n} blocks of '{a['set']}' evicted (need >= {need}), "
                    f"{len(g['hits'])} still readable, {len(g['torn'])} torn")


def guest_saw_command(event: str) -> str:
    """The guest shell text that finds the first trace line of `event`. The event name
    is the user's text: quoted as one word, `x:' /dev/null; touch f; echo '` ran the touch."""
    return f"grep -m1 -F -e {shlex.quote(' ' + event + ':')} {TRACE_FILE} || true"


def _ranges(xs) -> str:
    xs = sorted(xs)
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}" if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def write_report(report: dict, dest: Path) -> tuple[Path, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    j = dest / "report.json"
    j.write_text(json.dumps(report, indent=2, default=str) + "\n")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    h = dest / "report.html"
    total = max([s["end_s"] for s in report["steps"]] + [0.001])
    h.write_text(env.get_template("report.html.j2").render(r=report, total=total))
    return j, h


def run(sc: Scenario, *, topology: str | None = None, testbed: str | None = None, keep: bool = False,
        report_dir: Path | None = None) -> tuple[dict, Path]:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    topo = topology or sc.topology
    name = testbed or f"scn-{sc.name}"
    report_dir = report_dir or Path("reports") / f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    own = testbed is None
    t0 = time.monotonic()
    report: dict = {"scenario": sc.name, "description": sc.description, "source": sc.source, "topology": topo,
                    "testbed": name, "started_at": started, "steps": [], "expectations": [], "deploy": None,
                    "error": None}
    r = None
    interrupted: BaseException | None = None
    try:
        if own:
            tb = lifecycle.up(topo, name=name)
        else:
            tb = lifecycle.find(name)
        r = Run(sc, tb)
        report["roles"] = {"service": sc.service, "writers": list(sc.writers), "readers": r.readers}
        info(f"• deploy the store: service on {sc.service}, writers {', '.join(sc.writers)}, "
             f"readers {', '.join(r.readers)}")
        report["deploy"] = r.deploy()
        r.play()
        report["expectations"] = r.check()
    except TestbedError as e:
        report["error"] = str(e)
        info(f"✗ {e}")
    except Exception as e:  # noqa: BLE001 - a crash is a failed run with its traceback, never a pass
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = "".join(traceback.format_exception(e))
        info(f"✗ {report['error']}")
    except BaseException as e:  # Ctrl-C, SIGTERM: record, write the report, tear down, then stop
        interrupted = e
        report["error"] = "interrupted (Ctrl-C or SIGTERM)"
        info("✗ interrupted: writing the report and tearing down")
    finally:
        try:
            if r is not None:
                report["steps"] = [vars(s) for s in r.steps + r.not_run()]
                report["killed_hosts"] = sorted(r.killed)
            report["passed"] = passed(report, sc)
            report["duration_s"] = round(time.monotonic() - t0, 1)
            if not report["passed"] and interrupted is None:
                try:
                    report["logs"] = str(lifecycle.export_logs(name, report_dir / "logs"))
                except Exception as e:  # noqa: BLE001 - the report matters more than the logs
                    report["logs"] = f"could not collect logs: {e}"
            j, h = write_report(report, report_dir)
        finally:
            if own and not keep:
                lifecycle.down(name)
    if interrupted is not None:
        raise interrupted
    return report, h


def passed(report: dict, sc: Scenario) -> bool:
    """True only when the run got through: no error, every step of the scenario ran and
    ended ok, and every expectation was checked and held."""
    steps, expects = report["steps"], report["expectations"]
    return (report["error"] is None
            and len(steps) == len(sc.steps) and all(s["outcome"] == "ok" for s in steps)
            and len(expects) == len(sc.expect) and all(e["passed"] for e in expects))
