"""The `run` and `join` steps drive testbed/scenario/programs.py's API (run_program -> handle,
handle.join -> {host: ProgramResult}); here that API is faked, the runner is real."""
import json
from types import SimpleNamespace

import pytest

from testbed import faults, lifecycle, scenario
from testbed.scenario import runner

TEXT = """\
apiVersion: beluga.testbed/v1alpha1
kind: Scenario
name: prog
topology: 2hosts-1switch
roles:
  service: host0
  writers: [host1]
steps:
  - run: {name: bg, on: all, argv: [/opt/w, --n, '3'], background: true, env: {N: 3, MODE: fast}, timeout_s: 60}
  - fault: {kill_host: host1}
  - join: {name: bg, timeout_s: 30}
  - name: check the pool
    run: {name: fg, on: survivors, shell: 'echo ok > /tmp/done'}
expect:
  - exit_code: {run: bg}
  - exit_code: {run: fg}
  - output_matches: {run: bg, regex: 'wrote \\d+'}
"""


class FakeHandle:
    def __init__(self, results):
        self.results = results
        self.joined = []

    def join(self, timeout_s=None):
        self.joined.append(timeout_s)
        return self.results


@pytest.fixture
def bed(guests, monkeypatch, tmp_path):
    fake = guests.use("2hosts-1switch")
    fake.start_qemus()
    monkeypatch.setattr(lifecycle, "up", lambda topo, name=None, **kw: fake.tb)
    monkeypatch.setattr(lifecycle, "down", lambda name: True)
    monkeypatch.setattr(lifecycle, "export_logs", lambda name, dest: dest)
    fake.started = []
    fake.exits = {"bg": {"host0": 0, "host1": None}, "fg": {"host0": 0}}

    def start_program(tb, hosts, argv, shell, env, timeout_s, background, out_dir):
        name = out_dir.name
        fake.started.append(SimpleNamespace(name=name, hosts=hosts, argv=argv, shell=shell, env=env,
                                            timeout_s=timeout_s, background=background, out_dir=out_dir))
        out_dir.mkdir(parents=True)
        results = {}
        for h in hosts:
            (out_dir / f"{h}.stdout").write_text(f"wrote {len(h)} records\n")
            (out_dir / f"{h}.stderr").write_text("")
            code = fake.exits[name][h]
            results[h] = SimpleNamespace(host=h, exit_code=code, stdout_path=out_dir / f"{h}.stdout",
                                         stderr_path=out_dir / f"{h}.stderr", stdout_tail="wrote", stderr_tail="",
                                         timed_out=code == "timeout")
            if code == "timeout":
                results[h].exit_code = None
        handle = FakeHandle(results)
        fake.handles = getattr(fake, "handles", []) + [handle]
        if not background:
            handle.join()
        return handle
    monkeypatch.setattr(runner, "start_program", start_program)
    monkeypatch.setattr(faults, "time", SimpleNamespace(sleep=lambda s: None, monotonic=__import__("time").monotonic))
    return fake


def play(tmp_path, text=TEXT):
    return runner.run(scenario.parse(text, "prog.yaml"), report_dir=tmp_path / "r")[0]


def test_programs_run_join_and_are_judged(bed, tmp_path):
    report = play(tmp_path)
    assert report["passed"], report
    bg, fg = bed.started
    assert (bg.hosts, bg.argv, bg.shell, bg.env, bg.timeout_s, bg.background) == (
        ["host0", "host1"], ["/opt/w", "--n", "3"], None, {"MODE": "fast", "N": "3"}, 60, True)
    assert bg.out_dir == tmp_path / "r" / "programs" / "bg"
    assert (fg.hosts, fg.argv, fg.shell, fg.background) == (["host0"], None, "echo ok > /tmp/done", False)
    assert bed.handles[0].joined == [30]
    steps = report["steps"]
    assert [s["outcome"] for s in steps] == ["ok"] * 4
    assert steps[0]["details"]["results"]["host1"]["exit_code"] is None  # killed under it
    assert steps[3]["name"] == "check the pool"
    ev = {e["kind"] + str(e["args"]): e["evidence"] for e in report["expectations"]}
    assert ev["exit_code{'run': 'bg'}"] == "program 'bg' (want exit 0): host0: exit 0"


def test_a_failing_program_fails_its_expectation_not_its_step(bed, tmp_path):
    bed.exits["bg"]["host0"] = 2
    report = play(tmp_path)
    assert not report["passed"]
    assert report["steps"][0]["outcome"] == "ok"
    assert [e["passed"] for e in report["expectations"]] == [False, True, True]


def test_a_program_that_times_out_fails_its_step(bed, tmp_path):
    bed.exits["fg"]["host0"] = "timeout"
    report = play(tmp_path)
    assert report["steps"][3]["outcome"] == "failed"
    assert report["steps"][3]["error"] == "program 'fg' timed out or lost its host on host0"
    assert not report["passed"]


def test_background_program_without_join_is_joined_at_the_end(bed, tmp_path):
    text = TEXT.replace("  - join: {name: bg, timeout_s: 30}\n", "")
    report = play(tmp_path, text)
    assert report["passed"]
    assert bed.handles[0].joined == [runner.BACKGROUND_JOIN_S]
    assert json.loads((tmp_path / "r" / "report.json").read_text())["steps"][0]["outcome"] == "ok"


def test_a_background_program_spans_the_timeline_until_joined(bed, tmp_path, monkeypatch):
    import itertools
    import time
    clock = itertools.count()  # every reading of the clock is one second later
    monkeypatch.setattr(runner, "time", SimpleNamespace(monotonic=lambda: float(next(clock)), sleep=lambda s: None,
                                                        strftime=time.strftime))
    report = play(tmp_path)
    bg, fault, join = report["steps"][:3]
    assert bg["start_s"] < fault["start_s"] < join["start_s"] < bg["end_s"] <= join["end_s"]
