"""The pytest plugin's options, names and fixture lifecycle, with a fake Testbed class in
the inner runs (the boundary: booting VMs). The inner suites run through pytester, in
this process or, for xdist, in worker processes; every call the fake gets is a JSON line
in a file, so the assertions read what the plugin really did."""
import json
import textwrap

import pytest

from testbed import pytest_plugin
from testbed.log import TestbedError
from testbed.pytest_plugin import Options, choose_name

pytest_plugins = ["pytester"]

FAKE_CONFTEST = textwrap.dedent('''
    import json, os
    import testbed.pytest_plugin as plugin

    LOG = os.environ["FAKE_TESTBED_LOG"]

    def note(*what):
        with open(LOG, "a") as f:
            f.write(json.dumps(list(what)) + "\\n")

    class Report:
        def __init__(self, not_undone=()):
            self.not_undone = tuple(not_undone)
            self.complete = not self.not_undone

    class FakeTestbed:
        running_names = set(filter(None, os.environ.get("FAKE_RUNNING", "").split(",")))

        def __init__(self, name):
            self.name = name
            self.topology = os.environ.get("FAKE_TOPOLOGY", "2hosts-1switch")
            self.hosts = ("host0", "host1")
            self.dead = set()

        @classmethod
        def running(cls):
            return sorted(cls.running_names)

        @classmethod
        def up(cls, topology, *, name, shares, keep, **kernel):
            note("up", topology, name, list(shares), keep, *([kernel] if kernel else []))
            cls.running_names.add(name)
            return cls(name)

        @classmethod
        def attach(cls, name):
            note("attach", name)
            return cls(name)

        def alive(self, h):
            return h not in self.dead

        def kill(self, h):
            note("kill", self.name, h)
            self.dead.add(h)

        def reset(self):
            note("reset", self.name)
            return Report(f"{h}: QEMU is not running" for h in sorted(self.dead))

        def down(self):
            note("down", self.name)
            self.running_names.discard(self.name)

        def _adopt(self, other):
            self.name, self.dead = other.name, other.dead

    plugin._testbed_class = lambda: FakeTestbed
''')


@pytest.fixture
def inner(pytester, tmp_path, monkeypatch, request):
    """Run a user's test file through the plugin with the fake; returns (result, calls)."""
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TESTBED_LOG", str(log))
    # The inner conftest puts the fake into the plugin module, which an in-process run
    # shares with this one: put the real one back afterwards.
    monkeypatch.setattr(pytest_plugin, "_testbed_class", pytest_plugin._testbed_class)
    pytester.makeconftest(FAKE_CONFTEST)
    # The plugin is registered already where beluga-testbed is installed (its entry point);
    # elsewhere (a worktree run through PYTHONPATH) the inner run loads it by module name.
    # Inner runs share this process, which imported testbed before them: pytest warns that
    # it cannot rewrite the asserts of the plugin's package (a user's run loads the plugin
    # first and never sees this). With the package installed the entry point loads it.
    plugin_args = ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    if not request.config.pluginmanager.has_plugin("beluga_testbed"):
        plugin_args = ["-p", "testbed.pytest_plugin", *plugin_args]

    def run(test_source: str, *args: str, subprocess: bool = False):
        pytester.makepyfile(test_user=textwrap.dedent(test_source))
        runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest_inprocess
        result = runner(*plugin_args, "-p", "no:cacheprovider", *args)
        calls = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        return result, calls

    return run


THREE_TESTS = '''
    def test_a(testbed):
        assert testbed.name

    def test_b(testbed):
        pass

    def test_c(testbed_session):
        pass
'''


def test_nothing_boots_when_no_test_asks_for_a_testbed(inner):
    result, calls = inner("def test_plain():\n    assert 1 + 1 == 2\n")
    result.assert_outcomes(passed=1)
    assert calls == []


def test_one_up_for_the_session_a_reset_before_each_later_test_and_down_at_the_end(inner):
    result, calls = inner(THREE_TESTS)
    result.assert_outcomes(passed=3)
    assert calls == [["up", "2hosts-1switch", "pytest-2hosts-1switch", [], True],
                     ["reset", "pytest-2hosts-1switch"],   # before test_b: test_a had it
                     ["down", "pytest-2hosts-1switch"]]    # test_c uses the session one as it is


def test_options_choose_topology_name_and_shares_and_keep_leaves_it_up(inner, tmp_path):
    result, calls = inner(THREE_TESTS, "--beluga-topology", "1host-1switch", "--beluga-name", "ci-7",
                          "--beluga-share", f"{tmp_path}:/mnt/x", "--beluga-keep")
    result.assert_outcomes(passed=3)
    assert calls[0] == ["up", "1host-1switch", "ci-7", [f"{tmp_path}:/mnt/x"], True]
    assert ["down", "ci-7"] not in calls


def test_kernel_and_qemu_options_boot_them(inner, tmp_path):
    result, calls = inner(THREE_TESTS, "--beluga-kernel", "/k/bzImage", "--beluga-modules", "/k/mods",
                          "--beluga-qemu", "/q/qemu")
    result.assert_outcomes(passed=3)
    assert calls[0] == ["up", "2hosts-1switch", "pytest-2hosts-1switch", [], True,
                        {"kernel": "/k/bzImage", "modules": "/k/mods", "qemu": "/q/qemu"}]


