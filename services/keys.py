"""API keys: create, revoke, rotate the webhook secret; one home for the CLI (and any other
shell that manages keys). Functions flush; the caller commits."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from db.models import ApiKey
from db.repositories import keys
from db.repositories.keys import IssuedKey


class KeyNotFoundError(Exception):
    """No key has that id or prefix."""


def create(session: Session, name: str, *, admin: bool = False) -> IssuedKey:
    """A new key with its own webhook secret (an `admin` one may manage the server): the only
    moment its plaintext exists."""
    return keys.create_key(session, name, admin=admin)


def find(session: Session, ref: str) -> ApiKey:
    """The key with id or prefix `ref`; KeyNotFoundError otherwise."""
    key = keys.find_key(session, ref)
    if key is None:
        raise KeyNotFoundError(f"no key {ref}")
    return key


def revoke(session: Session, ref: str) -> ApiKey:
    """Stop accepting key `ref` (id or prefix); its jobs and outputs stay."""
    key = find(session, ref)
    keys.revoke_key(session, key)
    return key


def rotate_secret(session: Session, ref: str, grace: timedelta) -> tuple[ApiKey, str]:
    """Give key `ref` a new webhook secret, the old one co-signing for `grace`: the key and the
    new secret."""
    key = find(session, ref)
    return key, keys.rotate_webhook_secret(session, key, grace)
