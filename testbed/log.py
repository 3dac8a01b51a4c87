"""Progress and errors on stderr; stdout is for data (lists, JSON, paths)."""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import NoReturn


class TestbedError(Exception):
    """A failure the user can act on: a message and an optional hint."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


def die(message: str, *, hint: str | None = None) -> NoReturn:
    raise TestbedError(message, hint=hint)


def info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tty() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def step(title: str) -> Iterator[None]:
    """One line per step: '• title' while it runs (on a TTY), then ✓ or ✗ with its time."""
    start = time.monotonic()
    if _tty():
        print(f"• {title} ...", end="\r", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        _finish("✗", title, start)
        raise
    _finish("✓", title, start)


def _finish(mark: str, title: str, start: float) -> None:
    clear = "\x1b[2K" if _tty() else ""
    print(f"{clear}{mark} {title} ({time.monotonic() - start:.1f} s)", file=sys.stderr, flush=True)
