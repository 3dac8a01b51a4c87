"""What a new user meets first on the command line: mistakes answered in one located
line with a hint, a non-zero exit and no traceback; nothing here boots a VM."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Empty state and pool folders of this test's own: no testbed is running."""
    state, pools = tmp_path / "state", tmp_path / "pools"
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(state))
    monkeypatch.setenv("BELUGA_TESTBED_POOLS", str(pools))
    return state, pools


def cli(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *argv], cwd=REPO, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, **kw)


@pytest.mark.parametrize("argv", [["run", "--list"], ["scenario", "list"], ["topology", "show"]])
def test_a_reader_that_leaves_early_is_no_traceback(dirs, argv):
    """`beluga-testbed run --list | head -1`: the pipe's reader is gone before the list is written."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = cli(*argv, stdout=w, stderr=subprocess.PIPE)
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
    assert p.returncode == 141  # as a tool killed by SIGPIPE


@pytest.mark.parametrize("src,dst,said", [
    ("./f", "./g", "both sides are local: one of SRC and DST must be HOST:PATH"),
    ("host0:/a", "host1:/b", "both sides are remote"),
    ("./f", "host0:", "host0: no path after ':'"),
    ("./f", ":/tmp/", ":/tmp/: which host?"),
])
def test_cp_names_a_mistake_in_its_paths_before_looking_for_the_testbed(dirs, src, dst, said):
    """Not 'no testbed named tb' first, then, once one is up, the real mistake."""
    p = cli("cp", "tb", src, dst, capture_output=True)
    assert p.returncode == 1
    assert said in p.stderr and "hint:" in p.stderr, p.stderr
    assert "no testbed named" not in p.stderr and "Traceback" not in p.stderr


def test_cp_names_a_missing_or_folder_source_before_looking_for_the_testbed(dirs, tmp_path):
    p = cli("cp", "tb", str(tmp_path / "nope"), "host0:/tmp/", capture_output=True)
    assert p.returncode == 1 and f"{tmp_path / 'nope'}: no such file or folder" in p.stderr, p.stderr
    p = cli("cp", "tb", str(tmp_path), "host0:/tmp/", capture_output=True)
    assert p.returncode == 1 and f"{tmp_path}: is a folder" in p.stderr and "add -r" in p.stderr, p.stderr


@pytest.mark.parametrize("cmd,usage", [("ssh", "NAME HOST [-- CMD ...]"), ("exec", "NAME [HOST] -- CMD ...")])
def test_the_help_of_ssh_and_exec_shows_where_the_command_goes(cmd, usage):
    p = cli(cmd, "--help", capture_output=True)
    assert p.returncode == 0 and usage in p.stdout, p.stdout


def test_a_command_after_double_dash_is_refused_where_nothing_runs_it(dirs):
    """`up 2hosts-1switch -- --retain` used to boot without --retain and say nothing."""
    p = cli("up", "2hosts-1switch", "--dry-run", "--", "--retain", capture_output=True)
    assert p.returncode == 2
    assert "'-- --retain': a command after '--' is for 'ssh' and 'exec' only" in p.stderr, p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "ten"])
def test_exec_refuses_a_timeout_that_is_none(dirs, value):
    p = cli("exec", "tb", "--all", "--timeout", value, "--", "true", capture_output=True)
    assert p.returncode == 2
    assert "beluga-testbed exec: error: argument --timeout:" in p.stderr, p.stderr


def test_logs_export_to_a_file_is_refused_in_a_line(dirs, tmp_path, monkeypatch, capsys):
    """It ended in a FileExistsError traceback once the testbed was found."""
    from testbed import cli as cli_mod, lifecycle
    monkeypatch.setattr(lifecycle, "find", lambda name: SimpleNamespace(name=name, hosts=[], data={}))
    (tmp_path / "taken").write_text("")
    assert cli_mod.main(["logs", "export", "tb", "--dest", str(tmp_path / "taken")]) == 1
    err = capsys.readouterr().err
    assert f"--dest {tmp_path / 'taken'}: not a folder" in err and "hint:" in err, err


def test_exec_with_a_host_and_all_is_refused_not_run_everywhere(dirs):
    p = cli("exec", "tb", "host1", "--all", "--", "reboot", capture_output=True)
    assert p.returncode == 1
    assert "both a host (host1) and --all" in p.stderr and "hint:" in p.stderr, p.stderr


def test_doctor_modules_without_a_kernel_is_refused_not_ignored(dirs, tmp_path):
    """It ran every other check and said '✓ ready' without looking at the modules."""
    p = cli("doctor", "--modules", str(tmp_path), capture_output=True)
    assert p.returncode == 1 and "--modules without --kernel checks nothing" in p.stderr, p.stderr
    assert "ready" not in p.stderr + p.stdout
