"""Model-affinity routing: a job goes preferably to a worker that already holds its model.

Every worker consumes the general jobs queue, plus `{job_queue}.model.<operation>:<model id>`
for each model it holds resident, and advertises those models in Redis with a TTL. At submit
the API publishes to the job's model queue when a live worker holds the model and that queue
is not much longer than the general one (`affinity_queue_slack`); otherwise to the general
queue, which every worker takes from. The sweeper moves jobs out of model queues that no live
worker advertises any more (`affinity_stranded_after_s`), so no job waits on a dead worker.

Presence is ephemeral, so it lives beside the queues in Redis: per model a sorted set of its
holders scored by expiry, per worker a JSON record for operators. Expiries are read off Redis's
clock (TIME), so hosts whose clocks disagree still agree on who is alive. With the embedded
filesystem broker there is one worker and routing is off. Torch-free: the API imports it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from darkroom.identities import Operation
from darkroom.model_ids import default_model_id, operations
from darkroom.settings import Settings

log = logging.getLogger(__name__)

#: Bound on a worker's or the sweeper's presence calls (the API uses its own, shorter one).
PRESENCE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ModelKey:
    """What a worker loads for a job: an operation's pipelines with a model id (None: default)."""

    operation: Operation
    model_id: str | None = None

    @property
    def name(self) -> str:
        """`<operation>:<model id>` with the default written out; its model queue's suffix."""
        return f"{self.operation}:{self.model_id or default_model_id(self.operation)}"


@dataclass(frozen=True)
class WorkerPresence:
    """What a live worker says about itself: its model keys, cold loads per key, jobs run, its
    GPUs (name, memory used and total) and library versions (system_details shows them)."""

    name: str
    models: list[str] = field(default_factory=list)
    loads: dict[str, int] = field(default_factory=dict)
    jobs: int = 0
    gpus: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def model_key(operation: str, model_id: str | None) -> ModelKey:
    """The key of a job's model; naming the default model explicitly gives the same key."""
    if not model_id or model_id == default_model_id(operation):
        model_id = None
    return ModelKey(Operation(operation), model_id)


def parse_model_key(entry: str) -> ModelKey:
    """A key as an operator writes it: `my-sd` (img2img), `pix2pix:` (its default model) or
    `img_mixer:owner/decoder`."""
    operation, colon, model_id = entry.strip().partition(":")
    if not colon:
        operation, model_id = Operation.IMG2IMG, operation
    if operation not in operations():
        raise ValueError(
            f"{entry!r} names the unknown operation {operation!r}; "
            f"write <operation>:<model id> with one of {', '.join(operations())}."
        )
    return model_key(operation, model_id or None)


def model_queue_prefix(settings: Settings) -> str:
    """What every model queue's name starts with."""
    return f"{settings.job_queue}.model."


def model_queue(settings: Settings, key: ModelKey) -> str:
    """The queue of jobs for `key`, consumed by the workers that hold it."""
    return model_queue_prefix(settings) + key.name


def routing_enabled(settings: Settings) -> bool:
    """Affinity needs Redis (presence and queue lengths); the embedded broker has one worker."""
    broker = settings.resolved_broker_url
    return settings.affinity_routing and broker.startswith(("redis://", "rediss://"))


@lru_cache(maxsize=8)
def redis_client(url: str, timeout_s: float) -> redis.Redis:
    """A client whose every call, connecting included, gives up after `timeout_s`, unretried."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


def _prefix(settings: Settings) -> str:
    """Presence keys are namespaced by the jobs queue, like the queues themselves."""
    return f"darkroom.affinity.{settings.job_queue}"


def _holders_key(settings: Settings, key_name: str) -> str:
    return f"{_prefix(settings)}.holders.{key_name}"


def _workers_key(settings: Settings) -> str:
    return f"{_prefix(settings)}.workers"


def _record_key(settings: Settings, worker: str) -> str:
    return f"{_prefix(settings)}.worker.{worker}"


def _now(time_reply: Any) -> float:
    """Redis's TIME reply as seconds."""
    seconds, micros = time_reply
    return float(seconds) + float(micros) / 1e6


