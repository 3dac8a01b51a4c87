"""Run a function over items in threads, one per item; results in item order."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_parallel(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """The first exception (a Ctrl-C included) propagates at once instead of waiting for
    the other threads: callers tear down what those threads talk to (QEMU), so they end."""
    items = list(items)
    ex = ThreadPoolExecutor(max_workers=max(1, len(items)))
    try:
        futures = [ex.submit(fn, x) for x in items]
        return [f.result() for f in futures]
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
