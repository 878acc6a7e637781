"""Queries of uploaded images (base64_to_url): record one, find the expired ones, forget them.

Functions flush; the caller commits.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Upload, utcnow


def record_upload(
    session: Session,
    filename: str,
    api_key_id: int | None,
    size_bytes: int,
    life: timedelta,
    *,
    created_at: datetime | None = None,
) -> Upload:
    """Record a stored upload that expires `life` after `created_at` (by default now)."""
    created = created_at or utcnow()
    upload = Upload(
        filename=filename,
        api_key_id=api_key_id,
        size_bytes=size_bytes,
        created_at=created,
        expires_at=created + life,
    )
    session.add(upload)
    session.flush()
    return upload


def get_upload(session: Session, filename: str) -> Upload | None:
    """The upload stored under `filename`, if one was recorded."""
    return session.scalar(select(Upload).where(Upload.filename == filename))


def recorded_names(session: Session, filenames: Collection[str]) -> set[str]:
    """Those of `filenames` that have an upload row (deleted or not)."""
    rows = session.scalars(select(Upload.filename).where(Upload.filename.in_(list(filenames))))
    return set(rows)


def is_expired(upload: Upload) -> bool:
    """Whether the upload's life is over (its file may still await the sweeper)."""
    return upload.deleted_at is not None or upload.expires_at <= utcnow()


def expired_uploads(session: Session, *, limit: int = 200) -> list[Upload]:
    """Uploads past their expiry whose file has not been deleted yet, oldest first."""
    rows = session.scalars(
        select(Upload)
        .where(Upload.expires_at < utcnow(), Upload.deleted_at.is_(None))
        .order_by(Upload.expires_at)
        .limit(limit)
    )
    return list(rows)


def mark_uploads_deleted(session: Session, uploads: Sequence[Upload]) -> None:
    """Record that these uploads' files were deleted."""
    deleted_at = utcnow()
    for upload in uploads:
        upload.deleted_at = deleted_at
    session.flush()
