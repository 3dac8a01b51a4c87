"""Names never become paths outside the testbed's folders; those folders are private.

`beluga-testbed down ..` once printed "✓ .. is down" after deleting other applications'
folders under ~/.local/state and files in /dev/shm; `down .` removed every testbed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import lifecycle, paths
from testbed import topology as T
from testbed.log import TestbedError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """A state and a pool folder, each beside a folder of 'another application'."""
    home = tmp_path / "home"
    state, pools = home / "state" / "beluga-testbed", home / "shm" / "beluga-testbed"
    for d in (state, pools):
        d.mkdir(parents=True, mode=0o700)
        (d.parent / "other-app").mkdir()
        (d.parent / "other-app" / "data").write_text("precious")
    (state / "x").mkdir()  # what `down ../x` could reach: <state>/../x
    (state.parent / "x").mkdir()
    (state.parent / "x" / "data").write_text("precious")
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(state))
    monkeypatch.setenv("BELUGA_TESTBED_POOLS", str(pools))
    return home, state, pools


def _everything(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["..", ".", "../x", "a,b", "../../..", "x/..", "Up", "_x", "a" * 64])
def test_down_refuses_a_name_that_is_not_one_and_deletes_nothing(dirs, name):
    home, state, pools = dirs
    before = _everything(home)
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "down", name], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0
    assert "beluga-testbed down: error: argument NAME: invalid name" in r.stderr
    assert "lower-case letters, digits and '-'" in r.stderr
    assert "is down" not in r.stderr + r.stdout
    assert _everything(home) == before


@pytest.mark.parametrize("argv", [["status", ".."], ["ssh", "..", "host0"], ["exec", "../x", "--all"],
                                  ["pool", "a,b"], ["provision", "."], ["logs", "export", ".."],
                                  ["up", "1host-1switch", "--name", "..", "--dry-run"],
                                  ["run", "--testbed", "../x", "whatever"], ["cp", "..", "./f", "host0:/tmp/"]])
def test_every_command_that_takes_a_testbed_name_checks_it(dirs, argv):
    r = subprocess.run([sys.executable, "-m", "testbed.cli", *argv], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "invalid name" in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["..", ".", "../x", "a,b", ""])
def test_the_library_refuses_such_names_too(dirs, name):
    # Whatever calls lifecycle (the runner, a script), not only the CLI.
    home, state, pools = dirs
    before = _everything(home)
    for call in (lifecycle.down, lifecycle.find, lifecycle.status):
        with pytest.raises(TestbedError, match="testbed name: invalid name|expected a name"):
            call(name)
    assert _everything(home) == before


def test_a_topology_named_dotdot_is_refused_by_up(dirs, tmp_path):
    home, state, pools = dirs
    src = T.resolve("1host-1switch")
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.read_text().replace("name: 1host-1switch", 'name: ".."'))
    before = _everything(home)
    with pytest.raises((TestbedError, T.TopologyError)) as e:
        lifecycle.up(str(bad), accel="tcg")
    assert "invalid name '..'" in str(e.value)
    assert _everything(home) == before


# --- remove_child: the one way anything is deleted -------------------------------------


def test_remove_child_removes_a_direct_child(tmp_path):
    (tmp_path / "tb" / "host0").mkdir(parents=True)
    (tmp_path / "tb" / "host0" / "f").write_text("x")
    (tmp_path / "file").write_text("x")
    assert paths.remove_child(tmp_path, tmp_path / "tb") is True
    assert paths.remove_child(tmp_path, tmp_path / "file") is True
    assert paths.remove_child(tmp_path, tmp_path / "gone") is False
    assert list(tmp_path.iterdir()) == []


def test_remove_child_through_a_symlinked_root(tmp_path):
    real = tmp_path / "real"
    (real / "tb").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    assert paths.remove_child(tmp_path / "link", tmp_path / "link" / "tb") is True
    assert not (real / "tb").exists()


@pytest.mark.parametrize("rel", ["..", ".", "a/..", "a/b", "../outside", "a/../../outside"])
def test_remove_child_refuses_what_is_not_directly_inside(tmp_path, rel):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    before = _everything(tmp_path)
    with pytest.raises(TestbedError, match="refusing to remove"):
        paths.remove_child(root, root / rel)
    assert _everything(tmp_path) == before


@pytest.mark.parametrize("target", ["outside", "root/sibling"])
def test_remove_child_refuses_a_symlink(tmp_path, target):
    # A link planted in the state folder, to a folder outside or to another testbed.
    root = tmp_path / "root"
    (root / "sibling").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "data").write_text("precious")
    (root / "tb").symlink_to(tmp_path / target)
    before = _everything(tmp_path)
    with pytest.raises(TestbedError, match="it is a symlink"):
        paths.remove_child(root, root / "tb")
    assert _everything(tmp_path) == before


def test_down_refuses_a_testbed_folder_that_is_a_symlink(dirs):
    home, state, pools = dirs
    (state / "tb").symlink_to(state.parent / "other-app")
    before = _everything(home)
    with pytest.raises(TestbedError, match="refusing to remove .*tb.*symlink"):
        lifecycle.down("tb")
    assert [p for p in _everything(home) if not p.endswith(".tb.lock")] == before
    assert (state.parent / "other-app" / "data").read_text() == "precious"


# --- private folders --------------------------------------------------------------------


def test_pools_default_to_a_folder_of_their_own_per_user(monkeypatch):
    monkeypatch.delenv("BELUGA_TESTBED_POOLS", raising=False)
    got = {}
    for uid in (1000, 1001):
        monkeypatch.setattr(os, "getuid", lambda uid=uid: uid)
        got[uid] = paths.pool_dir()
    assert got == {1000: Path("/dev/shm/beluga-testbed-1000"), 1001: Path("/dev/shm/beluga-testbed-1001")}


def test_private_dir_is_created_0700_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        d = paths.private_dir(tmp_path / "a" / "pools")
    finally:
        os.umask(old)
    assert (os.stat(d).st_mode & 0o777) == 0o700


def test_a_folder_writable_by_others_is_refused(tmp_path, monkeypatch):
    pools = tmp_path / "pools"
    pools.mkdir()
    pools.chmod(0o777)
    monkeypatch.setenv("BELUGA_TESTBED_POOLS", str(pools))
    with pytest.raises(TestbedError, match=r"writable by group or others \(mode 0777\)") as e:
        paths.private_dir(pools)
    assert "chmod 700" in e.value.hint and "BELUGA_TESTBED_POOLS" in e.value.hint


def test_a_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(state, 65534, 65534)
    else:
        state = Path("/usr")  # owned by root
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(state))
    with pytest.raises(TestbedError, match=r"owned by uid \d+, not by you") as e:
        lifecycle.down("tb")
    assert "BELUGA_TESTBED_STATE" in e.value.hint


def test_a_symlink_in_place_of_a_pool_file_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "mem0.raw").symlink_to(victim)
    with pytest.raises(TestbedError, match="cannot create"):
        paths.create_private(tmp_path / "mem0.raw")
    with pytest.raises(OSError):
        paths.open_nofollow(tmp_path / "mem0.raw", "r+b")
    assert victim.read_text() == "precious"
