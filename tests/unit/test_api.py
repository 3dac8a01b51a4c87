"""The Python API (testbed/api.py) without VMs: real pool files (sparse, in a temporary
folder), the topology's real interleave arithmetic; SSH results and QMP answers are the
faked boundary."""
from pathlib import Path

import pytest

from testbed import api, faults, ssh
from testbed import topology as T
from testbed.api import Testbed
from testbed.log import TestbedError


class FakeHost:
    def __init__(self, name, port, root: Path, alive=True):
        self.name, self.ssh_port, self.pid, self.dir = name, port, 1000 + port, root / name
        self._alive = alive

        class Files:
            qmp = root / name / "qmp.sock"
        self.files = Files()

    def alive(self):
        return self._alive


class FakeState:
    """What api.Testbed reads of state.TestbedState."""

    def __init__(self, root: Path, topology="2hosts-1switch", dead=()):
        self.name = "unit"
        self.dir = root
        self.topology = T.load(topology)
        self.topology_name = self.topology.name
        self.hosts = [FakeHost(h.name, 20000 + i, root, h.name not in dead) for i, h in enumerate(self.topology.hosts)]
        self.pool_files = {}
        for d in self.topology.devices:
            f = root / f"{d.id}.raw"
            with open(f, "wb") as fh:
                fh.truncate(d.size_bytes)
            self.pool_files[d.id] = f

    def dax(self, host):
        return "/dev/dax0.0"

    @property
    def key(self):
        return self.dir / "id_ed25519"


@pytest.fixture
def tb(tmp_path):
    return Testbed(FakeState(tmp_path))


def test_hosts_are_typed_and_frozen(tb):
    hosts = tb.hosts
    assert [(h.name, h.index, h.dax) for h in hosts] == [("host0", 0, "/dev/dax0.0"), ("host1", 1, "/dev/dax0.0")]
    with pytest.raises(AttributeError):
        hosts[0].name = "x"  # type: ignore[misc]


def test_an_unknown_host_is_refused_with_the_list_and_a_suggestion(tb):
    with pytest.raises(TestbedError) as e:
        tb.exec("hots1", ["true"])
    assert "no host 'hots1'" in str(e.value) and "did you mean 'host1'" in str(e.value)
    assert "hosts: host0, host1" in str(e.value)


def test_pool_geometry_and_the_offset_to_device_and_file_mapping(tb, tmp_path):
    p = tb.pool
    assert (p.ways, p.granularity_bytes, p.stripe_bytes) == (2, 4096, 8192)
    assert [(d.id, d.position, d.file) for d in p.devices] == [("mem0", 0, tmp_path / "mem0.raw"),
                                                               ("mem1", 1, tmp_path / "mem1.raw")]
    loc = p.locate(8192 + 4096 + 5)  # second stripe, position 1
    assert (loc.device, loc.file, loc.file_offset) == ("mem1", tmp_path / "mem1.raw", 4096 + 5)
    with pytest.raises(TestbedError, match="outside the pool"):
        p.locate(p.size_bytes)


def test_pool_write_and_read_cross_granules_and_land_where_the_arithmetic_says(tb, tmp_path):
    data = bytes(range(256)) * 40  # 10240 bytes from 4000: four granules, both devices, two stripes
    tb.pool.write(4000, data)
    assert tb.pool.read(4000, len(data)) == data
    mem0 = (tmp_path / "mem0.raw").read_bytes()
    mem1 = (tmp_path / "mem1.raw").read_bytes()
    assert mem0[4000:4096] == data[:96]                   # region 4000..4095: mem0 granule 0
    assert mem1[0:4096] == data[96:96 + 4096]              # region 4096..8191: mem1 granule 0
    assert mem0[4096:8192] == data[4192:8288]              # region 8192..12287: mem0 granule 1
    assert mem1[4096:4096 + 1952] == data[8288:]           # region 12288..14239: mem1 granule 1


def test_exec_quotes_every_word_and_reports_per_host(tb, monkeypatch):
    seen = []

    def run(h, command, timeout_s):
        seen.append((h.name, command))
        return ssh.Result(h.name, 0 if h.name == "host0" else 3, "out", "boom\n")

    monkeypatch.setattr(tb, "_run", run)
    r = tb.exec(None, ["echo", "a b", "$(reboot)", "it's"])
    assert sorted(seen) == [("host0", "echo 'a b' '$(reboot)' 'it'\"'\"'s'"),
                            ("host1", "echo 'a b' '$(reboot)' 'it'\"'\"'s'")]
    assert list(r) == ["host0", "host1"]
    assert r["host0"].ok and not r["host1"].ok and not r.ok
    assert [x.host for x in r.failed] == ["host1"]
    with pytest.raises(TestbedError, match="host1: exit 3: boom"):
        r.check()


