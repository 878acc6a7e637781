"""The dispatcher's delivery loop: the database says what is due, not one broker message each.

One thread claims due deliveries in batches (one UPDATE ... RETURNING that also reads the
signing secrets) and queues them for DARKROOM_WEBHOOK_CONCURRENCY sender threads that POST them
(`dispatcher.attempt`: the same deadline, decoding bounds and SSRF guard as every attempt), each
through a keep-alive client of its own (one shared pool's lock was a fifth of their time); a
recorder thread records the finished attempts in batches, on a connection of its own. A Celery
task per delivery cost more CPU than the POST itself; here a delivery costs a share of a
statement.

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

import redis
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel

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

    Nothing waits for what it does not need: this thread claims due deliveries in batches
    and queues them for DARKROOM_WEBHOOK_CONCURRENCY sender threads; the senders hand each
    outcome to a recorder thread, which records all that arrived since its last transaction
    in one. Claims and records run at once on two connections: the senders never wait for a
    record, and the queue is topped up while the recorder writes.
    """

    def __init__(self, settings: Settings, doorbell: Doorbell) -> None:
        self.settings = settings
        self.doorbell = doorbell
        self.capacity = settings.webhook_concurrency * CLAIM_AHEAD
        #: Claim again once half the room is free (the other half, CLAIM_AHEAD / 2 tickets a
        #: sender, still queued meanwhile): fewer, larger claims. Claiming at one sender's worth
        #: of room made two processes side by side claim often, each claim scanning past the
        #: rows the other holds: Postgres spent 0.45-0.57 ms a delivery, against 0.23-0.49 ms
        #: at half (the throughput gain of two processes was within noise: docs/PERFORMANCE.md).
        self.refill = max(1, self.capacity // 2)
        self._todo: queue.SimpleQueue[Ticket | None] = queue.SimpleQueue()
        #: Outcomes for the recorder; None: the senders have stopped.
        self._done: queue.SimpleQueue[Finished | None] = queue.SimpleQueue()
        #: One item per attempt that came back, for this thread's count of those in flight.
        self._returned: queue.SimpleQueue[None] = queue.SimpleQueue()
        #: Tickets handed to the senders whose attempt has not come back yet.
        self._in_flight = 0

    def run(self, stop: threading.Event) -> None:
        """Deliver until `stop`; then finish and record the attempts under way."""
        senders = [
            threading.Thread(target=self._send, name=f"deliver-{n}", daemon=True)
            for n in range(self.settings.webhook_concurrency)
        ]
        recorder = threading.Thread(target=self._record_all, name="record", daemon=True)
        for thread in [*senders, recorder]:
            thread.start()
        try:
            self._coordinate(stop)
        finally:
            for _ in senders:
                self._todo.put(None)
            for sender in senders:
                sender.join()
            self._done.put(None)
            recorder.join()

    def _coordinate(self, stop: threading.Event) -> None:
        """Claim while there is room and something due, until `stop` and nothing is under way."""
        while not stop.is_set() or self._in_flight:
            room = 0 if stop.is_set() else self.capacity - self._in_flight
            if room < self.refill:
                self._count_returns(block=True)
                continue
            tickets = self._claim(room)
            for ticket in tickets:
                self._todo.put(ticket)
            self._in_flight += len(tickets)
            if len(tickets) == room:
                self._count_returns(block=False)
            else:
                # Nothing more is due now, and the attempts under way make nothing due either
                # (a failure's retry is scheduled later): wait for news, a message or the poll.
                # Claiming again after each return cost one empty claim per delivery at a
                # trickle: 38% of the dispatcher's interpreter time in the saturation run.
                self.doorbell.wait(self.settings.webhook_poll_s)
                self._count_returns(block=False)

    def _count_returns(self, *, block: bool) -> None:
        """Count the attempts that came back, waiting up to a second for the first when
        `block` (and some are in flight)."""
        returned = 0
        if block and self._in_flight:
            try:
                self._returned.get(timeout=1.0)
                returned = 1
            except queue.Empty:
                return
        while True:
            try:
                self._returned.get_nowait()
            except queue.Empty:
                break
            returned += 1
        self._in_flight -= returned

    def _claim(self, room: int) -> list[Ticket]:
        """Up to `room` due deliveries, leased; none after a database error (and a pause)."""
        lease_s = lease_seconds(self.settings)
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                claimed = webhooks.claim_due_deliveries(session, limit=room, lease_s=lease_s)
        except Exception:
            log.exception("dispatcher: the database failed; trying again")
            pause(ERROR_BACKOFF_S)
            return []
        return [Ticket.of(delivery) for delivery in claimed]

    def _send(self) -> None:
        """A sender thread: attempt each ticket from the queue until a None (through clients
        of its own: `dispatcher.attempt`)."""
        while (ticket := self._todo.get()) is not None:
            finished = self._attempt(ticket)
            if finished is not None:
                self._done.put(finished)
            self._returned.put(None)

    def _attempt(self, ticket: Ticket) -> Finished | None:
        """One attempt and its outcome; None if it raised (a bug: network trouble is an
        outcome), leaving the delivery to its lease."""
        try:
            return ticket, attempt_logged(ticket, self.settings)
        except Exception:
            log.exception("dispatcher: an attempt failed")
            return None

    def _record_all(self) -> None:
        """The recorder thread: record what the senders hand over, in batches, until the
        None after the last; a batch the database refused is kept for the next try, and one
        still unrecorded at the end is attempted again when its lease runs out."""
        unrecorded: list[Finished] = []
        ended = False
        while not ended:
            arrived = self._outcomes(block=not unrecorded)
            ended = None in arrived
            unrecorded += [item for item in arrived if item is not None]
            if unrecorded and self._record(unrecorded):
                unrecorded = []
            elif unrecorded:
                pause(ERROR_BACKOFF_S)

    def _outcomes(self, *, block: bool) -> list[Finished | None]:
        """What the senders handed over since the last call, waiting for the first if `block`."""
        arrived = [self._done.get()] if block else []
        while True:
            try:
                arrived.append(self._done.get_nowait())
            except queue.Empty:
                return arrived

    def _record(self, finished: list[Finished]) -> bool:
        """Record `finished` in one transaction; False if the database refused."""
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                webhooks.record_outcomes(session, [outcome for _, outcome in finished])
        except Exception:
            log.exception("dispatcher: the database failed; trying again")
            return False
        for ticket, outcome in finished:
            note_outcome(ticket, outcome)
        return True


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
