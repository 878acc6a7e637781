"""The hosted API's enterprise "Server Management" endpoints: thin shells over
services.server, answering its `{status, message, ...}` shapes.

Who may call what: `system_details`, `clear_cache` and `restart_server` need an admin key
(`darkroom keys create --admin`); any other key gets 403. `clear_queue` fails the calling key's
queued jobs (an admin key's call fails everyone's). `list_schedulers`, `nsfw_image_check` and
`base64_to_url` serve any valid key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import keyed
from api.deps import BodyDep, BrokerDep, SettingsDep, presented_key
from api.errors import ApiError
from darkroom.settings import Settings
from db.models import ApiKey
from db.session import session_scope
from services import server

router = APIRouter(tags=["server management"])

Answer = dict[str, Any]
T = TypeVar("T")
PREFIX = "/api/v1/enterprise"
#: The answer to a key that may not manage the server.
NOT_ADMIN = (
    "This key may not manage the server: use a key created with `darkroom keys create --admin`."
)


async def _as_key(request: Request, body: dict[str, Any]) -> ApiKey:
    """The caller's key (401 when missing or invalid), in one short session."""
    return await keyed(request, presented_key(request, body), lambda _session, key: key)


async def _as_admin(request: Request, body: dict[str, Any]) -> ApiKey:
    """The caller's key if it is an admin key; 403 otherwise."""
    key = await _as_key(request, body)
    if not key.admin:
        raise ApiError(403, NOT_ADMIN)
    return key


async def _controlled(call: Callable[[], T]) -> T:
    """A broker call in the thread pool; a deployment without workers answers 503."""
    try:
        return await run_in_threadpool(call)
    except server.UnavailableError as unavailable:
        raise ApiError(503, str(unavailable)) from None


@router.post(f"{PREFIX}/system_details", summary="Workers, GPUs, resident models, queues")
async def system_details(request: Request, body: BodyDep, settings: SettingsDep) -> Answer:
    """Admin keys only."""
    await _as_admin(request, body)
    details = await run_in_threadpool(server.system_details, settings)
    return {"status": "success", "message": "system details", **details}


@router.post(f"{PREFIX}/clear_queue", summary="Fail queued jobs")
async def clear_queue(
    request: Request, body: BodyDep, broker: BrokerDep, settings: SettingsDep
) -> Answer:
    """The calling key's queued jobs fail (an admin key's: every key's), each with the message
    `server.CLEARED_MESSAGE` and its webhook; running jobs go on."""

    def work(session: Session, key: ApiKey) -> server.ClearedQueue:
        return server.clear_queue(session, broker, settings, None if key.admin else key.id)

    cleared = await keyed(request, presented_key(request, body), work)
    count = len(cleared.job_ids)
    return {
        "status": "success",
        "message": f"{count} queued job{'s' if count != 1 else ''} cleared",
        "cleared": cleared.job_ids,
    }


@router.post(f"{PREFIX}/clear_cache", summary="Drop models from the workers' memory")
async def clear_cache(
    request: Request, body: BodyDep, broker: BrokerDep, settings: SettingsDep
) -> Answer:
    """Admin keys only. Each worker drops its resident models between jobs; they reload on
    demand."""
    await _as_admin(request, body)
    replies, pending = await _controlled(lambda: server.clear_cache(broker, settings))
    message = "cache cleared" if not pending else "cache cleared; busy workers clear after a job"
    return {"status": "success", "message": message, "workers": replies, "pending": pending}


@router.post(f"{PREFIX}/restart_server", summary="Restart the workers gracefully")
async def restart_server(
    request: Request, body: BodyDep, broker: BrokerDep, settings: SettingsDep
) -> Answer:
    """Admin keys only. Each worker finishes its running job, stops, and is started again by
    its supervisor; queued jobs wait in the queue meanwhile."""
    await _as_admin(request, body)
    names = await _controlled(lambda: server.restart_workers(broker, settings))
    return {"status": "success", "message": "server restart started", "workers": names}