def test_exec_refuses_a_string_and_a_dead_host_is_a_result_not_an_exception(tmp_path, monkeypatch):
    tb = Testbed(FakeState(tmp_path, dead=("host1",)))
    monkeypatch.setattr(tb, "_run", lambda h, c, t: ssh.Result(h.name, 0, "", ""))
    with pytest.raises(TestbedError, match="argv must be a non-empty list"):
        tb.exec("host0", "rm -rf /tmp/x")  # type: ignore[arg-type]
    r = tb.exec(None, ["true"])
    assert r["host0"].ok
    assert r["host1"].exit_code is None and "not running" in r["host1"].error


def test_poison_splits_at_granules_and_goes_to_every_live_hosts_device(tmp_path, monkeypatch):
    tb = Testbed(FakeState(tmp_path, dead=("host1",)))
    calls = []
    monkeypatch.setattr(faults.qmp, "execute", lambda sock, cmd, args=None, **kw: calls.append((sock.parent.name, cmd, args)))
    locs = tb.poison(4096 - 64, 128)  # the last line of mem0's granule and the first of mem1's
    assert [(x.device, x.file_offset) for x in locs] == [("mem0", 4032), ("mem1", 0)]
    assert calls == [("host0", "cxl-inject-poison", {"path": "/machine/peripheral/mem0", "start": 4032, "length": 64}),
                     ("host0", "cxl-inject-poison", {"path": "/machine/peripheral/mem1", "start": 0, "length": 64})]


def test_media_event_kind_is_checked_before_anything_is_injected(tb, monkeypatch):
    calls = []
    monkeypatch.setattr(faults.qmp, "execute", lambda *a, **k: calls.append(a))
    with pytest.raises(TestbedError, match="unknown media event kind 'thermal'"):
        tb.media_event(0, "thermal")
    assert calls == []
    loc = tb.media_event(4096 + 128, "dram")
    assert loc.device == "mem1" and [c[1] for c in calls] == ["cxl-inject-dram-event"] * 2


def test_flip_bits_changes_exactly_count_bytes_at_the_region_offsets(tb):
    before = tb.pool.read(4090, 12)
    changed = tb.flip_bits(4090, 12)  # crosses from mem0 into mem1
    after = tb.pool.read(4090, 12)
    assert changed == list(range(4090, 4102))
    assert all(bin(a ^ b).count("1") == 1 for a, b in zip(before, after))


def test_attach_checks_the_name_before_it_becomes_a_path(monkeypatch, tmp_path):
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(tmp_path / "state"))
    with pytest.raises(TestbedError, match="invalid name '../x'"):
        Testbed.attach("../x")
    with pytest.raises(TestbedError, match="no testbed named 'nothing-here'"):
        Testbed.attach("nothing-here")


def test_a_testbed_taken_down_refuses_further_use(tb, monkeypatch):
    monkeypatch.setattr(api.lifecycle, "down", lambda name: True)
    with tb:
        pass  # keep=True (attach's default): leaving the block leaves it up
    assert not tb._down
    tb.down()
    with pytest.raises(TestbedError, match="was taken down"):
        tb.exec(None, ["true"])


def test_exec_with_the_pool_environment_and_more_variables_each_value_quoted(tb, monkeypatch):
    seen = {}
    monkeypatch.setattr(tb, "_run", lambda h, command, t: seen.setdefault(h.name, command) and ssh.Result(h.name, 0, "", ""))
    tb.exec(None, ["sh", "-c", "echo $BELUGA_DAX"], pool_env=True, env={"MODE": "a b; reboot"})
    assert seen["host1"].startswith("export BELUGA_POOL_SIZE=536870912; ")
    assert "export BELUGA_HOST=host1; export BELUGA_HOST_INDEX=1; " in seen["host1"]
    assert "export BELUGA_DAX=/dev/dax0.0; " in seen["host1"]
    assert seen["host1"].endswith("export MODE='a b; reboot'; sh -c 'echo $BELUGA_DAX'")
    with pytest.raises(TestbedError, match="env: '1X': not a variable name"):
        tb.exec(None, ["true"], env={"1X": "v"})


