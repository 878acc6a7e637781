"""Bringing models: install, verify, list and delete models, LoRAs, embeddings and VAEs.

The one home of the hosted API's enterprise model endpoints (api/routes/enterprise_models.py)
and of `darkroom models` (cli/models.py): the load requests parsed and checked, an install
queued, an install described, verified, listed and deleted. A load only records a queued
install here; the installer process (worker/installer.py, `darkroom installer`) downloads,
verifies, converts and places it, and records its outcome through `services.install_outcomes`.
Where each kind lives in the models folder, and what the folder holds, is
`services.model_folder`'s.

Torch-free: the API imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from darkroom import families
from darkroom.identities import Family, ModelKind
from darkroom.jobspec import JobSpec
from darkroom.limits import MAX_ID_CHARS
from darkroom.model_ids import HUB_ID, VALID_ID, model_id_problem
from darkroom.settings import Settings
from db.models import InstallState, ModelInstall
from db.repositories import models as repo
from services import model_folder
from services import webhooks as webhook_service

#: The hosted API's `model_type` values and the kind each installs.
MODEL_TYPES = {
    "huggingface": ModelKind.MODEL,
    "custom_ckpt": ModelKind.MODEL,
    "lora": ModelKind.LORA,
    "embeddings": ModelKind.EMBEDDING,
}
#: load_model_v2's `model_category` values and the family the model must be.
CATEGORIES = {
    "stable_diffusion": Family.SD,
    "stable_diffusion_2": Family.SD,
    "stable_diffusion_xl": Family.SDXL,
    "sdxl": Family.SDXL,
    "flux": Family.FLUX,
}
FORMATS = ("safetensors", "ckpt", "diffusers")


class InstallRefusedError(ValueError):
    """A load, verify or delete that cannot go on; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InstallRequest:
    """What to install under which id, from where, and what it must turn out to be."""

    kind: ModelKind
    model_id: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    webhook: str | None = None


@dataclass(frozen=True)
class Started:
    """The install a load refers to, and what to tell the client."""

    install_id: int
    message: str


# --- requests -------------------------------------------------------------------------------


