"""Keeping a lease alive from a thread while a block of work runs: one home for the heartbeat
of a batch's jobs (worker.jobs) and of a model install (worker.installer).

A lease tells the sweeper (or another installer) that its holder is alive; a step that reports
no progress for longer than the lease (a pipeline call, storing a batch, converting a
checkpoint) must still renew it, or another worker takes the work meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def renewing(renew: Callable[[], bool], every_s: float, name: str) -> Iterator[None]:
    """Call `renew` every `every_s` seconds from a thread while the block runs. `renew` returns
    False once the lease is gone for good (the thread stops; the block finds out on its own);
    an exception is logged and the next beat tries again (the database blinked)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                if not renew():
                    return
            except Exception:
                log.warning("%s: the lease could not be renewed; will retry", name, exc_info=True)

    thread = threading.Thread(target=beat, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
