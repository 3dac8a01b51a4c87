"""The HTML report in a real headless Chromium: the page renders, PASSED/FAILED is
visible, and no timeline label runs outside the timeline (measured by the browser)."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.scenario import runner

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Measured in the page once it has laid out; the result lands in the dumped DOM.
MEASURE = """<script>
window.addEventListener("load", () => {
  const tl = document.querySelector(".timeline").getBoundingClientRect();
  const v = document.querySelector("h1 .verdict");
  const vr = v.getBoundingClientRect(), vs = getComputedStyle(v);
  const out = {timeline: [tl.left, tl.right], page: document.documentElement.clientWidth,
               verdict: {text: v.textContent, w: vr.width, h: vr.height, top: vr.top,
                         visible: vs.visibility === "visible" && vs.display !== "none", color: vs.color,
                         background: vs.backgroundColor},
               labels: [], rows: document.querySelector(".timeline").children.length,
               nested_tables: document.querySelectorAll("td table").length,
               raw_json: [...document.querySelectorAll("td")].filter(td => /^\\s*\\{"/.test(td.textContent)).length};
  for (const el of document.querySelectorAll(".timeline .label, .timeline .bar")) {
    const r = el.getBoundingClientRect();
    // A label's text may be clipped with an ellipsis inside its box, but the box stays in.
    out.labels.push({text: el.textContent.trim().slice(0, 60), left: r.left, right: r.left + el.scrollWidth,
                     box_right: r.right});
  }
  const pre = document.createElement("pre");
  pre.id = "measure";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium(args: list[str], tmp: Path, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}",
                           "--window-size=1280,1600", *args], capture_output=True, text=True, timeout=timeout_s)


def failing_report() -> dict:
    """A failed run whose last steps start near the end of the timeline with long names."""
    steps = []
    t = 30.0
    for i, (kind, name, dur) in enumerate([
            ("put", "put on=writers, set=a, blocks=16", 12.0), ("fault", "crash the writer host (SIGKILL its QEMU)", 0.2),
            ("wait", "let the service notice the missing heartbeat", 12.0),
            ("get", "get on=readers, set=b", 3.0),
            ("stat", "a step with a long name that starts at the very end of the run " * 3, 0.1)]):
        steps.append({"index": i, "name": name.strip(), "kind": kind, "line": 10 + i, "start_s": t, "end_s": t + dur,
                      "outcome": "failed" if kind == "get" else "ok",
                      "details": {"per_host": {"host2": {"hits": 12, "misses": 4, "torn": 0}}} if kind == "get"
                      else {"killed": ["host1"]}, "error": "a torn or corrupted block was returned as valid"
                      if kind == "get" else None, "traceback": None})
        t += dur
    return {"scenario": "writer-crash", "description": "A writer crashes mid-stream.", "source": "writer-crash.yaml",
            "topology": "4hosts-1switch", "testbed": "scn-writer-crash", "started_at": "2026-11-29T11:00:00+0000",
            "duration_s": round(t + 4, 1), "passed": False, "error": None, "killed_hosts": ["host1"],
            "roles": {"service": "host0", "writers": ["host1"], "readers": ["host2", "host3"]},
            "phases": [{"name": "boot 4hosts-1switch", "start_s": 0.0, "end_s": 24.0, "outcome": "ok"},
                       {"name": "deploy the store", "start_s": 24.0, "end_s": 30.0, "outcome": "ok"},
                       {"name": "check the expectations", "start_s": t, "end_s": t + 4, "outcome": "ok"}],
            "deploy": {"formatted": {"segments": 8, "segment_size_bytes": 2097152}, "service": {"pid": 812},
                       "health": {"host0": True, "host1": True}},
            "steps": steps,
            "expectations": [{"kind": "all_readable", "args": {"set": "b"}, "line": 22, "passed": False,
                              "evidence": "37 acknowledged blocks of set 'b': host2: 4 of 37 blocks not readable "
                                          "(indices 33-36); killed hosts: host1", "traceback": None},
                             {"kind": "no_torn_reads", "args": {}, "line": 23, "passed": True,
                              "evidence": "148 block reads in 4 gets, none torn", "traceback": None}]}


def measure(html: Path, tmp: Path) -> dict:
    page = tmp / "page.html"
    page.write_text(html.read_text().replace("</body>", MEASURE + "</body>"))
    r = chromium(["--virtual-time-budget=5000", "--dump-dom", page.as_uri()], tmp)
    m = re.search(r'<pre id="measure">(.*?)</pre>', r.stdout, re.S)
    assert m, f"chromium rendered no page (exit {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">"))


@pytest.fixture
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/setup-host.sh installs it)")
        pytest.skip("chromium is not installed: run 'make setup'")


def test_failed_report_in_a_real_browser(browser, tmp_path):
    _, html = runner.write_report(failing_report(), tmp_path / "r")
    m = measure(html, tmp_path)
    v = m["verdict"]
    assert v["text"] == "FAILED" and v["visible"] and v["w"] > 20 and v["h"] > 10 and 0 <= v["top"] < 400
    assert v["background"] == "rgb(179, 38, 30)"  # the red badge
    left, right = m["timeline"]
    assert right <= m["page"]
    out = [x for x in m["labels"] if x["left"] < left - 0.5 or x["right"] > right + 0.5]
    assert not out, f"labels or bars outside the timeline [{left}, {right}]: {out}"
    assert m["rows"] == 3 + 5  # boot, deploy, checks and the five steps
    assert m["nested_tables"] >= 5 and m["raw_json"] == 0


def test_passed_report_shows_passed(browser, tmp_path):
    r = failing_report()
    r["passed"] = True
    _, html = runner.write_report(r, tmp_path / "r")
    v = measure(html, tmp_path)["verdict"]
    assert v["text"] == "PASSED" and v["visible"] and v["background"] == "rgb(42, 125, 46)"
