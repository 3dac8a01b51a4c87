"""A scenario is checked against its topology before any VM boots: hosts and roles exist,
block sizes fit the pool, every fault's and expectation's target exists, programs are
well formed. Every error at once, `file:line: path: message`, did-you-mean where it helps."""

import pytest

from testbed import cli, lifecycle, topology
from testbed import scenario as S
from testbed.topology import load as load_topology

HEAD = """\
apiVersion: beluga.testbed/v1alpha1
kind: Scenario
name: s
topology: 2hosts-1switch
roles:
  service: host0
  writers: [host1]
steps:
  - put: {on: writers, set: a, blocks: 4}
"""


def errors(body: str, topo: str = "2hosts-1switch") -> list[str]:
    with pytest.raises(S.ScenarioError) as e:
        S.check(S.parse(HEAD + body, "s.yaml"), load_topology(topo))
    return e.value.errors


def parse_errors(body: str) -> list[str]:
    with pytest.raises(S.ScenarioError) as e:
        S.parse(HEAD + body, "s.yaml")
    return e.value.errors


def test_typo_in_on_is_located_with_did_you_mean():
    assert errors("  - get: {on: readrs, set: a}\n") == [
        "s.yaml:10: steps[1].get.on: unknown host or role 'readrs' (did you mean 'readers'? roles: service, "
        "writers, readers, survivors, all; hosts of 2hosts-1switch: host0, host1)"]


def test_fault_on_a_host_the_topology_lacks():
    assert errors("  - fault: {kill_host: host2}\n") == [
        "s.yaml:10: steps[1].fault.kill_host: unknown host or role 'host2' (did you mean 'host1'? roles: service, "
        "writers, readers, survivors, all; hosts of 2hosts-1switch: host0, host1)"]


def test_block_faults_need_a_block_put_before_them():
    errs = errors("  - fault: {poison: {set: b, index: 1}}\n"
                  "  - fault: {bitflip: {set: a, index: 4}}\n"
                  "  - fault: {media_event: {set: a, index: 3, kind: dram}}\n")
    assert errs == [
        "s.yaml:10: steps[1].fault.poison.set: no step before this one puts set 'b' (sets put so far: a)",
        "s.yaml:11: steps[2].fault.bitflip.index: block 4 of set 'a' is never put (indices put: 0-3)"]


def test_roles_and_every_error_at_once():
    text = HEAD.replace("service: host0", "service: host5") + (
        "  - wait: {seconds: 0}\n"
        "  - fault: {hang_host: host1, seconds: 99999999}\n"
        "  - put: {on: writers, set: 'A/b', blocks: 0}\n"
        "expect:\n"
        "  - never_returned: {set: a, index: 2}\n")
    with pytest.raises(S.ScenarioError) as e:
        S.parse(text, "s.yaml")
    assert e.value.errors == [
        "s.yaml:10: steps[1].wait.seconds: expected more than 0 to 86400 seconds, got 0",
        "s.yaml:11: steps[2].fault.seconds: expected more than 0 to 86400 seconds, got 99999999",
        "s.yaml:12: steps[3].put.set: invalid name 'A/b': use lower-case letters, digits and '-', starting with "
        "a letter or digit, at most 63 characters",
        "s.yaml:12: steps[3].put.blocks: expected an integer from 1 to 1048576, got 0"]
    sc = S.parse(HEAD.replace("service: host0", "service: host5") + "expect:\n  - never_returned: {set: a, index: 2}\n",
                 "s.yaml")
    with pytest.raises(S.ScenarioError) as e:
        S.check(sc, load_topology("2hosts-1switch"))
    assert e.value.errors == [
        "s.yaml:6: roles.service: no host 'host5' in topology 2hosts-1switch (did you mean 'host1'? hosts: host0, host1)",
        "s.yaml:11: expect[0].never_returned: no fault step hits block a/2 (poison, media_event or bitflip)"]


