"""A user's test file with only `def test_x(testbed): ...`, run through the pytest plugin
against a real 2hosts-1switch testbed: the tests exec on both hosts, share bytes through
the pool (guest devdax mappings and the backing files on this machine), read a folder
shared by --beluga-share, run a program with the pool's environment, copy files in
and out, take a link down and hang a host, leave processes, files and poison behind, and
the next test finds none of it (the plugin's reset). Then `beluga-testbed reset` on the
testbed the run kept, and again once a host was killed: it says it could not undo that."""
import textwrap

from testbed import Testbed, paths

from .conftest import cli

CACHE = paths.cache_dir()  # at import: before pytester points HOME elsewhere

pytest_plugins = ["pytester"]

NAME = "itest-plugin"

USER_TESTS = textwrap.dedent('''
    WRITE = """
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    m = mmap.mmap(fd, 2 << 20)
    off = int(sys.argv[2])
    m[off:off + len(sys.argv[3])] = sys.argv[3].encode()
    """
    READ = """
    import mmap, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    m = mmap.mmap(fd, 2 << 20)
    off, n = int(sys.argv[2]), int(sys.argv[3])
    print(m[off:off + n].decode(errors="replace"))
    """
    POISON_LIST = ("echo 1 > /sys/kernel/tracing/events/cxl/cxl_poison/enable; "
                   "for t in /sys/bus/cxl/devices/mem*/trigger_poison_list; do echo 1 > $t; done; "
                   "grep -c 'cxl_poison:.*trace_type=List' /sys/kernel/tracing/trace; true")


    def test_hosts_share_the_pool_and_leave_a_mess(testbed):
        host0, host1 = testbed.hosts
        assert (host0.name, host1.name) == ("host0", "host1")
        testbed.exec("host0", ["python3", "-c", WRITE, host0.dax, "4096", "written by host0"], check=True)
        got = testbed.exec("host1", ["python3", "-c", READ, host1.dax, "4096", "16"], check=True)
        assert got["host1"].stdout.strip() == "written by host0"
        assert testbed.pool.read(4096, 16) == b"written by host0"
        testbed.pool.write(8192 + 100, b"from the host")
        got = testbed.exec(None, ["python3", "-c", READ, host0.dax, str(8192 + 100), "13"], check=True)
        assert [r.stdout.strip() for r in got.values()] == ["from the host", "from the host"]
        testbed.exec(None, ["sh", "-c", "setsid sleep 600 > /dev/null 2>&1 < /dev/null & echo x > /tmp/left"],
                     check=True)
        testbed.poison(65536, 128)
        assert testbed.exec("host1", ["sh", "-c", POISON_LIST])["host1"].stdout.split() == ["1"]
        # The folder shared by --beluga-share, the pool's environment, a user's program.
        got = testbed.exec(None, ["cat", "/mnt/share/hello.txt"], check=True)
        assert [r.stdout for r in got.values()] == ["from the share\\n"] * 2
        got = testbed.exec("host1", ["sh", "-c", "echo $BELUGA_DAX $BELUGA_HOST_INDEX"], pool_env=True, check=True)
        assert got["host1"].stdout.split() == [host1.dax, "1"]
        done = testbed.run_program(None, ["sh", "-c", "echo $BELUGA_HOST of $BELUGA_HOST_COUNT"]).join()
        assert [(r.exit_code, r.stdout_tail) for r in done.values()] == [(0, "host0 of 2\\n"), (0, "host1 of 2\\n")]


    def test_copies_link_and_hang_and_a_reset_that_says_what_it_resumed(testbed, tmp_path):
        import os, threading, time
        from testbed import qmp
        src = tmp_path / "prog.sh"
        src.write_text("#!/bin/sh\\necho payload\\n")
        os.chmod(src, 0o750)
        assert testbed.copy_in(None, src, "/root/") == ["host0:/root/prog.sh", "host1:/root/prog.sh"]
        got = testbed.exec(None, ["/root/prog.sh"], check=True)
        assert [r.stdout for r in got.values()] == ["payload\\n", "payload\\n"]
        outs = testbed.copy_out(None, "/root/prog.sh", tmp_path / "back")
        assert outs == [tmp_path / "back" / "host0" / "prog.sh", tmp_path / "back" / "host1" / "prog.sh"]
        assert all(p.read_text() == src.read_text() and p.stat().st_mode & 0o777 == 0o750 for p in outs)

        testbed.nic("host1", False)
        assert testbed.exec("host1", ["true"], timeout_s=5)["host1"].exit_code is None
        hang = threading.Thread(target=testbed.hang, args=("host0", 15))
        hang.start()
        sock = testbed._state.host("host0").files.qmp
        deadline = time.monotonic() + 10
        while qmp.execute(sock, "query-status")["running"]:
            assert time.monotonic() < deadline, "host0 never stopped"
            time.sleep(0.05)
        report = testbed.reset()
        assert report.complete, report.not_undone
        assert [(h.host, h.continued) for h in report.hosts] == [("host0", True), ("host1", False)]
        # Each guest's resident helper (started by up) answered through its forwarded port.
        assert [h.via for h in report.hosts] == ["tcp", "tcp"]
        assert testbed.exec(None, ["true"], timeout_s=30).ok  # host0 runs, host1's link is up
        hang.join()


    def test_the_next_test_starts_from_a_clean_testbed(testbed):
        assert testbed.pool.read(4096, 16) == bytes(16)
        got = testbed.exec(None, ["python3", "-c", READ, testbed.hosts[1].dax, "4096", "16"], check=True)
        assert got["host1"].stdout.strip("\\x00\\n") == ""
        left = testbed.exec(None, ["sh", "-c", "pgrep -x sleep; ls -A /tmp; echo end"], check=True)
        assert [r.stdout.split() for r in left.values()] == [["end"], ["end"]]
        assert testbed.exec("host1", ["sh", "-c", POISON_LIST])["host1"].stdout.split() == ["0"]
''')


def test_a_user_suite_runs_through_the_plugin_and_reset_cleans_between_tests(pytester, request, monkeypatch):
    monkeypatch.setenv("BELUGA_TESTBED_CACHE", str(CACHE))  # pytester moves HOME, where the images are
    plugin = [] if request.config.pluginmanager.has_plugin("beluga_testbed") else \
        ["-p", "testbed.pytest_plugin", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    pytester.makepyfile(test_user=USER_TESTS)
    share = pytester.path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("from the share\n")
    try:
        result = pytester.runpytest_inprocess(*plugin, "-p", "no:cacheprovider", "--beluga-topology",
                                              "2hosts-1switch", "--beluga-name", NAME, "--beluga-keep",
                                              "--beluga-share", f"{share}:/mnt/share", "-v")
        result.assert_outcomes(passed=3)
        assert NAME in cli("list").stdout.split()  # --beluga-keep left it up
        r = cli("reset", NAME)
        assert f"✓ {NAME} reset in" in r.stderr
        Testbed.attach(NAME).kill("host1")
        r = cli("reset", NAME, check=False)
        assert r.returncode == 1
        assert "✗ host1: QEMU is not running" in r.stderr, r.stderr
        assert "host0: 0 process(es) killed" in r.stderr
    finally:
        cli("down", NAME, check=False)
