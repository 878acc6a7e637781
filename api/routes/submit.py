"""The submit endpoints: validate, store, enqueue, answer "processing" at once.

Or, when the client asks for a sync wait, answer the job's outcome if it ends in time (see
api.waiting). Each operation also answers at the aliases that clients of the hosted API call
(evidence in docs/CLIENTS.md); the aliases stay out of the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import ApiKeyDep, BodyDep, SessionDep, SettingsDep
from api.intake import GroupCommit
from api.routes.fetch import JOB_RESPONSES, WAIT_HELP, answer_or_wait
from api.schemas import (
    Img2ImgRequest,
    MixerRequest,
    Pix2PixRequest,
    V3Img2ImgRequest,
    V5MixerRequest,
)
from api.schemas.answers import ErrorAnswer
from api.schemas.examples import FIELD_ERRORS, REQUEST_EXAMPLES
from api.submission import Accepted, PreparedJob, prepare_job
from api.waiting import requested_wait
from darkroom.responses import processing_body
from darkroom.settings import Settings
from db.models import ApiKey

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


def _store(
    model: type[BaseModel],
    endpoint: str,
    body: dict[str, Any],
    session: Session,
    intake: GroupCommit[PreparedJob, Accepted],
    settings: Settings,
    key: ApiKey,
) -> Answer:
    """Validate, then store with the submissions arriving at the same time (api.intake)."""
    request: Any = model.model_validate(body)
    prepared = prepare_job(settings, key.id, request, endpoint)
    session.commit()  # the key was read: hand the connection back before waiting for a group
    accepted = intake.submit(prepared)
    return processing_body(accepted.job, settings.public_url, accepted.eta)


def _submit_endpoint(route: SubmitRoute) -> Handler:
    """A handler that validates the body as the route's model and submits it."""

    async def handler(
        request: Request,
        response: Response,
        body: BodyDep,
        key: ApiKeyDep,
        session: SessionDep,
        settings: SettingsDep,
    ) -> Answer:
        wait_s = requested_wait(request, body, settings)
        intake = request.app.state.intake
        answer = await run_in_threadpool(
            _store, route.model, route.endpoint, body, session, intake, settings, key
        )
        return await answer_or_wait(request, response, answer, wait_s=wait_s, key=key)

    return handler


def _documented(route: SubmitRoute) -> dict[str, Any]:
    """OpenAPI: the body is parsed by hand (lenient types, our error shape) but documented,
    with the reference page's example."""
    media: dict[str, Any] = {"schema": route.model.model_json_schema()}
    example = REQUEST_EXAMPLES.get(route.path)
    if example is not None:
        media["examples"] = {
            "reference": {"summary": "The reference page's example body", "value": example}
        }
    return {"requestBody": {"required": True, "content": {"application/json": media}}}


def _responses() -> dict[int | str, dict[str, Any]]:
    """The job answers, and the refusals a submit adds (limits, full queue)."""
    fields = {"application/json": {"examples": _examples(FIELD_ERRORS)}}
    return {
        **JOB_RESPONSES,
        422: {**JOB_RESPONSES[422], "content": fields},
        429: {"model": ErrorAnswer, "description": "Too many jobs for this key (`retry_after`)"},
        503: {**JOB_RESPONSES[503], "description": "The queue is full or a service is down"},
    }


def _examples(values: dict[str, Any]) -> dict[str, Any]:
    return {name: {"value": value} for name, value in values.items()}


for _route in ROUTES:
    router.add_api_route(
        _route.path,
        _submit_endpoint(_route),
        methods=["POST"],
        summary=_route.summary,
        description=WAIT_HELP,
        response_model=None,
        responses=_responses(),
        openapi_extra=_documented(_route),
        include_in_schema=_route.documented,
    )