def test_block_size_must_fit_the_pool():
    assert errors("  - put: {on: writers, set: b, blocks: 1, size_bytes: 4294967296}\n") == [
        "s.yaml:10: steps[1].put.size_bytes: blocks of 4294967296 bytes do not fit the pool of 2hosts-1switch "
        "(512 MiB; at most half of it per block)"]


def test_programs_are_well_formed():
    errs = parse_errors(
        "  - run: {name: w, on: all, argv: [./w], shell: './w'}\n"
        "  - run: {name: r, on: all}\n"
        "  - run: {name: x, on: all, shell: true, env: {'1X': a, Y: [1]}}\n")
    assert errs == [
        "s.yaml:10: steps[1].run: give exactly one of 'argv' (a list of words) and 'shell' (a string for sh -c)",
        "s.yaml:11: steps[2].run: give exactly one of 'argv' (a list of words) and 'shell' (a string for sh -c)",
        "s.yaml:12: steps[3].run.shell: expected a string, got a boolean",
        "s.yaml:12: steps[3].run.env.1X: not an environment variable name (letters, digits, '_')",
        "s.yaml:12: steps[3].run.env.Y: expected a string or a number, got a list"]


def test_a_nul_in_a_programs_words_or_environment_is_refused_before_boot():
    """YAML's "\\0" reached the guest's command line, where it cut the word short."""
    errs = parse_errors(
        '  - run: {name: a, on: all, argv: [./w, "x\\0y"]}\n'
        '  - run: {name: b, on: all, shell: "echo \\0", env: {K: "v\\0"}}\n')
    assert errs == [
        "s.yaml:10: steps[1].run.argv[1]: contains a NUL byte (a command line or environment cannot hold one)",
        "s.yaml:11: steps[2].run.shell: contains a NUL byte (a command line or environment cannot hold one)",
        "s.yaml:11: steps[2].run.env.K: contains a NUL byte (a command line or environment cannot hold one)"]


def test_joins_and_program_expectations_name_programs_that_run():
    errs = parse_errors("expect:\n  - output_matches: {run: writer, regex: '(unclosed'}\n")
    assert errs == ["s.yaml:11: expect[0].output_matches.regex: not a valid regular expression: "
                    "missing ), unterminated subpattern at position 0"]
    errs = errors("  - run: {name: writer, on: all, argv: [./w], background: true}\n"
                  "  - run: {name: fg, on: all, shell: './r'}\n"
                  "  - join: {name: wirter}\n"
                  "  - join: {name: fg}\n"
                  "  - run: {name: writer, on: host0, argv: [./w]}\n"
                  "expect:\n"
                  "  - exit_code: {run: writr}\n")
    assert errs == [
        "s.yaml:12: steps[3].join.name: no program named 'wirter' runs before this step (programs: writer, fg)",
        "s.yaml:13: steps[4].join.name: program 'fg' runs in the foreground: nothing to join",
        "s.yaml:14: steps[5].run.name: a program named 'writer' already runs at line 10",
        "s.yaml:16: expect[0].exit_code.run: no program named 'writr' (did you mean 'writer'? programs: "
        "writer, fg, writer)"]


def test_builtins_are_valid_on_their_topology():
    for name in S.builtin():
        S.load_checked(name)


