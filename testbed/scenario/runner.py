"""Run a scenario on a testbed: deploy the store, play the steps, check the expectations,
write the report (JSON, HTML and JUnit XML). A run passes only when every step ran and
ended ok and every expectation was checked and held.

The step and expectation kinds are defined here, each one frozen dataclass (its YAML
fields) with the method that does it (`run` for a step, `check_run` for an expectation),
registered in testbed/scenario/__init__.py's registry; the fault kinds live in testbed/faults.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from .. import deploy, lifecycle, provision, ssh
from .. import kernel as kernel_mod
from .. import reset as reset_mod
from .. import scenario as S
from ..kernel import UserKernel
from ..log import TestbedError, info
from ..par import map_parallel
from ..scenario import (Bool, Choice, Env, Expectation, Fault, Hosts, Int, Name, Regex, Scenario, Seconds, Step,
                       StrList, Str, arg, check_block, check_set, expectation, step, steps_before)
from ..yamlcheck import did_you_mean

TEMPLATES = Path(__file__).with_name("templates")
TRACE_FILE = "/sys/kernel/tracing/trace"
BACKGROUND_JOIN_S = 900


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


def start_program(tb, hosts: list[str], argv, shell, env: dict, timeout_s: float, background: bool, out_dir: Path):
    """testbed/scenario/programs.py's run_program (the boundary the unit tests fake)."""
    from . import programs
    return programs.run_program(tb, hosts, argv, shell, env, timeout_s, background, out_dir)


# ================================================================ step kinds

def _set_target(self, sc, t, c) -> None:
    check_set(sc, self, c)


@step("put", "put blocks, split over the hosts; the host records each put the service acknowledged as it "
             "happens, so a crash mid-stream still leaves a known committed set")
