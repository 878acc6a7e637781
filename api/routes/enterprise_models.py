"""The hosted API's enterprise model endpoints: load_model, load_model_v2, load_vae,
verify_model, get_all_models and delete_model; thin shells over services.models.

Every one needs an admin key (`darkroom keys create --admin`): a missing or unknown key gets 401,
another key 403, in the hosted API's `{status: "error", message}` shape. A load answers at once
(`model load started`); the installer process does the work and POSTs the key's webhook, signed,
when the model is ready or has failed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import keyed
from api.deps import BodyDep, BrokerDep, SettingsDep, presented_key
from api.errors import ApiError
from api.routes.enterprise_server import NOT_ADMIN, PREFIX
from darkroom.settings import Settings
from db.models import ApiKey
from services import models, server

router = APIRouter(tags=["model management"])

Answer = dict[str, Any]
Parse = Callable[[dict[str, Any]], models.InstallRequest]


async def _admin_work(request: Request, body: dict[str, Any], work: Callable[..., Any]) -> Any:
    """`work(session, key)` for an admin key, in one short session; refusals as API errors."""

    def guarded(session: Session, key: ApiKey) -> Any:
        if not key.admin:
            raise ApiError(403, NOT_ADMIN)
        try:
            return work(session, key)
        except models.InstallRefusedError as refused:
            raise ApiError(refused.status, str(refused)) from None

    return await keyed(request, presented_key(request, body), guarded)


async def _load(request: Request, body: dict[str, Any], settings: Settings, parse: Parse) -> Answer:
    """Parse, then queue the install (or join the same one); the installer takes it from there."""

    def work(session: Session, key: ApiKey) -> models.Started:
        install = parse(body)
        return models.request_install(session, settings, install, key.id)

    started: models.Started = await _admin_work(request, body, work)
    return {"status": "success", "message": started.message, "id": started.install_id}


@router.post(f"{PREFIX}/load_model", summary="Install a model, LoRA or embedding from a URL")
async def load_model(request: Request, body: BodyDep, settings: SettingsDep) -> Answer:
    """Body `{key, url, model_id, model_type, from_safetensors, revision, upcast_attention,
    webhook}`; model_type `huggingface`, `custom_ckpt`, `lora` or `embeddings`."""
    return await _load(request, body, settings, models.parse_load_model)


@router.post(f"{PREFIX}/load_model_v2", summary="Install a model of a given category")
async def load_model_v2(request: Request, body: BodyDep, settings: SettingsDep) -> Answer:
    """Body `{key, url, model_id, model_category, model_format, revision, webhook}`."""
    return await _load(request, body, settings, models.parse_load_model_v2)


@router.post(f"{PREFIX}/load_vae", summary="Install a VAE from a URL")
async def load_vae(request: Request, body: BodyDep, settings: SettingsDep) -> Answer:
    """Body `{key, url, vae_id, webhook}`."""
    return await _load(request, body, settings, models.parse_load_vae)


@router.post(f"{PREFIX}/verify_model", summary="Whether a model is ready")
async def verify_model(request: Request, body: BodyDep, settings: SettingsDep) -> Answer:
    """Body `{key, model_id}`: queued, downloading, ready or failed (with the reason)."""
    model_id = _model_id(body)
    found: Answer = await _admin_work(
        request, body, lambda session, _key: models.verify(session, settings, model_id)
    )
    state = found["model_status"]
    message = {"ready": "model is ready", "failed": "model load failed"}.get(
        state, "model is loading"
    )
    return {"status": "success", "message": message, **found}


@router.post(f"{PREFIX}/get_all_models", summary="Every model, LoRA, embedding and VAE")
async def get_all_models(request: Request, body: BodyDep, settings: SettingsDep) -> Answer:
    """Installs in every state and the files installed by hand, with kind, family and state."""
    rows = await _admin_work(
        request, body, lambda session, _key: models.list_all(session, settings)
    )
    return {"status": "success", "message": f"{len(rows)} models", "models": rows}


@router.post(f"{PREFIX}/delete_model", summary="Remove a model and its files")
async def delete_model(
    request: Request, body: BodyDep, broker: BrokerDep, settings: SettingsDep
) -> Answer:
    """Body `{key, model_id}`. Refused (409) while queued or running jobs name the model; the
    workers then drop their resident models, so that a model installed again under the same
    id is read anew."""
    model_id = _model_id(body)
    removed = await _admin_work(
        request, body, lambda session, _key: models.delete(session, settings, model_id, broker)
    )
    with contextlib.suppress(server.UnavailableError):  # no live worker: nothing is resident
        await run_in_threadpool(server.clear_cache, broker, settings)
    return {
        "status": "success",
        "message": "model deleted",
        "model_id": model_id,
        "removed": removed,
    }


def _model_id(body: dict[str, Any]) -> str:
    """The body's model_id (vae_id is accepted too); 422 when missing."""
    value = body.get("model_id") or body.get("vae_id")
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, {"model_id": ["The model_id field is required."]})
    return value.strip()
