"""Connecting Celery signal receivers from an app factory, once per process.

Celery's signals are process-wide, while a factory may run more than once in one process (tests
build several apps). A receiver connected under a fixed id replaces the one connected before
under that id, so the hooks never pile up and the newest app's hooks are the ones that run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.utils.dispatch import Signal


def connect_replacing(signal: Signal, receiver: Callable[..., Any], uid: str) -> None:
    """Connect `receiver` to `signal` under `uid`, replacing any receiver connected under it.

    Held strongly (`weak=False`): a factory's receivers are closures nothing else keeps alive.
    """
    signal.disconnect(dispatch_uid=uid)
    signal.connect(receiver, weak=False, dispatch_uid=uid)
