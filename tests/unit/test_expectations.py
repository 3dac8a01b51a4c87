"""Every scenario expectation, holding and failing, on constructed evidence: the record of
a run (puts acknowledged, reads, scans, program results) plus the fake guests' answers to
the fresh reads an expectation makes. An expectation that always passes fails here."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from beluga.keys import name_key
from testbed import scenario
from testbed.scenario import runner

TEXT = """\
apiVersion: beluga.testbed/v1alpha1
kind: Scenario
name: ev
topology: 4hosts-1switch
roles:
  service: host0
  writers: [host1]
steps:
  - put: {on: writers, set: a, blocks: 8}
  - fault: {poison: {set: a, index: 5}}
  - run: {name: prog, on: all, argv: [./prog], background: true}
  - fault: {kill_host: host3}
  - join: {name: prog}
expect:
"""


@pytest.fixture
def run(guests):
    fake = guests.use("4hosts-1switch")

    def make(expect: str):
        sc = scenario.parse(TEXT + f"  - {expect}\n", "ev.yaml")
        r = runner.Run(sc, fake.tb, fake.tmp / "out")
        r.fake = fake
        return r, sc.expect[0]
    return make


def put(r, n=8):
    r.requested["a"] = (0, n, 65536)
    r.committed["a"] = set(range(n))
    for i in range(n):
        r.fake.slot(f"a/{i}", 65536)


def read(r, host, hits, misses=(), torn=(), after=0):
    r.gets.append({"host": host, "set": "a", "after_step": after, "hits": list(hits), "misses": list(misses),
                   "torn": list(torn), "corrupt_misses": 0})


# ---------------------------------------------------------------- the store's expectations

def test_all_readable(run):
    r, e = run("all_readable: {set: a}")
    assert e.check_run(r) == (False, "no put of set 'a' ran")
    put(r)
    ok, ev = e.check_run(r)
    assert ok and ev == "all 8 acknowledged blocks of 'a' read with the right bytes on host0, host1, host2, host3"
    del r.fake.blocks["a/6"]
    r.fake.torn.add("a/2")
    ok, ev = e.check_run(r)
    assert not ok
    assert ev.startswith("8 acknowledged blocks of set 'a': host0: 2 of 8 blocks not readable (indices 2,6); "
                         "host0: blocks 2 returned with wrong bytes")


def test_all_readable_include_uncommitted_and_killed_hosts(run):
    r, e = run("all_readable: {set: a, include_uncommitted: true}")
    put(r, 4)
    r.requested["a"] = (0, 6, 65536)  # 6 requested, 4 acknowledged (a writer crashed)
    r.killed.add("host3")
    ok, ev = e.check_run(r)
    assert not ok and "6 requested blocks of set 'a': host0: 2 of 6 blocks not readable (indices 4-5)" in ev
    assert ev.endswith("killed hosts: host3")
    assert "host3" not in ev.split(";")[0]  # a killed host is not read


def test_no_torn_reads(run):
    r, e = run("no_torn_reads: {}")
    assert e.check_run(r) == (False, "no read ran: nothing shows that reads are not torn")
    read(r, "host2", range(8))
    assert e.check_run(r) == (True, "8 block reads in 1 gets, none torn (0 damaged blocks detected and reported "
                                    "as misses)")
    r.gets.append({"host": "host1", "set": "a", "after_step": 0, "hits": [0, 1], "misses": [2, 3, 4],
                   "torn": [], "corrupt_misses": 2})
    assert e.check_run(r) == (True, "13 block reads in 2 gets, none torn (2 damaged blocks detected and reported "
                                    "as misses)")
    read(r, "host3", range(7), torn=[7])
    assert e.check_run(r) == (False, "torn or corrupted blocks returned as valid: host3 set a indices 7")


def test_never_returned_needs_a_fault_on_that_very_block():
    from testbed.topology import load
    topo = load("4hosts-1switch")

    def errors(fault: str) -> list[str]:
        text = TEXT.replace("  - fault: {poison: {set: a, index: 5}}\n", fault) + "  - never_returned: {set: a, index: 5}\n"
        try:
            scenario.check(scenario.parse(text, "ev.yaml"), topo)
        except scenario.ScenarioError as e:
            return e.errors
        return []
    assert errors("  - fault: {poison: {set: a, index: 5}}\n") == []
    assert errors("  - fault: {bitflip: {set: a, index: 5}}\n") == []
    missing = ["ev.yaml:15: expect[0].never_returned: no fault step hits block a/5 (poison, media_event or bitflip)"]
    assert errors("  - fault: {poison: {set: a, index: 4}}\n") == missing
    assert errors("  - put: {on: writers, set: b, blocks: 8}\n  - fault: {poison: {set: b, index: 5}}\n") == [
        missing[0].replace("ev.yaml:15", "ev.yaml:16")]
    assert errors("") == [missing[0].replace("ev.yaml:15", "ev.yaml:14")]


def test_never_returned(run):
    r, e = run("never_returned: {set: a, index: 5}")
    put(r)
    assert e.check_run(r) == (False, "no fault step hit block a/5")
    r.faults_at["a/5"] = 1
    read(r, "host2", range(8), after=0)        # before the fault: fine
    read(r, "host2", [0, 1, 2, 3, 4, 6, 7], misses=[5], after=2)
    del r.fake.blocks["a/5"]
    ok, ev = e.check_run(r)
    assert ok and ev == ("block a/5 never returned after the fault (step 2): 1 reads of its set after it, "
                         "4 fresh reads at the end, all misses")
    read(r, "host3", range(8), after=3)        # a later read returned it
    ok, ev = e.check_run(r)
    assert not ok and ev == "block a/5 was returned as valid after the fault on host3"


def test_never_returned_fresh_read_still_returns_it(run):
    r, e = run("never_returned: {set: a, index: 5}")
    put(r)
    r.faults_at["a/5"] = 1
    ok, ev = e.check_run(r)  # no read after the fault, but the store still serves the block
    assert not ok and ev == "block a/5 was returned as valid after the fault on host0, host1, host2, host3"


def test_guest_saw(run):
    r, e = run("guest_saw: {event: cxl_poison, on: service}")
    assert e.check_run(r) == (False, "no cxl_poison trace event on host0")
    r.fake.trace["host0"].append("kworker [000] 1.0: cxl_general_media: dpa=0x40")
    assert not e.check_run(r)[0]  # another event is not this one
    r.fake.trace["host0"].append("kworker [000] 2.0: cxl_poison: dpa=0x40")
    assert e.check_run(r) == (True, "cxl_poison traced on host0, e.g. kworker [000] 2.0: cxl_poison: dpa=0x40")


def test_quarantined(run):
    r, e = run("quarantined: {set: a, index: 5}")
    r.scans.append({"host": "host0", "events": [{}], "quarantined": [{"key": name_key("a/4").hex()}]})
    assert e.check_run(r) == (False, "block a/5 was not taken out of service by any of 1 scans (1 media events seen)")
    r.scans.append({"host": "host2", "events": [], "quarantined": [{"key": name_key("a/5").hex()}]})
    assert e.check_run(r) == (True, "block a/5 taken out of service by the scan on host2")


def test_no_reserved_space(run):
    r, e = run("no_reserved_space: {}")
    put(r)
    r.fake.service_on = "host0"
    assert e.check_run(r) == (True, "0 reserved slots, no client of a killed host left; 8 committed blocks")
    r.killed.add("host1")
    r.fake.clients = [{"host": "host1"}, {"host": "host2"}]
    assert e.check_run(r) == (False, "0 slots still reserved; clients of killed hosts still registered: ['host1']")
    r.fake.clients, r.fake.reserved = [], 3
    assert e.check_run(r) == (False, "3 slots still reserved; clients of killed hosts still registered: []")


def test_evicted(run):
    r, e = run("evicted: {set: a, at_least: 2}")
    assert e.check_run(r) == (False, "no put of set 'a' ran")
    put(r)
    assert e.check_run(r) == (False, "0 of 8 blocks of 'a' evicted (need >= 2), 8 still readable, 0 torn")
    del r.fake.blocks["a/0"], r.fake.blocks["a/1"]
    assert e.check_run(r) == (True, "2 of 8 blocks of 'a' evicted (need >= 2), 6 still readable, 0 torn")
    r.fake.torn.add("a/3")
    assert e.check_run(r)[0] is False
    r.killed.update(r.readers)  # it was "could not be checked: IndexError: list index out of range"
    assert e.check_run(r) == (False, "no live reader to read set 'a' from (killed: host2, host3)")


# ---------------------------------------------------------------- programs

def result(tmp: Path, host: str, code, out="", err="", timed_out=False):
    (tmp / f"{host}.stdout").write_text(out)
    (tmp / f"{host}.stderr").write_text(err)
    return SimpleNamespace(host=host, exit_code=code, stdout_path=tmp / f"{host}.stdout",
                           stderr_path=tmp / f"{host}.stderr", stdout_tail=out[-4096:], stderr_tail=err[-4096:],
                           timed_out=timed_out)


def test_exit_code(run, tmp_path):
    r, e = run("exit_code: {run: prog}")
    assert e.check_run(r) == (False, "program 'prog' never ran or never ended")
    r.killed.add("host3")
    r.program_results["prog"] = {h: result(tmp_path, h, 0) for h in ("host0", "host1", "host2")}
    r.program_results["prog"]["host3"] = result(tmp_path, "host3", None)  # killed under it: not judged
    assert e.check_run(r) == (True, "program 'prog' (want exit 0): host0: exit 0; host1: exit 0; host2: exit 0")
    r.program_results["prog"]["host1"] = result(tmp_path, "host1", 3, err="reading\nbad record 7\n")
    r.program_results["prog"]["host2"] = result(tmp_path, "host2", None, timed_out=True)
    assert e.check_run(r) == (False, "program 'prog' (want exit 0): host0: exit 0; host1: exit 3 (bad record 7); "
                                     "host2: timed out")


def test_exit_code_on_named_hosts(run, tmp_path):
    r, e = run("exit_code: {run: prog, equals: 3, on: [host1, host3]}")
    r.program_results["prog"] = {"host1": result(tmp_path, "host1", 3)}
    assert e.check_run(r) == (False, "program 'prog' did not run on host3 (ran on: host1)")
    r.program_results["prog"]["host3"] = result(tmp_path, "host3", 3)
    assert e.check_run(r) == (True, "program 'prog' (want exit 3): host1: exit 3; host3: exit 3")


def test_output_matches_reads_the_whole_output(run, tmp_path):
    r, e = run(r"output_matches: {run: prog, regex: '^verified \d+ records$', on: host0}")
    long = "x\n" * 10000 + "verified 42 records\n" + "y\n" * 10000  # far outside the tail
    r.program_results["prog"] = {"host0": result(tmp_path, "host0", 0, out=long)}
    assert e.check_run(r) == (True, r"/^verified \d+ records$/ in stdout of 'prog': host0: matched "
                                    "'verified 42 records'")
    r.program_results["prog"] = {"host0": result(tmp_path, "host0", 0, out="verified some records\n")}
    assert e.check_run(r) == (False, r"/^verified \d+ records$/ in stdout of 'prog': host0: no match in 22 bytes "
                                     "of stdout, last line 'verified some records'")


def test_output_matches_stderr(run, tmp_path):
    r, e = run("output_matches: {run: prog, regex: 'warn', stream: stderr, on: host0}")
    r.program_results["prog"] = {"host0": result(tmp_path, "host0", 0, out="warn", err="")}
    assert e.check_run(r)[0] is False
    r.program_results["prog"] = {"host0": result(tmp_path, "host0", 0, out="", err="a warning")}
    assert e.check_run(r)[0] is True


def test_file_written(run, monkeypatch):
    r, e = run("file_written: {path: \"/tmp/out file; touch x\", on: [host0, host2], min_bytes: 10}")
    sizes = {"host0": "12\n", "host2": None}

    def answer(host, command, out_stream=None, real=r.fake.answer):
        assert command == "stat -c %s -- '/tmp/out file; touch x'"  # one quoted word
        if sizes[host] is None:
            from tests.unit.conftest import _GuestExit
            raise _GuestExit("stat: cannot statx '/tmp/out file; touch x': No such file or directory")
        return 0, sizes[host], ""
    monkeypatch.setattr(r.fake, "answer", answer)
    assert e.check_run(r) == (False, "/tmp/out file; touch x: host0: 12 bytes; host2: no such file (stat: cannot "
                                     "statx '/tmp/out file; touch x': No such file or directory)")
    sizes["host2"] = "4\n"
    assert e.check_run(r) == (False, "/tmp/out file; touch x: host0: 12 bytes; host2: 4 bytes, fewer than 10")
    sizes["host2"] = "10\n"
    assert e.check_run(r) == (True, "/tmp/out file; touch x: host0: 12 bytes; host2: 10 bytes")


# ---------------------------------------------------------------- what the first run's mutants showed

def test_no_reserved_space_reads_the_metadata_on_a_live_host(run):
    r, e = run("no_reserved_space: {}")
    put(r)
    r.killed.update({"host0", "host2"})  # the service host and one reader: host3 is the only one left
    assert e.check_run(r) == (True, "0 reserved slots, no client of a killed host left; 8 committed blocks")
    assert [h for h, c in r.fake.commands if "guest_store.py stat" in c] == ["host3"]
    r.killed.add("host3")
    assert e.check_run(r) == (False, "no live host to read the pool's metadata from")


def test_evicted_reads_on_the_one_live_reader(run):
    r, e = run("evicted: {set: a}")
    put(r)
    del r.fake.blocks["a/7"]
    r.killed.add("host2")
    assert e.check_run(r) == (True, "1 of 8 blocks of 'a' evicted (need >= 1), 7 still readable, 0 torn")
    assert [h for h, c in r.fake.commands if "guest_store.py get" in c] == ["host3"]


def test_guest_saw_quotes_at_most_200_characters_and_needs_a_live_host(run):
    r, e = run("guest_saw: {event: cxl_poison, on: [host1, host2]}")
    line = "kworker [000] 2.0: cxl_poison: " + "x" * 300
    r.fake.trace["host1"].append(line)
    r.fake.trace["host2"].append(line)
    assert e.check_run(r) == (True, f"cxl_poison traced on host1, host2, e.g. {line[:200]}")
    r, e = run("guest_saw: {event: cxl_poison, on: service}")
    r.killed.add("host0")
    assert e.check_run(r) == (False, "no live host to look on (service)")


def test_exit_code_of_a_lost_host_and_of_a_silent_failure(run, tmp_path):
    r, e = run("exit_code: {run: prog, on: [host0, host1, host2]}")
    r.program_results["prog"] = {
        "host0": result(tmp_path, "host0", None),                    # connection lost, host not killed
        "host1": result(tmp_path, "host1", 1),                       # failed without a word
        "host2": result(tmp_path, "host2", 2, err="first\n" + "e" * 300 + "\n")}
    assert e.check_run(r) == (False, "program 'prog' (want exit 0): host0: exit none (host or connection lost); "
                                     f"host1: exit 1; host2: exit 2 ({'e' * 200})")


def test_a_program_with_no_result_to_judge(run):
    r, e = run("exit_code: {run: prog}")
    r.program_results["prog"] = {"host3": None}
    r.killed.add("host3")
    assert e.check_run(r) == (False, "program 'prog' left no result on a live host (killed: host3)")
    r, e = run("exit_code: {run: prog, on: host1}")
    r.program_results["prog"] = {}
    assert e.check_run(r) == (False, "program 'prog' did not run on host1 (ran on: none)")


def test_output_matches_falls_back_to_the_tail_and_shortens_what_it_quotes(run, tmp_path):
    r, e = run("output_matches: {run: prog, regex: 'ok+', stream: stderr, on: host0}")
    p = result(tmp_path, "host0", 0, out="ok", err="o" + "k" * 150)
    p.stdout_path.unlink()
    p.stderr_path.unlink()                     # the copied output is gone: the tail kept in memory is read
    r.program_results["prog"] = {"host0": p}
    assert e.check_run(r) == (True, f"/ok+/ in stderr of 'prog': host0: matched {('o' + 'k' * 99)!r}")
    r, e = run("output_matches: {run: prog, regex: 'ok', on: host0}")
    r.program_results["prog"] = {"host0": result(tmp_path, "host0", 0, out="", err="ok")}
    assert e.check_run(r) == (False, "/ok/ in stdout of 'prog': host0: no match in 0 bytes of stdout, "
                                     "last line '(empty)'")
    r.program_results["prog"] = {"host0": result(tmp_path, "host0", 0, out="first\n" + "n" * 300 + "\n")}
    assert e.check_run(r) == (False, f"/ok/ in stdout of 'prog': host0: no match in 307 bytes of stdout, "
                                     f"last line {'n' * 200!r}")


def test_file_written_needs_a_live_host(run):
    r, e = run("file_written: {path: /tmp/x, on: host3}")
    r.killed.add("host3")
    assert e.check_run(r) == (False, "no live host to look on (host3)")


def test_output_matches_of_a_program_that_never_ran(run):
    r, e = run("output_matches: {run: prog, regex: '.*'}")
    assert e.check_run(r) == (False, "program 'prog' never ran or never ended")


# ---------------------------------------------------------------- the coherence sanitizer

COHERENT = TEXT.replace("steps:\n", "store: {coherence: check-collect}\nsteps:\n")


def coherence_report(kind: str, offset: int, unix_ns: int, pid: int = 77) -> dict:
    return {"kind": kind, "offset": offset, "region": "host slot 1: response buffer +0", "what": "rpc response",
            "detail": "this host's cached copy is stale", "lines": 1, "pool": "/dev/dax0.0", "pid": pid,
            "host": "guest", "unix_ns": unix_ns,
            "stack": ['  File "/opt/beluga/beluga/client.py", line 9, in call\n    resp = read()\n']}


def test_coherence_clean_fails_with_the_first_report_of_any_host(guests):
    fake = guests.use("4hosts-1switch")
    sc = scenario.parse(COHERENT + "  - coherence_clean: {}\n", "ev.yaml")
    r, e = runner.Run(sc, fake.tb, fake.tmp / "out"), sc.expect[0]
    assert e.check_run(r) == (True, "no coherence report on host0, host1, host2, host3")
    fake.coherence["host2"] = [coherence_report("stale-read", 0x12340, 20), coherence_report("lost-write", 64, 30)]
    fake.coherence["host1"] = [coherence_report("not-written-back", 0x2000, 10, pid=5)]
    ok, why = e.check_run(r)
    assert not ok
    assert why == ("coherence reports (host1: 1, host2: 2); first on host1, pid 5: not-written-back at pool offset "
                   "0x2000 (host slot 1: response buffer +0), rpc response: this host's cached copy is stale; "
                   "at File \"/opt/beluga/beluga/client.py\", line 9, in call")
    r.killed.add("host1")  # its guest is gone, and its report file with it
    assert e.check_run(r)[1].startswith("coherence reports (host2: 2); first on host2, pid 77: stale-read at pool "
                                        "offset 0x12340")


def test_coherence_clean_needs_something_under_the_sanitizer():
    from testbed.topology import load as load_topology

    sc = scenario.parse(TEXT + "  - coherence_clean: {}\n", "ev.yaml")
    with pytest.raises(scenario.ScenarioError) as err:
        scenario.check(sc, load_topology("4hosts-1switch"))
    assert any("nothing runs under the coherence sanitizer: set `store: {coherence: check-collect}`" in m
               for m in err.value.errors), err.value.errors
    by_env = TEXT.replace("argv: [./prog], background: true}",
                          "argv: [./prog], background: true, env: {BELUGA_COHERENCE: check}}")
    scenario.check(scenario.parse(by_env + "  - coherence_clean: {}\n", "ev.yaml"), load_topology("4hosts-1switch"))
    with pytest.raises(scenario.ScenarioError) as err:
        scenario.parse(TEXT.replace("steps:\n", "store: {coherence: chekc}\nsteps:\n") + "  - no_torn_reads: {}\n",
                       "ev.yaml")
    assert "unknown value 'chekc' (did you mean 'check'? known: off, check, check-collect)" in "\n".join(
        err.value.errors)


def test_a_sanitized_store_runs_the_service_drivers_and_programs_under_it(guests, tmp_path, monkeypatch):
    fake = guests.use("4hosts-1switch")
    fake.coherence["host3"] = [coherence_report("stale-read", 64, 1)]  # left from an earlier run
    sc = scenario.parse(COHERENT + "  - coherence_clean: {}\n", "ev.yaml")
    r = runner.Run(sc, fake.tb, fake.tmp / "out")
    r.deploy()
    assert "host3" not in fake.coherence, "deploy clears the reports of an earlier run"
    want = ("BELUGA_COHERENCE=check-collect BELUGA_COHERENCE_REPORT=/run/beluga/coherence.jsonl "
            "BELUGA_COHERENCE_SCOPE=metadata PYTHONPATH=")
    serve = [c for _, c in fake.commands if "beluga.cli serve" in c and not c.startswith("pkill")]
    stat = [c for _, c in fake.commands if "guest_store.py stat" in c]
    assert serve and want in serve[0] and stat and all(want in c for c in stat)
    seen = {}
    monkeypatch.setattr(runner, "start_program",
                        lambda tb, hosts, argv, shell, env, *a: seen.update(env) or SimpleNamespace(join=lambda *_: {}))
    sc.steps[2].run(r, runner.StepRecord(index=2, name="prog", kind="run", line=1))
    assert seen == {"BELUGA_COHERENCE": "check-collect", "BELUGA_COHERENCE_REPORT": "/run/beluga/coherence.jsonl",
                    "BELUGA_COHERENCE_SCOPE": "metadata"}
    plain = runner.Run(scenario.parse(TEXT + "  - no_torn_reads: {}\n", "ev.yaml"), fake.tb, fake.tmp / "out2")
    assert plain.store_env == {}
