"""Cancel: a queued job fails at once; a running one stops at its next denoising step."""

from __future__ import annotations

from typing import Any

from celery import Celery
from fastapi import APIRouter, Request
from sqlalchemy.orm import Session

from api.auth import Work, keyed
from api.deps import BodyDep, BrokerDep, SettingsDep, presented_key
from api.errors import ApiError
from api.routes.fetch import fetch_job
from darkroom.queue import DELIVER_WEBHOOK_TASK, send
from darkroom.settings import Settings
from db.models import TERMINAL_STATES, ApiKey, JobState
from db.repositories import jobs
from services import outcomes

router = APIRouter(tags=["cancel"])

Answer = dict[str, Any]


@router.post("/api/v1/jobs/{job_id}/cancel", summary="Cancel a queued or running job")
async def cancel(
    job_id: int, request: Request, body: BodyDep, broker: BrokerDep, settings: SettingsDep
) -> Answer:
    """Body `{key}`. Answers the job's shape after the cancel: failed, or still processing
    (with `cancel_requested: true`) until its worker reaches the next step."""
    work = _cancel_as(settings, broker, job_id)
    return await keyed(request, presented_key(request, body), work)


def _cancel_as(settings: Settings, broker: Celery, job_id: int) -> Work[Answer]:
    """The work of a cancel, run with the key in one thread-pool hop (api.auth)."""

    def work(session: Session, key: ApiKey) -> Answer:
        job = jobs.get_job_for_key(session, job_id, key.id)
        if job is None:
            raise ApiError(404, f"No request with id {job_id}.")
        if job.state in TERMINAL_STATES:
            raise ApiError(409, f"Request {job_id} has already finished: it cannot be canceled.")
        delivery_id = None
        if job.state == JobState.QUEUED:
            delivery_id = outcomes.fail(session, settings, job, outcomes.CANCELED_MESSAGE)
        jobs.request_cancel(session, job_id)
        session.commit()  # releases the connection: the publish below holds none
        if delivery_id is not None:
            send(broker, DELIVER_WEBHOOK_TASK, delivery_id)
        session.expire_all()
        return {**fetch_job(session, settings, key, job_id), "cancel_requested": True}

    return work
