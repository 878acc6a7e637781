"""Output files: the PNGs behind the API links in `output`, from disk or from the bucket."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import KeyCache, authenticate, get_key_cache
from api.deps import SettingsDep, presented_key
from api.errors import ApiError
from darkroom.settings import Settings
from db.models import JobOutput, utcnow
from db.repositories.jobs import get_output
from db.session import session_scope
from services.links import OutputLinks

router = APIRouter(tags=["outputs"])

# Only names the worker writes: this also rules out any path traversal.
_OUTPUT_NAME = re.compile(r"^[0-9a-f]{32}-\d{1,2}(?:-\d{1,6}-[0-9a-f]{8})?\.png$")


@router.get("/outputs/{filename}", summary="Download an output image")
async def download_output(filename: str, request: Request, settings: SettingsDep) -> Response:
    """Serve one output PNG by its unguessable name, until it expires if it is temporary.

    A local file is streamed; an object in the bucket is a redirect to a link signed now, so
    links handed out before a move to S3, and `future_links`, keep working. With
    DARKROOM_OUTPUT_ACCESS=key only the key that owns the job may download it; another key,
    or none, gets the same 404 as a missing file.
    """
    presented = presented_key(request, {"key": request.query_params.get("key")})
    cache = get_key_cache(request)
    # One thread-pool hop and one short session; the file is streamed after it is closed.
    return await run_in_threadpool(_output_response, settings, cache, presented, filename)


def _output_response(
    settings: Settings, cache: KeyCache, presented: str | None, filename: str
) -> Response:
    """The file, or the redirect to it, after the checks (one session, closed on return)."""
    with session_scope(settings.resolved_database_url) as session:
        output = get_output(session, filename) if _OUTPUT_NAME.match(filename) else None
        if output is None or not _may_download(session, settings, cache, presented, output):
            raise ApiError(404, "No such output.")
        expires_at, deleted = output.expires_at, output.deleted_at is not None
        stored = output.filename  # a public name leads to the file the winning run stored
    if expires_at is not None and expires_at <= utcnow():
        raise ApiError(410, "This temporary link has expired.")
    links = OutputLinks.from_settings(settings)
    path = links.storage.path(stored)
    if path is not None:
        return FileResponse(path, media_type="image/png")
    target = None if deleted else links.direct(stored, expires_at)
    if target is None:
        raise ApiError(404, "No such output.")
    return RedirectResponse(target, status_code=307)


def _may_download(
    session: Session,
    settings: Settings,
    cache: KeyCache,
    presented: str | None,
    output: JobOutput,
) -> bool:
    """Public links always; in key mode only with the owning key."""
    if settings.output_access == "public":
        return True
    try:
        key = authenticate(session, cache, presented)
    except ApiError:
        return False
    return key.id == output.job.api_key_id
