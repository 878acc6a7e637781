"""Server management: the hosted API's enterprise "Server Management" operations, one home each.

The routes (api/routes/enterprise_server.py) are thin shells around these functions:

- `system_details`: the live workers as they advertise themselves in Redis (services.routing:
  models resident, GPUs, versions) and the depth of every queue;
- `clear_queue`: every queued job of a key (or of all keys) fails through the cancel path
  (services.jobs.cancel), each with its message and webhook;
- `clear_cache`, `restart_workers`, `nsfw_check`: Celery control commands addressed by name to
  the live workers of this deployment only (the pidbox exchange is shared by every Celery app on
  the broker, so a broadcast without destinations would reach other deployments' workers);
- `scheduler_names`: the scheduler names that work, per model family;
- `store_upload`: a base64 image kept in output storage, its link usable as `init_image` for
  UPLOAD_LIFETIME (as temporary outputs), then deleted by the sweeper.

Torch-free: the API imports it.
"""

from __future__ import annotations

import base64
import binascii
import io
import platform
import re
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import timedelta
from importlib import metadata
from itertools import islice
from typing import Any

import redis
from celery import Celery
from PIL import Image, UnidentifiedImageError
from sqlalchemy.orm import Session

from darkroom import families, scheduler_names
from darkroom.limits import MAX_PIXELS
from darkroom.queue import queue_lengths
from darkroom.settings import Settings
from darkroom.storage import StoredFile
from db.repositories import operator, uploads
from services import jobs
from services.routing import WorkerPresence, live_workers, model_queue_prefix, routing_enabled

#: Why a job failed when its queue was cleared (the job's error and its webhook say so).
CLEARED_MESSAGE = "The job was canceled: its queue was cleared (clear_queue)."
#: Jobs one clear_queue call fails in its transaction; a larger backlog takes several calls.
CLEAR_BATCH = 1000
#: The control commands the GPU worker registers (worker/gpu_app.py).
CLEAR_CACHE_COMMAND = "darkroom_clear_cache"
NSFW_CHECK_COMMAND = "darkroom_nsfw_check"
#: Seconds to wait for workers' replies to a control command.
CONTROL_TIMEOUT_S = 5.0
#: Seconds the Redis calls of `system_details` may take.
REDIS_TIMEOUT_S = 2.0

#: Uploaded images: what the hosted API's base64_to_url accepts, kept under output storage.
UPLOAD_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
UPLOAD_PREFIX = "upload-"
UPLOAD_NAME = re.compile(rf"^{UPLOAD_PREFIX}[0-9a-f]{{32}}\.(?:png|jpg|webp)$")
UPLOAD_MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_DATA_URI = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
#: How long an upload's link works: the life of a `temp: yes` output (worker.jobs.TEMP_LIFETIME).
UPLOAD_LIFETIME = timedelta(hours=24)
#: Upload names looked up in the database at a time when adopting unrecorded files.
ADOPT_CHUNK = 500


class UnavailableError(Exception):
    """The operation needs something this deployment lacks now (the message says what)."""


class UploadError(ValueError):
    """A base64 image that cannot be stored; the message is safe to show the client."""


# --- system_details -------------------------------------------------------------------------


def system_details(settings: Settings) -> dict[str, Any]:
    """Workers (models, GPUs, versions), queue depths and this API's versions."""
    workers = _workers(settings)
    return {
        "workers": [asdict(worker) for worker in workers],
        "gpus": [{"worker": w.name, **gpu} for w in workers for gpu in w.gpus],
        "queues": _queue_depths(settings, workers),
        "versions": api_versions(),
    }


def _workers(settings: Settings) -> list[WorkerPresence]:
    """The live workers; none when presence is off (embedded broker) or Redis cannot answer."""
    if not routing_enabled(settings):
        return []
    try:
        return live_workers(settings)
    except redis.RedisError:
        return []


