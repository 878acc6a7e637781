"""The installer's outcome of an install, recorded in the installer's transaction: ready (with
what it found) or failed (with a reason safe to show the client), and the key's webhook frozen
as a pending delivery in the same transaction (the same delivery rows, signing, retries and
records as a job's webhook).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from darkroom.identities import Family
from darkroom.settings import Settings
from db.models import InstallState, ModelInstall
from db.repositories import models as repo
from services import webhooks as webhook_service
from services.models import describe


@dataclass(frozen=True)
class Found:
    """What the installer found and installed."""

    family: Family | None
    format: str
    size_bytes: int
    sha256: str | None


def complete(session: Session, settings: Settings, install_id: int, found: Found) -> int | None:
    """Record a finished install and queue its webhook; the delivery id (None: no webhook, or
    the install is gone or no longer this installer's)."""
    install = repo.get_install_by_id(session, install_id)
    if install is None or install.state != InstallState.DOWNLOADING:
        return None
    repo.finish_install(
        session,
        install,
        family=found.family,
        format=found.format,
        size_bytes=found.size_bytes,
        bytes_done=found.size_bytes,
        sha256=found.sha256,
    )
    return _queue_webhook(session, install)


def fail(session: Session, settings: Settings, install_id: int, message: str) -> int | None:
    """Record a failed install with its client-safe reason and queue its webhook."""
    install = repo.get_install_by_id(session, install_id)
    if install is None or install.state in (InstallState.READY, InstallState.FAILED):
        return None
    repo.fail_install(session, install, message)
    return _queue_webhook(session, install)


def _queue_webhook(session: Session, install: ModelInstall) -> int | None:
    """The install's webhook, frozen as a pending delivery signed with the asking key."""
    if not install.webhook_url or install.api_key_id is None:
        return None
    return webhook_service.freeze(
        session,
        install.webhook_url,
        webhook_body(install),
        api_key_id=install.api_key_id,
        model_install_id=install.id,
    )


def webhook_body(install: ModelInstall) -> dict[str, Any]:
    """What a load's webhook says: the hosted API's status and message, and what was found."""
    ready = install.state == InstallState.READY
    return {
        "status": "success" if ready else "error",
        "message": "model loaded" if ready else (install.error or "model load failed"),
        **describe(install),
    }
