"""`POST /v1/images/edits`: OpenAI's image edits, for the clients written against that API.

A multipart form (`image` or `image[]`, `prompt`, `n`, `size`, `response_format`, `model`) with
`Authorization: Bearer KEY`. It is a submit like any other (the same validation, admission,
durable job and Idempotency-Key; one image is img2img, several the mixer) that then waits
synchronously, as OpenAI's API does, up to DARKROOM_SYNC_WAIT_MAX_S, and answers OpenAI's
shape: `{created, data: [{url} | {b64_json}]}`. Errors on this path take OpenAI's error shape,
`{error: {message, type, param, code}}`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.datastructures import UploadFile

from api.errors import ApiError, Message, SafeJSONResponse, field_messages
from api.routes.submit import SubmitRoute, submit_endpoint
from api.schemas.openai import (
    OPENAI_NAMES,
    EditImg2ImgRequest,
    EditMixerRequest,
    data_uri,
    form_body,
)
from darkroom.limits import MAX_IMAGES, MAX_INLINE_IMAGE_BYTES
from darkroom.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])

Answer = dict[str, Any]
PATH = "/v1/images/edits"

_one_image = submit_endpoint(SubmitRoute(PATH, EditImg2ImgRequest, "openai", "Image edit"))
_several_images = submit_endpoint(SubmitRoute(PATH, EditMixerRequest, "openai", "Image edit"))

#: OpenAI's error `type` for each status this path answers.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "server_error",
}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


#: OpenAI's error `code` for the statuses that have one.
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def error_answer(error: OpenAIError) -> JSONResponse:
    """`{error: {message, type, param, code}}` with the error's status."""
    code = ERROR_CODES.get(error.status)
    kind = ERROR_TYPES.get(error.status, "server_error" if error.status >= 500 else "api_error")
    body = {"error": {"message": error.message, "type": kind, "param": error.param, "code": code}}
    return SafeJSONResponse(body, status_code=error.status)


def from_api_error(error: ApiError) -> OpenAIError:
    """One of Darkroom's refusals in OpenAI's terms (invalid fields are a 400 there)."""
    status = 400 if error.status_code == 422 else error.status_code
    message, param = _sentence(error.message)
    return OpenAIError(status, message, param=param)


def _sentence(message: Message) -> tuple[str, str | None]:
    """A message and the (OpenAI-named) field it is about, if it is about one."""
    if isinstance(message, str):
        return message, None
    field = next(iter(message))
    name = OPENAI_NAMES.get(field, field)
    return "; ".join(" ".join(items) for items in message.values()), name


async def _uploads(request: Request) -> tuple[dict[str, str], list[str]]:
    """The form's text fields and its images (as data: URIs)."""
    form = await request.form(max_files=MAX_IMAGES + 2, max_fields=64)
    fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
    if "mask" in form:
        raise OpenAIError(
            400, "mask is not supported: edits apply to the whole image.", param="mask"
        )
    uploads = [*form.getlist("image"), *form.getlist("image[]")]
    files = [upload for upload in uploads if isinstance(upload, UploadFile)]
    if not files:
        raise OpenAIError(400, "image is required: upload one image, or up to 4.", param="image")
    if len(files) > MAX_IMAGES:
        raise OpenAIError(
            400, f"At most {MAX_IMAGES} images can be edited together.", param="image"
        )
    images = []
    for upload in files:
        data = await upload.read()
        if len(data) > MAX_INLINE_IMAGE_BYTES:
            message = f"Each image must be at most {MAX_INLINE_IMAGE_BYTES} bytes."
            raise OpenAIError(400, message, param="image")
        images.append(data_uri(data))
    return fields, images


def _images(answer: Answer, b64_json: bool) -> list[dict[str, str]]:
    """The job's outputs as OpenAI's `data` items."""
    output = answer.get("output") or []
    items = [output] if isinstance(output, str) else list(output)
    return [{"b64_json": item} if b64_json else {"url": item} for item in items]


def _result(answer: Answer, b64_json: bool) -> Answer:
    """OpenAI's answer for a finished job; the job's own message when it did not succeed."""
    status = answer.get("status")
    if status == "success":
        return {"created": int(time.time()), "data": _images(answer, b64_json)}
    if status == "failed":
        # 400, not 5xx: OpenAI's clients retry 5xx, and each retry would be a new job.
        raise OpenAIError(400, str(answer.get("message") or "The edit failed."))
    raise OpenAIError(
        504,
        f"The edit (job {answer.get('id')}) is still running; fetch it later at"
        f" {answer.get('fetch_result')}.",
    )


async def create_edit(request: Request, response: Response) -> Answer | JSONResponse:
    """Submit the edit, wait for it, answer OpenAI's shape (or its error shape)."""
    settings: Settings = request.app.state.settings
    try:
        fields, images = await _uploads(request)
        body = {**form_body(fields, images), "wait": settings.sync_wait_max_s}
        submit = _one_image if len(images) == 1 else _several_images
        try:
            answer = await submit(request, response, body)
        except ValidationError as invalid:
            raise ApiError(422, field_messages(list(invalid.errors()))) from None
        return _result(answer, bool(body["b64_json"]))
    except ApiError as refusal:
        return error_answer(from_api_error(refusal))
    except (OperationalError, PoolTimeoutError):
        log.warning("image edit refused: the database cannot be reached or is busy")
        return error_answer(OpenAIError(503, "Service temporarily unavailable; retry shortly."))
    except (OpenAIError, ValueError) as error:
        problem = error if isinstance(error, OpenAIError) else OpenAIError(400, str(error))
        return error_answer(problem)


# Left out of /openapi.json: its form, answer and error shapes are OpenAI's (their API reference
# documents them; docs/CLIENTS.md says what Darkroom takes), and the schema's fuzz test checks
# every documented path against Darkroom's own error shape.
router.add_api_route(
    PATH,
    create_edit,
    methods=["POST"],
    summary="Edit images (OpenAI's image edits)",
    response_model=None,
    include_in_schema=False,
)
