"""`beluga-testbed cp`: which side is remote, where files land, located errors. The SFTP
boundary is faked by a client over a real folder per host (its "root file system")."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed import transfer
from testbed.log import TestbedError


class FolderSFTP:
    """The calls transfer makes on paramiko's SFTPClient, on a local folder. Relative
    paths are taken from /root, as an SFTP server starts in root's home."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _p(self, path: str) -> Path:
        return self.root / (path if path.startswith("/") else "root/" + path).lstrip("/")

    def stat(self, path):
        return os.stat(self._p(path))

    def mkdir(self, path):
        os.mkdir(self._p(path))

    def put(self, local, remote):
        self._p(remote).write_bytes(Path(local).read_bytes())

    def get(self, remote, local):
        Path(local).write_bytes(self._p(remote).read_bytes())

    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)

    def listdir_attr(self, path):
        return [SimpleNamespace(filename=n) for n in os.listdir(self._p(path))]

    def lstat(self, path):
        return os.lstat(self._p(path))

    def symlink(self, source, dest):
        os.symlink(source, self._p(dest))

    def remove(self, path):
        os.unlink(self._p(path))

    def readlink(self, path):
        return os.readlink(self._p(path))


@pytest.fixture
def tb(tmp_path, monkeypatch):
    roots = {}
    for name in ("host0", "host1"):
        r = tmp_path / "guests" / name
        (r / "root").mkdir(parents=True)
        (r / "tmp").mkdir()
        roots[name] = r
    alive = {"host0": True, "host1": True}
    hosts = [SimpleNamespace(name=n, ssh_port=0, alive=lambda n=n: alive[n]) for n in roots]

    def host(name):
        for h in hosts:
            if h.name == name:
                return h
        raise TestbedError(f"testbed 't' has no host '{name}' (hosts: host0, host1)")

    @contextlib.contextmanager
    def fake_sftp(h, key):
        yield FolderSFTP(roots[h.name])

    monkeypatch.setattr(transfer, "open_sftp", fake_sftp)
    return SimpleNamespace(hosts=hosts, host=host, key=Path("/k"), roots=roots, alive=alive)


@pytest.fixture
def prog(tmp_path):
    d = tmp_path / "prog"
    (d / "lib").mkdir(parents=True)
    (d / "run.py").write_text("print('hi')\n")
    os.chmod(d / "run.py", 0o755)
    (d / "lib" / "util.py").write_text("X = 1\n")
    return d


def test_a_file_into_a_folder_of_every_host_keeps_its_mode(tb, prog):
    out = transfer.copy(tb, str(prog / "run.py"), ":/tmp/", all_hosts=True, recursive=False)
    assert out == ["host0:/tmp/run.py", "host1:/tmp/run.py"]
    for r in tb.roots.values():
        f = r / "tmp" / "run.py"
        assert f.read_text() == "print('hi')\n" and stat.S_IMODE(f.stat().st_mode) == 0o755


def test_a_folder_needs_r_and_then_lands_whole(tb, prog):
    with pytest.raises(TestbedError, match=f"{prog}: is a folder") as e:
        transfer.copy(tb, str(prog), "host1:/tmp", all_hosts=False, recursive=False)
    assert "add -r" in e.value.hint
    assert transfer.copy(tb, str(prog), "host1:/tmp", all_hosts=False, recursive=True) == ["host1:/tmp/prog"]
    assert (tb.roots["host1"] / "tmp/prog/lib/util.py").read_text() == "X = 1\n"
    assert not (tb.roots["host0"] / "tmp/prog").exists()
    # A new name: the folder is copied as that name, like cp -r.
    transfer.copy(tb, str(prog), "host1:/tmp/renamed", all_hosts=False, recursive=True)
    assert (tb.roots["host1"] / "tmp/renamed/run.py").exists()


def test_links_inside_a_folder_are_copied_as_links_never_followed(tb, prog, tmp_path):
    """A link out of the folder copies nothing from outside it; a link to a parent is no loop."""
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the folder")
    (prog / "lib" / "secret").symlink_to(secret)
    (prog / "lib" / "up").symlink_to("..")
    assert transfer.copy(tb, str(prog), "host0:/tmp", all_hosts=False, recursive=True) == ["host0:/tmp/prog"]
    lib = tb.roots["host0"] / "tmp/prog/lib"
    assert os.readlink(lib / "secret") == str(secret) and os.readlink(lib / "up") == ".."
    assert (lib / "util.py").read_text() == "X = 1\n"
    # and back out: links come back as links
    out = tmp_path / "back"
    out.mkdir()
    transfer.copy(tb, "host0:/tmp/prog", str(out), all_hosts=False, recursive=True)
    assert os.readlink(out / "prog/lib/up") == ".." and (out / "prog/run.py").read_text() == "print('hi')\n"
    # Copied again, both ways, after the link changed: it is replaced, as the files are.
    (prog / "lib" / "up").unlink()
    (prog / "lib" / "up").symlink_to("../lib")
    transfer.copy(tb, str(prog), "host0:/tmp", all_hosts=False, recursive=True)
    assert os.readlink(lib / "up") == "../lib"
    transfer.copy(tb, "host0:/tmp/prog", str(out), all_hosts=False, recursive=True)
    assert os.readlink(out / "prog/lib/up") == "../lib" and os.readlink(out / "prog/lib/secret") == str(secret)