def _queue_depths(settings: Settings, workers: list[WorkerPresence]) -> dict[str, int | None]:
    """Messages waiting in the jobs and webhooks queues and in every advertised model queue."""
    prefix = model_queue_prefix(settings)
    names = [settings.job_queue, settings.webhook_queue]
    names += sorted({prefix + model for worker in workers for model in worker.models})
    try:
        return dict(queue_lengths(settings, names, REDIS_TIMEOUT_S))
    except (redis.RedisError, OSError):
        return dict.fromkeys(names)  # unknown rather than wrong


def api_versions() -> dict[str, str]:
    """Versions of this API process (workers report their own in their presence)."""
    return {"darkroom": _version("darkroom"), "python": platform.python_version()}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


# --- clear_queue ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClearedQueue:
    """The jobs a clear failed, and their webhooks' deliveries (sent once committed)."""

    job_ids: list[int]
    delivery_ids: list[int]


def clear_queue(
    session: Session, broker: Celery, settings: Settings, key_id: int | None
) -> ClearedQueue:
    """Fail the queued jobs of key `key_id` (None: of every key) through the cancel
    (`services.jobs.cancel`); flushes, and their webhooks are sent once the caller commits. A
    job that starts meanwhile keeps running."""
    canceled: list[int] = []
    deliveries: list[int] = []
    for job_id in operator.queued_job_ids(session, key_id, CLEAR_BATCH):
        try:
            outcome = jobs.cancel(
                session, broker, settings, job_id, message=CLEARED_MESSAGE, queued_only=True
            )
        except jobs.RefusedError:
            continue  # it started or ended since the query
        canceled.append(job_id)
        if outcome.delivery_id is not None:
            deliveries.append(outcome.delivery_id)
    return ClearedQueue(canceled, deliveries)


# --- worker control -------------------------------------------------------------------------


def worker_names(settings: Settings) -> list[str]:
    """The Celery node names of this deployment's live workers; UnavailableError if none."""
    if not routing_enabled(settings):
        raise UnavailableError(
            "Server control needs the Redis broker (the embedded profile has no worker registry)."
        )
    try:
        names = [worker.name for worker in live_workers(settings)]
    except redis.RedisError:
        raise UnavailableError("The broker cannot be reached: try again shortly.") from None
    if not names:
        raise UnavailableError("No worker is running.")
    return names


def _control(
    broker: Celery,
    command: str,
    destination: list[str],
    arguments: dict[str, Any] | None = None,
    timeout_s: float = CONTROL_TIMEOUT_S,
) -> dict[str, Any]:
    """Send a control command to the named workers; their replies by worker name."""
    replies = broker.control.broadcast(
        command,
        arguments=arguments or {},
        destination=destination,
        reply=True,
        timeout=timeout_s,
        limit=len(destination),
    )
    merged: dict[str, Any] = {}
    for reply in replies or []:
        merged.update(reply)
    return merged


