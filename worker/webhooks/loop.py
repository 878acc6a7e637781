"""The dispatcher's delivery loop: the database says what is due, not one broker message each.

One thread claims due deliveries in batches (one UPDATE ... RETURNING that also reads the
signing secrets), hands them to a pool of DARKROOM_WEBHOOK_CONCURRENCY threads that POST them
(`dispatcher.attempt`: the same deadline, decoding bounds and SSRF guard as every attempt), and
records finished attempts in batches, in the same transaction as the next claim. A Celery task
per delivery cost more CPU than the POST itself; here a delivery costs a share of a statement.

Broker messages on the webhook queue (published by workers and the sweeper) are only a doorbell:
the loop waits on the queue when it has nothing to do, wakes at the first message, and drops
the rest, since the rows say what is due. Without a message it looks again every
DARKROOM_WEBHOOK_POLL_S. Several dispatcher processes claim side by side (SKIP LOCKED); each
delivery's lease still allows one attempt at a time, on the database's clock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import redis
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel

from darkroom.settings import Settings
from db.repositories import webhooks
from db.repositories.webhooks import AttemptOutcome
from db.session import session_scope
from worker.webhooks.dispatcher import Ticket, attempt_logged, lease_seconds, note_outcome

log = logging.getLogger(__name__)

#: Deliveries claimed ahead of the pool, per thread: work waits for a thread, never the reverse.
CLAIM_AHEAD = 2
#: Once an attempt ends, how long to let others end too, so one transaction records several.
GATHER_S = 0.002
#: After a database error, the wait before trying again.
ERROR_BACKOFF_S = 1.0

Finished = tuple[Ticket, AttemptOutcome]


class Doorbell:
    """Waits for a message on the webhook queue (any priority), then drops what is queued."""

    def __init__(self, settings: Settings) -> None:
        name = settings.webhook_queue
        self._keys = [f"{name}{RedisChannel.sep}{p}" if p else name for p in PRIORITY_STEPS]
        self._redis = redis.Redis.from_url(settings.resolved_broker_url)

    def wait(self, timeout_s: float) -> None:
        """Return at the first message or after `timeout_s`; the broker's trouble is a timeout."""
        try:
            if self._redis.blpop(self._keys, timeout=timeout_s) is not None:
                self._redis.delete(*self._keys)
        except redis.RedisError:
            pause(timeout_s)

    def close(self) -> None:
        self._redis.close()


class DeliveryLoop:
    """Claims, attempts and records deliveries until `stop` is set (see the module doc)."""

    def __init__(self, settings: Settings, client: httpx.Client, doorbell: Doorbell) -> None:
        self.settings = settings
        self.client = client
        self.doorbell = doorbell
        self.capacity = settings.webhook_concurrency * CLAIM_AHEAD
        self.unrecorded: list[Finished] = []

    def run(self, stop: threading.Event) -> None:
        """Deliver until `stop`; then finish and record the attempts under way."""
        threads = self.settings.webhook_concurrency
        with ThreadPoolExecutor(threads, thread_name_prefix="deliver") as pool:
            running: set[Future[Finished]] = set()
            while not stop.is_set() or running:
                room = 0 if stop.is_set() else self.capacity - len(running)
                tickets = self._exchange(_take_done(running), room)
                running |= {pool.submit(self._attempt, ticket) for ticket in tickets}
                if running:
                    futures.wait(running, timeout=1.0, return_when=futures.FIRST_COMPLETED)
                    stop.wait(GATHER_S)
                elif not tickets and not stop.is_set():
                    self.doorbell.wait(self.settings.webhook_poll_s)
        if self.unrecorded:  # one last try; unrecorded attempts are made again after the lease
            self._exchange([], 0)

    def _attempt(self, ticket: Ticket) -> Finished:
        return ticket, attempt_logged(ticket, self.settings, self.client)

    def _exchange(self, finished: Iterable[Finished], room: int) -> list[Ticket]:
        """Record `finished` and claim up to `room` more in one transaction; on a database
        error keep the records for the next try and claim nothing (the leases cover it)."""
        self.unrecorded.extend(finished)
        lease_s = lease_seconds(self.settings)
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                webhooks.record_outcomes(session, [outcome for _, outcome in self.unrecorded])
                claimed = (
                    webhooks.claim_due_deliveries(session, limit=room, lease_s=lease_s)
                    if room > 0
                    else []
                )
        except Exception:
            log.exception("dispatcher: the database failed; trying again")
            pause(ERROR_BACKOFF_S)
            return []
        for ticket, outcome in self.unrecorded:
            note_outcome(ticket, outcome)
        self.unrecorded = []
        return [Ticket.of(delivery) for delivery in claimed]


def pause(seconds: float) -> None:
    """Sleep, as a timed lock wait: under libfaketime (the clock tests), `time.sleep` of a few
    milliseconds fails with EINVAL, while lock waits keep working."""
    threading.Event().wait(seconds)


def _take_done(running: set[Future[Finished]]) -> list[Finished]:
    """Remove the finished attempts from `running`; their results. An attempt that raised (a
    bug: network trouble is an outcome) is logged and left to its lease, as a crash would be."""
    done = [future for future in running if future.done()]
    running.difference_update(done)
    results = []
    for future in done:
        error = future.exception()
        if error is None:
            results.append(future.result())
        else:
            log.error("dispatcher: an attempt failed", exc_info=error)
    return results


def run_loop(settings: Settings, client: httpx.Client, stop: threading.Event) -> None:
    """Run the delivery loop until `stop` is set."""
    doorbell = Doorbell(settings)
    try:
        DeliveryLoop(settings, client, doorbell).run(stop)
    finally:
        doorbell.close()
