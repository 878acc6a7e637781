"""Output files (embedded profile): the PNGs behind the links in `output`."""

from __future__ import annotations

import re

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import SettingsDep
from api.errors import ApiError

router = APIRouter(tags=["outputs"])

# Only names the worker writes: this also rules out any path traversal.
_OUTPUT_NAME = re.compile(r"^[0-9a-f]{32}-\d{1,2}\.png$")


@router.get("/outputs/{filename}", summary="Download an output image")
def get_output(filename: str, settings: SettingsDep) -> FileResponse:
    """Serve one output PNG by its unguessable name."""
    path = settings.outputs_dir / filename
    if not _OUTPUT_NAME.match(filename) or not path.is_file():
        raise ApiError(404, "No such output.")
    return FileResponse(path, media_type="image/png")