def choose_queue(settings: Settings, operation: Operation, model_id: str | None) -> str:
    """The queue for a job: its model's queue when a live worker holds the model and that queue
    is at most `affinity_queue_slack` longer than the general one; else the general queue.

    One Redis round trip, bounded by `affinity_lookup_timeout_s`; any Redis error means the
    general queue (whose publish then fails too, leaving the job to the outbox as before).
    """
    if not routing_enabled(settings):
        return settings.job_queue
    key = model_key(operation, model_id)
    queue = model_queue(settings, key)
    try:
        holders, backlog, general = _lookup(settings, key, queue)
    except redis.RedisError as exc:
        log.warning("affinity lookup failed, general queue used: %s", exc)
        return settings.job_queue
    if holders and backlog <= general + settings.affinity_queue_slack:
        return queue
    return settings.job_queue


def _lookup(settings: Settings, key: ModelKey, queue: str) -> tuple[int, int, int]:
    """Live holders of `key`, the length of its queue, and the general queue's length."""
    client = redis_client(settings.resolved_broker_url, settings.affinity_lookup_timeout_s)
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(_holders_key(settings, key.name), 0, -1, withscores=True)
    pipe.llen(queue)
    pipe.llen(settings.job_queue)
    now, holders, backlog, general = pipe.execute()
    live = sum(1 for _worker, expiry in holders if expiry > _now(now))
    return live, int(backlog), int(general)


def unconsumed(settings: Settings, queues: Iterable[str]) -> set[str]:
    """Those of the model `queues` that no live worker advertises (raises on Redis errors)."""
    names = sorted(set(queues))
    client = redis_client(settings.resolved_broker_url, PRESENCE_TIMEOUT_S)
    pipe = client.pipeline(transaction=False)
    pipe.time()
    prefix = model_queue_prefix(settings)
    for queue in names:
        pipe.zrange(_holders_key(settings, queue.removeprefix(prefix)), 0, -1, withscores=True)
    now, *holders = pipe.execute()
    return {
        queue
        for queue, members in zip(names, holders, strict=True)
        if not any(expiry > _now(now) for _worker, expiry in members)
    }


def live_workers(settings: Settings) -> list[WorkerPresence]:
    """The workers whose advertisement has not expired, by name."""
    client = redis_client(settings.resolved_broker_url, PRESENCE_TIMEOUT_S)
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(_workers_key(settings), 0, -1, withscores=True)
    now, members = pipe.execute()
    names = sorted(member.decode() for member, expiry in members if expiry > _now(now))
    records = client.mget([_record_key(settings, name) for name in names]) if names else []
    return [_presence(json.loads(raw)) for raw in records if raw is not None]


def _presence(record: dict[str, Any]) -> WorkerPresence:
    """A record as written by this or another version of the worker (unknown fields dropped)."""
    known = WorkerPresence.__dataclass_fields__
    return WorkerPresence(**{name: value for name, value in record.items() if name in known})


class Presence:
    """One worker's advertisement in Redis, renewed before its TTL runs out."""

    def __init__(self, settings: Settings, worker: str) -> None:
        self.settings = settings
        self.worker = worker
        self.client = redis_client(settings.resolved_broker_url, PRESENCE_TIMEOUT_S)

    def renew(self, presence: WorkerPresence) -> None:
        """Advertise `presence` until now + TTL (Redis's clock); prune expired holders."""
        ttl = self.settings.affinity_ttl_s
        now = _now(self.client.time())
        keep_ms = int(ttl * 2000)  # the sets outlive one missed renewal, then vanish
        pipe = self.client.pipeline(transaction=False)
        for name in [*presence.models, None]:
            key = _workers_key(self.settings) if name is None else _holders_key(self.settings, name)
            pipe.zadd(key, {self.worker: now + ttl})
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.pexpire(key, keep_ms)
        record = json.dumps(asdict(presence))
        pipe.set(_record_key(self.settings, self.worker), record, px=int(ttl * 1000))
        pipe.execute()

    def withdraw(self, key_name: str) -> None:
        """Stop advertising one model at once (it was evicted)."""
        self.client.zrem(_holders_key(self.settings, key_name), self.worker)

    def leave(self, key_names: Iterable[str]) -> None:
        """Remove every trace of this worker at once (it is stopping)."""
        pipe = self.client.pipeline(transaction=False)
        for name in key_names:
            pipe.zrem(_holders_key(self.settings, name), self.worker)
        pipe.zrem(_workers_key(self.settings), self.worker)
        pipe.delete(_record_key(self.settings, self.worker))
        pipe.execute()
