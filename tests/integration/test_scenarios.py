"""Scenarios end to end on a two-host topology, as CI runs them; and one that must fail."""
import json
from pathlib import Path

import pytest

from .conftest import cli

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["functional/cross-host-put-get", "faults/writer-crash", "faults/poison",
                                  "examples/dax-records"])  # a user program from a shared folder, a host killed
def test_builtin_scenario_passes_on_two_hosts(name, tmp_path):
    r = cli("run", name, "--topology", "2hosts-1switch", "--report-dir", str(tmp_path / "report"),
            check=False, timeout=1200)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert r.returncode == 0, f"{name} failed:\n{r.stderr[-4000:]}"
    assert report["passed"] and report["expectations"] and all(e["passed"] for e in report["expectations"])
    assert r.stdout.strip() == str(tmp_path / "report" / "report.html")
    html = (tmp_path / "report" / "report.html").read_text()
    assert "PASSED" in html and "Timeline" in html
    assert all(s["outcome"] == "ok" for s in report["steps"])
    if name == "faults/writer-crash":
        assert report["killed_hosts"] == ["host1"]
    assert "scn-" not in cli("list").stdout  # the scenario's testbed is down again


def test_expectation_that_cannot_hold_fails_with_a_reason(tmp_path):
    r = cli("run", str(DATA / "impossible.yaml"), "--report-dir", str(tmp_path / "report"), check=False, timeout=1200)
    assert r.returncode == 1
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert not report["passed"]
    by_kind = {e["kind"]: e for e in report["expectations"]}
    assert by_kind["no_torn_reads"]["passed"]
    failed = by_kind["all_readable"]
    assert not failed["passed"]
    assert "3000 requested blocks of set 'b'" in failed["evidence"] and "not readable" in failed["evidence"]
    assert "killed hosts: host1" in failed["evidence"]
    assert "✗ all_readable" in r.stderr and "(line 19)" in r.stderr
    assert "FAILED" in (tmp_path / "report" / "report.html").read_text()
    assert (tmp_path / "report" / "logs" / "host0" / "dmesg.txt").exists()  # logs collected on failure