def test_a_testbed_already_up_with_another_kernel_is_not_used(inner, monkeypatch):
    monkeypatch.setenv("FAKE_RUNNING", "ci")
    seen = []
    monkeypatch.setattr(pytest_plugin, "_kernel_differences",
                        lambda name, opts: seen.append((name, opts.kernel)) or ["kernel: /a/bzImage, not /k/bzImage"])
    result, calls = inner("def test_a(testbed):\n    pass\n", "--beluga-name", "ci", "--beluga-kernel", "/k/bzImage")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*beluga-testbed: testbed 'ci' is up with another kernel or QEMU: "
                                 "kernel: /a/bzImage, not /k/bzImage*"])
    assert seen == [("ci", "/k/bzImage")] and calls == [["attach", "ci"]]


def test_without_kernel_options_a_running_testbeds_kernel_is_not_asked_for():
    assert pytest_plugin._kernel_differences("no-such-testbed", Options()) == []


def test_a_testbed_already_up_is_attached_and_reset_before_the_first_test(inner, monkeypatch):
    monkeypatch.setenv("FAKE_RUNNING", "pytest-2hosts-1switch")
    result, calls = inner("def test_a(testbed):\n    pass\n")
    result.assert_outcomes(passed=1)
    assert calls == [["attach", "pytest-2hosts-1switch"], ["reset", "pytest-2hosts-1switch"],
                     ["down", "pytest-2hosts-1switch"]]


def test_a_testbed_already_up_with_another_topology_is_not_used(inner, monkeypatch):
    monkeypatch.setenv("FAKE_RUNNING", "ci")
    monkeypatch.setenv("FAKE_TOPOLOGY", "4hosts-1switch")
    result, calls = inner("def test_a(testbed):\n    pass\n", "--beluga-name", "ci")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*beluga-testbed: testbed 'ci' is up with topology '4hosts-1switch', "
                                 "not '2hosts-1switch'*", "*hint: 'beluga-testbed down ci', or another --beluga-name*"])
    assert calls == [["attach", "ci"]]


def test_a_killed_host_gets_the_next_test_a_fresh_testbed(inner):
    result, calls = inner('''
        def test_kill(testbed):
            testbed.kill("host1")

        def test_after(testbed):
            assert all(testbed.alive(h) for h in testbed.hosts)
    ''')
    result.assert_outcomes(passed=2)
    name = "pytest-2hosts-1switch"
    assert calls == [["up", "2hosts-1switch", name, [], True], ["kill", name, "host1"], ["reset", name],
                     ["down", name], ["up", "2hosts-1switch", name, [], True], ["down", name]]


def test_a_reset_that_leaves_something_undone_warns_with_what(inner):
    result, calls = inner('''
        def test_a(testbed):
            testbed.dead.add("ghost")   # not one of its hosts: the reset reports it, the hosts live

        def test_b(testbed):
            pass
    ''')
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(["*BelugaResetWarning: reset of 'pytest-2hosts-1switch' could not undo: "
                                 "ghost: QEMU is not running*"])


def test_xdist_workers_each_get_their_own_testbed(inner):
    pytest.importorskip("xdist")
    result, calls = inner(THREE_TESTS + "\n    def test_d(testbed):\n        pass\n", "-n", "2", "--dist", "load",
                          subprocess=True)
    result.assert_outcomes(passed=4)
    ups = sorted(c[2] for c in calls if c[0] == "up")
    assert ups == ["pytest-2hosts-1switch-gw0", "pytest-2hosts-1switch-gw1"]
    assert sorted(c[1] for c in calls if c[0] == "down") == ups


def test_the_real_testbed_class_is_back_after_the_inner_runs_with_the_fake():
    """Runs after them (tests run in file order): the inner runs share the plugin module."""
    assert pytest_plugin._testbed_class().__module__ == "testbed.api"


def test_names_follow_the_topology_and_the_worker():
    assert choose_name(Options(), None) == "pytest-2hosts-1switch"
    assert choose_name(Options(), "master") == "pytest-2hosts-1switch"
    assert choose_name(Options(), "gw3") == "pytest-2hosts-1switch-gw3"
    assert choose_name(Options(topology="topos/My_Rack.yaml"), None) == "pytest-my-rack"
    assert choose_name(Options(name="ci"), "gw0") == "ci-gw0"


def test_a_bad_name_is_refused_with_the_rule_before_anything_boots():
    with pytest.raises(TestbedError) as e:
        choose_name(Options(name="../etc"), None)
    assert "--beluga-name" in str(e.value) and "invalid name '../etc'" in str(e.value)


def test_a_bad_name_option_errors_the_tests_that_need_a_testbed_with_the_rule_not_a_traceback(inner):
    result, calls = inner("def test_a(testbed):\n    pass\n\ndef test_plain():\n    pass\n",
                          "--beluga-name", "Bad Name")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*beluga-testbed: --beluga-name*invalid name 'Bad Name'*"])
    assert "pytest_plugin.py" not in result.stdout.str()
    assert calls == []


def test_the_entry_point_is_declared():
    import tomllib
    from pathlib import Path
    meta = tomllib.loads((Path(pytest_plugin.__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["pytest11"] == {"beluga_testbed": "testbed.pytest_plugin"}


def test_loading_the_plugin_imports_nothing_heavy():
    """It is loaded into every pytest run where beluga-testbed is installed."""
    import subprocess
    import sys
    code = ("import sys, testbed.pytest_plugin; "
            "print(sorted(m for m in ('testbed.api', 'testbed.lifecycle', 'paramiko', 'fabric', 'qemu.qmp') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
