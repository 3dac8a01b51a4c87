"""Every built-in scenario played by the real runner against guests faked at SSH and QMP
(conftest.py): it passes when the store behaves, and the report says why when it does not.
Sleeps (wait steps, hangs) are skipped: nothing here waits on a clock."""
import json
import time
from types import SimpleNamespace

import pytest

from testbed import faults, lifecycle, scenario
from testbed.scenario import runner

NO_SLEEP = SimpleNamespace(sleep=lambda s: None, monotonic=time.monotonic, strftime=time.strftime)


@pytest.fixture
def bed(guests, monkeypatch):
    fake = guests.use("4hosts-1switch")
    fake.start_qemus()
    calls = []
    monkeypatch.setattr(lifecycle, "up", lambda topo, name=None, **kw: calls.append(("up", topo)) or fake.tb)
    monkeypatch.setattr(lifecycle, "down", lambda name: calls.append(("down", name)) or True)
    monkeypatch.setattr(lifecycle, "export_logs", lambda name, dest: dest)
    monkeypatch.setattr(runner, "time", NO_SLEEP)
    monkeypatch.setattr(faults, "time", NO_SLEEP)
    fake.calls = calls
    return fake


def play(name, tmp_path):
    report, html = runner.run(scenario.load(name), report_dir=tmp_path / "r")
    assert json.loads((tmp_path / "r" / "report.json").read_text())["passed"] is report["passed"]
    return report


# The store's scenarios; those that run a user's program (examples/) need real guests.
STORE_SCENARIOS = sorted(n for n in scenario.builtin()
                         if not any(s.kind == "run" for s in scenario.load(n).steps) and not scenario.load(n).shares)


@pytest.mark.parametrize("name", STORE_SCENARIOS)
def test_builtin_scenario_passes_when_the_store_behaves(bed, tmp_path, name):
    report = play(name, tmp_path)
    failed = [(e["kind"], e["evidence"]) for e in report["expectations"] if not e["passed"]]
    bad_steps = [(s["name"], s["error"]) for s in report["steps"] if s["outcome"] != "ok"]
    assert report["passed"], (failed, bad_steps, report["error"])
    assert len(STORE_SCENARIOS) >= 7
    assert bed.calls == [("up", "4hosts-1switch"), ("down", f"scn-{scenario.load(name).name}")]


def test_writer_crash_kills_the_writer_and_reads_on_the_survivors(bed, tmp_path):
    report = play("faults/writer-crash", tmp_path)
    assert report["killed_hosts"] == ["host1"]
    assert not bed.tb.hosts[1].alive()
    reads = {h for h, c in bed.commands if "guest_store.py get" in c}
    assert "host1" not in reads and reads == {"host2", "host3", "host0"}


def test_poison_is_injected_at_the_blocks_device_address_on_every_host(bed, tmp_path):
    report = play("faults/poison", tmp_path)
    poison = [(h, a) for h, c, a in bed.qmp if c == "cxl-inject-poison"]
    assert sorted(h for h, _ in poison) == ["host0", "host1", "host2", "host3"]
    step = report["steps"][1]["details"]
    assert poison[0][1] == {"path": f"/machine/peripheral/{step['device']}", "start": step["dpa"] - step["dpa"] % 64,
                            "length": 64}
    assert {e["kind"] for e in report["expectations"]} >= {"quarantined", "never_returned", "guest_saw"}


def test_poison_that_the_store_keeps_serving_fails_the_run(bed, tmp_path, monkeypatch):
    monkeypatch.setattr(bed, "do_scan", lambda host, a, out: json.dumps(
        {"events": [], "region_base": 0, "affected": [], "quarantined": []}))
    report = play("faults/poison", tmp_path)
    by = {(e["kind"], json.dumps(e["args"])): e for e in report["expectations"]}
    nr = by[("never_returned", json.dumps({"set": "a", "index": 5}))]
    assert not nr["passed"] and nr["evidence"].startswith("block a/5 was returned as valid after the fault on ")
    q = by[("quarantined", json.dumps({"set": "a", "index": 5}))]
    assert not q["passed"] and "was not taken out of service" in q["evidence"]
    assert not report["passed"]


def test_bitflip_changes_the_backing_file_under_the_block(bed, tmp_path):
    report = play("faults/pool-bitflip", tmp_path)
    d = report["steps"][1]["details"]
    data = open(d["file"], "rb").read()
    assert [data[o] for o in d["file_offsets"]] == [0b1, 0b10, 0b100]  # sparse zeros, one bit flipped in each


def test_torn_reads_fail_the_run(bed, tmp_path):
    bed.torn.add("a/3")
    report = play("functional/cross-host-put-get", tmp_path)
    assert not report["passed"]
    assert report["steps"][1]["outcome"] == "failed"
    e = {x["kind"]: x for x in report["expectations"]}
    assert e["no_torn_reads"]["evidence"].startswith("torn or corrupted blocks returned as valid: ")
    assert "host2 set a indices 3" in e["no_torn_reads"]["evidence"]
    assert "returned with wrong bytes" in e["all_readable"]["evidence"]


