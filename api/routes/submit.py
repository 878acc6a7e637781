"""The submit endpoints: validate, store, enqueue, answer "processing" at once.

Or, when the client asks for a sync wait, answer the job's outcome if it ends in time (see
api.waiting). Each operation also answers at the aliases that clients of the hosted API call
(evidence in docs/CLIENTS.md); the aliases stay out of the OpenAPI document.

Every submit path takes an `Idempotency-Key` header: a retry with the same key and body answers
the job the first request created, as a fetch of it would (docs/CLIENTS.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from api.deps import BodyDep, presented_key
from api.errors import INVALID_KEY, ApiError
from api.intake import GroupCommit
from api.routes.fetch import JOB_RESPONSES, WAIT_HELP, answer_or_wait, job_reader
from api.schemas import (
    Img2ImgRequest,
    MixerRequest,
    Pix2PixRequest,
    V3Img2ImgRequest,
    V5MixerRequest,
)
from api.schemas.answers import ErrorAnswer
from api.schemas.examples import FIELD_ERRORS, REQUEST_EXAMPLES
from api.submission import (
    Accepted,
    Idempotency,
    PreparedJob,
    Replayed,
    prepare_job,
    request_digest,
)
from api.waiting import requested_wait
from darkroom.settings import Settings
from db.models import ApiKey
from services.responses import processing_body

router = APIRouter(tags=["submit"])

Answer = dict[str, Any]
Handler = Callable[..., Awaitable[Answer]]


@dataclass(frozen=True)
class SubmitRoute:
    """One submit path: the body it takes and the endpoint family its job belongs to (which
    decides the `fetch_result` URL)."""

    path: str
    model: type[BaseModel]
    endpoint: str
    summary: str
    documented: bool = True


ROUTES = (
    SubmitRoute("/api/v5/img_mixer", V5MixerRequest, "v5", "Mix images (v5)"),
    SubmitRoute("/api/v6/image_editing/img_mixer", MixerRequest, "v6", "Mix images (v6)"),
    SubmitRoute("/api/v5/pix2pix", Pix2PixRequest, "v5", "Edit an image by instruction"),
    SubmitRoute("/api/v1/enterprise/img2img", Img2ImgRequest, "enterprise", "Image to image"),
    # Aliases (docs/CLIENTS.md lists the clients that call each).
    SubmitRoute("/api/v3/img_mixer", V5MixerRequest, "v3", "Mix images (v3)", False),
    SubmitRoute("/api/v6/image_editing/pix2pix", Pix2PixRequest, "v6", "Pix2pix (v6)", False),
    SubmitRoute("/api/v3/img2img", V3Img2ImgRequest, "v3", "Image to image (v3)", False),
    SubmitRoute("/api/v6/images/img2img", Img2ImgRequest, "v6_images", "Img2img (v6)", False),
    SubmitRoute(
        "/api/v1/enterprise/images/img2img", Img2ImgRequest, "enterprise_images", "Img2img", False
    ),
)


#: The request header that makes a submit idempotent, and the longest value it may hold.
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 255
#: The answer header of a replay (as Stripe's): the job was created by an earlier request.
REPLAYED_HEADER = "Idempotent-Replayed"
BAD_IDEMPOTENCY_KEY = (
    f"The {IDEMPOTENCY_HEADER} header must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII"
    " characters."
)


@dataclass(frozen=True)
class Stored:
    """A submission's answer, the key that made it, how long it asked to wait, and whether it
    answers a job an earlier request with the same Idempotency-Key created."""

    answer: Answer
    key: ApiKey
    wait_s: float
    replayed: bool = False


def idempotency_of(request: Request, path: str, body: dict[str, Any]) -> Idempotency | None:
    """The request's Idempotency-Key and digest; None without the header, 400 for a bad one."""
    value = request.headers.get(IDEMPOTENCY_HEADER)
    if value is None:
        return None
    value = value.strip()
    printable = all(" " <= char <= "~" for char in value)
    if not value or len(value) > MAX_IDEMPOTENCY_KEY or not printable:
        raise ApiError(400, BAD_IDEMPOTENCY_KEY)
    return Idempotency(value, request_digest(path, body))


