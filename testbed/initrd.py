"""A writer for the cpio 'newc' format that the kernel unpacks as an initramfs."""
from __future__ import annotations

import stat
from pathlib import Path


class CpioWriter:
    """Writes entries in order; the caller lists parents before children."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")
        self._ino = 1

    def __enter__(self) -> "CpioWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._entry("TRAILER!!!", 0, b"", nlink=1)
        self._f.close()

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def _entry(self, name: str, mode: int, data: bytes, *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        raw_name = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._f.write(header + raw_name)
        self._pad(len(header) + len(raw_name))
        self._f.write(data)
        self._pad(len(data))

    def _pad(self, n: int) -> None:
        self._f.write(b"\0" * (-n % 4))
