"""`beluga-testbed cp`: files in and out of the guests over SFTP, the way scp takes them.

    cp NAME ./prog host0:/root/           # into one host (a folder needs -r)
    cp NAME --all ./prog :/root/          # into every host
    cp NAME host1:/tmp/out.json ./        # out of one host
    cp NAME --all :/tmp/out.json ./outs   # out of every host: ./outs/host0/out.json, ...

A side is remote when a ':' comes before any '/' (so `./a:b` is a local file, as in scp).
Copies keep the file mode (a program stays executable). Every error names the side it
is about: `host1:/tmp/out.json: no such file or folder`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import ssh
from .log import TestbedError
from .par import map_parallel

HINT = "beluga-testbed cp NAME SRC DST, one side remote: HOST:PATH, or :PATH with --all"


@dataclass(frozen=True)
class Remote:
    host: str  # "" with --all
    path: str


def split(arg: str) -> Remote | None:
    """HOST:PATH or :PATH as a Remote; None for a local path."""
    head, sep, tail = arg.partition(":")
    if not sep or "/" in head:
        return None
    return Remote(head, tail)


@contextlib.contextmanager
def open_sftp(h, key: Path) -> Iterator:
    """An SFTP client on host h (the boundary the unit tests fake)."""
    with ssh.connection(h.ssh_port, key) as c:
        client = c.sftp()
        try:
            yield client
        finally:
            client.close()


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOENT:
        return "no such file or folder"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _rstat(sftp, path: str):
    try:
        return sftp.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


def _put(sftp, src: Path, dst: str, *, top: bool = True) -> None:
    """src (followed when it is a link named on the command line) to dst. Inside a folder a
    symbolic link is made again as a link, never followed: a link out of the folder copies
    nothing from outside it, and a link to a parent folder is no endless loop."""
    st = src.stat() if top else src.lstat()
    if stat.S_ISLNK(st.st_mode):
        if _is_remote_link(sftp, dst):
            sftp.remove(dst)  # a link from an earlier copy: replaced, as files are (nothing is written through it)
        sftp.symlink(os.readlink(src), dst)
        return
    if stat.S_ISDIR(st.st_mode):
        if _rstat(sftp, dst) is None:
            sftp.mkdir(dst)
        for child in sorted(src.iterdir()):
            _put(sftp, child, posixpath.join(dst, child.name), top=False)
    elif stat.S_ISREG(st.st_mode):
        sftp.put(str(src), dst)
    else:
        raise TestbedError(f"{src}: not a file, folder or symbolic link; not copied")
    sftp.chmod(dst, stat.S_IMODE(st.st_mode))


def _is_remote_link(sftp, path: str) -> bool:
    try:
        return stat.S_ISLNK(sftp.lstat(path).st_mode)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise


def _local_name(name: str, where: str) -> str:
    """A name a host listed, as one local path component (a hostile guest may list anything)."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise TestbedError(f"{where}: the host listed an entry named {name!r}; refusing to write it")
    return name


def _get(sftp, src: str, dst: Path, *, host: str, top: bool = True) -> None:
    """The mirror of _put: links inside a folder come back as links, and nothing is ever
    written through a local link (one an earlier copy made could point anywhere)."""
    st = sftp.stat(src) if top else sftp.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        if dst.is_symlink():
            dst.unlink()  # a link from an earlier copy: replaced, as files are (nothing is written through it)
        os.symlink(sftp.readlink(src), dst)
        return
    if dst.is_symlink():
        raise TestbedError(f"{dst}: is a symbolic link; will not write through it")
    if stat.S_ISDIR(st.st_mode):
        dst.mkdir(exist_ok=True)
        for a in sorted(sftp.listdir_attr(src), key=lambda a: a.filename):
            name = _local_name(a.filename, f"{host}:{src}")
            _get(sftp, posixpath.join(src, name), dst / name, host=host, top=False)
    elif stat.S_ISREG(st.st_mode):
        sftp.get(src, str(dst))
    else:
        raise TestbedError(f"{host}:{src}: not a file, folder or symbolic link; not copied")
    os.chmod(dst, stat.S_IMODE(st.st_mode))


def check_source(src: Path, *, recursive: bool) -> None:
    """What `copy_in` can know of a local source before any host is reached."""
    if not src.exists():
        raise TestbedError(f"{src}: no such file or folder")
    if src.is_dir() and not recursive:
        raise TestbedError(f"{src}: is a folder", hint="add -r to copy a folder and everything in it")


