"""Where the testbed keeps things: cache (images), state (running testbeds), pools.

The state and pool folders hold a root shell's socket (the serial console) and every byte
of the guests' shared memory, so they are private to the user: folders 0700, files and
sockets 0600 whatever the umask, a folder owned by someone else or writable by others is
refused, and nothing is ever removed that is not directly inside one of them.
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .log import TestbedError

REPO_ROOT = Path(__file__).resolve().parent.parent

DIR_MODE = 0o700
FILE_MODE = 0o600
# For the processes that create files there (QEMU: sockets, logs, pid file; qemu-img):
# 0177 leaves 0600 on files and on sockets alike (bind() gives a socket 0777 & ~umask).
UMASK = 0o177


def cache_dir() -> Path:
    """Guest images live here; `BELUGA_TESTBED_CACHE` overrides the XDG default."""
    if env := os.environ.get("BELUGA_TESTBED_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "beluga-testbed"


def state_dir() -> Path:
    """One folder per running testbed; `BELUGA_TESTBED_STATE` overrides the XDG default."""
    if env := os.environ.get("BELUGA_TESTBED_STATE"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "beluga-testbed"


def pool_dir() -> Path:
    """The pools' backing files: in memory, shared by every VM of a testbed. One folder per
    user (/dev/shm is shared by all of them); `BELUGA_TESTBED_POOLS` overrides it."""
    if env := os.environ.get("BELUGA_TESTBED_POOLS"):
        return Path(env)
    return Path(f"/dev/shm/beluga-testbed-{os.getuid()}")


def images_src() -> Path:
    return REPO_ROOT / "images"


def _env_for(path: Path) -> str:
    return "BELUGA_TESTBED_POOLS" if path == pool_dir() else "BELUGA_TESTBED_STATE"


def check_private(path: Path) -> None:
    """Refuse a state or pool folder that another user could have prepared or can change:
    one owned by someone else (or reached through someone else's symlink), or writable by
    group or others. (One of ours that others may read is left as it is: it may be a folder
    the user chose, and each testbed's own folders inside are 0700.)"""
    try:
        link = os.lstat(path)
        st = os.stat(path)
    except FileNotFoundError:
        return
    uid = os.getuid()
    hint = f"remove it if you do not need it, or set {_env_for(path)} to a folder of your own"
    if link.st_uid != uid or st.st_uid != uid:
        owner = st.st_uid if link.st_uid == uid else link.st_uid
        raise TestbedError(f"{path}: owned by uid {owner}, not by you (uid {uid}); the testbed keeps "
                           f"its sockets and pool files only in folders of your own", hint=hint)
    if not stat.S_ISDIR(st.st_mode):
        raise TestbedError(f"{path}: not a folder", hint=hint)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TestbedError(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                           f"anyone could put files or links there", hint=f"'chmod 700 {path}' if you trust "
                           f"what is in it, or set {_env_for(path)} to another folder")


def private_dir(path: Path) -> Path:
    """`path` as a folder of ours: created 0700 where missing, refused where someone else's."""
    check_private(path)
    try:
        path.mkdir(mode=DIR_MODE, parents=True)
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        check_private(path)  # it may have appeared, someone else's, since the first check
    return path


def make_child_dir(root: Path, name: str) -> Path:
    """A new folder `root/name`, 0700 whatever the umask (fails if it exists)."""
    d = root / name
    d.mkdir(mode=DIR_MODE)
    os.chmod(d, DIR_MODE)
    return d


def create_private(path: Path, *, exclusive: bool = False) -> int:
    """Open `path` for writing as a new or truncated file of mode 0600, never through a
    symlink (O_NOFOLLOW). Returns the file descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    try:
        fd = os.open(path, flags, FILE_MODE)
    except OSError as e:
        raise TestbedError(f"{path}: cannot create: {e.strerror}",
                           hint="a symlink or a file of someone else is in the way; remove it") from None
    os.fchmod(fd, FILE_MODE)  # the umask may have cleared bits; a file that was there keeps its old mode
    return fd


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` (mode 0600, never through a symlink)."""
    with os.fdopen(create_private(path), "w") as f:
        f.write(text)


def open_nofollow(path: Path, mode: str = "rb"):
    """open() of a pool backing file that refuses a symlink in its place."""
    return open(path, mode, opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW))


def remove_child(root: Path, path: Path) -> bool:
    """Remove `path` (a folder with everything in it, or a file) only if it is directly
    inside `root` once every symlink is resolved, and not a symlink itself. Names such as
    '..' or 'a/b', or a link planted in the folder, are refused: `down ..` once deleted
    other applications' folders. Returns whether there was something to remove."""
    if not os.path.lexists(path):
        return False
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.islink(path) or os.path.dirname(real) != real_root or os.path.basename(real) in ("", ".", ".."):
        raise TestbedError(f"refusing to remove {path}: it is not a file or folder directly inside {root}"
                           + (" (it is a symlink)" if os.path.islink(path) else f" (it resolves to {real})"),
                           hint="remove it by hand if it is yours; the testbed removes only its own folders")
    if os.path.isdir(real):
        shutil.rmtree(real, ignore_errors=True)
    else:
        os.unlink(real)
    return True
