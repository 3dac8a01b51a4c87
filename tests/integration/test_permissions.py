"""After a real `up` under umask 000, the testbed's folders are 0700 and every file and
socket 0600: the pool's bytes, and the serial console (a root shell in the guest), are
the user's alone."""
import os
import stat

from .conftest import cli, qemu_processes_under


def _modes(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames, "."]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "s" if stat.S_ISSOCK(st.st_mode) else "f"
            out[f"{os.path.relpath(p, os.path.dirname(root))} ({kind})"] = stat.S_IMODE(st.st_mode)
    return out


def test_up_leaves_folders_0700_and_files_and_sockets_0600_whatever_the_umask(isolated_dirs):
    state, pools = isolated_dirs
    old = os.umask(0)  # the CLI inherits it
    try:
        cli("up", "1host-1switch", "--name", "perm")
    finally:
        os.umask(old)
    try:
        modes = {**_modes(str(state / "perm")), **_modes(str(pools / "perm"))}
        for must in ("perm/host0/qmp.sock (s)", "perm/host0/serial.sock (s)", "perm/host0/serial.log (f)",
                     "perm/host0/qemu.pid (f)", "perm/host0/qemu.log (f)", "perm/host0/disk.qcow2 (f)",
                     "perm/state.json (f)", "perm/id_ed25519 (f)", "perm/id_ed25519.pub (f)",
                     "perm/mem0.raw (f)", "perm/mem1.raw (f)"):
            assert must in modes, sorted(modes)
        wrong = {k: f"{m:04o}" for k, m in modes.items() if m != (0o700 if k.endswith("(d)") else 0o600)}
        assert wrong == {}
        assert stat.S_IMODE(os.stat(state / ".perm.lock").st_mode) == 0o600
    finally:
        cli("down", "perm")
    assert qemu_processes_under(state / "perm") == []