class Put(Step):
    on: Any = arg(Hosts(), "where the puts run")
    set: str = arg(Name(), "the set's name (block i has key name_key('SET/i'))")
    blocks: int = arg(Int(1, 1 << 20), "how many blocks")
    size_bytes: int | None = arg(Int(1), "bytes per block (default: store.block_size_bytes)", None)
    start: int = arg(Int(0), "first block index", 0)
    background: bool = arg(Bool(), "do not wait: a later `join` (or the end of the steps) does", False)
    delay_s: float = arg(Seconds(zero_ok=True), "pause after each put", 0)

    def check(self, sc, t, c) -> None:
        size = sc.block_size(self.size_bytes)
        if size > t.pool_size_bytes // 2:
            c.err(self.path + ("size_bytes",), f"blocks of {size} bytes do not fit the pool of {t.name} "
                                              f"({t.pool_size_bytes >> 20} MiB; at most half of it per block)")

    def run(self, r: Run, rec: StepRecord) -> None:
        hosts = r.live(r.resolve(self.on))
        if not hosts:
            raise TestbedError(f"no live host to put from ({self.on}; killed: {', '.join(sorted(r.killed))})")
        size, start, n, set_name = r.sc.block_size(self.size_bytes), self.start, self.blocks, self.set
        r.requested[set_name] = (start, n, size)
        share = -(-n // len(hosts))
        jobs = []
        for k, host in enumerate(hosts):
            lo, hi = start + k * share, min(start + n, start + (k + 1) * share)
            if lo < hi:
                jobs.append((host, lo, hi - lo))

        def one(host, lo, count):
            def on_line(line):
                if line.startswith("committed "):
                    r.committed[set_name].add(int(line.split()[1]))
            args = {"pool": r.dax[host], "set": set_name, "start": lo, "count": count, "size": size,
                    "delay_s": self.delay_s}
            cmd = f"{deploy.PY} {deploy.GUEST_DIR}/guest_store.py put {shlex.quote(json.dumps(args))}"
            try:
                with ssh.connection(r.hosts[host].ssh_port, r.tb.key) as c:
                    res = c.run(cmd, hide=False, warn=True, out_stream=_Lines(on_line), err_stream=io.StringIO(),
                                timeout=900, in_stream=False)
                rec.details.setdefault("exit", {})[host] = res.exited
            except Exception as e:  # noqa: BLE001 - a crashed writer ends its SSH session
                rec.details.setdefault("exit", {})[host] = f"connection lost ({type(e).__name__})"
            if self.background:  # the timeline shows a background put until its last writer ended
                rec.end_s = max(rec.end_s, r.now())

        rec.details["writers"] = [j[0] for j in jobs]
        if self.background:
            for job in jobs:
                t = threading.Thread(target=one, args=job, daemon=True, name=f"put {set_name} on {job[0]}")
                t.start()
                r.background.append(t)
            rec.outcome = "running"
            return
        for job in jobs:
            one(*job)
        rec.details.update({"committed": len(r.committed[set_name]), "requested": n, "size_bytes": size})
        if len(r.committed[set_name]) < n:
            raise TestbedError(f"only {len(r.committed[set_name])} of {n} puts were acknowledged")


@step("get", "get every block of the set on each host; hits, misses, torn (returned with wrong bytes), "
             "damaged-and-reported")
class Get(Step):
    on: Any = arg(Hosts(), "where the gets run")
    set: str = arg(Name(), "the set")
    blocks: int | None = arg(Int(1, 1 << 20), "how many (default: as many as were put)", None)
    start: int | None = arg(Int(0), "first index (default: the put's)", None)
    size_bytes: int | None = arg(Int(1), "bytes per block (default: the put's)", None)
    check = _set_target

    def run(self, r: Run, rec: StepRecord) -> None:
        start, n, size = r.requested.get(self.set, (0, self.blocks or 0, r.sc.block_size(self.size_bytes)))
        start = self.start if self.start is not None else start
        n = self.blocks or n
        size = self.size_bytes or size
        out = {}
        hosts = r.live(r.resolve(self.on))
        for host, g in zip(hosts, map_parallel(lambda h: r.get(h, self.set, start, n, size, rec.index), hosts)):
            out[host] = {"hits": len(g["hits"]), "misses": len(g["misses"]), "torn": len(g["torn"]),
                         "corrupt_misses": g["corrupt_misses"]}
        rec.details["per_host"] = out
        if any(v["torn"] for v in out.values()):
            raise TestbedError("a torn or corrupted block was returned as valid")


@step("wait", "sleep")
class Wait(Step):
    seconds: float = arg(Seconds(), "how long")

    def run(self, r: Run, rec: StepRecord) -> None:
        time.sleep(self.seconds)


class _FaultType(S.FieldType):
    doc = "one of the faults below"


@step("fault", "inject one of the faults below")
class FaultStep(Step):
    fault: Fault = arg(_FaultType(), "the fault")

    def args(self) -> dict:
        f = self.fault
        return f.args() if f.primary is not None else {f.kind: f.args() or True}

    def check(self, sc, t, c) -> None:
        pass  # the fault itself is checked by scenario.check

    def run(self, r: Run, rec: StepRecord) -> None:
        self.fault.run(r, rec)


@step("scan", "read the devices' poison lists and the traced media events; delete (stop serving) every "
              "committed block whose bytes overlap an affected address")
class Scan(Step):
    on: Any = arg(Hosts(), "where the scan runs")

    def run(self, r: Run, rec: StepRecord) -> None:
        for host in r.live(r.resolve(self.on)):
            res = r.driver(host, "scan", {})
            r.scans.append({"host": host, "after_step": rec.index, **res})
            rec.details[host] = {"events": [f"{e['event']} hpa={e['hpa']:#x}" for e in res["events"]],
                                 "region_base": res["region_base"], "quarantined": res["quarantined"]}


@step("stat", "the pool's metadata as the store sees it")
class Stat(Step):
    on: Any = arg(Hosts(), "where")

    def run(self, r: Run, rec: StepRecord) -> None:
        for host in r.live(r.resolve(self.on)):
            res = r.driver(host, "stat", {})
            rec.details[host] = {k: res.get(k) for k in ("blocks", "reserved", "segments", "service")}


@step("run", "run a program (argv list or shell string) on hosts, with the pool in its environment "
             "(BELUGA_DAX, BELUGA_POOL_SIZE, BELUGA_INTERLEAVE_WAYS, BELUGA_INTERLEAVE_GRANULARITY, BELUGA_HOST, "
             "BELUGA_HOST_INDEX, BELUGA_HOST_COUNT); stdout and stderr saved whole in the run folder")
class RunProgram(Step):
    name_: str = arg(Name(), "the program's name (for `join` and the expectations)", yaml="name")
    on: Any = arg(Hosts(), "where it runs (each host runs it once)")
    argv: tuple | None = arg(StrList(), "the command as a list of words (no shell)", None)
    shell: str | None = arg(Str(), "or one string for `sh -c`", None)
    background: bool = arg(Bool(), "do not wait: a later `join` does (or the end of the steps)", False)
    env: tuple = arg(Env(), "extra environment variables (override the BELUGA_* ones)", ())
    timeout_s: float = arg(Seconds(), "the program is killed after this long", 600)

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.shell is None):
            raise ValueError("give exactly one of 'argv' (a list of words) and 'shell' (a string for sh -c)")

    def check(self, sc, t, c) -> None:
        for s in steps_before(sc, self):
            if s.kind == "run" and s.name_ == self.name_:
                c.err(self.path + ("name",), f"a program named '{self.name_}' already runs at line {s.line}")

    def run(self, r: Run, rec: StepRecord) -> None:
        hosts = r.live(r.resolve(self.on))
        if not hosts:
            raise TestbedError(f"no live host to run '{self.name_}' on (killed: {', '.join(sorted(r.killed))})")
        out_dir = r.out_dir / "programs" / self.name_
        handle = start_program(r.tb, hosts, list(self.argv) if self.argv else None, self.shell,
                               {**r.store_env, **dict(self.env)}, self.timeout_s, self.background, out_dir)
        rec.details["hosts"] = hosts
        rec.details["output"] = str(out_dir)
        if self.background:
            r.programs[self.name_] = (handle, rec)
            rec.outcome = "running"
            return
        r.finish_program(self.name_, handle.join(), rec)


@step("join", "wait for background work: the program `name`, or (no name) every background put and program")
class Join(Step):
    name_: str | None = arg(Name(), "the background program to wait for", None, yaml="name")
    timeout_s: float = arg(Seconds(), "a program still running after this long is killed", BACKGROUND_JOIN_S)

    def check(self, sc, t, c) -> None:
        if self.name_ is None:
            return
        runs = {s.name_: s for s in steps_before(sc, self) if s.kind == "run"}
        if self.name_ not in runs:
            c.err(self.path + ("name",), f"no program named '{self.name_}' runs before this step" +
                  (f" (programs: {', '.join(runs)})" if runs else ""))
        elif not runs[self.name_].background:
            c.err(self.path + ("name",), f"program '{self.name_}' runs in the foreground: nothing to join")

    def run(self, r: Run, rec: StepRecord) -> None:
        r.join(self.name_, self.timeout_s, rec)


# ================================================================ expectation kinds

def _block_target(self, sc, t, c) -> None:
    check_block(sc, self, c)


