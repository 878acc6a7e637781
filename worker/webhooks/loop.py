"""The dispatcher's delivery loop: the database says what is due, not one broker message each.

One thread claims due deliveries in batches (one UPDATE ... RETURNING that also reads the
signing secrets) and queues them for DARKROOM_WEBHOOK_CONCURRENCY sender threads that POST them
(`dispatcher.attempt`: the same deadline, decoding bounds and SSRF guard as every attempt), each
through a keep-alive client of its own (one shared pool's lock was a fifth of their time); it
records the finished attempts in batches, in the same transaction as the next claim, without
waiting for the attempts under way. A Celery task per delivery cost more CPU than the POST
itself; here a delivery costs a share of a statement.

Broker messages on the webhook queue (published by workers and the sweeper) are only a doorbell:
the loop waits on the queue when it has nothing to do, wakes at the first message, and drops
the rest, since the rows say what is due. Without a message it looks again every
DARKROOM_WEBHOOK_POLL_S. Several dispatcher processes claim side by side (SKIP LOCKED); each
delivery's lease still allows one attempt at a time, on the database's clock.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable

import httpx
import redis
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel

from darkroom import outbound
from darkroom.settings import Settings
from db.repositories import webhooks
from db.repositories.webhooks import AttemptOutcome
from db.session import session_scope
from worker.webhooks.dispatcher import Ticket, attempt_logged, lease_seconds, note_outcome

log = logging.getLogger(__name__)

#: Deliveries claimed ahead, per sender thread: enough that the senders still have work while
#: the claiming thread's transaction runs (work waits for a thread, never the reverse).
CLAIM_AHEAD = 8
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
    """Claims, attempts and records deliveries until `stop` is set (see the module doc).

    The claiming thread never waits for the attempts: DARKROOM_WEBHOOK_CONCURRENCY sender
    threads take tickets from a queue and hand back outcomes on another, and each pass of
    the claiming thread records every outcome that has arrived since the last and tops the
    queue up in one transaction. While that transaction runs, the senders work through the
    tickets claimed ahead, so neither side idles waiting for the other.
    """

    def __init__(self, settings: Settings, doorbell: Doorbell) -> None:
        self.settings = settings
        self.doorbell = doorbell
        self.capacity = settings.webhook_concurrency * CLAIM_AHEAD
        self.unrecorded: list[Finished] = []
        self._todo: queue.SimpleQueue[Ticket | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Finished | None] = queue.SimpleQueue()
        #: Tickets handed to the senders whose attempt has not come back yet.
        self._in_flight = 0

    def run(self, stop: threading.Event) -> None:
        """Deliver until `stop`; then finish and record the attempts under way."""
        senders = [
            threading.Thread(target=self._send, name=f"deliver-{n}", daemon=True)
            for n in range(self.settings.webhook_concurrency)
        ]
        for sender in senders:
            sender.start()
        try:
            self._coordinate(stop)
        finally:
            for _ in senders:
                self._todo.put(None)
            for sender in senders:
                sender.join()
        if self.unrecorded:  # one last try; unrecorded attempts are made again after the lease
            self._exchange([], 0)

    def _coordinate(self, stop: threading.Event) -> None:
        """Record what came back and claim more, until `stop` and nothing is under way."""
        while not stop.is_set() or self._in_flight:
            finished = self._collect(block=self._in_flight > 0)
            room = 0 if stop.is_set() else self.capacity - self._in_flight
            tickets = self._exchange(finished, room)
            for ticket in tickets:
                self._todo.put(ticket)
            self._in_flight += len(tickets)
            if not self._in_flight and not tickets and not stop.is_set():
                self.doorbell.wait(self.settings.webhook_poll_s)

    def _collect(self, *, block: bool) -> list[Finished]:
        """The outcomes that came back, waiting up to a second for the first when `block`."""
        arrived: list[Finished | None] = []
        if block:
            try:
                arrived.append(self._done.get(timeout=1.0))
            except queue.Empty:
                return []
        while True:
            try:
                arrived.append(self._done.get_nowait())
            except queue.Empty:
                break
        self._in_flight -= len(arrived)
        # None: an attempt that raised (a bug: network trouble is an outcome), left to its lease.
        return [item for item in arrived if item is not None]

    def _send(self) -> None:
        """A sender thread: attempt each ticket from the queue until a None, through a client
        (connection pool) of its own."""
        with outbound.new_client(self.settings.webhook_timeout_s) as client:
            while (ticket := self._todo.get()) is not None:
                self._done.put(self._attempt(ticket, client))

    def _attempt(self, ticket: Ticket, client: httpx.Client) -> Finished | None:
        """One attempt and its outcome; None if it raised."""
        try:
            return ticket, attempt_logged(ticket, self.settings, client)
        except Exception:
            log.exception("dispatcher: an attempt failed")
            return None

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


def run_loop(settings: Settings, stop: threading.Event) -> None:
    """Run the delivery loop until `stop` is set."""
    doorbell = Doorbell(settings)
    try:
        DeliveryLoop(settings, doorbell).run(stop)
    finally:
        doorbell.close()
