"""Calls made from many threads at the same moment, for tests of what runs concurrently."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def call_at_once(call: Callable[[T], R], items: Sequence[T]) -> list[R | Exception]:
    """`call(item)` for every item, each from its own thread, all released together by a
    barrier; each call's result or raised exception, in the order of `items`."""
    start = threading.Barrier(len(items))

    def one(item: T) -> R | Exception:
        start.wait()
        try:
            return call(item)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(one, items))