def _run_target(self, sc, t, c) -> None:
    runs = [s.name_ for s in sc.steps if s.kind == "run"]
    if self.run not in runs:
        hint = did_you_mean(self.run, runs)
        c.err(self.path + ("run",), f"no program named '{self.run}' ({hint}programs: {', '.join(runs) or 'none'})")


@expectation("all_readable", "every acknowledged block (every requested one with `include_uncommitted`) reads "
                             "back with the right bytes on each live host of `on`")
class AllReadable(Expectation):
    set: str = arg(Name(), "the set")
    on: Any = arg(Hosts(), "where to read", "survivors")
    include_uncommitted: bool = arg(Bool(), "also blocks whose put was never acknowledged", False)
    check = _set_target

    def check_run(self, r: Run) -> tuple[bool, str]:
        if self.set not in r.requested:
            return False, f"no put of set '{self.set}' ran"
        start, n, size = r.requested[self.set]
        want = set(range(start, start + n)) if self.include_uncommitted else r.committed[self.set]
        hosts = r.live(r.resolve(self.on))
        if not hosts:
            return False, f"no live host to read from ({self.on})"
        problems = []
        reads = map_parallel(lambda h: r.get(h, self.set, start, n, size, len(r.steps)), hosts)
        for host, g in zip(hosts, reads):
            missing = sorted(want - set(g["hits"]))
            if missing:
                problems.append(f"{host}: {len(missing)} of {len(want)} blocks not readable "
                                f"(indices {_ranges(missing)})")
            if g["torn"]:
                problems.append(f"{host}: blocks {_ranges(g['torn'])} returned with wrong bytes")
        what = "requested" if self.include_uncommitted else "acknowledged"
        if problems:
            killed = f"; killed hosts: {', '.join(sorted(r.killed))}" if r.killed else ""
            return False, f"{len(want)} {what} blocks of set '{self.set}': " + "; ".join(problems) + killed
        return True, f"all {len(want)} {what} blocks of '{self.set}' read with the right bytes on {', '.join(hosts)}"


@expectation("no_torn_reads", "no read in the whole run returned a block with wrong bytes")
class NoTornReads(Expectation):
    WHOLE_RUN = True

    def check_run(self, r: Run) -> tuple[bool, str]:
        torn = [(g["host"], g["set"], g["torn"]) for g in r.gets if g["torn"]]
        total = sum(len(g["hits"]) + len(g["misses"]) + len(g["torn"]) for g in r.gets)
        corrupt = sum(g["corrupt_misses"] for g in r.gets)
        if torn:
            return False, "torn or corrupted blocks returned as valid: " + "; ".join(
                f"{h} set {s} indices {_ranges(t)}" for h, s, t in torn)
        if not r.gets:
            return False, "no read ran: nothing shows that reads are not torn"
        return True, (f"{total} block reads in {len(r.gets)} gets, none torn "
                      f"({corrupt} damaged blocks detected and reported as misses)")


@expectation("never_returned", "after the fault that hit the block, no read returned it (and a fresh read "
                               "on each host of `on` misses it)")
class NeverReturned(Expectation):
    set: str = arg(Name(), "the set of the block")
    index: int = arg(Int(0), "the block's index")
    on: Any = arg(Hosts(), "where to read it again at the end", "survivors")

    def check(self, sc, t, c) -> None:
        _block_target(self, sc, t, c)
        hit = [s for s in sc.steps if s.kind == "fault" and getattr(s.fault, "set", None) == self.set
               and getattr(s.fault, "index", None) == self.index]
        if not hit:
            c.err(self.path, f"no fault step hits block {self.set}/{self.index} (poison, media_event or bitflip)")

    def check_run(self, r: Run) -> tuple[bool, str]:
        key = f"{self.set}/{self.index}"
        after = r.faults_at.get(key)
        if after is None:
            return False, f"no fault step hit block {key}"
        start, n, size = r.requested[self.set]
        bad = [g["host"] for g in r.gets if g["set"] == self.set and g["after_step"] > after and self.index in g["hits"]]
        checked = 0
        for host in r.live(r.resolve(self.on)):
            g = r.get(host, self.set, self.index, 1, size, len(r.steps))
            checked += 1
            if g["hits"]:
                bad.append(host)
        if bad:
            return False, f"block {key} was returned as valid after the fault on {', '.join(sorted(set(bad)))}"
        later = sum(1 for g in r.gets if g["set"] == self.set and g["after_step"] > after)
        return True, (f"block {key} never returned after the fault (step {after + 1}): {later} reads of its set "
                      f"after it, {checked} fresh reads at the end, all misses")


@expectation("guest_saw", "the kernel traced the event (`cxl_poison`, `cxl_general_media`, `cxl_dram`)")
class GuestSaw(Expectation):
    event: str = arg(Choice(("cxl_poison", "cxl_general_media", "cxl_dram")), "the trace event")
    on: Any = arg(Hosts(), "where to look", "survivors")

    def check_run(self, r: Run) -> tuple[bool, str]:
        hosts = r.live(r.resolve(self.on))
        if not hosts:
            return False, f"no live host to look on ({self.on})"
        seen = {}
        for host in hosts:
            h = r.hosts[host]
            res = ssh.run(host, h.ssh_port, r.tb.key, guest_saw_command(self.event), timeout_s=60)
            seen[host] = res.stdout.strip()
        missing = [h for h, line in seen.items() if not line]
        if missing:
            return False, f"no {self.event} trace event on {', '.join(missing)}"
        first = next(iter(seen.values()))
        return True, f"{self.event} traced on {', '.join(hosts)}, e.g. {first[:200]}"


