#!/usr/bin/env python3
"""`make mutate`: mutation testing of the modules where a bug hurts users most.

    scripts/mutate.py [GROUP ...] [--fresh | --survivors | --report]

Runs mutmut (2.x) once per group of mutmut_config.GROUPS, each mutant against that
group's unit test files only (so a run fits this machine), then writes
reports/mutate/summary.md: per group the mutants tested, killed (a timeout counts as
killed: the tests did not pass), survived, the kill rate, and the diff of every
survivor. mutmut keeps its results in .mutmut-cache: a second run with unchanged
tests and code only reports; --fresh starts over; --survivors re-tests only the
mutants that survived the last run (after tests were added for them: mutants killed
before stay killed, as tests are only ever added); --report only writes the summary
of what .mutmut-cache holds. String mutations (messages) are
left out: the exact-message tests pin those, and a changed string is a changed
message, not a changed behaviour.
"""
from __future__ import annotations

import os
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mutmut_config  # noqa: E402

OUT = REPO / "reports" / "mutate"
DISABLED_TYPES = "string,fstring,decorator"


def run_group(name: str, mutant_ids: list[int] | None = None) -> float:
    """mutmut over the group's file, or (mutant_ids) over just those mutants."""
    file, _, tests, _ = mutmut_config.GROUPS[name]
    pytest = f"{shlex.quote(sys.executable)} -m pytest -x -q -p no:cacheprovider " + " ".join(tests)
    # mutmut 2 counts only exit status 1 as "the tests failed": a mutant that breaks the
    # import (pytest's status 2, a collection error) would pass as a survivor.
    runner = f"sh -c {shlex.quote(pytest + ' || exit 1')}"
    env = dict(os.environ, MUTATE_GROUP=name, PYTHONPATH=str(REPO))
    start = time.monotonic()
    for target in ([None] if mutant_ids is None else [str(i) for i in mutant_ids]):
        subprocess.run([sys.executable, "-m", "mutmut", "run", *([target] if target else []),
                        "--paths-to-mutate", file, "--runner", runner, "--tests-dir", "tests",
                        "--disable-mutation-types", DISABLED_TYPES, "--simple-output", "--no-progress"],
                       cwd=REPO, env=env, check=False)
    return time.monotonic() - start


def group_rows(name: str, res: dict) -> list:
    file = mutmut_config.GROUPS[name][0]
    return [r for r in res.get(os.path.normpath(file), [])
            if mutmut_config.selected(name, file, r[1], r[4]) and r[3] != "skipped"]


def results() -> dict[str, list[tuple[int, int, str, str]]]:
    """file -> [(mutant id, line number (1-based), line, status)] of the non-skipped mutants."""
    db = sqlite3.connect(REPO / ".mutmut-cache")
    out: dict[str, list] = {}
    for mid, fn, ln, line, status, index in db.execute(
            "SELECT m.id, f.filename, l.line_number, l.line, m.status, m.\"index\" FROM Mutant m "
            "JOIN Line l ON m.line = l.id JOIN SourceFile f ON l.sourcefile = f.id ORDER BY m.id"):
        out.setdefault(os.path.normpath(fn), []).append((mid, ln + 1, line, status, index))
    return out


def show(mid: int) -> str:
    r = subprocess.run([sys.executable, "-m", "mutmut", "show", str(mid)], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip()


def main(argv: list[str]) -> int:
    fresh = "--fresh" in argv
    survivors_only = "--survivors" in argv
    report_only = "--report" in argv
    groups = [a for a in argv if not a.startswith("--")] or list(mutmut_config.GROUPS)
    unknown = [g for g in groups if g not in mutmut_config.GROUPS]
    if unknown:
        print(f"unknown group(s) {', '.join(unknown)}; groups: {', '.join(mutmut_config.GROUPS)}", file=sys.stderr)
        return 2
    if fresh:
        (REPO / ".mutmut-cache").unlink(missing_ok=True)
    if report_only:
        times = {g: 0.0 for g in groups}
    elif survivors_only:
        before = results()
        times = {g: run_group(g, [r[0] for r in group_rows(g, before) if r[3] in ("bad_survived", "untested")])
                 for g in groups}
    else:
        times = {g: run_group(g) for g in groups}
    res = results()
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["# Mutation testing (`make mutate`)", "",
             "| group | file | functions | sample | tested | killed | of which timeouts | survived | kill rate | time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    survivors_md = []
    total_k = total_t = 0
    for g in groups:
        file, functions, _, fraction = mutmut_config.GROUPS[g]
        rows = group_rows(g, res)
        killed = [r for r in rows if r[3] in ("ok_killed", "bad_timeout", "ok_suspicious")]
        survived = [r for r in rows if r[3] == "bad_survived"]
        untested = [r for r in rows if r[3] == "untested"]
        tested = len(killed) + len(survived)
        total_k += len(killed)
        total_t += tested
        rate = f"{100 * len(killed) / tested:.1f} %" if tested else "-"
        timeouts = sum(r[3] == "bad_timeout" for r in rows)
        lines.append(f"| {g} | {file} | {len(functions) if functions else 'all'} | {fraction:.0%} | {tested} | "
                     f"{len(killed)} | {timeouts} | {len(survived)} | {rate} | {times[g] / 60:.1f} min |"
                     + (f" ({len(untested)} untested)" if untested else ""))
        for r in survived:
            survivors_md += [f"## {g}: mutant {r[0]}, {file}:{r[1]} in {mutmut_config.function_at(file, r[1])}",
                             "", "```diff", show(r[0]), "```", ""]
    rate = f"{100 * total_k / total_t:.1f} %" if total_t else "-"
    lines += ["", f"Total: {total_k} of {total_t} mutants killed ({rate}).", ""] + survivors_md
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: len(groups) + 6]))
    print(f"survivors and their diffs: {OUT / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