def clear_cache(broker: Celery, settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """Every live worker drops its resident models between jobs: the replies by name, and the
    workers that did not reply within CONTROL_TIMEOUT_S (busy with a job: they clear after it,
    when their control messages are read)."""
    names = worker_names(settings)
    replies = _control(broker, CLEAR_CACHE_COMMAND, names)
    # A worker acts on a command whenever it reads it (only the wait for replies expires).
    return replies, [name for name in names if name not in replies]


def restart_workers(broker: Celery, settings: Settings) -> list[str]:
    """A warm shutdown of every live worker: each finishes the job it runs (the solo pool
    handles control messages between jobs), leaves, and its supervisor (`darkroom up`, the
    container's restart policy, Kubernetes) starts it again. The workers told."""
    names = worker_names(settings)
    broker.control.broadcast("shutdown", destination=names, reply=False)
    return names


def nsfw_check(broker: Celery, settings: Settings, url: str) -> dict[str, Any]:
    """One live worker fetches `url` through its SSRF guard and runs the safety checker: its
    reply, `{"nsfw": bool}` or `{"error": message}`."""
    names = worker_names(settings)
    timeout_s = settings.image_fetch_timeout_s + 60.0  # the fetch, maybe a checker cold load
    for name in names:
        replies = _control(broker, NSFW_CHECK_COMMAND, [name], {"url": url}, timeout_s)
        if name in replies:
            reply: dict[str, Any] = replies[name]
            return reply
    raise UnavailableError("No worker answered: try again shortly.")


# --- list_schedulers ------------------------------------------------------------------------


def accepted_schedulers() -> dict[str, Any]:
    """The scheduler names img2img accepts, those refused, and per family which apply."""
    per_family = {
        name: list(scheduler_names.IMG2IMG_SCHEDULERS) if family.page_schedulers else []
        for name, family in families.FAMILIES.items()
    }
    return {
        "schedulers": list(scheduler_names.IMG2IMG_SCHEDULERS),
        "refused": list(scheduler_names.REFUSED_SCHEDULERS),
        "families": per_family,
    }


# --- base64_to_url --------------------------------------------------------------------------


def decode_upload(text: str, max_bytes: int) -> tuple[bytes, str]:
    """The image bytes of a base64 string (a data: URI or bare) and its file extension;
    UploadError when it is no PNG, JPEG or WebP within the byte and pixel limits."""
    payload = _DATA_URI.sub("", text.strip(), count=1)
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise UploadError(f"The image is too large: at most {max_bytes} bytes.")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError("The image is not valid base64.") from None
    if len(data) > max_bytes:
        raise UploadError(f"The image is too large: at most {max_bytes} bytes.")
    return data, _checked_format(data)


def _checked_format(data: bytes) -> str:
    """The extension of `data`'s format, from its header only (pixels are not decoded)."""
    try:
        image = Image.open(io.BytesIO(data), formats=tuple(UPLOAD_FORMATS))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
        raise UploadError("The image is not a PNG, JPEG or WebP image.") from None
    if image.width * image.height > MAX_PIXELS:  # as for init images
        raise UploadError(f"The image has too many pixels: at most {MAX_PIXELS}.")
    return UPLOAD_FORMATS[str(image.format)]


def store_upload(session: Session, settings: Settings, text: str, api_key_id: int | None) -> str:
    """Store a base64 image under an unguessable name, recorded to expire after
    UPLOAD_LIFETIME (the sweeper deletes the file then); the link that serves it until then."""
    from darkroom.storage import make_storage  # the S3 client is built only when used

    data, extension = decode_upload(text, settings.image_max_bytes)
    name = f"{UPLOAD_PREFIX}{uuid.uuid4().hex}.{extension}"
    # The row first: a file whose row cannot be written would never expire.
    uploads.record_upload(session, name, api_key_id, len(data), UPLOAD_LIFETIME)
    make_storage(settings).save(name, data)
    return f"{settings.public_url.rstrip('/')}/uploads/{name}"


def upload_expired(session: Session, filename: str) -> bool:
    """Whether the upload stored as `filename` has outlived UPLOAD_LIFETIME (a file with no
    row yet is served until the sweeper adopts it: see `adopt_unrecorded_uploads`)."""
    upload = uploads.get_upload(session, filename)
    return upload is not None and uploads.is_expired(upload)


def adopt_unrecorded_uploads(session: Session, files: Iterable[StoredFile]) -> int:
    """Record the upload files that have no row, expiring UPLOAD_LIFETIME after they were
    written, as a recorded upload would; how many. Such files were stored before uploads
    were recorded (migration 0011 added the rows, not the files' history) or by a request
    whose transaction failed after its write; without a row they would never expire.

    The caller leaves out files young enough that their request may still be committing its
    row. Files whose name is no upload's are ignored."""
    named = (file for file in files if UPLOAD_NAME.match(file.name))
    adopted = 0
    while chunk := list(islice(named, ADOPT_CHUNK)):
        known = uploads.recorded_names(session, [file.name for file in chunk])
        for file in chunk:
            if file.name in known:
                continue
            life, written = UPLOAD_LIFETIME, file.modified
            uploads.record_upload(
                session, file.name, None, file.size_bytes, life, created_at=written
            )
            adopted += 1
    return adopted