@expectation("quarantined", "a `scan` took the block out of service")
class Quarantined(Expectation):
    set: str = arg(Name(), "the set of the block")
    index: int = arg(Int(0), "the block's index")
    check = _block_target

    def check_run(self, r: Run) -> tuple[bool, str]:
        from beluga.keys import name_key
        key = f"{self.set}/{self.index}"
        hexkey = name_key(key).hex()
        hits = [s["host"] for s in r.scans if any(q["key"] == hexkey for q in s["quarantined"])]
        if not hits:
            events = sum(len(s["events"]) for s in r.scans)
            return False, (f"block {key} was not taken out of service by any of {len(r.scans)} scans "
                           f"({events} media events seen)")
        return True, f"block {key} taken out of service by the scan on {', '.join(hits)}"


@expectation("no_reserved_space", "no slot is left reserved and no client of a killed host is registered "
                                  "(its space was reclaimed)")
class NoReservedSpace(Expectation):
    def check_run(self, r: Run) -> tuple[bool, str]:
        live = r.live([r.service_host, *r.readers])
        if not live:
            return False, "no live host to read the pool's metadata from"
        res = r.driver(live[0], "stat", {})
        dead = [c for c in res.get("clients", []) if c.get("host") in r.killed]
        if res.get("reserved") or dead:
            return False, (f"{res.get('reserved')} slots still reserved; clients of killed hosts still registered: "
                           f"{[c['host'] for c in dead]}")
        return True, f"0 reserved slots, no client of a killed host left; {res.get('blocks')} committed blocks"


@expectation("evicted", "at least that many blocks of the set were evicted, none torn")
class Evicted(Expectation):
    set: str = arg(Name(), "the set")
    at_least: int = arg(Int(1), "how many blocks at least", 1)
    check = _set_target

    def check_run(self, r: Run) -> tuple[bool, str]:
        if self.set not in r.requested:
            return False, f"no put of set '{self.set}' ran"
        start, n, size = r.requested[self.set]
        readers = r.live(r.readers)
        if not readers:
            return False, f"no live reader to read set '{self.set}' from (killed: {', '.join(sorted(r.killed))})"
        host = readers[0]
        g = r.get(host, self.set, start, n, size, len(r.steps))
        ok = len(g["misses"]) >= self.at_least and not g["torn"]
        return ok, (f"{len(g['misses'])} of {n} blocks of '{self.set}' evicted (need >= {self.at_least}), "
                    f"{len(g['hits'])} still readable, {len(g['torn'])} torn")


def _program_hosts(r: Run, run: str, on) -> tuple[dict, list[str]] | str:
    """The results of program `run` on the hosts to judge: `on`, else those it ran on
    that were not killed. A string says why there is nothing to judge."""
    results = r.program_results.get(run)
    if results is None:
        return f"program '{run}' never ran or never ended"
    hosts = [h for h in (r.resolve(on) if on is not None else results) if on is not None or h not in r.killed]
    missing = [h for h in hosts if h not in results]
    if missing:
        return f"program '{run}' did not run on {', '.join(missing)} (ran on: {', '.join(results) or 'none'})"
    if not hosts:
        return f"program '{run}' left no result on a live host (killed: {', '.join(sorted(r.killed))})"
    return results, hosts


def _judge_program(r: Run, run: str, on, head: str, one) -> tuple[bool, str]:
    """`one(result) -> (ok, text)` on each host `_program_hosts` names: every host's text, after `head`."""
    got = _program_hosts(r, run, on)
    if isinstance(got, str):
        return False, got
    results, hosts = got
    verdicts = [one(results[h]) for h in hosts]
    return all(ok for ok, _ in verdicts), head + "; ".join(f"{h}: {text}" for h, (_, text) in zip(hosts, verdicts))


@expectation("exit_code", "the program exited with this code on each host (default: the hosts it ran on "
                          "that were not killed)")
class ExitCode(Expectation):
    run: str = arg(Name(), "the program's name")
    equals: int = arg(Int(0, 255), "the exit code", 0)
    on: Any = arg(Hosts(), "the hosts to judge", None)
    check = _run_target

    def check_run(self, r: Run) -> tuple[bool, str]:
        def one(p) -> tuple[bool, str]:
            if p.timed_out:
                return False, "timed out"
            if p.exit_code != self.equals:
                last = (p.stderr_tail.strip().splitlines() or [""])[-1][:200]
                return False, (f"exit {'none (host or connection lost)' if p.exit_code is None else p.exit_code}"
                               + (f" ({last})" if last else ""))
            return True, f"exit {p.exit_code}"

        return _judge_program(r, self.run, self.on, f"program '{self.run}' (want exit {self.equals}): ", one)


@expectation("output_matches", "a regular expression matches the program's stdout (or stderr) on each host")
class OutputMatches(Expectation):
    run: str = arg(Name(), "the program's name")
    regex: str = arg(Regex(), "Python regular expression, searched in the whole output")
    stream: str = arg(Choice(("stdout", "stderr")), "which output", "stdout")
    on: Any = arg(Hosts(), "the hosts to judge", None)
    check = _run_target

    def check_run(self, r: Run) -> tuple[bool, str]:
        pattern = re.compile(self.regex, re.MULTILINE)

        def one(p) -> tuple[bool, str]:
            path = Path(p.stdout_path if self.stream == "stdout" else p.stderr_path)
            text = path.read_text(errors="replace") if path.is_file() else (
                p.stdout_tail if self.stream == "stdout" else p.stderr_tail)
            m = pattern.search(text)
            if m:
                return True, f"matched {m.group(0)[:100]!r}"
            tail = text.strip().splitlines()[-1][:200] if text.strip() else "(empty)"
            return False, f"no match in {len(text)} bytes of {self.stream}, last line {tail!r}"

        return _judge_program(r, self.run, self.on, f"/{self.regex}/ in {self.stream} of '{self.run}': ", one)


