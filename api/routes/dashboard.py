"""The operators' dashboard: one static page, and the JSON it reads under /admin/api/.

Off (every path answers 404) until DARKROOM_ADMIN_TOKEN is set. The page holds no data; each
/admin/api/ request must carry `Authorization: Bearer <token>`. It is read-only, and it never
fetches a job's input URLs, nor does the operator's browser: the page shows them as text.
"""

from __future__ import annotations

import hmac
from functools import cache
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from darkroom.identities import Operation
from darkroom.settings import Settings
from darkroom.storage import make_storage
from db.models import DeliveryState, JobState, utcnow
from db.repositories import operator
from db.repositories.jobs import get_output
from db.repositories.keys import find_key
from services import job_views

router = APIRouter(include_in_schema=False)

#: The page's files, by the name it requests them under, with their media types.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: The page runs only its own script and talks only to this origin. Its only images are our
#: outputs, fetched from this origin with the token and shown as blobs (whatever the storage,
#: /admin/api/outputs/ reads it server-side): a client-chosen URL is never loaded.
PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}
#: Where the page links an output thumbnail (fetched with the token, shown as a blob).
OUTPUT_PATH = "/admin/api/outputs/{}"


def _require_enabled(settings: Settings) -> None:
    """404, as for any unknown path, while no operator token is configured."""
    if not settings.admin_token:
        raise ApiError(404, "Not Found")


def require_operator(request: Request, response: Response, settings: SettingsDep) -> None:
    """Let only requests with the operator token through; their answers are never cached."""
    _require_enabled(settings)
    header = request.headers.get("authorization", "")
    presented = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(presented.encode(), settings.admin_token.encode()):
        raise ApiError(401, "A valid operator token is required.")
    response.headers["cache-control"] = "no-store"


admin_api = APIRouter(prefix="/admin/api", dependencies=[Depends(require_operator)])


@cache
def _asset(name: str) -> bytes:
    """A file of the page, read once from the package."""
    return resources.files("api").joinpath("dashboard", name).read_bytes()


@router.get("/dashboard")
def dashboard_page(settings: SettingsDep) -> Response:
    """The page; the token travels in the URL fragment (`#token=...`), never to the server."""
    return dashboard_asset("index.html", settings)


@router.get("/dashboard/{name}")
def dashboard_asset(name: str, settings: SettingsDep) -> Response:
    """The page's script and style sheet."""
    _require_enabled(settings)
    if name not in ASSETS:
        raise ApiError(404, "Not Found")
    return Response(_asset(name), media_type=ASSETS[name], headers=PAGE_HEADERS)


@admin_api.get("/queue")
def queue(session: SessionDep) -> dict[str, Any]:
    """Jobs by state and by operation, the oldest queued job, expired leases, webhooks."""
    summary = operator.queue_summary(session)
    by_state = dict.fromkeys(JobState, 0)
    by_operation = {op: dict.fromkeys(JobState, 0) for op in Operation}
    for op, state, count in summary.counts:
        by_state[state] += count
        by_operation[op][state] = count
    oldest = summary.oldest_queued_at
    return {
        "generated_at": utcnow().isoformat(),
        "by_state": by_state,
        "by_operation": [{"operation": op, **counts} for op, counts in by_operation.items()],
        "oldest_queued_at": None if oldest is None else oldest.isoformat(),
        "oldest_queued_age_s": None if oldest is None else (utcnow() - oldest).total_seconds(),
        "expired_leases": summary.expired_leases,
        "webhooks": {state: summary.deliveries.get(state, 0) for state in DeliveryState},
    }


@admin_api.get("/jobs")
def recent_jobs(
    session: SessionDep,
    state: JobState | None = None,
    operation: Operation | None = None,
    key: Annotated[str | None, Query(description="key id or prefix")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> dict[str, Any]:
    """The newest jobs with their thumbnails' links, optionally filtered."""
    owner = find_key(session, key) if key else None
    if key and owner is None:
        return {"jobs": []}
    wanted = operator.JobFilter(state, operation, None if owner is None else owner.id, limit)
    rows = operator.list_jobs(session, wanted)
    return {"jobs": job_views.job_summaries(session, rows, OUTPUT_PATH.format)}


@admin_api.get("/jobs/{job_id}")
def job(job_id: int, session: SessionDep) -> dict[str, Any]:
    """One job: parameters, meta, timeline, outputs, webhook attempts and earlier runs."""
    record = operator.job_record(session, job_id)
    if record is None:
        raise ApiError(404, f"No job {job_id}.")
    return job_views.job_detail(record, OUTPUT_PATH.format)


@admin_api.get("/outputs/{filename}")
def output_image(filename: str, session: SessionDep, settings: SettingsDep) -> Response:
    """An output PNG for a thumbnail, whatever DARKROOM_OUTPUT_ACCESS says for clients."""
    output = get_output(session, filename)
    if output is None or output.deleted_at is not None:
        raise ApiError(404, "No such output.")
    try:
        data = make_storage(settings).read(output.filename)
    except FileNotFoundError:
        raise ApiError(404, "No such output.") from None
    return Response(data, media_type="image/png", headers={"cache-control": "no-store"})


router.include_router(admin_api)
