"""Text sent to guest shells quotes every value: a hostile event name or dax path is one
word to the shell, never a command. The command lines run here in a real shell."""
import shlex
import subprocess

from testbed import deploy, ssh
from testbed.scenario import runner

HOSTILE = "x:' /dev/null; touch {f}; echo '"


def test_guest_saw_event_name_is_one_word(tmp_path):
    pwned = tmp_path / "pwned"
    cmd = runner.guest_saw_command(HOSTILE.format(f=pwned))
    subprocess.run(["sh", "-c", cmd], cwd=tmp_path, capture_output=True, timeout=30)
    assert not pwned.exists()
    # and the grep really looks for that text, fixed-string, in the trace file
    assert shlex.split(cmd)[:5] == ["grep", "-m1", "-F", "-e", " " + HOSTILE.format(f=pwned) + ":"]


def test_guest_saw_finds_the_event_line(tmp_path):
    trace = tmp_path / "trace"
    trace.write_text("kworker-1 [000] 1.0: cxl_general_media: memdev=mem0\nkworker-1 [000] 2.0: cxl_poison: dpa=0x40\n")
    cmd = runner.guest_saw_command("cxl_poison").replace(runner.TRACE_FILE, str(trace))
    out = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30).stdout
    assert out == "kworker-1 [000] 2.0: cxl_poison: dpa=0x40\n"


def test_dax_path_from_the_guest_is_one_word(tmp_path, monkeypatch):
    pwned = tmp_path / "pwned"
    sent = []
    monkeypatch.setattr(ssh, "run_json", lambda h, key, command, **kw: sent.append(command) or {})
    dax = f"/dev/dax0.0; touch {pwned}; echo "
    tb = type("Testbed", (), {"key": None})()
    deploy.format_pool(tb, None, dax, ["--segment-size", "2097152"])
    deploy.start_service(tb, None, dax, ["--lease-ttl", "30"], timeout_s=0.1)
    assert dax in shlex.split(sent[0]) and dax in shlex.split(sent[1])
    # the format command, run for real in a shell (python3 -m beluga.cli is not found there)
    subprocess.run(["sh", "-c", sent[0]], cwd=tmp_path, capture_output=True, timeout=60)
    assert not pwned.exists()
