"""The four submit endpoints: validate, store, enqueue, answer "processing" at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import ApiKeyDep, BodyDep, BrokerDep, SessionDep, SettingsDep
from api.schemas import Img2ImgRequest, MixerRequest, Pix2PixRequest, V5MixerRequest
from api.submission import submit_job

router = APIRouter(tags=["submit"])

Handler = Callable[..., dict[str, Any]]


def _submit_endpoint(model: type[BaseModel], endpoint: str) -> Handler:
    """A handler that validates the body as `model` and submits it as an `endpoint` job."""

    def handler(
        body: BodyDep,
        key: ApiKeyDep,
        session: SessionDep,
        broker: BrokerDep,
        settings: SettingsDep,
    ) -> dict[str, Any]:
        request: Any = model.model_validate(body)
        return submit_job(session, broker, settings, key, request, endpoint)

    return handler


def _documented(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI: the body is parsed by hand (lenient types, our error shape) but documented."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_ROUTES: tuple[tuple[str, type[BaseModel], str, str], ...] = (
    ("/api/v5/img_mixer", V5MixerRequest, "v5", "Mix images (v5)"),
    ("/api/v6/image_editing/img_mixer", MixerRequest, "v6", "Mix images (v6)"),
    ("/api/v5/pix2pix", Pix2PixRequest, "v5", "Edit an image by instruction"),
    ("/api/v1/enterprise/img2img", Img2ImgRequest, "enterprise", "Image to image"),
)

for _path, _model, _endpoint, _summary in _ROUTES:
    router.add_api_route(
        _path,
        _submit_endpoint(_model, _endpoint),
        methods=["POST"],
        summary=_summary,
        openapi_extra=_documented(_model),
    )
