"""`up --share`: parsing and checking the specs, the QEMU options, the guest mount command,
and the CLI refusing a bad share before anything boots."""
import json
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed import shares as S
from testbed import topology as T
from testbed.log import TestbedError
from testbed.qemucmd import HostFiles, host_argv

REPO = Path(__file__).resolve().parents[2]


def test_defaults_read_only_at_mnt_folder_name(tmp_path):
    (tmp_path / "my-prog").mkdir()
    s = S.parse("my-prog", 0, base=tmp_path)
    assert s == S.Share(tmp_path / "my-prog", "/mnt/my-prog", False, "share0")
    assert S.parse(f"{tmp_path}/my-prog/:/opt/p:rw", 3).rw and S.parse(f"{tmp_path}:/opt/p:ro", 3).tag == "share3"
    assert S.Share.from_state(s.to_state()) == s


@pytest.mark.parametrize("spec, message", [
    ("{d}/nope", "host folder {d}/nope does not exist"),
    ("{d}/file", "{d}/file is not a folder"),
    ("{d}:mnt/x", "guest folder 'mnt/x' is not an absolute path"),
    ("{d}:/mnt/../etc", "guest folder '/mnt/../etc' is not in normal form \\(use '/etc'\\)"),
    ("{d}:/", "guest folder '/' is a system folder"),
    ("{d}:/etc", "guest folder '/etc' is a system folder"),
    ("{d}:/usr/lib/python3", "guest folder '/usr/lib/python3' is a system folder"),
    ("{d}:/root", "guest folder '/root' is a system folder"),
    ("{d}:/proc/x", "guest folder '/proc/x' is a system folder"),
    ("{d}:/mnt/x:wr", "unknown mode 'wr' \\(expected 'rw' or 'ro'"),
    ("{d}:/mnt/x:rw:y", "too many ':'"),
    (":/mnt/x", "no host folder given"),
    ("{d}:/mnt/a\nb", "contains control characters"),
])
def test_bad_specs_are_refused_with_the_reason(tmp_path, spec, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TestbedError, match=message.format(d=tmp_path)) as e:
        S.parse(spec.format(d=tmp_path), 0)
    assert str(e.value).startswith("--share ")


def test_two_shares_at_one_place_or_one_inside_another(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(TestbedError, match="two shares are mounted at /mnt/x"):
        S.parse_all([f"{tmp_path}/a:/mnt/x", f"{tmp_path}/b:/mnt/x/"])
    with pytest.raises(TestbedError, match=f"share {tmp_path}/b at /mnt/x/y would be inside share {tmp_path}/a"):
        S.parse_all([f"{tmp_path}/a:/mnt/x", f"{tmp_path}/b:/mnt/x/y"])
    assert [s.tag for s in S.parse_all([f"{tmp_path}/a:/mnt/x", f"{tmp_path}/b:/mnt/xy"])] == ["share0", "share1"]


def test_qemu_options_escape_commas_and_pin_the_bus(tmp_path):
    odd = tmp_path / "a,b=c"
    odd.mkdir()
    t = T.load("2hosts-1switch")
    shares = S.parse_all([f"{odd}:/mnt/odd", f"{tmp_path}:/mnt/all:rw"])
    argv = host_argv(t, t.hosts[0], kernel=Path("/k"), initrd=Path("/i"), cmdline="", files=HostFiles(Path("/s/h0")),
                     ssh_port=10022, pool_files={d.id: Path(f"/p/{d.id}") for d in t.devices},
                     authorized_keys=Path("/s/key.pub"), shares=shares)
    i = argv.index("-fsdev")
    assert argv[i:i + 8] == [
        "-fsdev", f"local,id=share0,path={tmp_path}/a,,b=c,security_model=none,readonly=on",
        "-device", "virtio-9p-pci,fsdev=share0,mount_tag=share0,bus=pcie.0,id=share0-dev",
        "-fsdev", f"local,id=share1,path={tmp_path},security_model=none",
        "-device", "virtio-9p-pci,fsdev=share1,mount_tag=share1,bus=pcie.0,id=share1-dev",
    ]


def test_mount_command_quotes_guest_folders(tmp_path):
    cmd = S.mount_command(S.parse_all([f"{tmp_path}:/mnt/my prog", f"{tmp_path}:/opt/w:rw"]))
    assert cmd == ("modprobe -a 9pnet_virtio 9p"
                   " && mkdir -p '/mnt/my prog' && mount -t 9p -o trans=virtio,version=9p2000.L,ro share0 '/mnt/my prog'"
                   " && mkdir -p /opt/w && mount -t 9p -o trans=virtio,version=9p2000.L,rw share1 /opt/w")
    assert shlex.split(cmd)[-1] == "/opt/w"


def test_cli_dry_run_shows_the_shares_and_refuses_a_bad_one(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=REPO, capture_output=True, text=True,
                              env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                   "BELUGA_TESTBED_STATE": str(tmp_path / "state")})
    r = cli("up", "2hosts-1switch", "--dry-run", "--share", f"{tmp_path}:/mnt/t")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f"local,id=share0,path={tmp_path},security_model=none,readonly=on") == 2  # both hosts
    r = cli("up", "2hosts-1switch", "--share", f"{tmp_path}:/etc")
    assert r.returncode == 1 and "is a system folder of the guest" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_status_lists_the_shares_of_a_testbed(tmp_path):
    state = tmp_path / "state"
    (state / "sh").mkdir(parents=True)
    share = S.parse(f"{tmp_path}:/mnt/prog", 0)
    (state / "sh" / "state.json").write_text(json.dumps({
        "name": "sh", "topology": "2hosts-1switch", "accel": "tcg", "image": "k", "created_at": "now", "pool": None,
        "hosts": [{"name": "host0", "pid": None, "ssh_port": 10022, "dir": str(state / "sh" / "host0"), "argv": []}],
        "shares": [share.to_state()]}))
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "status", "sh"], cwd=REPO, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "BELUGA_TESTBED_STATE": str(state)})
    assert f"share {tmp_path} -> /mnt/prog (read-only, tag share0) on every host" in r.stdout, r.stderr


def test_a_scenario_locates_its_errors_and_finds_what_a_running_testbed_lacks(tmp_path):
    with pytest.raises(TestbedError) as e:
        S.parse("nope", 0, base=tmp_path, where="s.yaml:7: shares[0]")
    assert str(e.value).startswith(f"s.yaml:7: shares[0]: host folder {tmp_path}/nope does not exist")
    ro, rw = S.parse(f"{tmp_path}:/mnt/a", 0), S.parse(f"{tmp_path}:/mnt/b:rw", 1)
    tb = SimpleNamespace(shares=[ro, S.parse(f"{tmp_path}:/mnt/b", 1)])
    assert S.missing(tb, [ro]) == []
    assert S.missing(tb, [rw]) == [rw]  # mounted, but read-only
    assert S.missing(tb, [S.parse(f"{tmp_path}:/mnt/c", 0)]) == [S.parse(f"{tmp_path}:/mnt/c", 0)]
