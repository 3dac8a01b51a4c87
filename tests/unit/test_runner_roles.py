"""Role resolution and report rendering of the scenario runner (the testbed is faked: no VM)."""
import json
from types import SimpleNamespace

import pytest

from testbed import scenario, topology
from testbed.scenario import runner
from testbed.log import TestbedError


def fake_testbed(topo_name: str):
    t = topology.load(topo_name)
    hosts = [SimpleNamespace(name=h.name) for h in t.hosts]
    return SimpleNamespace(topology=t, hosts=hosts, pool_files={}, dax=lambda host: "/dev/dax0.0")


def test_readers_others_on_four_and_two_hosts():
    sc = scenario.load("faults/writer-crash")
    r4 = runner.Run(sc, fake_testbed("4hosts-1switch"))
    assert r4.readers == ["host2", "host3"]
    r2 = runner.Run(sc, fake_testbed("2hosts-1switch"))
    assert r2.readers == ["host0"]  # no host left: the service host reads
    r4.killed.add("host1")
    assert r4.resolve("survivors") == ["host0", "host2", "host3"]
    assert r4.resolve(["writers", "readers"]) == ["host1", "host2", "host3"]
    with pytest.raises(TestbedError, match="unknown host or role 'host9'"):
        r4.resolve("host9")


def test_roles_naming_missing_hosts_are_refused():
    sc = scenario.parse(scenario.resolve("faults/writer-crash").read_text().replace("service: host0", "service: host3"),
                        "wc.yaml")
    with pytest.raises(TestbedError) as e:
        runner.Run(sc, fake_testbed("2hosts-1switch"))
    assert "wc.yaml: roles name host(s) host3 that topology '2hosts-1switch' does not have" in str(e.value)


def test_report_renders_timeline_and_failed_expectation(tmp_path):
    report = {"scenario": "s", "description": "d", "source": "s.yaml", "topology": "t", "testbed": "tb",
              "started_at": "now", "duration_s": 3.0, "passed": False, "error": None, "deploy": {},
              "roles": {"service": "host0", "writers": ["host1"], "readers": ["host0"]}, "killed_hosts": ["host1"],
              "steps": [{"index": 0, "name": "kill <host1>", "kind": "fault", "line": 9, "start_s": 0.0, "end_s": 1.0,
                         "outcome": "ok", "details": {"killed": ["host1"]}, "error": None}],
              "expectations": [{"kind": "all_readable", "args": {"set": "b"}, "line": 12, "passed": False,
                                "evidence": "host0: 3 of 9 blocks not readable"}]}
    j, h = runner.write_report(report, tmp_path)
    assert json.loads(j.read_text())["passed"] is False
    html = h.read_text()
    assert "FAILED" in html and "host0: 3 of 9 blocks not readable" in html
    assert "kill &lt;host1&gt;" in html  # escaped
    assert 'class="bar k-fault' in html


def test_ranges():
    assert runner._ranges([5, 1, 2, 3, 9]) == "1-3,5,9"
