"""Cancel: a queued job fails at once; a running one stops at its next denoising step."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import ApiKeyDep, BrokerDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.routes.fetch import fetch_job
from darkroom import outcomes
from darkroom.queue import DELIVER_WEBHOOK_TASK, send
from db.models import TERMINAL_STATES, JobState
from db.repositories import jobs

router = APIRouter(tags=["cancel"])


@router.post("/api/v1/jobs/{job_id}/cancel", summary="Cancel a queued or running job")
def cancel(
    job_id: int, key: ApiKeyDep, session: SessionDep, broker: BrokerDep, settings: SettingsDep
) -> dict[str, Any]:
    """Body `{key}`. Answers the job's shape after the cancel: failed, or still processing
    (with `cancel_requested: true`) until its worker reaches the next step."""
    job = jobs.get_job_for_key(session, job_id, key.id)
    if job is None:
        raise ApiError(404, f"No request with id {job_id}.")
    if job.state in TERMINAL_STATES:
        raise ApiError(409, f"Request {job_id} has already finished: it cannot be canceled.")
    delivery_id = None
    if job.state == JobState.QUEUED:
        delivery_id = outcomes.fail(session, settings, job, outcomes.CANCELED_MESSAGE)
    jobs.request_cancel(session, job_id)
    session.commit()
    if delivery_id is not None:
        send(broker, DELIVER_WEBHOOK_TASK, delivery_id)
    session.expire_all()
    return {**fetch_job(session, settings, key, job_id), "cancel_requested": True}