def test_cli_refuses_a_typo_fast_and_boots_nothing(tmp_path, monkeypatch, capsys):
    def no_boot(*a, **kw):
        raise AssertionError("a VM was started")
    monkeypatch.setattr(lifecycle, "up", no_boot)
    f = tmp_path / "typo.yaml"
    f.write_text(HEAD + "  - get: {on: readrs, set: a}\n")
    assert cli.main(["run", str(f), "--report-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("✗ invalid scenario:\n")
    assert f"{f}:10: steps[1].get.on: unknown host or role 'readrs' (did you mean 'readers'?" in err
    assert cli.main(["scenario", "validate", str(f)]) == 1
    assert "did you mean 'readers'?" in capsys.readouterr().err
    assert cli.main(["run", str(f), "--check"]) == 1
    assert not (tmp_path / "r").exists()
    f.write_text(HEAD)
    assert cli.main(["scenario", "validate", str(f)]) == 0
    assert capsys.readouterr().out == f"{f}: ok (s: 1 step(s), 0 expectation(s), on 2hosts-1switch with 2 host(s))\n"
    assert cli.main(["run", str(f), "--check"]) == 0


def test_docs_tables_are_the_registry():
    from pathlib import Path
    text = (Path(__file__).parents[2] / "docs" / "scenarios.md").read_text()
    begin, end = "<!-- registry tables: begin -->\n", "<!-- registry tables: end -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == S.docs_tables(), \
        "docs/scenarios.md is out of date: paste the output of `python -m testbed.scenario`"


def test_every_kind_is_documented_and_every_field_typed():
    for table in (S.STEPS, S.FAULTS, S.EXPECTS):
        for kind, cls in table.items():
            assert cls.summary, kind
            for f in cls.fields():
                assert isinstance(f.metadata["type"], S.FieldType) and f.metadata["doc"], (kind, f.name)


def test_shares_are_strings():
    errs = parse_errors("shares:\n  - {dir: x}\n")
    assert errs == ["s.yaml:11: shares[0]: expected a share 'HOST_DIR[:GUEST_DIR[:rw]]', got a mapping"]


def test_shares_are_checked_with_the_scenario(tmp_path):
    pytest.importorskip("testbed.shares")  # testbed/shares.py (up --share) lands with the programs branch
    (tmp_path / "prog").mkdir()
    f = tmp_path / "s.yaml"
    f.write_text(HEAD + "shares:\n  - prog:/mnt/prog\n  - missing:/mnt/m\n  - prog:/etc/x\n")
    with pytest.raises(S.ScenarioError) as e:
        S.load_checked(str(f))
    assert [x.split(": ", 2)[:2] for x in e.value.errors] == [[f"{f}:12", "shares[1]"], [f"{f}:13", "shares[2]"]]
    assert "does not exist" in e.value.errors[0] and "system folder" in e.value.errors[1]
    f.write_text(HEAD + "shares:\n  - prog:/mnt/prog\n  - prog:/mnt/prog/sub\n")
    with pytest.raises(S.ScenarioError) as e:
        S.load_checked(str(f))
    assert e.value.errors[0].startswith(f"{f}:10: shares: share ") and "would be inside share" in e.value.errors[0]
    f.write_text(HEAD + "shares:\n  - prog:/mnt/prog\n")
    sc, _ = S.load_checked(str(f))
    (share,) = sc.share_list()
    assert (share.host_dir, share.guest_dir, share.rw) == (tmp_path / "prog", "/mnt/prog", False)


def test_a_get_of_a_set_never_put_is_located_with_did_you_mean():
    """It used to pass validation and then read nothing: a typo silently made the step a no-op."""
    assert errors("  - get: {on: readers, set: aa}\n"
                  "  - get: {on: readers, set: b}\n"
                  "  - put: {on: writers, set: b, blocks: 1}\n") == [
        "s.yaml:10: steps[1].get.set: no step before this one puts set 'aa' (did you mean 'a'? sets put so far: a)",
        "s.yaml:11: steps[2].get.set: no step before this one puts set 'b' (sets put so far: a)"]


def test_an_expectation_on_a_set_never_put_says_which_sets_are():
    body = "expect:\n  - all_readable: {set: aa}\n  - evicted: {set: c}\n"
    assert errors(body) == [
        "s.yaml:11: expect[0].all_readable.set: no step puts set 'aa' (did you mean 'a'? sets put: a)",
        "s.yaml:12: expect[1].evicted.set: no step puts set 'c' (sets put: a)"]


@pytest.mark.parametrize("argv", [["scenario", "validate"], ["run", "--check"], ["run"]])
def test_a_typo_in_the_scenarios_topology_is_located_in_the_scenario(tmp_path, monkeypatch, capsys, argv):
    """It said only '2host-1switch: no built-in topology of that name', not in which file or line."""
    def no_boot(*a, **kw):
        raise AssertionError("a VM was started")
    monkeypatch.setattr(lifecycle, "up", no_boot)
    f = tmp_path / "typo.yaml"
    f.write_text(HEAD.replace("topology: 2hosts-1switch", "topology: 2host-1switch"))
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, str(f)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("✗ invalid scenario:\n")
    assert f"{f}:4: topology: 2host-1switch: no built-in topology of that name (did you mean '2hosts-1switch'?" in err
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("flag", ["--report-dir", "--junit"])
def test_a_report_that_cannot_be_written_is_refused_before_anything_boots(tmp_path, monkeypatch, capsys, flag):
    """A file given as --report-dir failed only after the whole run, with a traceback and no report."""
    def no_boot(*a, **kw):
        raise AssertionError("a VM was started")
    monkeypatch.setattr(lifecycle, "up", no_boot)
    monkeypatch.setattr(lifecycle, "down", lambda name: False)
    f = tmp_path / "s.yaml"
    f.write_text(HEAD)
    where = tmp_path / "taken"
    if flag == "--report-dir":
        where.write_text("")  # a file where the folder would go
    else:
        where.mkdir()  # a folder where the file would go
    assert cli.main(["run", str(f), flag, str(where)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("✗ ") and str(where) in err and "hint:" in err, err
    assert "a VM was started" not in err


def test_check_with_testbed_checks_against_the_running_testbeds_topology(tmp_path, monkeypatch, capsys):
    """`run --check --testbed T` said valid for the scenario's own topology, and the run on T then failed."""
    from types import SimpleNamespace
    monkeypatch.setattr(lifecycle, "find", lambda name: SimpleNamespace(name=name, topology=load_topology("1host-1switch")))
    f = tmp_path / "s.yaml"
    f.write_text(HEAD)
    assert cli.main(["run", str(f), "--check"]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(f), "--check", "--testbed", "small"]) == 1
    assert "roles.writers: no host 'host1' in topology 1host-1switch" in capsys.readouterr().err


def test_a_bad_topology_option_is_said_once_not_once_per_scenario(capsys):
    assert cli.main(["scenario", "validate", "faults/poison", "faults/host-hang", "--topology", "2host-1switch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("✗ invalid topology:\n") and err.count("no built-in topology of that name") == 1, err


def test_a_topology_file_beside_the_scenario_is_found_from_anywhere(tmp_path, monkeypatch, capsys):
    """`topology: my-topo.yaml` was looked up in the current folder, unlike the scenario's
    `shares:`: the same scenario passed from its own folder and failed from the repository's root."""
    from pathlib import Path
    ours = tmp_path / "ci"
    ours.mkdir()
    builtin = Path(topology.__file__).parent / "topologies" / "2hosts-1switch.yaml"
    (ours / "my-topo.yaml").write_text(builtin.read_text().replace("name: 2hosts-1switch", "name: my-topo"))
    f = ours / "s.yaml"
    f.write_text(HEAD.replace("topology: 2hosts-1switch", "topology: my-topo.yaml"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["scenario", "validate", "ci/s.yaml"]) == 0
    assert "on my-topo with 2 host(s)" in capsys.readouterr().out
    booted = []

    def up(topo, **kw):
        booted.append(topo)
        raise KeyboardInterrupt  # stop there: what matters is what it would boot
    monkeypatch.setattr(lifecycle, "up", up)
    monkeypatch.setattr(lifecycle, "down", lambda name: False)
    assert cli.main(["run", "ci/s.yaml", "--report-dir", str(tmp_path / "r")]) == 130
    assert booted == [str(ours / "my-topo.yaml")]
