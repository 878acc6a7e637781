"""API keys: created with a random secret, stored only as a SHA-256 digest."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ApiKey, utcnow


@dataclass(frozen=True)
class IssuedKey:
    """A freshly created key: the only moment its plaintext exists."""

    row: ApiKey
    plaintext: str


def hash_key(plaintext: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def create_key(session: Session, name: str, *, admin: bool = False) -> IssuedKey:
    """Create a key with its own webhook secret (an `admin` one may manage the server);
    flushes, the caller commits."""
    plaintext = "dk_" + secrets.token_urlsafe(32)
    row = ApiKey(
        name=name,
        key_hash=hash_key(plaintext),
        key_prefix=plaintext[:10],
        webhook_secret=new_webhook_secret(),
        admin=admin,
    )
    session.add(row)
    session.flush()
    return IssuedKey(row=row, plaintext=plaintext)


def find_active_key(session: Session, plaintext: str) -> ApiKey | None:
    """The unrevoked key whose digest matches `plaintext`, if any.

    Lookup is by digest, so the plaintext is never compared byte by byte against stored data.
    """
    digest = hash_key(plaintext)
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if row is None or row.revoked_at is not None:
        return None
    return row


def active_keys_by_digest(session: Session, digests: Collection[str]) -> dict[str, ApiKey]:
    """The unrevoked keys among `digests` (see `hash_key`), by digest, in one query."""
    rows = session.scalars(
        select(ApiKey).where(ApiKey.key_hash.in_(digests), ApiKey.revoked_at.is_(None))
    )
    return {row.key_hash: row for row in rows}


def get_key(session: Session, key_id: int) -> ApiKey | None:
    """A key by id (the worker uses it to find the webhook secret)."""
    return session.get(ApiKey, key_id)


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, oldest first (revoked ones included)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def find_key(session: Session, ref: str) -> ApiKey | None:
    """A key by id or by the prefix shown in `darkroom keys list`."""
    if ref.isdigit():
        return session.get(ApiKey, int(ref))
    return session.scalar(select(ApiKey).where(ApiKey.key_prefix == ref))


def revoke_key(session: Session, key: ApiKey) -> None:
    """Stop accepting the key; its jobs and outputs stay."""
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    session.flush()


def rotate_webhook_secret(session: Session, key: ApiKey, grace: timedelta) -> str:
    """Give the key a new webhook secret; the old one co-signs for `grace`. The new secret."""
    key.previous_webhook_secret = key.webhook_secret
    key.previous_secret_until = utcnow() + grace
    key.webhook_secret = new_webhook_secret()
    session.flush()
    return key.webhook_secret
