"""A run that crashes or is interrupted is a failed run: the step records the error (and
the traceback of a crash), report.json and the exit status say FAILED, the testbed goes
down unless --keep. The guests are faked at SSH and QMP (conftest.py)."""
import dataclasses
import json

import pytest

from testbed import cli, lifecycle, scenario
from testbed.scenario import runner

SCENARIO = """\
apiVersion: beluga.testbed/v1alpha1
kind: Scenario
name: crash
topology: 2hosts-1switch
roles:
  service: host0
  writers: [host1]
steps:
  - put: {on: writers, set: a, blocks: 4}
  - STEP
  - get: {on: readers, set: a}
expect:
  - all_readable: {set: a}
  - no_torn_reads: {}
"""


@pytest.fixture
def bed(guests, monkeypatch, tmp_path):
    fake = guests.use("2hosts-1switch")
    calls = []
    monkeypatch.setattr(lifecycle, "up", lambda topo, name=None, **kw: calls.append(("up", name)) or fake.tb)
    monkeypatch.setattr(lifecycle, "find", lambda name: fake.tb)
    monkeypatch.setattr(lifecycle, "down", lambda name: calls.append(("down", name)) or True)
    monkeypatch.setattr(lifecycle, "export_logs", lambda name, dest: dest)
    fake.calls = calls
    return fake


def run_text(tmp_path, step: str, **kw):
    sc = scenario.parse(SCENARIO.replace("STEP", step), str(tmp_path / "crash.yaml"))
    return runner.run(sc, report_dir=tmp_path / "report", **kw)


def run_unchecked(tmp_path, **replace):
    """A scenario whose second step (a wait) holds values validation refuses, as a bug
    in a step would: the runner must still fail the run, not pass it."""
    sc = scenario.parse(SCENARIO.replace("STEP", "wait: {seconds: 1}"), str(tmp_path / "crash.yaml"))
    steps = list(sc.steps)
    steps[1] = dataclasses.replace(steps[1], **replace)
    return runner.run(dataclasses.replace(sc, steps=tuple(steps)), report_dir=tmp_path / "report")


def saved(tmp_path) -> dict:
    return json.loads((tmp_path / "report" / "report.json").read_text())


def test_a_clean_run_passes(bed, tmp_path):
    report, html = run_text(tmp_path, "stat: {on: service}")
    assert report["passed"] is True and saved(tmp_path)["passed"] is True
    assert [s["outcome"] for s in report["steps"]] == ["ok", "ok", "ok"]
    assert bed.calls == [("up", "scn-crash"), ("down", "scn-crash")]


@pytest.mark.parametrize("crash, error", [("wait", "ValueError"), ("stat", "ZeroDivisionError")])
def test_a_crashing_step_fails_the_run_with_its_traceback(bed, tmp_path, crash, error):
    if crash == "wait":
        report, html = run_unchecked(tmp_path, seconds=-1)  # time.sleep(-1) raises ValueError
    else:
        bed.crash_on["stat"] = (ZeroDivisionError("division by zero"), 2)  # deploy's health check stats 2 hosts
        report, html = run_text(tmp_path, "stat: {on: service}")
    r = saved(tmp_path)
    assert r["passed"] is False
    crashed = r["steps"][1]
    assert crashed["outcome"] == "failed" and crashed["error"].startswith(error)
    assert "Traceback" in crashed["traceback"]
    assert r["steps"][2]["outcome"] == "ok"  # the next steps still ran
    assert "FAILED" in html.read_text() and "PASSED" not in html.read_text()
    assert bed.calls[-1] == ("down", "scn-crash")


def test_put_on_no_host_is_refused_before_anything_boots(bed, tmp_path):
    with pytest.raises(scenario.ScenarioError) as e:
        run_text(tmp_path, "put: {on: [], set: b, blocks: 2}")
    assert e.value.errors == [f"{tmp_path}/crash.yaml:10: steps[1].put.on: expected at least one host or role "
                              "(service, writers, readers, survivors, all)"]
    assert bed.calls == []


def test_negative_wait_is_refused_before_anything_boots(bed, tmp_path):
    with pytest.raises(scenario.ScenarioError) as e:
        run_text(tmp_path, "wait: {seconds: -1}")
    assert e.value.errors == [f"{tmp_path}/crash.yaml:10: steps[1].wait.seconds: expected more than 0 to 86400 "
                              "seconds, got -1"]
    assert bed.calls == []


