"""Output files (embedded profile): the PNGs behind the links in `output`."""

from __future__ import annotations

import re

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from db.models import utcnow
from db.repositories.jobs import get_output

router = APIRouter(tags=["outputs"])

# Only names the worker writes: this also rules out any path traversal.
_OUTPUT_NAME = re.compile(r"^[0-9a-f]{32}-\d{1,2}\.png$")


@router.get("/outputs/{filename}", summary="Download an output image")
def download_output(filename: str, session: SessionDep, settings: SettingsDep) -> FileResponse:
    """Serve one output PNG by its unguessable name, until it expires if it is temporary."""
    output = get_output(session, filename) if _OUTPUT_NAME.match(filename) else None
    path = settings.outputs_dir / filename
    if output is None or not path.is_file():
        raise ApiError(404, "No such output.")
    if output.expires_at is not None and output.expires_at <= utcnow():
        raise ApiError(410, "This temporary link has expired.")
    return FileResponse(path, media_type="image/png")
