"""The Celery wiring shared by every tier. Messages carry only ids; Postgres holds the truth.

No task code lives here: the API sends tasks by name, so it never imports the worker (or torch).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel

from darkroom.settings import Settings

RUN_JOB_TASK = "darkroom.run_job"
DELIVER_WEBHOOK_TASK = "darkroom.deliver_webhook"

log = logging.getLogger(__name__)


def _transport_options(settings: Settings) -> dict[str, Any]:
    """Broker options: the filesystem folders (embedded), or Redis's visibility timeout."""
    if settings.is_embedded_broker:
        folder = settings.broker_dir
        for sub in (folder, folder / "processed", folder / "control"):
            sub.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.2,
        }
    # Longer than the longest job: otherwise Redis re-delivers a job that is still running.
    return {"visibility_timeout": settings.visibility_timeout_s}


def make_celery(settings: Settings, name: str = "darkroom") -> Celery:
    """A Celery app configured for at-least-once delivery of job and webhook ids."""
    app = Celery(name, broker=settings.resolved_broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_routes={
            RUN_JOB_TASK: {"queue": settings.job_queue},
            DELIVER_WEBHOOK_TASK: {"queue": settings.webhook_queue},
        },
        task_default_queue=settings.job_queue,
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # A short publish retry: if the broker is down the row stays in the outbox and the
        # sweeper sends it later, so the API need not hold the client waiting.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def send(app: Celery, task_name: str, record_id: int, queue: str | None = None) -> bool:
    """Publish one id, to `queue` or the task's own queue; False (logged) if the broker cannot
    be reached, so the caller can retry."""
    try:
        app.send_task(task_name, args=[record_id], queue=queue)
    except Exception:
        log.warning("broker unreachable: %s(%s) left for the sweeper", task_name, record_id)
        return False
    return True


def redis_list_lengths(client: redis.Redis, names: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each named queue, as kombu keeps them in Redis: one list per queue
    and priority step (messages a worker has taken but not acked are not counted)."""
    names = sorted(set(names))
    pipe = client.pipeline(transaction=False)
    for name in names:
        for priority in PRIORITY_STEPS:
            pipe.llen(f"{name}{RedisChannel.sep}{priority}" if priority else name)
    lengths = iter(pipe.execute())
    return {name: sum(int(next(lengths)) for _ in PRIORITY_STEPS) for name in names}


def filesystem_queue_lengths(settings: Settings) -> dict[str, int]:
    """Messages per queue of the embedded broker: one `<stamp>_<uuid>.<queue>.msg` file each."""
    counts: dict[str, int] = {}
    for path in settings.broker_dir.glob("*.msg"):
        queue = path.name.partition(".")[2].removesuffix(".msg")
        counts[queue] = counts.get(queue, 0) + 1
    return counts


def queue_lengths(settings: Settings, names: Iterable[str], timeout_s: float) -> dict[str, int]:
    """Messages waiting in each named queue, on either broker (raises if Redis cannot answer
    within `timeout_s`)."""
    if settings.is_embedded_broker:
        found = filesystem_queue_lengths(settings)
        return {name: found.get(name, 0) for name in names}
    client = redis.Redis.from_url(
        settings.resolved_broker_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        return redis_list_lengths(client, names)
    finally:
        client.close()


@dataclass(frozen=True)
class HeldIds:
    """The record ids the broker holds per queue: `waiting` in the queue, or `unacked`: handed
    to a consumer that has not acknowledged them yet (running, or held by a dead consumer)."""

    waiting: dict[str, set[int]] = field(default_factory=dict)
    unacked: dict[str, set[int]] = field(default_factory=dict)

    def holds(self, queue: str, record_id: int) -> bool:
        """True if a message for `record_id` waits in `queue`."""
        return record_id in self.waiting.get(queue, set())

    def delivered(self, queue: str, record_id: int) -> bool:
        """True if a consumer of `queue` took `record_id`'s message and has not acknowledged it."""
        return record_id in self.unacked.get(queue, set())

    def knows(self, queue: str, record_id: int) -> bool:
        """True if `record_id`'s message waits in `queue` or a consumer of it took it."""
        return self.holds(queue, record_id) or self.delivered(queue, record_id)

    def with_(self, other: HeldIds) -> HeldIds:
        """What either look saw held: an id held in one of two looks was not lost."""
        names = self.waiting.keys() | other.waiting.keys() | self.unacked.keys()
        names |= other.unacked.keys()
        return HeldIds(
            {
                name: self.waiting.get(name, set()) | other.waiting.get(name, set())
                for name in names
            },
            {
                name: self.unacked.get(name, set()) | other.unacked.get(name, set())
                for name in names
            },
        )


def held_ids(
    settings: Settings, task_name: str, queues: Iterable[str], timeout_s: float
) -> HeldIds:
    """Which ids of `task_name` the broker holds in each of `queues` (raises if Redis cannot
    answer within `timeout_s`). Read message by message, not counted: a stale duplicate in a
    queue must not hide another job's lost message."""
    names = sorted(set(queues))
    if settings.is_embedded_broker:
        return HeldIds(waiting=_filesystem_ids(settings, task_name, names))
    client = redis.Redis.from_url(
        settings.resolved_broker_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        return _redis_ids(client, task_name, names)
    finally:
        client.close()


def _redis_ids(client: redis.Redis, task_name: str, names: list[str]) -> HeldIds:
    """kombu's Redis layout: one list per queue and priority step, and one `unacked` hash of
    `[message, exchange, routing key]` for every message a consumer holds (acks late)."""
    pipe = client.pipeline(transaction=False)
    for name in names:
        for priority in PRIORITY_STEPS:
            pipe.lrange(f"{name}{RedisChannel.sep}{priority}" if priority else name, 0, -1)
    pipe.hvals(RedisChannel.unacked_key)
    *lists, unacked = pipe.execute()
    waiting: dict[str, set[int]] = {name: set() for name in names}
    for index, raw_messages in enumerate(lists):
        found = waiting[names[index // len(PRIORITY_STEPS)]]
        found.update(i for raw in raw_messages if (i := _record_id(raw, task_name)) is not None)
    taken: dict[str, set[int]] = {name: set() for name in names}
    for raw in unacked:
        message, _exchange, routing_key = json.loads(raw)
        record_id = _record_id(message, task_name)
        if routing_key in taken and record_id is not None:
            taken[routing_key].add(record_id)  # the default exchange routes by queue name
    return HeldIds(waiting, taken)


def _filesystem_ids(settings: Settings, task_name: str, names: list[str]) -> dict[str, set[int]]:
    """The embedded broker: one `<stamp>_<uuid>.<queue>.msg` file per waiting message (a
    consumer deletes the file when it takes the message: nothing is held unacknowledged)."""
    waiting: dict[str, set[int]] = {name: set() for name in names}
    for path in settings.broker_dir.glob("*.msg"):
        queue = path.name.partition(".")[2].removesuffix(".msg")
        if queue not in waiting:
            continue
        try:
            record_id = _record_id(path.read_bytes(), task_name)
        except FileNotFoundError:  # taken by a consumer since the listing
            continue
        if record_id is not None:
            waiting[queue].add(record_id)
    return waiting


def _record_id(message: bytes | str | dict[str, Any], task_name: str) -> int | None:
    """The record id a Celery message of `task_name` carries; None for any other message."""
    try:
        payload = json.loads(message) if isinstance(message, bytes | str) else message
        if payload["headers"]["task"] != task_name:
            return None
        body = payload["body"]
        if payload["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, _kwargs, _embed = json.loads(body)
        return int(args[0])
    except (ValueError, KeyError, TypeError, IndexError):
        log.warning("unreadable message in the broker ignored")
        return None