def copy_in(tb, hosts: list, src: Path, dst: str, *, recursive: bool) -> list[str]:
    """Copy local `src` to `dst` on each host; returns HOST:PATH of what was written."""
    check_source(src, recursive=recursive)

    def one(h) -> str:
        where = f"{h.name}:{dst}"
        if not h.alive():
            raise TestbedError(f"{h.name}: not running (QEMU stopped)")
        try:
            with open_sftp(h, tb.key) as sftp:
                target = dst
                a = _rstat(sftp, dst)
                if dst.endswith("/") or (a is not None and stat.S_ISDIR(a.st_mode)):
                    if a is None:
                        raise TestbedError(f"{where}: no such folder")
                    target = posixpath.join(dst, src.name)
                else:
                    parent = posixpath.dirname(dst) or "."
                    p = _rstat(sftp, parent)
                    if p is None or not stat.S_ISDIR(p.st_mode):
                        raise TestbedError(f"{h.name}:{parent}: no such folder")
                where = f"{h.name}:{target}"
                t = _rstat(sftp, target)
                if t is not None and stat.S_ISDIR(t.st_mode) != src.is_dir():
                    what = "a folder" if stat.S_ISDIR(t.st_mode) else "a file"
                    raise TestbedError(f"{where}: is {what}; will not replace it with {src}")
                _put(sftp, src, target)
                return f"{h.name}:{target}"
        except TestbedError:
            raise
        except Exception as e:  # noqa: BLE001 - located, per host
            raise TestbedError(f"{where}: {_why(e)}") from None

    return _each(hosts, one)


def copy_out(tb, hosts: list, src: str, dst: Path, *, recursive: bool) -> list[str]:
    """Copy `src` from each host to local `dst`; with several hosts, into dst/<host>/."""
    several = len(hosts) > 1
    if several:
        if dst.exists() and not dst.is_dir():
            raise TestbedError(f"{dst}: not a folder (copying from {len(hosts)} hosts makes one subfolder per host)")
        dst.mkdir(parents=True, exist_ok=True)
    name = posixpath.basename(src.rstrip("/")) or "root"

    def one(h) -> str:
        where = f"{h.name}:{src}"
        if not h.alive():
            raise TestbedError(f"{h.name}: not running (QEMU stopped)")
        try:
            with open_sftp(h, tb.key) as sftp:
                a = _rstat(sftp, src)
                if a is None:
                    raise TestbedError(f"{where}: no such file or folder")
                if stat.S_ISDIR(a.st_mode) and not recursive:
                    raise TestbedError(f"{where}: is a folder", hint="add -r to copy a folder and everything in it")
                if several:
                    (dst / h.name).mkdir(exist_ok=True)
                    target = dst / h.name / name
                elif dst.is_dir():
                    target = dst / name
                else:
                    if not dst.parent.is_dir():
                        raise TestbedError(f"{dst.parent}: no such folder")
                    target = dst
                if target.exists() and target.is_dir() != stat.S_ISDIR(a.st_mode):
                    raise TestbedError(f"{target}: is {'a folder' if target.is_dir() else 'a file'}; "
                                       f"will not replace it with {where}")
                _get(sftp, src, target, host=h.name)
                return str(target)
        except TestbedError:
            raise
        except Exception as e:  # noqa: BLE001 - located, per host
            raise TestbedError(f"{where}: {_why(e)}") from None

    return _each(hosts, one)


def _each(hosts: list, fn) -> list[str]:
    """fn on every host in parallel; every host's error, not just the first."""
    def safe(h):
        try:
            return fn(h), None
        except TestbedError as e:
            return None, e

    results = map_parallel(safe, hosts)
    errors = [e for _, e in results if e is not None]
    if errors:
        hints = {e.hint for e in errors if e.hint}
        raise TestbedError("\n".join(e.message for e in errors) if len(errors) > 1 else errors[0].message,
                           hint="; ".join(sorted(hints)) or None)
    return [r for r, _ in results]


def sides(src: str, dst: str, *, all_hosts: bool) -> tuple[Remote | None, Remote | None]:
    """SRC and DST split (see `split`), or why they are no `cp`: checked before the
    testbed is looked up, so a mistake is named even when none is running."""
    rs, rd = split(src), split(dst)
    if (rs is None) == (rd is None):
        both = "both sides are remote" if rs else "both sides are local"
        raise TestbedError(f"{both}: one of SRC and DST must be HOST:PATH", hint=HINT)
    remote = rs or rd
    assert remote is not None
    if not remote.path:
        raise TestbedError(f"{remote.host}: no path after ':'", hint="e.g. host0:/root/ (absolute) or host0:file "
                                                                    "(in root's home)")
    if all_hosts and remote.host:
        raise TestbedError(f"--all with a host ({remote.host}:{remote.path})",
                           hint=f"with --all write the remote side as :{remote.path}")
    if not all_hosts and not remote.host:
        raise TestbedError(f":{remote.path}: which host?",
                           hint=f"host0:{remote.path} for one host, or --all for every host")
    return rs, rd


def copy(tb, src: str, dst: str, *, all_hosts: bool, recursive: bool) -> list[str]:
    """The `cp` command: which side is remote, which hosts, then copy_in or copy_out."""
    rs, rd = sides(src, dst, all_hosts=all_hosts)
    remote = rs or rd
    assert remote is not None
    hosts = tb.hosts if all_hosts else [tb.host(remote.host)]
    if rs is not None:
        return copy_out(tb, hosts, rs.path, Path(dst), recursive=recursive)
    return copy_in(tb, hosts, Path(src), remote.path, recursive=recursive)