@expectation("file_written", "a file exists at `path` on each host of `on`, at least `min_bytes` long")
class FileWritten(Expectation):
    path_: str = arg(Str(), "the file's path in the guest", yaml="path")
    on: Any = arg(Hosts(), "where", "survivors")
    min_bytes: int = arg(Int(0), "its size at least", 1)

    def check_run(self, r: Run) -> tuple[bool, str]:
        hosts = r.live(r.resolve(self.on))
        if not hosts:
            return False, f"no live host to look on ({self.on})"
        cmd = f"stat -c %s -- {shlex.quote(self.path_)}"
        results = map_parallel(lambda h: ssh.run(h, r.hosts[h].ssh_port, r.tb.key, cmd, timeout_s=60), hosts)
        parts, ok = [], True
        for h, res in zip(hosts, results):
            size = int(res.stdout.strip()) if res.ok and res.stdout.strip().isdigit() else None
            if size is None:
                ok = False
                parts.append(f"{h}: no such file ({res.why})")
            elif size < self.min_bytes:
                ok = False
                parts.append(f"{h}: {size} bytes, fewer than {self.min_bytes}")
            else:
                parts.append(f"{h}: {size} bytes")
        return ok, f"{self.path_}: " + "; ".join(parts)


def _sanitized(sc: Scenario) -> bool:
    return sc.store.get("coherence", "off") != "off" or any(
        s.kind == "run" and dict(s.env).get("BELUGA_COHERENCE", "off") != "off" for s in sc.steps)


@expectation("coherence_clean", "no process under the coherence sanitizer (`store: {coherence: check-collect}` "
                                "runs the store and the programs under it; docs/coherence.md) reported a missing "
                                "cache flush on the hosts of `on`; fails with the first report")
class CoherenceClean(Expectation):
    on: Any = arg(Hosts(), "whose reports", "survivors")
    WHOLE_RUN = True

    def check(self, sc, t, c) -> None:
        if not _sanitized(sc):
            c.err(self.path, "nothing runs under the coherence sanitizer: set `store: {coherence: check-collect}` "
                             "(or `check`), or BELUGA_COHERENCE in a run step's env")

    def check_run(self, r: Run) -> tuple[bool, str]:
        hosts = r.live(r.resolve(self.on))
        if not hosts:
            return False, f"no live host to read the reports on ({self.on})"
        found = map_parallel(lambda h: r.driver(h, "coherence", {"report": deploy.COHERENCE_REPORT}), hosts)
        firsts = [(rep["reports"][0], h, rep["count"]) for h, rep in zip(hosts, found) if rep["count"]]
        if not firsts:
            return True, f"no coherence report on {', '.join(hosts)}"
        first, host, _ = min(firsts, key=lambda x: x[0].get("unix_ns", 0))
        counts = ", ".join(f"{h}: {n}" for _, h, n in firsts)
        frame = first["stack"][-1].strip().splitlines()[0] if first.get("stack") else "no stack"
        return False, (f"coherence reports ({counts}); first on {host}, pid {first['pid']}: {first['kind']} at pool "
                       f"offset {first['offset']:#x} ({first['region']}), {first['what']}: {first['detail']}; "
                       f"at {frame}")


# ================================================================ the run

