"""What operators see of jobs: JSON views of rows and a job's timeline in sentences.

One home for both presenters, the `darkroom jobs` commands (cli/admin.py) and the dashboard
(api/routes/dashboard.py), so that they show the same fields and the same timeline. The rows
come from db.repositories.operator; nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from db.models import ApiKey, DeliveryState, Job, JobRequeue, JobState, WebhookDelivery
from db.repositories import operator
from db.repositories.operator import JobRecord

#: The request fields a job view summarises (meta holds the rest as the client sees it).
PARAM_FIELDS = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "strength",
    "image_guidance_scale",
    "samples",
    "seed",
    "model_id",
    "scheduler",
    "temp",
    "base64_output",
)
#: Long client-supplied strings are cut to this many characters in views.
TEXT_LIMIT = 300

#: Turns an output file name into the link a view shows.
Link = Callable[[str], str]


def delivery_view(delivery: WebhookDelivery) -> dict[str, Any]:
    """A delivery and its attempts as JSON (without the payload, which can be large)."""
    pending = delivery.state == DeliveryState.PENDING
    return {
        "id": delivery.id,
        "webhook_id": delivery.message_id,
        "url": delivery.url,
        "state": delivery.state.value,
        "attempt_count": delivery.attempt_count,
        "last_error": delivery.last_error,
        "created_at": delivery.created_at.isoformat(),
        "next_attempt_at": delivery.next_attempt_at.isoformat() if pending else None,
        "finished_at": delivery.finished_at.isoformat() if delivery.finished_at else None,
        "attempts": [
            {
                "attempted_at": attempt.attempted_at.isoformat(),
                "status_code": attempt.status_code,
                "latency_ms": attempt.latency_ms,
                "error": attempt.error,
                "response_excerpt": attempt.response_excerpt,
            }
            for attempt in delivery.attempts
        ],
    }


def superseded_webhook(delivery: WebhookDelivery | None) -> dict[str, Any] | None:
    """The delivery as a requeue record keeps it (`operator.supersede_run`): with the body
    that was sent; None without a delivery."""
    if delivery is None:
        return None
    return {**delivery_view(delivery), "payload": json.loads(delivery.payload)}


def job_summaries(session: Session, rows: list[Job], link: Link) -> list[dict[str, Any]]:
    """Views of a page of jobs, with their keys and webhooks read in two queries."""
    owners = operator.keys_by_id(session, {job.api_key_id for job in rows})
    hooks = operator.deliveries_by_job(session, [job.id for job in rows])
    return [job_summary(job, owners.get(job.api_key_id), hooks.get(job.id), link) for job in rows]


def job_summary(
    job: Job, key: ApiKey | None, delivery: WebhookDelivery | None, link: Link
) -> dict[str, Any]:
    """One job as a row of a listing: state, owner, times, inputs, outputs, webhook state."""
    return {
        "id": job.id,
        "state": job.state.value,
        "operation": job.operation.value,
        "endpoint": job.endpoint,
        "key": None if key is None else {"id": key.id, "name": key.name, "prefix": key.key_prefix},
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "attempts": job.attempts,
        "progress": job.progress,
        "cancel_requested": job.cancel_requested_at is not None,
        "error": job.error,
        "track_id": job.track_id,
        "generation_time": job.generation_time,
        "inputs": input_images(job.params),
        "outputs": [
            {
                "filename": out.filename,
                "url": link(out.filename),
                "width": out.width,
                "height": out.height,
                "seed": out.seed,
                "nsfw": out.nsfw,
                "deleted": out.deleted_at is not None,
            }
            for out in job.outputs
        ],
        "webhook": None
        if delivery is None
        else {"state": delivery.state.value, "attempts": delivery.attempt_count},
    }


def job_detail(record: JobRecord, link: Link) -> dict[str, Any]:
    """One job in full: the summary, its parameters, meta, timeline, webhook and earlier runs."""
    job = record.job
    return {
        **job_summary(job, record.key, record.delivery, link),
        "params": params_summary(job.params),
        "meta": job.meta,
        "timeline": timeline(record),
        "webhook": None if record.delivery is None else delivery_view(record.delivery),
        "requeues": [
            {
                "requeued_at": row.requeued_at.isoformat(),
                "reason": row.reason,
                "previous_state": row.previous_state.value,
                "previous_error": row.previous_error,
                "previous_attempts": row.previous_attempts,
                "previous_webhook": row.previous_webhook,
            }
            for row in record.requeues
        ],
    }


def input_images(params: dict[str, Any]) -> list[dict[str, Any]]:
    """A job's init images: http(s) URLs as given, inline (data:) images only by their size."""
    shown: list[dict[str, Any]] = []
    for value in params.get("init_images", []):
        text = str(value)
        if text.startswith(("http://", "https://")):
            shown.append({"kind": "url", "url": text})
        else:
            shown.append({"kind": "inline", "chars": len(text)})
    return shown