# ---------------------------------------------------------------- JUnit XML

def junit(path):
    from xml.etree import ElementTree as ET
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    return root, suite


def test_junit_of_a_failing_run(bed, tmp_path, capsys):
    from testbed import cli
    bed.torn.add("a/3")
    out = tmp_path / "ci" / "junit.xml"
    assert cli.main(["run", "functional/cross-host-put-get", "--report-dir", str(tmp_path / "r"),
                     "--junit", str(out)]) == 1
    root, suite = junit(out)
    assert out.read_bytes() == (tmp_path / "r" / "junit.xml").read_bytes()
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        'all_readable {"on": "all", "set": "a"} (line 18)', "no_torn_reads {} (line 19)", "steps"]
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "3", "0")
    assert root.get("failures") == "3"
    torn = cases[1].find("failure")
    assert torn.get("type") == "no_torn_reads"
    assert torn.get("message").startswith("torn or corrupted blocks returned as valid: ")
    assert "host2 set a indices 3" in torn.get("message")
    assert "step 2 [failed] get on=readers, set=a" in cases[2].find("failure").text
    log = suite.find("system-out").text
    assert log.splitlines()[0].startswith("step 1 [ok] put on=writers, set=a, blocks=32 (line 13, ")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["topology"] == "4hosts-1switch" and props["testbed"] == "scn-cross-host-put-get"


def test_junit_of_a_passing_run(bed, tmp_path):
    play("functional/cross-host-put-get", tmp_path)
    root, suite = junit(tmp_path / "r" / "junit.xml")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "0", "0")
    assert all(len(c) == 0 for c in suite.findall("testcase"))


def test_junit_of_an_interrupted_run_has_every_expectation_as_an_error(bed, tmp_path):
    bed.crash_on["get"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        play("functional/cross-host-put-get", tmp_path)
    root, suite = junit(tmp_path / "r" / "junit.xml")
    cases = suite.findall("testcase")
    assert [c.find("error").get("message") for c in cases[:2]] == [
        "not checked: the run ended before the expectations"] * 2
    assert cases[2].get("name") == "steps" and cases[2].find("error").get("message").startswith("interrupted")
    assert suite.get("errors") == "3"


def test_junit_holds_a_programs_colored_or_binary_output(tmp_path):
    """A program's last stderr line in the evidence (here red ANSI and a NUL) made junit.xml
    unparseable: CI showed no test results at all."""
    report = {"scenario": "s", "started_at": "", "duration_s": 1.0, "error": None,
              "steps": [{"index": 0, "name": "run prog", "outcome": "failed", "error": "exit 1 (\x1b[31mboom\x00)",
                         "start_s": 0, "end_s": 1, "line": 9, "kind": "run", "details": {}}],
              "expectations": [{"kind": "exit_code", "args": {"run": "prog"}, "line": 12, "passed": False,
                                "evidence": "program 'prog' (want exit 0): host1: exit 1 (\x1b[31mError\x1b[0m)",
                                "traceback": None}]}
    root, suite = junit(runner.write_junit(report, None, tmp_path / "junit.xml"))
    failure = suite.find("testcase").find("failure")
    assert failure.get("message") == "program 'prog' (want exit 0): host1: exit 1 (\\x1b[31mError\\x1b[0m)"
    assert "step 1 [failed] run prog: exit 1 (\\x1b[31mboom\\x00)" in suite.findall("testcase")[1].find("failure").text


def test_no_torn_reads_counts_the_reads_of_expectations_written_after_it(bed, tmp_path):
    """A scenario without a get step (tests/integration/data/impossible.yaml) lists
    no_torn_reads before all_readable: the reads all_readable makes are the run's reads,
    whatever the order of `expect:`. Checked in the written order, no_torn_reads found no
    read and failed a run whose reads were all whole."""
    sc = scenario.parse("""\
apiVersion: beluga.testbed/v1alpha1
kind: Scenario
name: order
topology: 4hosts-1switch
roles: {service: host0, writers: [host1]}
steps:
  - put: {on: writers, set: b, blocks: 4}
expect:
  - no_torn_reads: {}
  - all_readable: {set: b}
""", "order.yaml")
    report, _ = runner.run(sc, report_dir=tmp_path / "r")
    assert [e["kind"] for e in report["expectations"]] == ["no_torn_reads", "all_readable"]  # the file's order
    assert report["expectations"][0]["passed"], report["expectations"][0]["evidence"]
    assert report["expectations"][0]["evidence"].startswith("16 block reads in 4 gets, none torn")  # 4 blocks on each of 4 live hosts
    assert report["passed"]