def test_copying_out_never_writes_through_a_local_link(tb, tmp_path):
    """A guest's link, copied out, becomes a local link; a later copy whose file has that name
    must not write through it to wherever it points."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    guest = tb.roots["host0"] / "tmp/res"
    guest.mkdir()
    (guest / "f").symlink_to(victim)
    out = tmp_path / "out"
    out.mkdir()
    transfer.copy(tb, "host0:/tmp/res", str(out), all_hosts=False, recursive=True)
    assert os.readlink(out / "res/f") == str(victim)
    (guest / "f").unlink()
    (guest / "f").write_text("overwritten")
    with pytest.raises(TestbedError, match=f"^{out / 'res/f'}: is a symbolic link; will not write through it$"):
        transfer.copy(tb, "host0:/tmp/res", str(out), all_hosts=False, recursive=True)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("name", ["..", ".", "a/../../x", ""])
def test_a_name_no_file_can_have_from_a_hostile_guest_is_refused(tb, tmp_path, monkeypatch, name):
    guest = tb.roots["host0"] / "tmp/res"
    guest.mkdir()
    (guest / "ok").write_text("x")
    real = FolderSFTP.listdir_attr
    monkeypatch.setattr(FolderSFTP, "listdir_attr",
                        lambda self, path: real(self, path) + [SimpleNamespace(filename=name)])
    with pytest.raises(TestbedError, match=f"^host0:/tmp/res: the host listed an entry named {name!r}; "
                                           f"refusing to write it$".replace(".", r"\.")):
        transfer.copy(tb, "host0:/tmp/res", str(tmp_path / "out"), all_hosts=False, recursive=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guests", "out"]


def test_relative_remote_paths_are_in_roots_home(tb, prog):
    assert transfer.copy(tb, str(prog / "run.py"), "host0:x.py", all_hosts=False, recursive=False) == ["host0:x.py"]
    assert (tb.roots["host0"] / "root/x.py").exists()


def test_out_of_one_host_into_a_file_or_a_folder(tb, tmp_path):
    (tb.roots["host1"] / "tmp/out.json").write_text('{"ok": 1}')
    local = tmp_path / "local"
    local.mkdir()
    assert transfer.copy(tb, "host1:/tmp/out.json", str(local), all_hosts=False, recursive=False) == \
        [str(local / "out.json")]
    transfer.copy(tb, "host1:/tmp/out.json", str(local / "renamed.json"), all_hosts=False, recursive=False)
    assert (local / "renamed.json").read_text() == '{"ok": 1}'


def test_out_of_every_host_one_subfolder_each(tb, tmp_path):
    for n, r in tb.roots.items():
        (r / "tmp/out.json").write_text(n)
    outs = tmp_path / "outs"
    got = transfer.copy(tb, ":/tmp/out.json", str(outs), all_hosts=True, recursive=False)
    assert got == [str(outs / "host0/out.json"), str(outs / "host1/out.json")]
    assert [(outs / n / "out.json").read_text() for n in ("host0", "host1")] == ["host0", "host1"]


def test_every_hosts_error_is_reported_and_located(tb, tmp_path):
    (tb.roots["host0"] / "tmp/out.json").write_text("x")
    with pytest.raises(TestbedError) as e:
        transfer.copy(tb, ":/tmp/out.json", str(tmp_path / "outs"), all_hosts=True, recursive=False)
    assert str(e.value) == "host1:/tmp/out.json: no such file or folder"
    tb.alive["host0"] = False
    with pytest.raises(TestbedError) as e:
        transfer.copy(tb, ":/tmp/nope", str(tmp_path / "outs"), all_hosts=True, recursive=False)
    assert e.value.message == "host0: not running (QEMU stopped)\nhost1:/tmp/nope: no such file or folder"


@pytest.mark.parametrize("src, dst, all_hosts, message", [
    ("{p}/run.py", "{p}/copy.py", False, "both sides are local: one of SRC and DST must be HOST:PATH"),
    ("host0:/a", "host1:/b", False, "both sides are remote"),
    ("{p}/run.py", "host0:", False, "host0: no path after ':'"),
    ("{p}/run.py", ":/tmp/", False, ":/tmp/: which host\\?"),
    ("{p}/run.py", "host0:/tmp/", True, "--all with a host \\(host0:/tmp/\\)"),
    ("{p}/run.py", "hots0:/tmp/", False, "testbed 't' has no host 'hots0' \\(hosts: host0, host1\\)"),
    ("{p}/missing.py", "host0:/tmp/", False, "{p}/missing.py: no such file or folder"),
    ("{p}/run.py", "host0:/nope/x.py", False, "host0:/nope: no such folder"),
    ("{p}/run.py", "host0:/nope/", False, "host0:/nope/: no such folder"),
    ("{p}", "host0:/tmp/f", False, "host0:/tmp/f: is a file; will not replace it with {p}"),
    ("host0:/tmp", "{p}/out", False, "host0:/tmp: is a folder"),
    ("host0:/tmp/f", "{p}/no/such/f", False, "{p}/no/such: no such folder"),
])
def test_mistakes(tb, prog, src, dst, all_hosts, message):
    (tb.roots["host0"] / "tmp/f").write_text("x")
    with pytest.raises(TestbedError, match=message.format(p=prog)):
        transfer.copy(tb, src.format(p=prog), dst.format(p=prog), all_hosts=all_hosts, recursive=src == "{p}")


def test_a_local_path_with_a_colon_after_a_slash_is_local():
    assert transfer.split("./a:b") is None and transfer.split("/x/y:z") is None
    assert transfer.split("host0:/x") == transfer.Remote("host0", "/x")
    assert transfer.split(":rel") == transfer.Remote("", "rel")


def test_sftp_errors_become_located_messages():
    assert transfer._why(PermissionError(errno.EACCES, "Permission denied")) == "permission denied"
    assert transfer._why(OSError(errno.ENOSPC, "No space left on device")) == "no space left on device"
