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
from darkroom.settings import Settings
from db.models import ApiKey
from services import jobs

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
    """The work of a cancel, run with the key in one thread-pool hop (api.auth); its webhook is
    sent once the request's transaction commits."""

    def work(session: Session, key: ApiKey) -> Answer:
        try:
            jobs.cancel(session, broker, settings, job_id, key_id=key.id)
        except jobs.JobNotFoundError:
            raise ApiError(404, f"No request with id {job_id}.") from None
        except jobs.JobFinishedError:
            raise ApiError(
                409, f"Request {job_id} has already finished: it cannot be canceled."
            ) from None
        return {**fetch_job(session, settings, key, job_id), "cancel_requested": True}

    return work
