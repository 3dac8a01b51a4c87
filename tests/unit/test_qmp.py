"""qmp.QMP against a real QEMU (`-machine none`: no guest, a real monitor, real events):
one connection for many commands, events waited for and never missed, Ctrl-C kept."""
from __future__ import annotations

import _thread
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from testbed import qmp

pytestmark = pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="QEMU not installed")


@pytest.fixture
def qemu():
    """A QEMU with no machine, its QMP socket under a short path (unix sockets: 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="bt-qmp-", dir="/tmp"))
    sock = d / "qmp.sock"
    p = subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                          "-qmp", f"unix:{sock},server=on,wait=off"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert p.poll() is None and time.monotonic() < deadline, "QEMU did not make its QMP socket"
        time.sleep(0.05)
    yield sock, p
    p.kill()
    p.wait()
    shutil.rmtree(d, ignore_errors=True)


def test_stop_and_cont_send_stop_and_resume(qemu):
    sock, _ = qemu
    with qmp.QMP(sock) as q:
        assert q.execute("query-status")["running"] is True
        q.execute("stop")
        assert q.event_wait("STOP", timeout_s=10)["event"] == "STOP"
        assert q.execute("query-status")["status"] == "paused"
        q.execute("cont")
        assert q.event_wait("RESUME", timeout_s=10)["event"] == "RESUME"
        assert q.execute("query-status")["running"] is True


def test_an_event_that_came_before_the_wait_is_not_missed(qemu):
    sock, _ = qemu
    with qmp.QMP(sock) as q:
        q.execute("stop")
        q.execute("cont")
        q.execute("query-status")  # both events are in by the time this is answered
        assert q.event_wait("RESUME", timeout_s=10)["event"] == "RESUME"  # out of order: STOP is kept
        assert q.event_wait("STOP", timeout_s=10)["event"] == "STOP"
        with pytest.raises(qmp.EventTimeout, match=r"no STOP event within 0.5 s$"):
            q.event_wait("STOP", timeout_s=0.5)  # each event is returned once


def test_match_picks_the_event_by_its_data(qemu):
    sock, p = qemu
    with qmp.QMP(sock) as q:
        q.execute("quit")
        with pytest.raises(qmp.EventTimeout) as e:
            q.event_wait("SHUTDOWN", timeout_s=2, match={"data": {"reason": "guest-shutdown"}})
        assert "(matching {'data': {'reason': 'guest-shutdown'}})" in str(e.value)
        ev = q.event_wait("SHUTDOWN", timeout_s=2, match={"data": {"reason": "host-qmp-quit"}})
        assert ev["data"]["guest"] is False
    assert p.wait(timeout=30) == 0


def test_a_qmp_error_is_an_execute_error(qemu):
    sock, _ = qemu
    with pytest.raises(ExecuteError, match="no-such-command"):
        qmp.execute(sock, "no-such-command")
    assert qmp.execute(sock, "query-status")["running"] is True  # the one-shot form


def test_ctrl_c_during_a_wait_stays_a_keyboard_interrupt(qemu):
    sock, _ = qemu
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with qmp.QMP(sock) as q:
            timer = threading.Timer(0.5, _thread.interrupt_main)
            timer.start()
            try:
                with pytest.raises(KeyboardInterrupt):
                    q.event_wait("RESUME", timeout_s=60)  # never comes: nothing was stopped
            finally:
                timer.cancel()
            assert q.execute("query-status")["running"] is True, "the connection still works"
    finally:
        signal.signal(signal.SIGINT, old)