def test_interrupt_writes_a_failed_report_tears_down_and_stops(bed, tmp_path):
    bed.crash_on["get"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        run_text(tmp_path, "stat: {on: service}")
    r = saved(tmp_path)
    assert r["passed"] is False and r["error"].startswith("interrupted")
    assert [s["outcome"] for s in r["steps"]] == ["ok", "ok", "failed"]
    assert r["steps"][2]["error"].startswith("interrupted")
    assert r["expectations"] == []
    assert bed.calls[-1] == ("down", "scn-crash")


def test_interrupt_before_the_steps_leaves_them_not_run(bed, tmp_path):
    bed.crash_on["enable_trace"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        run_text(tmp_path, "stat: {on: service}")
    r = saved(tmp_path)
    assert r["passed"] is False
    assert [s["outcome"] for s in r["steps"]] == ["not run"] * 3


def test_a_crash_in_deploy_is_a_failed_run(bed, tmp_path):
    bed.crash_on["enable_trace"] = RuntimeError("boom")
    report, _ = run_text(tmp_path, "stat: {on: service}")
    assert report["passed"] is False and report["error"] == "RuntimeError: boom"
    assert "Traceback" in report["traceback"]
    assert bed.calls[-1] == ("down", "scn-crash")


def test_a_crash_in_an_expectation_fails_it(bed, tmp_path):
    gets = []

    def crash_after_the_steps(host, a, out, real=bed.do_get):
        gets.append(host)
        if len(gets) > 1:  # the get step made the first; the expectation's reads crash
            raise RuntimeError("guest driver crashed")
        return real(host, a, out)
    bed.do_get = crash_after_the_steps
    report, _ = run_text(tmp_path, "stat: {on: service}")
    e = report["expectations"][0]
    assert e["passed"] is False and e["evidence"] == "could not be checked: RuntimeError: guest driver crashed"
    assert "Traceback" in e["traceback"]
    assert report["passed"] is False


def test_keep_leaves_the_testbed_up(bed, tmp_path):
    bed.crash_on["stat"] = (ZeroDivisionError("division by zero"), 2)
    run_text(tmp_path, "stat: {on: service}", keep=True)
    assert ("down", "scn-crash") not in bed.calls


def test_cli_exit_status(bed, tmp_path, capsys):
    f = tmp_path / "crash.yaml"
    f.write_text(SCENARIO.replace("STEP", "stat: {on: service}"))
    bed.crash_on["stat"] = (ZeroDivisionError("division by zero"), 2)
    assert cli.main(["run", str(f), "--report-dir", str(tmp_path / "report")]) == 1
    assert "FAILED" in capsys.readouterr().err
    bed.crash_on = {"get": KeyboardInterrupt()}
    f.write_text(SCENARIO.replace("STEP", "stat: {on: service}"))
    assert cli.main(["run", str(f), "--report-dir", str(tmp_path / "report")]) == 130
    assert saved(tmp_path)["passed"] is False


def _fake_reset(calls, not_undone=()):
    from testbed import reset as reset_mod

    def fake(tb, **kw):
        calls.append(("reset", tb.name))
        return reset_mod.ResetReport(tb.name, 0.1, (), 0, tuple(not_undone))
    return fake


def test_a_running_testbed_is_reset_used_and_left_up(bed, tmp_path, monkeypatch):
    monkeypatch.setattr(runner.reset_mod, "reset", _fake_reset(bed.calls))
    sc = scenario.parse(SCENARIO.replace("STEP", "stat: {on: service}"), str(tmp_path / "crash.yaml"))
    report, _ = runner.run(sc, testbed="mine", report_dir=tmp_path / "report")
    assert report["passed"] and report["testbed"] == "mine"
    assert [c[0] for c in bed.calls] == ["reset"]  # reset instead of up; no down
    assert report["reset"]["complete"] is True
    assert [p["name"] for p in report["phases"][:2]] == ["testbed mine (already up)", "reset mine"]


def test_a_running_testbed_that_cannot_be_reset_fails_the_run_before_any_step(bed, tmp_path, monkeypatch):
    monkeypatch.setattr(runner.reset_mod, "reset", _fake_reset(bed.calls, ["host1: QEMU is not running"]))
    sc = scenario.parse(SCENARIO.replace("STEP", "stat: {on: service}"), str(tmp_path / "crash.yaml"))
    report, _ = runner.run(sc, testbed="mine", report_dir=tmp_path / "report")
    assert not report["passed"]
    assert report["error"].startswith("testbed 'mine' could not be reset: host1: QEMU is not running")
    assert report["steps"] == [] or all(s["outcome"] == "not run" for s in report["steps"])