def _store(route: SubmitRoute, request: Request, body: dict[str, Any]) -> Stored:
    """Validate, then authenticate and store with the submissions arriving at the same time
    (api.intake), which look their keys up together. One function in one worker thread: every
    hop to the thread pool costs a context switch, and a submission is otherwise cheap."""
    settings: Settings = request.app.state.settings
    intake: GroupCommit[PreparedJob, Accepted | Replayed] = request.app.state.intake
    presented = presented_key(request, body)
    if presented is None:
        raise ApiError(401, INVALID_KEY)
    wait_s = requested_wait(request, body, settings)
    claim = idempotency_of(request, route.path, body)
    parsed: Any = route.model.model_validate(body)
    outcome = intake.submit(prepare_job(settings, presented, parsed, route.endpoint, claim))
    if isinstance(outcome, Replayed):  # answered like a fetch: the job may have ended since
        answer = job_reader(settings, outcome.key, outcome.job_id)()
        return Stored(answer, outcome.key, wait_s, replayed=True)
    answer = processing_body(outcome.job, settings.public_url, outcome.eta)
    return Stored(answer, outcome.key, wait_s)


def submit_endpoint(route: SubmitRoute) -> Handler:
    """A handler that validates the body as the route's model and submits it."""

    async def handler(request: Request, response: Response, body: BodyDep) -> Answer:
        stored = await run_in_threadpool(_store, route, request, body)
        if stored.replayed:
            response.headers[REPLAYED_HEADER] = "true"
        return await answer_or_wait(
            request, response, stored.answer, wait_s=stored.wait_s, key=stored.key
        )

    return handler


def documented_body(route: SubmitRoute) -> dict[str, Any]:
    """OpenAPI: the body is parsed by hand (lenient types, our error shape) but documented,
    with the reference page's example."""
    media: dict[str, Any] = {"schema": route.model.model_json_schema()}
    example = REQUEST_EXAMPLES.get(route.path)
    if example is not None:
        media["examples"] = {
            "reference": {"summary": "The reference page's example body", "value": example}
        }
    return {
        "requestBody": {"required": True, "content": {"application/json": media}},
        "parameters": [IDEMPOTENCY_PARAMETER],
    }


#: OpenAPI: the Idempotency-Key header every submit path takes.
IDEMPOTENCY_PARAMETER = {
    "name": IDEMPOTENCY_HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
    "description": (
        "Makes a retry safe: the same key with the same body within 24 hours answers the job"
        " the first request created (its current shape, with `Idempotent-Replayed: true`)"
        " instead of creating another; the same key with another body is refused (422)."
        " Keys are scoped to the API key."
    ),
}


def submit_responses() -> dict[int | str, dict[str, Any]]:
    """The job answers, and the refusals a submit adds (limits, full queue, Idempotency-Key)."""
    fields = {"application/json": {"examples": _examples(FIELD_ERRORS)}}
    return {
        **JOB_RESPONSES,
        400: {"model": ErrorAnswer, "description": "A bad body or Idempotency-Key header"},
        409: {
            "model": ErrorAnswer,
            "description": "A request with the same Idempotency-Key is being stored: retry",
        },
        422: {**JOB_RESPONSES[422], "content": fields},
        429: {"model": ErrorAnswer, "description": "Too many jobs for this key (`retry_after`)"},
        503: {**JOB_RESPONSES[503], "description": "The queue is full or a service is down"},
    }


def _examples(values: dict[str, Any]) -> dict[str, Any]:
    return {name: {"value": value} for name, value in values.items()}


for _route in ROUTES:
    router.add_api_route(
        _route.path,
        submit_endpoint(_route),
        methods=["POST"],
        summary=_route.summary,
        description=WAIT_HELP,
        response_model=None,
        responses=submit_responses(),
        openapi_extra=documented_body(_route),
        include_in_schema=_route.documented,
    )