def test_copies_go_through_cp_to_the_hosts_asked_for(tb, tmp_path, monkeypatch):
    import contextlib
    import os
    from types import SimpleNamespace

    from testbed import transfer

    class FolderSFTP:
        """The SFTP boundary, over a folder per guest (its root file system)."""

        def __init__(self, root):
            self.root = root

        def _p(self, path):
            return self.root / path.lstrip("/")

        def stat(self, path):
            return os.stat(self._p(path))

        def put(self, local, remote):
            self._p(remote).write_bytes(Path(local).read_bytes())

        def get(self, remote, local):
            Path(local).write_bytes(self._p(remote).read_bytes())

        def chmod(self, path, mode):
            os.chmod(self._p(path), mode)

        def mkdir(self, path):
            os.mkdir(self._p(path))

        def listdir_attr(self, path):
            return [SimpleNamespace(filename=n) for n in os.listdir(self._p(path))]

    roots = {}
    for h in ("host0", "host1"):
        roots[h] = tmp_path / "guests" / h
        (roots[h] / "root").mkdir(parents=True)

    @contextlib.contextmanager
    def open_sftp(h, key):
        yield FolderSFTP(roots[h.name])

    monkeypatch.setattr(transfer, "open_sftp", open_sftp)
    src = tmp_path / "prog.sh"
    src.write_text("#!/bin/sh\n")
    src.chmod(0o750)
    assert tb.copy_in(None, src, "/root/") == ["host0:/root/prog.sh", "host1:/root/prog.sh"]
    assert (roots["host1"] / "root" / "prog.sh").stat().st_mode & 0o777 == 0o750
    out = tb.copy_out(None, "/root/prog.sh", tmp_path / "back")
    assert out == [tmp_path / "back" / "host0" / "prog.sh", tmp_path / "back" / "host1" / "prog.sh"]
    assert tb.copy_out("host1", "/root/prog.sh", tmp_path / "one.sh") == [tmp_path / "one.sh"]
    with pytest.raises(TestbedError, match="no host 'host7'"):
        tb.copy_in("host7", src, "/root/")


def test_up_passes_shares_and_a_users_kernel_and_qemu_to_up_checked_before_it(monkeypatch, tmp_path):
    got = {}
    monkeypatch.setattr(api.lifecycle, "up", lambda ref, **kw: got.update(ref=ref, **kw) or FakeState(tmp_path))
    tb = Testbed.up("2hosts-1switch", name="ci-1", shares=[f"{tmp_path}:/mnt/data:rw"], kernel="bzImage",
                    modules=str(tmp_path), qemu="/opt/qemu/bin/qemu-system-x86_64")
    assert got["ref"] == "2hosts-1switch" and got["name"] == "ci-1"
    assert [(s.host_dir, s.guest_dir, s.rw) for s in got["shares"]] == [(tmp_path, "/mnt/data", True)]
    assert (got["kernel"], got["modules"], got["qemu"]) == (Path("bzImage"), tmp_path,
                                                            Path("/opt/qemu/bin/qemu-system-x86_64"))
    assert "initrd" not in got and not tb.keep
    got.clear()
    with pytest.raises(TestbedError):
        Testbed.up("2hosts-1switch", shares=["relative/no/such:/etc"])  # a share over /etc is refused
    assert got == {}
    with pytest.raises(TestbedError, match="invalid name"):
        Testbed.up("2hosts-1switch", name="Bad Name")


def test_what_the_cli_does_the_api_does(tmp_path, monkeypatch):
    """up --dry-run, down NAME and exec's argument checks, without the command line."""
    monkeypatch.setenv("BELUGA_TESTBED_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("BELUGA_TESTBED_POOLS", str(tmp_path / "pools"))
    plan = Testbed.plan("2hosts-1switch", name="dry")
    assert plan.name == "dry" and list(plan.argv) == ["host0", "host1"]
    assert plan.argv["host1"][0] == "qemu-system-x86_64" and "-qmp" in plan.argv["host1"]
    assert Testbed.running() == [] and Testbed.down_named("dry") is False
    with pytest.raises(TestbedError, match=r"^no command given"):
        Testbed.check_shell("  ")
    with pytest.raises(TestbedError, match=r"^both a host \(host1\) and --all"):
        Testbed.check_shell("true", "host1", True)
