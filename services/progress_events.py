"""A running job's progress extras: its preview image and its opt-in progress webhooks.

`webhook_events_filter` (a submit field) names the webhook events a job wants: `start` (a worker
took it), `progress` (step k of n, at most one per DARKROOM_PROGRESS_WEBHOOK_EVERY_S and at most
DARKROOM_PROGRESS_WEBHOOK_MAX per job) and `completed` (the terminal webhook, as ever; the
default is `completed` alone). The GPU worker only records that a `start` or `progress` event is
due (a row of progress_deliveries, in the transaction that records its progress); the dispatcher
makes its one attempt (worker/webhooks/progress.py), signed exactly like the terminal webhook,
and records it. They never touch webhook_deliveries, so the terminal delivery stays one per
job, retried on its schedule, and is never queued behind them.

The preview (worker/previews.py makes it) is stored as the job's one latest preview and shown
by the `progress` server-sent event (services/job_events.py) as a data URL. Torch-free.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from darkroom.settings import Settings
from db.models import Job
from db.repositories import progress

START, PROGRESS, COMPLETED = "start", "progress", "completed"
EVENTS = (START, PROGRESS, COMPLETED)
#: The events a job gets when it names none: the terminal webhook alone, as before.
DEFAULT_EVENTS = (COMPLETED,)
#: Where a job's chosen events are kept (its `meta`, echoed in responses as the API does).
META_FIELD = "webhook_events_filter"


def parse_filter(value: Any) -> list[str] | None:
    """`webhook_events_filter` as a list of event names (a list or a comma-separated string);
    None when absent. Raises ValueError naming the allowed events for anything else."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        names = [part.strip().lower() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        names = [item.strip().lower() for item in value]
    else:
        raise ValueError("must be a list or a comma-separated string of events")
    unknown = sorted({name for name in names if name not in EVENTS})
    if unknown:
        raise ValueError(f"unknown events {unknown}: allowed are {', '.join(EVENTS)}")
    return [event for event in EVENTS if event in names]


def events_meta(request: object) -> dict[str, Any]:
    """The `meta` entry that keeps a request's chosen webhook events (none when it chose none)."""
    chosen = getattr(request, META_FIELD, None)
    return {META_FIELD: list(chosen)} if chosen else {}


def events_of(job: Job) -> tuple[str, ...]:
    """The webhook events `job` asked for."""
    chosen = (job.meta or {}).get(META_FIELD)
    if isinstance(chosen, list) and chosen:
        return tuple(str(event) for event in chosen)
    return DEFAULT_EVENTS


@dataclass(frozen=True)
class Watched:
    """What a running job's progress webhooks need, read once when the worker claims it."""

    job_id: int
    url: str | None
    events: tuple[str, ...]
    steps: int
    track_id: str | None

    @classmethod
    def of(cls, job: Job) -> Watched:
        """The job as its progress events see it."""
        steps = int((job.params or {}).get("steps") or 0)
        return cls(job.id, job.webhook_url, events_of(job), steps, job.track_id)

    def wants(self, event: str) -> bool:
        """Whether this job has a webhook and asked for `event`."""
        return bool(self.url) and event in self.events


def _payload(watched: Watched, event: str, fraction: float | None = None) -> str:
    """The body of a `start` or `progress` webhook: the event, the job and where it is."""
    body: dict[str, Any] = {"status": "processing", "event": event, "id": watched.job_id}
    if fraction is not None:
        body |= {
            "step": math.floor(fraction * watched.steps),
            "steps": watched.steps,
            "progress": round(fraction, 3),
        }
    body["track_id"] = watched.track_id
    return json.dumps(body, separators=(",", ":"))


def record_start(session: Session, watched: Iterable[Watched]) -> None:
    """Record the `start` webhooks due for jobs a worker has just taken (once per job)."""
    for job in watched:
        if (
            job.wants(START)
            and job.url
            and not progress.count_deliveries(session, job.job_id, START)
        ):
            progress.create_delivery(session, job.job_id, START, job.url, _payload(job, START))


@dataclass
class ProgressRecorder:
    """The progress webhooks of one batch: at most one per job every `every_s` seconds and
    `limit` per job in all (counted in the database, so a rerun adds none past it)."""

    settings: Settings
    watched: Mapping[int, Watched]
    last_sent: dict[int, float] = field(default_factory=dict)

    def record_webhooks(self, session: Session, job_ids: Sequence[int], fraction: float) -> None:
        """Record a `progress` delivery for each of `job_ids` whose throttle allows one."""
        every_s, limit = self.settings.progress_webhook_every_s, self.settings.progress_webhook_max
        now = time.monotonic()
        for job_id in job_ids:
            job = self.watched.get(job_id)
            if job is None or not job.wants(PROGRESS) or job.url is None or fraction >= 1.0:
                continue
            if now - self.last_sent.get(job_id, -math.inf) < every_s:
                continue
            self.last_sent[job_id] = now
            if progress.count_deliveries(session, job_id, PROGRESS) >= limit:
                continue
            progress.create_delivery(
                session, job_id, PROGRESS, job.url, _payload(job, PROGRESS, fraction)
            )

    def save_previews(
        self, session: Session, previews: Mapping[int, bytes], media_type: str, fraction: float
    ) -> None:
        """Store each job's latest preview (by job id) over the one before."""
        for job_id, image in previews.items():
            job = self.watched.get(job_id)
            steps = job.steps if job is not None else 0
            step = math.floor(fraction * steps)
            progress.save_preview(session, job_id, image, media_type, step, steps)


def preview_fields(session: Session, job_id: int) -> dict[str, Any]:
    """The `preview` (a data URL) and `preview_step` of a running job's latest preview; empty
    when it has none."""
    preview = progress.get_preview(session, job_id)
    if preview is None:
        return {}
    encoded = base64.b64encode(preview.image).decode("ascii")
    return {"preview": f"data:{preview.media_type};base64,{encoded}", "preview_step": preview.step}
