"""The v7 image paths that the official CLI (`modelslab-cli`, a Go binary) calls.

`modelslab generate image-to-image` posts to `/api/v7/images/image-to-image`, then polls
`/api/v7/images/fetch/{id}` and downloads `output` (docs/CLIENTS.md records its requests). Both
are the existing submit and fetch, on the same job system: the submit is the img2img JobSpec
(with Idempotency-Key and sync wait, as every submit path), the fetch the same fetch.

Two things differ from the other paths, both for that CLI: it sends its key in a `key` header
as well as in the body, and on a 429 it waits until the Unix time in `X-RateLimit-Reset`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from api.deps import BodyDep, SettingsDep
from api.errors import ApiError, error_response
from api.routes.fetch import JOB_RESPONSES, WAIT_HELP, fetch_by_path
from api.routes.submit import SubmitRoute, documented_body, submit_endpoint, submit_responses
from api.schemas.v7 import V7Img2ImgRequest

router = APIRouter(tags=["v7"])

Answer = dict[str, Any]

#: The header the CLI sends its key in (besides the body's `key`).
KEY_HEADER = "key"
#: The 429 header the CLI honours: the Unix time (seconds) at which to retry.
RATE_LIMIT_RESET_HEADER = "X-RateLimit-Reset"

IMAGE_TO_IMAGE = SubmitRoute(
    "/api/v7/images/image-to-image", V7Img2ImgRequest, "v7", "Image to image (v7)"
)
FETCH_PATH = "/api/v7/images/fetch/{job_id}"

_submit = submit_endpoint(IMAGE_TO_IMAGE)


def with_header_key(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    """The body, with the `key` header's value as its key when the body has none (a bearer
    token still comes first: see api.deps.presented_key)."""
    header = request.headers.get(KEY_HEADER, "").strip()
    if not header or (isinstance(body.get("key"), str) and body["key"]):
        return body
    return {**body, "key": header}


async def _answer(work: Awaitable[Answer]) -> Answer | JSONResponse:
    """`work`'s answer; a 429 also says when to retry as a Unix time (X-RateLimit-Reset)."""
    try:
        return await work
    except ApiError as refusal:
        retry_after = refusal.extra.get("retry_after")
        if refusal.status_code != 429 or not isinstance(retry_after, int | float):
            raise
        response = error_response(429, refusal.message, **refusal.extra)
        response.headers["retry-after"] = str(retry_after)
        response.headers[RATE_LIMIT_RESET_HEADER] = str(int(time.time() + retry_after) + 1)
        return response


async def image_to_image(
    request: Request, response: Response, body: BodyDep
) -> Answer | JSONResponse:
    """`POST /api/v7/images/image-to-image`: the img2img submit."""
    return await _answer(_submit(request, response, with_header_key(request, body)))


async def fetch(
    job_id: int, request: Request, response: Response, body: BodyDep, settings: SettingsDep
) -> Answer | JSONResponse:
    """`POST /api/v7/images/fetch/{id}`: the fetch, with the key from the header or body."""
    keyed_body = with_header_key(request, body)
    return await _answer(fetch_by_path(job_id, request, response, keyed_body, settings))


router.add_api_route(
    IMAGE_TO_IMAGE.path,
    image_to_image,
    methods=["POST"],
    summary=IMAGE_TO_IMAGE.summary,
    description=WAIT_HELP,
    response_model=None,
    responses=submit_responses(),
    openapi_extra=documented_body(IMAGE_TO_IMAGE),
)
router.add_api_route(
    FETCH_PATH,
    fetch,
    methods=["POST"],
    summary="Fetch a v7 image job by id",
    description=WAIT_HELP,
    response_model=None,
    responses=JOB_RESPONSES,
)