def _text(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    """A string field, stripped; None when absent or empty (422 when required)."""
    value = body.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InstallRefusedError(f"The {name} field is required.")
        return None
    if not isinstance(value, str):
        raise InstallRefusedError(f"The {name} field must be a string.")
    return value.strip()


def _yes(body: dict[str, Any], name: str) -> bool:
    """A yes/no field as the hosted API sends them (also true/false)."""
    return str(body.get(name, "")).strip().lower() in ("yes", "true", "1")


def parse_load_model(body: dict[str, Any]) -> InstallRequest:
    """load_model's `{url, model_id, model_type, from_safetensors, revision, upcast_attention,
    webhook}` as an install request."""
    model_type = (_text(body, "model_type") or "custom_ckpt").lower()
    if model_type == "controlnet":
        raise InstallRefusedError(
            "model_type controlnet is not supported yet: Darkroom has no ControlNet pipelines."
        )
    if model_type not in MODEL_TYPES:
        raise InstallRefusedError(
            f"Unknown model_type {model_type!r}; expected one of "
            f"{', '.join(sorted(MODEL_TYPES))} (controlnet: not yet)."
        )
    options = {
        "model_type": model_type,
        "revision": _text(body, "revision"),
        "upcast_attention": _yes(body, "upcast_attention"),
        "from_safetensors": _yes(body, "from_safetensors"),
        "prediction_type": _prediction_type(body),
    }
    return _request(body, MODEL_TYPES[model_type], "model_id", options)


def parse_load_model_v2(body: dict[str, Any]) -> InstallRequest:
    """load_model_v2's `{url, model_id, model_category, model_format, revision, webhook}`."""
    category = (_text(body, "model_category") or "").lower()
    model_format = (_text(body, "model_format") or "").lower()
    if category in ("lora", "embeddings"):
        kind = ModelKind.LORA if category == "lora" else ModelKind.EMBEDDING
        return _request(body, kind, "model_id", {"model_category": category})
    if category and category not in CATEGORIES:
        raise InstallRefusedError(
            f"Unknown model_category {category!r}; expected one of {', '.join(CATEGORIES)}, "
            "lora or embeddings."
        )
    if model_format and model_format not in FORMATS:
        raise InstallRefusedError(
            f"Unknown model_format {model_format!r}; expected one of {', '.join(FORMATS)}."
        )
    options = {
        "model_category": category or None,
        "family": CATEGORIES.get(category),
        "model_format": model_format or None,
        "revision": _text(body, "revision"),
        "prediction_type": _prediction_type(body),
    }
    return _request(body, ModelKind.MODEL, "model_id", options)


def _prediction_type(body: dict[str, Any]) -> str | None:
    """Darkroom's optional `prediction_type` for a single file (v-prediction and epsilon SD 2.x
    files have the same tensors): what its `<name>.json` sidecar would say; None: the
    configuration folder decides."""
    value = _text(body, "prediction_type")
    if value is not None and value not in families.PREDICTION_TYPES:
        raise InstallRefusedError(
            f"prediction_type must be one of {', '.join(families.PREDICTION_TYPES)}, not {value!r}."
        )
    return value


def parse_load_vae(body: dict[str, Any]) -> InstallRequest:
    """load_vae's `{url, vae_id, webhook}` (`model_id` is accepted for `vae_id`)."""
    id_field = "vae_id" if body.get("vae_id") else "model_id"
    return _request(body, ModelKind.VAE, id_field, {})


def _request(
    body: dict[str, Any], kind: ModelKind, id_field: str, options: dict[str, Any]
) -> InstallRequest:
    """The common fields: the id, the URL (or Hub repo id) and the webhook."""
    model_id = _text(body, id_field, required=True)
    assert model_id is not None
    check_model_id(model_id, kind)
    source = _text(body, "url", required=True)
    assert source is not None
    check_source(source, kind)
    webhook = _text(body, "webhook")
    if webhook is not None and urlsplit(webhook).scheme not in ("http", "https"):
        raise InstallRefusedError("The webhook must be an http or https URL.")
    return InstallRequest(kind, model_id, source, options, webhook)


def check_model_id(model_id: str, kind: ModelKind = ModelKind.MODEL) -> None:
    """Refuse ids that could escape the models folder or collide with its own folders."""
    if len(model_id) > MAX_ID_CHARS:
        raise InstallRefusedError(f"A model_id must be at most {MAX_ID_CHARS} characters.")
    if not VALID_ID.fullmatch(model_id) or ".." in model_id:
        raise InstallRefusedError(
            f"{model_id!r} is not a valid model_id: use letters, digits, '_', '-' and '.', "
            "optionally as owner/name (no leading dot, no '..', no other slash)."
        )
    problem = model_id_problem(model_id, None) if kind == ModelKind.MODEL else None
    if problem is not None:
        raise InstallRefusedError(problem)


def check_source(source: str, kind: ModelKind) -> None:
    """An http(s) download link, or a Hub repo id (owner/name) for a model or VAE folder."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https") and parts.hostname:
        return
    if parts.scheme == "" and HUB_ID.fullmatch(source) and kind in (ModelKind.MODEL, ModelKind.VAE):
        return
    raise InstallRefusedError(
        "The url must be an http(s) link to a .safetensors or .ckpt file, or a Hugging Face "
        "repo id (owner/name) for a diffusers model."
    )


def is_hub_id(source: str) -> bool:
    """Whether an install's source is a Hub repo id rather than a URL."""
    return urlsplit(source).scheme == "" and bool(HUB_ID.fullmatch(source))


# --- load -----------------------------------------------------------------------------------


def models_root(settings: Settings) -> Path:
    """DARKROOM_MODELS_DIR; installs need it (503 without)."""
    if settings.models_dir is None:
        raise InstallRefusedError(
            "Installing models needs DARKROOM_MODELS_DIR: set it (a folder shared by every "
            "worker) and restart.",
            status=503,
        )
    return settings.models_dir


def target_path(settings: Settings, kind: ModelKind, model_id: str) -> Path:
    """Where an installed model of `kind` lives (a folder, or a LoRA's/embedding's file)."""
    return model_folder.target_path(models_root(settings), kind, model_id)


def request_install(
    session: Session, settings: Settings, request: InstallRequest, api_key_id: int | None
) -> Started:
    """Queue an install (flushes; the caller commits, and the installer finds it).

    The same id and URL again is the same install: while it runs or once ready, the answer
    says so and nothing new starts; a failed one starts over. Another URL for an id that is
    installing or installed is refused (delete_model first).
    """
    root = models_root(settings)
    existing = repo.lock_install(session, request.kind, request.model_id)
    if existing is not None:
        return _again(session, existing, request, api_key_id)
    if model_folder.on_disk(root, request.kind, request.model_id):
        raise InstallRefusedError(
            f"{request.model_id!r} is already installed (its files are in the models folder); "
            "delete_model it first to load another.",
            status=409,
        )
    try:
        with session.begin_nested():
            install = repo.create_install(
                session,
                kind=request.kind,
                model_id=request.model_id,
                source=request.source,
                options=request.options,
                api_key_id=api_key_id,
                webhook_url=request.webhook,
            )
    except IntegrityError:
        raise InstallRefusedError(
            f"A load of {request.model_id!r} is already running: wait for it (verify_model).",
            status=409,
        ) from None
    return Started(install.id, "model load started")


def _again(
    session: Session, install: ModelInstall, request: InstallRequest, api_key_id: int | None
) -> Started:
    """A second load of an id that has an install row."""
    same = install.source == request.source
    if install.state == InstallState.FAILED:
        repo.restart_install(
            session,
            install,
            source=request.source,
            options=request.options,
            api_key_id=api_key_id,
            webhook_url=request.webhook,
        )
        return Started(install.id, "model load started")
    if not same:
        doing = "being loaded" if install.state != InstallState.READY else "installed"
        raise InstallRefusedError(
            f"{request.model_id!r} is already {doing} from another URL; delete_model it first "
            "to load another.",
            status=409,
        )
    if install.state == InstallState.READY:
        return Started(install.id, "model already loaded")
    return Started(install.id, "model load already in progress")


# --- verify, list, delete ---------------------------------------------------------------------


def describe(install: ModelInstall) -> dict[str, Any]:
    """An install as verify_model and get_all_models show it."""
    return {
        "model_id": install.model_id,
        "model_type": install.kind,
        "model_status": install.state.value,
        "family": install.family,
        "format": install.format,
        "size_bytes": install.size_bytes or None,
        "bytes_done": install.bytes_done,
        "sha256": install.sha256,
        "source": install.source,
        "error": install.error,
        "attempts": install.attempts,
    }


def verify(session: Session, settings: Settings, model_id: str) -> dict[str, Any]:
    """The state of `model_id`: an install's (queued, downloading, ready, failed with the
    reason), or `ready` for files an operator put in the models folder."""
    check_model_id(model_id, kind=ModelKind.LORA)  # any kind: reserved names are fine to ask about
    for kind in ModelKind:
        install = repo.get_install(session, kind, model_id)
        if install is not None:
            return describe(install) | {
                "dtype": model_folder.weights_dtype(settings.models_dir, kind, model_id)
            }
    for entry in model_folder.installed_on_disk(settings.models_dir):
        if entry["model_id"] == model_id:
            return entry | {
                "dtype": model_folder.weights_dtype(
                    settings.models_dir, entry["model_type"], model_id
                )
            }
    raise InstallRefusedError(f"No model, LoRA, embedding or VAE {model_id!r}.", status=404)


def list_all(session: Session, settings: Settings) -> list[dict[str, Any]]:
    """Every model, LoRA, embedding and VAE: installs (whatever their state) and the files an
    operator installed by hand, each with its kind, family and state."""
    rows = [describe(install) for install in repo.list_installs(session)]
    known = {(row["model_type"], row["model_id"]) for row in rows}
    if settings.models_dir is not None:
        for entry in model_folder.installed_on_disk(settings.models_dir):
            if (entry["model_type"], entry["model_id"]) not in known:
                rows.append(entry)
    return rows


def delete(
    session: Session, settings: Settings, model_id: str, broker: Celery | None = None
) -> list[str]:
    """Remove `model_id` (every kind with that id): its files and its install row. Refused
    (409) while queued or running jobs name it, so that none of them fails for want of it.
    The kinds removed. A queued or running install ends as deleted: its webhook (if asked)
    says so, published through `broker` once the caller commits (without one, the sweeper
    sends it), and its installer notices at its next lease renewal, stops and clears its
    staging folder (or takes away what it placed meanwhile)."""
    check_model_id(model_id, kind=ModelKind.LORA)
    removed: list[str] = []
    for kind in ModelKind:
        install = repo.lock_install(session, kind, model_id)
        paths = model_folder.paths_of(settings.models_dir, kind, model_id)
        if install is None and not paths:
            continue
        _refuse_in_use(session, kind, model_id)
        for path in paths:
            model_folder.remove(models_root(settings), path)
        if install is not None:
            delivery_id = _deleted_while_loading(session, install)
            repo.delete_install(session, install)
            if broker is not None:
                webhook_service.publish(session, broker, settings, delivery_id)
        removed.append(kind)
    if not removed:
        raise InstallRefusedError(f"No model, LoRA, embedding or VAE {model_id!r}.", status=404)
    return removed


#: What a load's webhook says when delete_model ended it before it was ready.
DELETED_WHILE_LOADING = "The model was deleted (delete_model) while it was being loaded."


def _deleted_while_loading(session: Session, install: ModelInstall) -> int | None:
    """The webhook of an install deleted before it ended (None: it had ended, or asked for
    none), its payload frozen now: the row, and deliveries that name it, go with the delete,
    so the delivery names no install (as a job's names its job)."""
    if install.state not in (InstallState.QUEUED, InstallState.DOWNLOADING):
        return None
    if not install.webhook_url or install.api_key_id is None:
        return None
    body = {
        "status": "error",
        "message": DELETED_WHILE_LOADING,
        **describe(install),
        "model_status": "deleted",
        "error": DELETED_WHILE_LOADING,
    }
    return webhook_service.freeze(session, install.webhook_url, body, api_key_id=install.api_key_id)


def _refuse_in_use(session: Session, kind: ModelKind, model_id: str) -> None:
    """409 when queued or running jobs name the model."""
    jobs = [
        job_id
        for job_id, params in repo.active_job_params(session)
        if model_id in _names_in(params, kind)
    ]
    if jobs:
        shown = ", ".join(str(job) for job in jobs[:10])
        raise InstallRefusedError(
            f"{model_id!r} is in use by {len(jobs)} queued or running job(s) ({shown}); "
            "delete it once they end (or cancel them).",
            status=409,
        )


def _names_in(params: dict[str, Any], kind: ModelKind) -> set[str]:
    """The ids of `kind` a job's stored params name (none when the row no longer reads as a
    job: the worker cannot run it either)."""
    try:
        return JobSpec.model_validate(params).names(kind)
    except ValidationError:
        return set()
