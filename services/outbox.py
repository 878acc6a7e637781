"""The transactional outbox: broker messages asked for in a transaction, sent once it commits.

Code that changes rows asks here for the message that tells a consumer about them (run this
job; deliver this webhook). The message waits in the session (`session.info`) and is sent only
when the session's transaction commits, after its connection went back to the pool; a rollback,
or a session closed without committing, drops it. So a consumer never receives an id whose row
it cannot read, and no caller writes commit-then-publish by hand (Polar's `enqueue_job`,
buffered until commit, is the model).

Once sent, a job's row is marked published (`enqueued_at`, `queue_name`; deliveries that ask
for it get `enqueued_at`), all marks in one short transaction, one statement per queue. The
sweeper's rules rest on that mark: a row never marked is sent again by the sweeper. So a send or
a mark that fails is logged and left to the sweeper: nothing raises into the caller after its
commit, and the first failed send skips the rest of the batch (the broker is down; each send
would wait for its own timeout). Each request returns a `Receipt` that says, after the commit,
whether its message reached the broker and on which queue (for a delivery beside the delivery
loop: whether the transaction's doorbell did, see `_send_and_mark`).

Savepoints are not tracked: messages follow the outermost transaction.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from darkroom.identities import Operation
from darkroom.queue import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK, send
from darkroom.settings import Settings
from db.repositories import routing, webhooks
from services.routing import choose_queue

log = logging.getLogger(__name__)

#: `session.info` keys: messages asked for in the open transaction, and those it committed.
_PENDING = "darkroom.outbox.pending"
_COMMITTED = "darkroom.outbox.committed"


@dataclass
class Receipt:
    """What became of one message: `sent` is None until the commit, then whether the broker
    took it; `queue` is where it went."""

    sent: bool | None = None
    queue: str | None = None


@dataclass(frozen=True)
class JobMessage:
    """Run job `job_id`: on `queue`, or (None) on the queue model-affinity routing picks."""

    job_id: int
    operation: Operation
    model_id: str | None
    queue: str | None = None


@dataclass(frozen=True)
class DeliveryMessage:
    """Deliver webhook delivery `delivery_id`; `mark`: stamp `enqueued_at` once sent (a row
    created or scheduled by this transaction is stamped already)."""

    delivery_id: int
    mark: bool = False


@dataclass
class _Request:
    """A message with the broker and settings it is sent with, and its receipt."""

    broker: Celery
    settings: Settings
    message: JobMessage | DeliveryMessage
    receipt: Receipt = field(default_factory=Receipt)


def publish_job(
    session: Session, broker: Celery, settings: Settings, message: JobMessage
) -> Receipt:
    """Send `message` once `session` commits (see the module docstring)."""
    return _ask(session, _Request(broker, settings, message))


def deliver_webhook(
    session: Session, broker: Celery, settings: Settings, message: DeliveryMessage
) -> Receipt:
    """Send a delivery's id once `session` commits (see the module docstring)."""
    return _ask(session, _Request(broker, settings, message))


def _ask(session: Session, request: _Request) -> Receipt:
    """Buffer `request` in the session until its transaction ends."""
    pending: list[_Request] = session.info.setdefault(_PENDING, [])
    pending.append(request)
    return request.receipt


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    """The outermost transaction committed: its messages may go (once its connection is back)."""
    if session.in_nested_transaction():
        return  # a savepoint: the outer transaction may still roll back
    committed = session.info.pop(_PENDING, [])
    if committed:
        session.info.setdefault(_COMMITTED, []).extend(committed)


@event.listens_for(Session, "after_soft_rollback")
def _after_soft_rollback(session: Session, previous: SessionTransaction) -> None:
    """The outermost transaction rolled back: what it asked for must never be sent."""
    if previous.parent is None:
        session.info.pop(_PENDING, None)


@event.listens_for(Session, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    """Send what the ended transaction committed; drop what it asked for without committing
    (the session was closed). Never raises: the caller's commit has happened."""
    if transaction.parent is not None:
        return
    session.info.pop(_PENDING, None)
    committed: list[_Request] = session.info.pop(_COMMITTED, [])
    if not committed:
        return
    try:
        _send_and_mark(session, committed)
    except Exception:
        log.exception("the outbox failed after a commit; the sweeper sends what is left")


def _send_and_mark(session: Session, requests: Sequence[_Request]) -> None:
    """Send each message (to the queue routing picks for jobs), then mark what was sent.

    Where the dispatcher runs the delivery loop, a delivery's message is only a doorbell (the
    loop claims every due row it finds): the first one a transaction committed rings for all
    of them, and the rest count as sent with it. A batch of 8 successes sent 8 messages, 1 ms
    of the worker's CPU each (docs/PERFORMANCE.md, "Saturation").
    """
    queues: dict[tuple[Operation, str | None], str] = {}  # one routing lookup per model
    broker_down = False
    rung = False
    for request in requests:
        if broker_down:
            request.receipt.sent = False
            continue
        if rung and _is_doorbell(request):
            request.receipt.sent = True
            continue
        task, record_id, queue = _address(request, queues)
        request.receipt.sent = send(request.broker, task, record_id, queue=queue)
        request.receipt.queue = queue
        broker_down = not request.receipt.sent
        rung = rung or (request.receipt.sent is True and _is_doorbell(request))
    if broker_down:
        log.warning("broker unreachable: messages after the first failed send left to the sweeper")
    _mark(session, requests)


def _is_doorbell(request: _Request) -> bool:
    """A delivery's message that only wakes the delivery loop (see `_send_and_mark`)."""
    return isinstance(request.message, DeliveryMessage) and request.settings.delivers_by_loop


def _address(
    request: _Request, queues: dict[tuple[Operation, str | None], str]
) -> tuple[str, int, str | None]:
    """The task, record id and queue of a message (None: the task's own queue)."""
    message = request.message
    if isinstance(message, DeliveryMessage):
        return DELIVER_WEBHOOK_TASK, message.delivery_id, None
    queue = message.queue
    if queue is None:
        model = (message.operation, message.model_id)
        if model not in queues:
            queues[model] = choose_queue(request.settings, *model)
        queue = queues[model]
    return RUN_JOB_TASK, message.job_id, queue


def _mark(session: Session, requests: Sequence[_Request]) -> None:
    """Mark the sent rows published in one short transaction: one statement per queue."""
    by_queue: dict[str, list[int]] = defaultdict(list)
    deliveries: list[int] = []
    for request in requests:
        message = request.message
        if not request.receipt.sent:
            continue
        if isinstance(message, JobMessage) and request.receipt.queue is not None:
            by_queue[request.receipt.queue].append(message.job_id)
        elif isinstance(message, DeliveryMessage) and message.mark:
            deliveries.append(message.delivery_id)
    if not by_queue and not deliveries:
        return
    with Session(session.get_bind()) as marks, marks.begin():
        for queue, job_ids in by_queue.items():
            routing.mark_published(marks, job_ids, queue)
        if deliveries:
            webhooks.mark_published(marks, deliveries)
