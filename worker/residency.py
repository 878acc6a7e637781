"""A worker's side of model-affinity routing: the models it holds, their queues, its presence.

A worker consumes the general jobs queue from the start. Once a model is resident (loaded at
start from `worker_models`, or cold-loaded by a job from the general queue) it also consumes
that model's queue and advertises the model in Redis; when the model cache evicts it, the worker
withdraws the advertisement first and then stops consuming the queue. Consumer changes go
through the Celery consumer's `call_soon`, so they run in the worker's event loop between jobs,
as Celery's own `add_consumer` control command does.

A model key counts as held here once a job or the preload fetched it from this process's
cache, and until its pipelines leave the cache. Under the tiny preset every model id shares the
same weights, so a key's first job on a worker counts as its cold load even when it took 0 s.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from darkroom import model_ids
from darkroom.settings import Settings
from db.repositories import routing
from db.session import session_scope
from services.routing import (
    ModelKey,
    Presence,
    WorkerPresence,
    model_key,
    model_queue,
    parse_model_key,
    routing_enabled,
)
from worker.models import weights as worker_registry
from worker.models.cache import CacheKey, ModelCache, ResidentModel
from worker.models.lora_cache import shared_cache
from worker.models.weights import ModelSpec
from worker.server_control import gpu_details, library_versions, release_memory

log = logging.getLogger(__name__)


class TrackedCache(ModelCache):
    """A `ModelCache` that notes when a model is fetched: the job that asked ran here."""

    fetched = False

    def get(self, spec: ModelSpec, pinned: Iterable[CacheKey] = ()) -> tuple[ResidentModel, float]:
        """As `ModelCache.get`, noting the fetch."""
        self.fetched = True
        return super().get(spec, pinned)

    def clear(self) -> int:
        """Drop every resident model and component (they load again on demand); how many."""
        dropped = len(self)
        self._entries.clear()
        release_memory()
        return dropped


class WorkerAffinity:
    """The model keys this worker holds, the queues it consumes for them, and its presence."""

    def __init__(self, settings: Settings, cache: TrackedCache) -> None:
        self.settings = settings
        self.cache = cache
        self.routing = routing_enabled(settings)
        self._held: dict[ModelKey, ModelSpec] = {}
        self._advertised: set[str] = set()
        self._loads: Counter[str] = Counter()
        self._jobs = 0
        self._consumer: Any = None
        self._presence: Presence | None = None
        self._lock = threading.Lock()  # guards what the heartbeat thread reads
        # Serialises writes to Redis, so a renewal never re-adds a model just withdrawn;
        # reentrant because `stop` runs in a signal handler, maybe inside a renewal.
        self._writing = threading.RLock()
        self._stopped = threading.Event()

    def start(self, consumer: Any) -> None:
        """The worker is ready: load the configured models, consume their queues, heartbeat."""
        self._consumer = consumer
        if self.routing:
            self._presence = Presence(self.settings, str(consumer.hostname))
        for entry in self.settings.worker_models:
            self._preload(entry)
        self._drop_evicted()
        if self._presence is not None:
            self._renew()
            beat = threading.Thread(target=self._heartbeat, name="affinity", daemon=True)
            beat.start()

    def stop(self) -> None:
        """The worker is stopping: stop advertising at once, so no new job is routed here."""
        self._stopped.set()
        if self._presence is None:
            return
        try:
            with self._writing:
                self._presence.leave([key.name for key in self._held])
        except redis.RedisError:
            log.warning("could not withdraw this worker's presence; it expires by itself")

    @contextmanager
    def tracking(self, job_id: int) -> Iterator[None]:
        """Around one job: afterwards, hold its model if it ran here, drop evicted models."""
        self.cache.fetched = False
        try:
            yield
        finally:
            self._drop_evicted()
            if self.cache.fetched:
                with self._lock:
                    self._jobs += 1
                key = self._key_of(job_id)
                if key is not None:
                    self._hold(key)

    def snapshot(self) -> WorkerPresence:
        """What this worker advertises now."""
        with self._lock:
            name = self._presence.worker if self._presence is not None else ""
            models = sorted(self._advertised)
            loads, jobs = dict(self._loads), self._jobs
        return WorkerPresence(name, models, loads, jobs, gpu_details(), library_versions())

    def clear_models(self) -> int:
        """Drop every resident model, withdrawing their advertisements; how many were held.
        Called between jobs (a control command, see worker.server_control)."""
        dropped = self.cache.clear()
        shared_cache().clear()  # the LoRAs held in memory go too
        self._drop_evicted()
        return dropped

    def _preload(self, entry: str) -> None:
        """Load one configured model; a bad entry is logged and skipped, the worker still runs."""
        try:
            key = parse_model_key(entry)
            spec = worker_registry.resolve_model(key.operation, key.model_id, self.settings)
            _model, seconds = self.cache.get(spec)
        except Exception:
            log.exception("could not preload model %r", entry)
            return
        log.info("preloaded model %s in %.2f s", key.name, seconds)
        self._hold(key)

    def _key_of(self, job_id: int) -> ModelKey | None:
        """The model key of job `job_id`, read from its row."""
        with session_scope(self.settings.resolved_database_url) as session:
            requested = routing.requested_models(session, [job_id]).get(job_id)
        return model_key(*requested) if requested is not None else None

    def _hold(self, key: ModelKey) -> None:
        """Count a cold load of `key` unless it is held already; then consume its queue."""
        if key in self._held:
            return
        self._held[key] = model_ids.resolve_model(key.operation, key.model_id, self.settings)
        with self._lock:
            self._loads[key.name] += 1
            loads = self._loads[key.name]
        log.info("model %s resident here (cold loads: %d)", key.name, loads)
        if self._presence is not None:
            self._consumer.call_soon(self._consume, key)

    def _consume(self, key: ModelKey) -> None:
        """In the event loop: take jobs from `key`'s queue, then say so."""
        if key not in self._held or self._stopped.is_set():
            return  # evicted, or stopping, before the loop came round
        self._consumer.add_task_queue(model_queue(self.settings, key))
        with self._lock:
            self._advertised.add(key.name)
        self._renew()

    def _drop_evicted(self) -> None:
        """Forget models the cache no longer holds: withdraw first, then stop consuming."""
        evicted = [key for key, spec in self._held.items() if spec not in self.cache]
        for key in evicted:
            del self._held[key]
            with self._lock:
                self._advertised.discard(key.name)
            log.info("model %s evicted here", key.name)
            if self._presence is not None:
                self._withdraw(self._presence, key)
        if evicted:
            self._renew()

    def _withdraw(self, presence: Presence, key: ModelKey) -> None:
        """Stop advertising `key` at once, then stop consuming its queue in the event loop."""
        try:
            with self._writing:
                presence.withdraw(key.name)
        except redis.RedisError:
            log.warning("could not withdraw %s; its advertisement expires by itself", key.name)
        self._consumer.call_soon(self._consumer.cancel_task_queue, model_queue(self.settings, key))

    def _heartbeat(self) -> None:
        """Renew the advertisement every third of its TTL until the worker stops."""
        while not self._stopped.wait(self.settings.affinity_ttl_s / 3):
            self._renew()

    def _renew(self) -> None:
        """Write the advertisement now; a Redis error is logged and retried next beat."""
        if self._presence is None or self._stopped.is_set():
            return
        try:
            with self._writing:
                self._presence.renew(self.snapshot())
        except redis.RedisError:
            log.warning("could not renew this worker's presence; retrying")
