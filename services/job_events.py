"""A job's live progress as events: where it is in the queue, which denoising step it is at,
and at the end the same payload its webhook carries.

One home for what a progress event says: the API's server-sent events (api/routes/events.py)
and `darkroom jobs watch` both read it from here. Torch-free.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from darkroom.settings import Settings
from db.models import TERMINAL_STATES, Job, JobState
from db.repositories import jobs
from services.eta import estimated_eta
from services.links import OutputLinks
from services.progress_events import preview_fields
from services.responses import webhook_body


@dataclass(frozen=True)
class JobEvent:
    """One server-sent event: its name (`queued`, `progress`, `success`, `failed`) and data."""

    name: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        """Whether the job has ended: nothing follows this event."""
        return self.name in ("success", "failed")

    def encode(self) -> str:
        """The event in the text/event-stream format."""
        return f"event: {self.name}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n"


def read_event(
    session: Session, settings: Settings, job_id: int, key_id: int | None
) -> JobEvent | None:
    """Job `job_id`'s current event; None when it does not exist or (with `key_id`) belongs
    to another key."""
    if not 1 <= job_id < 2**31:  # an id Postgres' integer cannot hold is no job
        return None
    if key_id is None:
        job = jobs.get_job(session, job_id)
    else:
        job = jobs.get_job_for_key(session, job_id, key_id)
    if job is None:
        return None
    return job_event(session, settings, job)


def job_event(session: Session, settings: Settings, job: Job) -> JobEvent:
    """What `job` is doing now, as an event."""
    if job.state in TERMINAL_STATES:
        links = OutputLinks.from_settings(settings)
        return JobEvent(job.state.value, webhook_body(job, links, links.storage.read))
    eta = round(estimated_eta(session, job), 1)
    if job.state == JobState.QUEUED:
        position = jobs.queued_position(session, job.id)
        return JobEvent(
            "queued", {"status": "queued", "id": job.id, "position": position, "eta": eta}
        )
    return JobEvent("progress", _progress(job, eta) | preview_fields(session, job.id))


def _progress(job: Job, eta: float) -> dict[str, Any]:
    """Step k of n of a running job (n: the steps it asked for; its worker writes the fraction).
    Its latest preview, when it has one, is added as `preview` (a JPEG data URL of at most
    128 px a side) and `preview_step`."""
    fraction = min(max(job.progress or 0.0, 0.0), 1.0)
    steps = int(job.params.get("steps") or 0)
    return {
        "status": "processing",
        "id": job.id,
        "step": math.floor(fraction * steps),
        "steps": steps,
        "progress": round(fraction, 3),
        "eta": eta,
    }