class Run:
    def __init__(self, sc: Scenario, tb, out_dir: Path | None = None, t0: float | None = None) -> None:
        self.sc = sc
        self.tb = tb
        self.topology = tb.topology
        self.out_dir = Path(out_dir) if out_dir is not None else Path("reports") / sc.name
        self.hosts = {h.name: h for h in tb.hosts}
        self.killed: set[str] = set()
        self.service_host = sc.service
        self.committed: dict[str, set[int]] = defaultdict(set)
        self.requested: dict[str, tuple[int, int, int]] = {}   # set -> (start, count, size)
        self.gets: list[dict] = []        # every get: host, set, hits, misses, torn, after_step
        self.scans: list[dict] = []
        self.faults_at: dict[str, int] = {}  # "set/index" -> step index of the fault that hit it
        self.background: list[threading.Thread] = []
        self.programs: dict[str, tuple[Any, StepRecord]] = {}   # background programs not joined yet
        self.program_results: dict[str, dict] = {}             # name -> {host: ProgramResult}
        self.steps: list[StepRecord] = []
        self.t0 = time.monotonic() if t0 is None else t0  # the run's clock: boot and deploy share it
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
        self.dax = {n: tb.dax(n) for n in names}

    # ------------------------------------------------------------ hosts and roles
    def resolve(self, on) -> list[str]:
        if isinstance(on, (list, tuple)):
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

    @property
    def store_env(self) -> dict[str, str]:
        """The store's environment in the guests: the coherence sanitizer when `store.coherence` asks."""
        return deploy.coherence_env(self.sc.store.get("coherence", "off"))

    def driver(self, host: str, verb: str, args: dict, timeout_s: float = 600) -> dict:
        return deploy.run_driver(self.tb, self.hosts[host], verb, {"pool": self.dax[host], **args}, timeout_s=timeout_s,
                                 env=self.store_env)

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
            if _sanitized(self.sc):  # reports of an earlier run on a reused testbed are not this run's
                deploy.run_driver(self.tb, h, "coherence", {"report": deploy.COHERENCE_REPORT, "clear": True})
        st = self.sc.store
        fmt = []
        if "segment_size_bytes" in st:
            fmt += ["--segment-size", str(st["segment_size_bytes"])]
        if "max_clients" in st:
            fmt += ["--max-clients", str(st["max_clients"])]
        svc = self.hosts[self.service_host]
        formatted = deploy.format_pool(self.tb, svc, self.dax[svc.name], fmt)
        ready = deploy.start_service(self.tb, svc, self.dax[svc.name], self.serve_options(), env=self.store_env)
        # Health: every host reaches the service through the pool and sees the same store.
        health = {n: self.driver(n, "stat", {})["service"]["running"] for n in self.live(list(self.hosts))}
        if not all(health.values()):
            raise TestbedError(f"store not healthy: service seen running on {health}")
        return {"formatted": formatted.get("geometry", formatted), "service": ready, "health": health}

    def serve_options(self) -> list[str]:
        st = self.sc.store
        return ["--heartbeat-timeout", str(st.get("heartbeat_timeout_s", 10)),
                "--lease-ttl", str(st.get("lease_ttl_s", 30))]

    # ------------------------------------------------------------ helpers of the kinds
    def get(self, host: str, set_name: str, start: int, count: int, size: int, after: int) -> dict:
        r = self.driver(host, "get", {"set": set_name, "start": start, "count": count, "size": size})
        rec = {"host": host, "set": set_name, "after_step": after, **r}
        self.gets.append(rec)
        return rec

    def block_location(self, set_name: str, index: int) -> dict:
        if set_name not in self.requested:
            raise TestbedError(f"no put of set '{set_name}' ran: block {set_name}/{index} does not exist")
        start, n, size = self.requested[set_name]
        live = self.live([self.service_host, *self.readers])
        if not live:
            raise TestbedError("no live host to locate the block from")
        loc = self.driver(live[0], "locate", {"set": set_name, "index": index, "size": size})
        where = provision.locate(self.topology, self.tb.pool_files, loc["data_offset"])
        return {"data_offset": loc["data_offset"], "length_bytes": loc["length_bytes"], "device": where.device,
                "serial": where.serial, "dpa": where.file_offset, "file": str(where.file),
                "file_offset": where.file_offset}

    def finish_program(self, name: str, results: dict, rec: StepRecord) -> None:
        """Record how program `name` ended on each host, in its step's record."""
        self.program_results[name] = results
        rec.details["results"] = {
            h: {"exit_code": p.exit_code, "timed_out": p.timed_out, "stdout": str(p.stdout_path),
                "stderr": str(p.stderr_path), "stdout_tail": p.stdout_tail[-1000:], "stderr_tail": p.stderr_tail[-1000:]}
            for h, p in results.items()}
        lost = [h for h, p in results.items() if p.timed_out or (p.exit_code is None and h not in self.killed)]
        if lost:
            raise TestbedError(f"program '{name}' timed out or lost its host on {', '.join(lost)}")

    def join(self, name: str | None, timeout_s: float, rec: StepRecord) -> None:
        """Wait for background program `name`, or for every background put and program."""
        failures = []
        names = [name] if name is not None else list(self.programs)
        for n in names:
            handle, started = self.programs.pop(n)
            try:
                self.finish_program(n, handle.join(timeout_s), started)
                started.outcome = "ok"
            except TestbedError as e:
                started.fail(e)
                failures.append(str(e))
            started.end_s = self.now()  # the timeline shows a background program until it was joined
            rec.details.setdefault("joined", []).append(n)
        if name is None:
            late = []
            deadline = time.monotonic() + timeout_s
            for t in self.background:
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    late.append(t.name)
            self.background.clear()
            if late:
                failures.append(f"background work still running after {timeout_s:g} s: {', '.join(late)}")
        if failures:
            raise TestbedError("; ".join(failures))

    # ------------------------------------------------------------ steps
    def play(self) -> None:
        """Every step, in order. A step that fails (a crash included) is recorded and the
        next one runs; an interruption is recorded on the step it hit and ends the run."""
        for i, st in enumerate(self.sc.steps):
            rec = StepRecord(i, st.name, st.kind, st.line, start_s=self.now())
            self.steps.append(rec)
            info(f"• step {i + 1}/{len(self.sc.steps)}: {st.name}")
            try:
                st.run(self, rec)
                if rec.outcome == "pending":
                    rec.outcome = "ok"
            except BaseException as e:
                rec.fail(e)
                if not isinstance(e, Exception):
                    raise
            finally:
                rec.end_s = max(rec.end_s, self.now())
                mark = {"ok": "✓", "running": "…", "failed": "✗"}.get(rec.outcome, "?")
                info(f"{mark} step {i + 1}: {st.name} ({rec.end_s - rec.start_s:.1f} s)"
                     + (f": {rec.error}" if rec.error else ""))
        final = StepRecord(-1, "join", "join", 0)
        try:
            self.join(None, BACKGROUND_JOIN_S, final)
        except TestbedError as e:
            final.fail(e)
        for rec in self.steps:
            if rec.outcome == "running":
                rec.outcome = "failed" if final.error else "ok"
                rec.error = final.error
                if rec.kind == "put":
                    rec.details["committed"] = {s: len(v) for s, v in self.committed.items()}

    def not_run(self) -> list[StepRecord]:
        """Records for the steps the run never reached (after an interruption or a crash
        before the first step), so the report shows them and the run cannot pass."""
        return [StepRecord(i, s.name, s.kind, s.line, outcome="not run")
                for i, s in enumerate(self.sc.steps) if i >= len(self.steps)]

    # ------------------------------------------------------------ expectations
    def check(self) -> list[dict]:
        """Every expectation's result, in the scenario's order; those that judge the whole
        run (no_torn_reads) are checked last, so the reads other checks make count."""
        order = sorted(range(len(self.sc.expect)), key=lambda i: self.sc.expect[i].WHOLE_RUN)
        results: dict[int, dict] = {}
        for i in order:
            e = self.sc.expect[i]
            tb = None
            try:
                passed, evidence = e.check_run(self)
            except TestbedError as err:
                passed, evidence = False, f"could not be checked: {err}"
            except Exception as err:  # noqa: BLE001 - a crash in a check is a failed check, with its traceback
                passed, evidence = False, f"could not be checked: {type(err).__name__}: {err}"
                tb = "".join(traceback.format_exception(err))
            results[i] = {"kind": e.kind, "args": e.args(), "line": e.line, "passed": passed, "evidence": evidence,
                          "traceback": tb}
            info(f"{'✓' if passed else '✗'} expect {e.kind} {e.args()}: {evidence}")
        return [results[i] for i in range(len(self.sc.expect))]


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