async def list_schedulers(request: Request, body: BodyDep) -> Answer:
    """The scheduler names img2img accepts, and per model family which apply."""
    await _as_key(request, body)
    return {"status": "success", "message": "schedulers", **server.accepted_schedulers()}


for _path in ("list_schedulers", "schedulers_list"):
    router.add_api_route(
        f"{PREFIX}/{_path}",
        list_schedulers,
        methods=["POST"],
        summary="List the scheduler names",
        include_in_schema=_path == "list_schedulers",
    )


@router.post(f"{PREFIX}/nsfw_image_check", summary="Run the safety checker on an image URL")
async def nsfw_image_check(
    request: Request, body: BodyDep, broker: BrokerDep, settings: SettingsDep
) -> Answer:
    """Body `{key, init_image}`: a worker fetches the image through the SSRF guard and answers
    whether the safety checker flags it."""
    await _as_key(request, body)
    url = body.get("init_image")
    if not isinstance(url, str) or not url:
        raise ApiError(422, {"init_image": ["The init_image field is required."]})
    verdict = await _controlled(lambda: server.nsfw_check(broker, settings, url))
    if "error" in verdict:
        raise ApiError(400, str(verdict["error"]))
    nsfw = bool(verdict.get("nsfw"))
    message = "the image is flagged" if nsfw else "the image is not flagged"
    return {"status": "success", "message": message, "nsfw": nsfw, "has_nsfw_concept": [nsfw]}


async def base64_to_url(request: Request, body: BodyDep, settings: SettingsDep) -> Answer:
    """Body `{key, base64_string}` (also `image` or `init_image`): store a PNG, JPEG or WebP
    image and answer its link, usable as `init_image` for 24 hours (as temporary outputs)."""
    text = next(
        (body[f] for f in ("base64_string", "image", "init_image") if isinstance(body.get(f), str)),
        None,
    )

    def store(session: Session, key: ApiKey) -> str:
        if not text:
            raise ApiError(422, {"base64_string": ["The base64_string field is required."]})
        try:
            return server.store_upload(session, settings, text, key.id)
        except server.UploadError as refused:
            raise ApiError(422, {"base64_string": [str(refused)]}) from None

    link = await keyed(request, presented_key(request, body), store)
    return {"status": "success", "message": "image stored", "output": [link], "link": link}


for _path in (
    "/api/v6/image_editing/base64_to_url",
    "/api/v6/base64_to_url",
    f"{PREFIX}/base64_to_url",
    f"{PREFIX}/upload_image",
):
    router.add_api_route(
        _path,
        base64_to_url,
        methods=["POST"],
        summary="Store a base64 image; its link",
        include_in_schema=_path.startswith(PREFIX),
    )


@router.get("/uploads/{filename}", summary="Download an uploaded image")
async def download_upload(filename: str, settings: SettingsDep) -> Response:
    """An image stored by base64_to_url, by its unguessable name."""
    if not server.UPLOAD_NAME.match(filename):
        raise ApiError(404, "No such upload.")
    return await run_in_threadpool(_upload_response, settings, filename)


def _upload_response(settings: Settings, filename: str) -> Response:
    from darkroom.storage import make_storage

    with session_scope(settings.resolved_database_url) as session:
        if server.upload_expired(session, filename):  # the sweeper may not have deleted it yet
            raise ApiError(404, "No such upload.")
    storage = make_storage(settings)
    media_type = server.UPLOAD_MEDIA_TYPES[filename.rsplit(".", 1)[1]]
    path = storage.path(filename)
    if path is not None:
        return FileResponse(path, media_type=media_type)
    target = storage.presigned_link(filename, 3600) or storage.public_link(filename)
    if target is None:
        raise ApiError(404, "No such upload.")
    return RedirectResponse(target, status_code=307)
