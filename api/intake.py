"""Group commit: submissions that arrive together are stored in one transaction.

A submission is bound by database round trips (admission counts, the insert, the commit, the
publish mark), not by computation. Under load, while one group is being stored, the next
submissions wait; the first of them to find no group in progress stores all that are waiting,
as one multi-row INSERT and one commit. At low load a group is one submission and nothing
waits; under load the round trips are shared by the whole group. There is no timer: a group is
simply whatever arrived while the previous one was being stored.

A store function answers each item on its own: one item that cannot be stored must not fail
the others of its group (api.submission.store_jobs stores a failed group again in halves).

Threads, not asyncio: the request handlers call `submit` from the server's thread pool, which
works the same under every event loop (the tests' clients start one per request).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(eq=False)  # compared by identity: two submissions may carry equal items
class _Waiting(Generic[Item, Result]):
    """One submission in the queue, and its outcome once its group is stored."""

    item: Item
    outcome: Result | BaseException | None = None
    done: bool = field(default=False)


class GroupCommit(Generic[Item, Result]):
    """Runs `store` on groups of at most `max_group` items; `submit` returns one item's result."""

    def __init__(
        self,
        store: Callable[[Sequence[Item]], Sequence[Result | BaseException]],
        max_group: int = 64,
        max_storing: int = 1,
    ) -> None:
        self._store = store
        self._max_group = max_group
        # More than one group at a time only pays where the database, not the CPU, is the limit
        # (measured: two at once were slower on a 2-core machine).
        self._max_storing = max_storing
        self._waiting: list[_Waiting[Item, Result]] = []
        self._storing = 0
        self._changed = threading.Condition()

    def submit(self, item: Item) -> Result:
        """Store `item` (with whatever else is waiting) and return its result, or raise."""
        entry: _Waiting[Item, Result] = _Waiting(item)
        with self._changed:
            self._waiting.append(entry)
            while not entry.done:
                if self._storing >= self._max_storing or entry not in self._waiting:
                    self._changed.wait()  # full, or its group is being stored by another
                else:
                    self._store_next_group()
        if isinstance(entry.outcome, BaseException):
            raise entry.outcome
        return entry.outcome  # type: ignore[return-value]  # set with done=True

    def pending(self) -> int:
        """How many submissions wait for a group to take them (for tests and operators)."""
        with self._changed:
            return len(self._waiting)

    def _store_next_group(self) -> None:
        """Store the oldest waiting items (called holding the lock; released while storing)."""
        group = self._waiting[: self._max_group]
        del self._waiting[: self._max_group]
        self._storing += 1
        self._changed.release()
        outcomes = self._outcomes(group)
        self._changed.acquire()
        self._storing -= 1
        for entry, outcome in zip(group, outcomes, strict=True):
            entry.outcome, entry.done = outcome, True
        self._changed.notify_all()

    def _outcomes(self, group: list[_Waiting[Item, Result]]) -> Sequence[Result | BaseException]:
        """The store function's outcomes; if it fails as a whole, that failure for every item
        (each submitter raises it, so nothing is left waiting for an outcome that never comes)."""
        try:
            outcomes = self._store([entry.item for entry in group])
        except BaseException as exc:
            return [exc] * len(group)
        if len(outcomes) != len(group):
            error = RuntimeError("the store function must return one outcome per item")
            return [error] * len(group)
        return outcomes