def step_log(report: dict) -> str:
    """One line per step (the JUnit system-out, and what a CI log shows)."""
    lines = []
    for s in report["steps"]:
        lines.append(f"step {s['index'] + 1} [{s['outcome']}] {s['name']} (line {s['line']}, "
                     f"{s['start_s']:.1f}-{s['end_s']:.1f} s)" + (f": {s['error']}" if s.get("error") else ""))
        if s.get("traceback"):
            lines.append(s["traceback"].rstrip())
    if report.get("error"):
        lines.append(f"run error: {report['error']}")
    return "\n".join(lines) + "\n"


# What XML 1.0 cannot hold at all, not even as &#..;: a program's colored or binary
# stderr in an expectation's evidence made junit.xml "not well-formed (invalid token)".
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_safe(s: str | None) -> str | None:
    """`s` with every character XML cannot hold written as a visible escape (\\x1b)."""
    if s is None:
        return None
    return _NOT_XML.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 256 else f"\\u{ord(m[0]):04x}", s)


def write_junit(report: dict, sc: Scenario | None, dest: Path) -> Path:
    """JUnit XML: one test case per expectation (a failure carries the evidence), plus one
    for the steps when a step failed or the run ended early; the step log as system-out.
    An expectation the run never reached is an error, so the XML fails exactly when the
    run did."""
    from xml.etree import ElementTree as ET
    name = report["scenario"]
    suite = ET.Element("testsuite", name=name, timestamp=report.get("started_at", ""),
                       time=f"{report.get('duration_s', 0):.1f}")
    props = ET.SubElement(suite, "properties")
    for k in ("topology", "testbed", "source"):
        ET.SubElement(props, "property", name=k, value=str(report.get(k, "")))
    cases = []
    checked = report["expectations"]
    for e in checked:
        c = ET.Element("testcase", classname=f"scenario.{name}", name=_case_name(e["kind"], e["args"], e["line"]),
                       time="0")
        if not e["passed"]:
            f = ET.SubElement(c, "failure", message=e["evidence"][:1000], type=e["kind"])
            f.text = e["evidence"] + ("\n\n" + e["traceback"] if e.get("traceback") else "")
        cases.append(c)
    for e in (sc.expect[len(checked):] if sc is not None else ()):
        c = ET.Element("testcase", classname=f"scenario.{name}", name=_case_name(e.kind, e.args(), e.line), time="0")
        ET.SubElement(c, "error", message="not checked: the run ended before the expectations",
                      type="not-checked").text = report.get("error") or "the run ended early"
        cases.append(c)
    bad = [s for s in report["steps"] if s["outcome"] != "ok"]
    if bad or report.get("error"):
        c = ET.Element("testcase", classname=f"scenario.{name}", name="steps", time=f"{report.get('duration_s', 0):.1f}")
        msg = report.get("error") or f"{len(bad)} step(s) did not end ok"
        ET.SubElement(c, "error" if report.get("error") else "failure", message=msg[:1000], type="steps").text = \
            "\n".join(f"step {s['index'] + 1} [{s['outcome']}] {s['name']}: {s.get('error') or ''}" for s in bad) \
            + (f"\n{report['traceback']}" if report.get("traceback") else "")
        cases.append(c)
    suite.extend(cases)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(1 for c in cases if c.find("failure") is not None)))
    suite.set("errors", str(sum(1 for c in cases if c.find("error") is not None)))
    suite.set("skipped", "0")
    ET.SubElement(suite, "system-out").text = step_log(report)
    root = ET.Element("testsuites", name="beluga-testbed")
    root.append(suite)
    for k in ("tests", "failures", "errors"):
        root.set(k, suite.get(k))
    for el in root.iter():
        el.text = _xml_safe(el.text)
        for k, v in el.attrib.items():
            el.set(k, _xml_safe(v))
    ET.indent(root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n")
    return dest


def _case_name(kind: str, args: dict, line: int) -> str:
    return f"{kind} {json.dumps(args, sort_keys=True)} (line {line})"


def write_report(report: dict, dest: Path, sc: Scenario | None = None) -> tuple[Path, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    j = dest / "report.json"
    j.write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_junit(report, sc, dest / "junit.xml")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, extensions=["jinja2.ext.do"])
    h = dest / "report.html"
    env.filters["cell"] = _cell
    bars = [{"name": p["name"], "kind": "phase", "start_s": p["start_s"], "end_s": p["end_s"] or p["start_s"],
             "outcome": p["outcome"], "n": ""} for p in report.get("phases", [])]
    bars += [{"name": s["name"], "kind": s["kind"], "start_s": s["start_s"], "end_s": s["end_s"],
              "outcome": s["outcome"], "n": f"{s['index'] + 1}."} for s in report["steps"] if s["outcome"] != "not run"]
    bars.sort(key=lambda b: (b["start_s"], b["end_s"]))  # a 0 s join before the checks that start with it
    total = max([b["end_s"] for b in bars] + [report.get("duration_s") or 0, 0.001])
    h.write_text(env.get_template("report.html.j2").render(r=report, total=total, bars=bars))
    return j, h


def _cell(v: Any) -> str:
    """A scalar or a list of scalars as text for a table cell (mappings become nested tables)."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 20:
        return f"{v} ({v:#x})"
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x) for x in v) or "(none)"
    if v is None:
        return "-"
    return str(v)


def run(sc: Scenario, *, topology: str | None = None, testbed: str | None = None, keep: bool = False,
        report_dir: Path | None = None, kernel: UserKernel | None = None) -> tuple[dict, Path]:
    """`kernel`: `run --kernel/--initrd/--modules/--qemu`, over the scenario's `kernel:`
    fields, which are over the topology's (each field on its own)."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if kernel:
        # Each path, named by its option, before anything else; whether modules come with
        # a kernel is judged with the scenario's and the topology's fields, by `up`.
        kernel_mod.check(kernel, whole=False)
    uk = (kernel or UserKernel()).over(sc.kernel)
    topo = topology or S.own_topology(sc)
    name = testbed or f"scn-{sc.name}"
    report_dir = report_dir or Path("reports") / f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    own = testbed is None
    t0 = time.monotonic()
    report: dict = {"scenario": sc.name, "description": sc.description, "source": sc.source, "topology": topo,
                    "testbed": name, "started_at": started, "steps": [], "expectations": [], "deploy": None,
                    "error": None, "phases": []}

    @contextlib.contextmanager
    def phase(what: str):
        """Boot, deploy and the checks on the report's timeline, on the steps' clock."""
        p = {"name": what, "start_s": round(time.monotonic() - t0, 2), "end_s": None, "outcome": "failed"}
        report["phases"].append(p)
        try:
            yield
            p["outcome"] = "ok"
        finally:
            p["end_s"] = round(time.monotonic() - t0, 2)

    # Every mistake the scenario file can hold, against the topology, before a VM boots.
    if own:
        S.check(sc, S.topology_of(sc, topology))
    else:
        S.check(sc, lifecycle.find(name).topology)
    try:  # now, not after the run: the report is what the run is for
        report_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "not a folder" if report_dir.exists() and not report_dir.is_dir() else (e.strerror or str(e)).lower()
        raise TestbedError(f"report folder {report_dir}: {why}",
                           hint="--report-dir names a folder to write (made if missing)") from None
    r = None
    interrupted: BaseException | None = None
    try:
        with phase(f"boot {topo}" if own else f"testbed {name} (already up)"):
            shares = sc.share_list()
            if own:
                tb = lifecycle.up(topo, name=name, **({"shares": shares} if shares else {}),
                                  **{f: getattr(uk, f) for f in kernel_mod.FIELDS if getattr(uk, f) is not None})
            else:
                tb = lifecycle.find(name)
                _check_shares(tb, shares, sc)
                _check_kernel(tb, uk, sc)
        if not own:
            # A running testbed is brought back to the state right after `up` (what an
            # earlier run or test left: processes, poison, trace, pool bytes), in seconds
            # instead of a new boot. What cannot be undone fails the run before it starts.
            with phase(f"reset {name}"):
                rep = reset_mod.reset(tb)
                report["reset"] = rep.to_dict()
                if not rep.complete:
                    raise TestbedError(f"testbed '{name}' could not be reset: {'; '.join(rep.not_undone)}",
                                       hint=f"beluga-testbed down {name}, then run the scenario without --testbed")
        r = Run(sc, tb, report_dir, t0=t0)
        report["roles"] = {"service": sc.service, "writers": list(sc.writers), "readers": r.readers}
        info(f"• deploy the store: service on {sc.service}, writers {', '.join(sc.writers)}, "
             f"readers {', '.join(r.readers)}")
        with phase("deploy the store"):
            report["deploy"] = r.deploy()
        r.play()
        with phase("check the expectations"):
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
            j, h = write_report(report, report_dir, sc)
        finally:
            if own and not keep:
                lifecycle.down(name)
    if interrupted is not None:
        raise interrupted
    return report, h


def _check_shares(tb, wanted: list, sc: Scenario) -> None:
    """A scenario run on a running testbed (`--testbed`) needs the folders it shares."""
    if not wanted:
        return
    from .. import shares as shares_mod
    if lack := shares_mod.missing(tb, wanted):
        raise TestbedError(f"{sc.source}: testbed '{tb.name}' does not share " +
                           ", ".join(s.spec for s in lack),
                           hint="bring it up with " + " ".join(f"--share {s.spec}" for s in lack) +
                           ", or run without --testbed")


def _check_kernel(tb, wanted: UserKernel, sc: Scenario) -> None:
    """A scenario run on a running testbed (`--testbed`) needs the kernel and QEMU it names."""
    if wanted and (diff := kernel_mod.differences(tb.kernel.to_json() if tb.kernel else None, wanted)):
        raise TestbedError(f"{sc.source}: testbed '{tb.name}' runs another kernel or QEMU than the run asks for: "
                           + "; ".join(diff),
                           hint="run without --testbed (a testbed of its own boots what it asks for), or "
                                f"bring '{tb.name}' up with those --kernel/--initrd/--modules/--qemu")


def passed(report: dict, sc: Scenario) -> bool:
    """True only when the run got through: no error, every step of the scenario ran and
    ended ok, and every expectation was checked and held."""
    steps, expects = report["steps"], report["expectations"]
    return (report["error"] is None
            and len(steps) == len(sc.steps) and all(s["outcome"] == "ok" for s in steps)
            and len(expects) == len(sc.expect) and all(e["passed"] for e in expects))
