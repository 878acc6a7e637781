"""Fetch by id: the processing, success or failed shape of one of the caller's jobs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy.orm import Session

from api.deps import ApiKeyDep, BodyDep, SessionDep, SettingsDep
from api.errors import ApiError
from api.schemas import FetchRequest
from api.submission import DEFAULT_ETA_S
from darkroom.responses import failed_body, processing_body, success_body
from darkroom.settings import Settings
from darkroom.storage import make_storage
from db.models import ApiKey, JobState
from db.repositories import jobs

router = APIRouter(tags=["fetch"])


def fetch_job(session: Session, settings: Settings, key: ApiKey, job_id: int) -> dict[str, Any]:
    """The current shape of job `job_id`; another key's job answers exactly like a missing one."""
    job = jobs.get_job_for_key(session, job_id, key.id)
    if job is None:
        raise ApiError(404, f"No request with id {job_id}.")
    if job.state == JobState.SUCCESS:
        return success_body(job, settings.public_url, make_storage(settings).read)
    if job.state == JobState.FAILED:
        return failed_body(job)
    eta = jobs.typical_generation_time(session, job.operation) or DEFAULT_ETA_S
    return processing_body(job, settings.public_url, eta)


def fetch_by_path(
    job_id: int, key: ApiKeyDep, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    """`POST .../fetch/{id}` with body `{key}`."""
    return fetch_job(session, settings, key, job_id)


for _path in (
    "/api/v6/image_editing/fetch/{job_id}",
    "/api/v5/fetch/{job_id}",
    "/api/v3/fetch/{job_id}",
    "/api/v1/enterprise/fetch/{job_id}",
):
    router.add_api_route(_path, fetch_by_path, methods=["POST"], summary="Fetch a job by id")


@router.post("/api/v1/enterprise/fetch", summary="Fetch a job by request_id")
def fetch_enterprise(
    body: BodyDep, key: ApiKeyDep, session: SessionDep, settings: SettingsDep
) -> dict[str, Any]:
    """`POST /api/v1/enterprise/fetch` with body `{key, request_id}`."""
    request = FetchRequest.model_validate(body)
    if request.request_id is None:
        raise ApiError(422, {"request_id": ["The request_id field is required."]})
    return fetch_job(session, settings, key, request.request_id)
