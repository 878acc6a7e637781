"""Every query on model installs (the rows behind load_model, verify_model, get_all_models).

The installer claims a queued install with a lease, as workers claim jobs: the lease is read and
written on the database's clock, so an installer that dies mid-download leaves a row that the
next one claims once the lease has passed (and resumes its partial download).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from darkroom.identities import ModelKind
from db.clock import db_now
from db.models import InstallState, Job, JobState, ModelInstall, utcnow

#: Active jobs scanned when checking whether a model is in use (params are JSON: read here).
_ACTIVE_SCAN_LIMIT = 10_000


def get_install(session: Session, kind: ModelKind, model_id: str) -> ModelInstall | None:
    """The install of `model_id` of `kind`, if any."""
    return session.scalar(
        select(ModelInstall).where(ModelInstall.kind == kind, ModelInstall.model_id == model_id)
    )


def get_install_by_id(session: Session, install_id: int) -> ModelInstall | None:
    """The install with this id, read fresh from the database."""
    return session.get(ModelInstall, install_id, populate_existing=True)


def lock_install(session: Session, kind: ModelKind, model_id: str) -> ModelInstall | None:
    """The install of `model_id`, locked for this transaction (Postgres; SQLite locks the file)."""
    return session.scalar(
        select(ModelInstall)
        .where(ModelInstall.kind == kind, ModelInstall.model_id == model_id)
        .with_for_update()
    )


def create_install(
    session: Session,
    *,
    kind: ModelKind,
    model_id: str,
    source: str,
    options: dict[str, Any],
    api_key_id: int | None,
    webhook_url: str | None,
) -> ModelInstall:
    """A queued install; the unique (kind, model_id) refuses a concurrent second one."""
    install = ModelInstall(
        kind=kind,
        model_id=model_id,
        source=source,
        options=options,
        api_key_id=api_key_id,
        webhook_url=webhook_url,
        state=InstallState.QUEUED,
        bytes_done=0,
        attempts=0,
    )
    session.add(install)
    session.flush()
    return install


def restart_install(
    session: Session,
    install: ModelInstall,
    *,
    source: str,
    options: dict[str, Any],
    api_key_id: int | None,
    webhook_url: str | None,
) -> None:
    """Queue a failed install again, from `source`, as new."""
    install.source, install.options = source, options
    install.api_key_id, install.webhook_url = api_key_id, webhook_url
    install.state, install.error, install.attempts = InstallState.QUEUED, None, 0
    install.bytes_done, install.size_bytes, install.sha256 = 0, None, None
    install.lease_until = install.started_at = install.finished_at = None
    session.flush()


def _claimable(now: Any) -> Any:
    """Queued, or downloading under a lease that has passed (its installer is gone)."""
    return and_(
        ModelInstall.state.in_((InstallState.QUEUED, InstallState.DOWNLOADING)),
        or_(ModelInstall.lease_until.is_(None), ModelInstall.lease_until < now),
    )


def claim_install(session: Session, *, lease_s: float, install_id: int | None = None) -> int | None:
    """Take the oldest claimable install (or `install_id`) for `lease_s` seconds, counting an
    attempt; its id, or None when there is none. A conditional UPDATE: one claimant wins."""
    now = db_now(session)
    query = select(ModelInstall.id).where(_claimable(now)).order_by(ModelInstall.id).limit(1)
    if install_id is not None:
        query = query.where(ModelInstall.id == install_id)
    candidate = session.scalar(query)
    if candidate is None:
        return None
    result = session.execute(
        update(ModelInstall)
        .where(ModelInstall.id == candidate, _claimable(now))
        .values(
            state=InstallState.DOWNLOADING,
            lease_until=now + timedelta(seconds=lease_s),
            attempts=ModelInstall.attempts + 1,
            started_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return candidate if int(result.rowcount) == 1 else None  # type: ignore[attr-defined]


def renew_lease(
    session: Session, install_id: int, *, lease_s: float, bytes_done: int, size: int | None
) -> bool:
    """Extend a running install's lease and record its progress; False if it is no longer
    downloading (deleted, or failed by someone else)."""
    now = db_now(session)
    result = session.execute(
        update(ModelInstall)
        .where(ModelInstall.id == install_id, ModelInstall.state == InstallState.DOWNLOADING)
        .values(
            lease_until=now + timedelta(seconds=lease_s), bytes_done=bytes_done, size_bytes=size
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount) == 1  # type: ignore[attr-defined]


def finish_install(session: Session, install: ModelInstall, **found: Any) -> None:
    """Mark the install ready with what was found (family, format, size_bytes, sha256)."""
    for name, value in found.items():
        setattr(install, name, value)
    install.state, install.error = InstallState.READY, None
    install.lease_until, install.finished_at = None, utcnow()
    session.flush()


def fail_install(session: Session, install: ModelInstall, message: str) -> None:
    """Mark the install failed with a message the client may read."""
    install.state, install.error = InstallState.FAILED, message
    install.lease_until, install.finished_at = None, utcnow()
    session.flush()


def list_installs(session: Session) -> list[ModelInstall]:
    """Every install, oldest first."""
    return list(session.scalars(select(ModelInstall).order_by(ModelInstall.id)))


def delete_install(session: Session, install: ModelInstall) -> None:
    """Remove the install's row (its webhook deliveries go with it)."""
    session.delete(install)
    session.flush()


def active_job_params(session: Session) -> list[tuple[int, dict[str, Any]]]:
    """(id, stored params) of the queued and running jobs (at most `_ACTIVE_SCAN_LIMIT`)."""
    rows = session.execute(
        select(Job.id, Job.params)
        .where(Job.state.in_((JobState.QUEUED, JobState.PROCESSING)))
        .limit(_ACTIVE_SCAN_LIMIT)
    )
    return [(job_id, params or {}) for job_id, params in rows]