def params_summary(params: dict[str, Any]) -> dict[str, Any]:
    """The request's main fields, long texts cut, without the images themselves."""
    given = [name for name in PARAM_FIELDS if params.get(name) not in (None, "")]
    summary = {name: _clip(params[name]) for name in given}
    loras = params.get("loras") or []
    if loras:
        summary["loras"] = [f"{lora.get('name')}:{lora.get('strength')}" for lora in loras]
    summary["init_images"] = len(params.get("init_images", []))
    return summary


def timeline(record: JobRecord) -> list[dict[str, Any]]:
    """What happened to the job, oldest first: its run, requeues and webhook attempts."""
    job = record.job
    events = [(job.created_at, "created", f"{job.operation.value} via {job.endpoint}")]
    events += [(row.requeued_at, "requeued", _requeue_detail(row)) for row in record.requeues]
    if job.enqueued_at is not None:
        events.append((job.enqueued_at, "enqueued", job.queue_name or ""))
    if job.started_at is not None:
        events.append((job.started_at, "started", _started_detail(job)))
    if job.cancel_requested_at is not None:
        events.append((job.cancel_requested_at, "cancel_requested", ""))
    if job.finished_at is not None:
        events.append((job.finished_at, "finished", _finished_detail(job)))
    if record.delivery is not None:
        events += _webhook_events(record.delivery)
    events.sort(key=lambda event: event[0])
    return [{"at": at.isoformat(), "event": name, "detail": text} for at, name, text in events]


def _started_detail(job: Job) -> str:
    """Which attempt runs, and how far it got while it still runs."""
    detail = f"attempt {job.attempts}"
    if job.state == JobState.PROCESSING and job.progress is not None:
        detail += f", {job.progress:.0%} done"
    return detail


def _finished_detail(job: Job) -> str:
    """The outcome: outputs and time, or the error."""
    if job.state == JobState.SUCCESS:
        seconds = f" in {job.generation_time:.1f} s" if job.generation_time is not None else ""
        return f"success: {len(job.outputs)} output(s){seconds}"
    return f"{job.state.value}: {_clip(job.error or '')}"


def _requeue_detail(row: JobRequeue) -> str:
    """What the requeue replaced."""
    detail = f"was {row.previous_state.value} after {row.previous_attempts} attempt(s)"
    if row.previous_started_at is not None:  # the timeline's own `started` is the next run's
        detail += f", the last started {row.previous_started_at.isoformat(timespec='seconds')}"
    if row.previous_error:
        detail += f": {_clip(row.previous_error)}"
    hook = row.previous_webhook
    if hook is not None:
        detail += f"; webhook {hook['webhook_id']} ({hook['state']}) superseded"
    if row.reason:
        detail += f"; reason: {_clip(row.reason)}"
    return detail


def _webhook_events(delivery: WebhookDelivery) -> list[tuple[datetime, str, str]]:
    """The delivery's creation, each attempt, and its end or next due time."""
    events = [(delivery.created_at, "webhook_queued", f"{delivery.message_id} to {delivery.url}")]
    for number, attempt in enumerate(delivery.attempts, start=1):
        answer = f"HTTP {attempt.status_code}" if attempt.status_code else attempt.error
        detail = f"#{number}: {answer} in {attempt.latency_ms:.0f} ms"
        events.append((attempt.attempted_at, "webhook_attempt", detail))
    if delivery.finished_at is not None:
        ended = f"webhook_{delivery.state.value}"
        events.append((delivery.finished_at, ended, delivery.last_error or ""))
    elif delivery.attempt_count:
        events.append((delivery.next_attempt_at, "webhook_retry_due", delivery.last_error or ""))
    return events


def _iso(moment: datetime | None) -> str | None:
    """A time as ISO 8601, or None."""
    return None if moment is None else moment.isoformat()


def _clip(value: Any) -> Any:
    """Long strings cut to TEXT_LIMIT characters; other values as they are."""
    if isinstance(value, str) and len(value) > TEXT_LIMIT:
        return value[:TEXT_LIMIT] + "…"
    return value
