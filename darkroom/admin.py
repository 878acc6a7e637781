"""Operator commands: `darkroom keys ...` and `darkroom webhooks ...`.

Each prints one JSON object per line, so the output is readable and scriptable; the last line
of `keys create` and `keys rotate-secret` holds the secret values, shown only then.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from darkroom.settings import Settings
from db.models import ApiKey
from db.repositories import keys, webhooks
from db.session import session_scope


def _print(row: dict[str, Any]) -> None:
    print(json.dumps(row, default=str))


def _key_row(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.key_prefix,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
    }


def keys_create(args: argparse.Namespace, settings: Settings) -> int:
    """Create an API key; the last line printed is `{"key": ..., "webhook_secret": ...}`."""
    with session_scope(settings.resolved_database_url) as session:
        issued = keys.create_key(session, args.name)
        secret = issued.row.webhook_secret
    _print({"key": issued.plaintext, "webhook_secret": secret})
    return 0


def keys_list(_args: argparse.Namespace, settings: Settings) -> int:
    """List keys (never their values: only a prefix is stored in clear)."""
    with session_scope(settings.resolved_database_url) as session:
        for key in keys.list_keys(session):
            _print(_key_row(key))
    return 0


def _find_key(session: Session, ref: str) -> ApiKey | None:
    """The key named on the command line, or None after saying so."""
    key = keys.find_key(session, ref)
    if key is None:
        _print({"error": f"no key {ref}"})
    return key


def keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Revoke a key by id or prefix."""
    with session_scope(settings.resolved_database_url) as session:
        key = _find_key(session, args.key)
        if key is None:
            return 1
        keys.revoke_key(session, key)
        _print(_key_row(key))
    return 0


def keys_rotate_secret(args: argparse.Namespace, settings: Settings) -> int:
    """New webhook secret; the old one co-signs for --grace-hours (default 24)."""
    with session_scope(settings.resolved_database_url) as session:
        key = _find_key(session, args.key)
        if key is None:
            return 1
        secret = keys.rotate_webhook_secret(session, key, timedelta(hours=args.grace_hours))
        _print(
            {
                "id": key.id,
                "webhook_secret": secret,
                "previous_valid_until": key.previous_secret_until,
            }
        )
    return 0


def webhooks_failed(_args: argparse.Namespace, settings: Settings) -> int:
    """List deliveries that gave up."""
    with session_scope(settings.resolved_database_url) as session:
        for delivery in webhooks.failed_deliveries(session):
            _print(
                {
                    "id": delivery.id,
                    "job_id": delivery.job_id,
                    "webhook_id": delivery.message_id,
                    "url": delivery.url,
                    "attempts": delivery.attempt_count,
                    "last_error": delivery.last_error,
                    "finished_at": delivery.finished_at,
                }
            )
    return 0


def webhooks_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Send failed deliveries again (same webhook-id): one by --id, or --all."""
    with session_scope(settings.resolved_database_url) as session:
        failed = webhooks.failed_deliveries(session, limit=10_000)
        chosen = [d for d in failed if args.all or d.id == args.id]
        for delivery in chosen:
            webhooks.replay(session, delivery)
            _print({"replayed": delivery.id, "webhook_id": delivery.message_id})
    if not chosen:
        _print({"error": "no failed delivery matched"})
        return 1
    return 0


def add_parsers(sub: Any) -> None:
    """Attach the `keys` and `webhooks` command groups to the main parser."""
    group = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True
    )
    create = group.add_parser("create", help=keys_create.__doc__)
    create.add_argument("--name", required=True)
    create.set_defaults(handler=keys_create)
    group.add_parser("list", help=keys_list.__doc__).set_defaults(handler=keys_list)
    for name, handler in (("revoke", keys_revoke), ("rotate-secret", keys_rotate_secret)):
        command = group.add_parser(name, help=handler.__doc__)
        command.add_argument("key", help="key id or prefix")
        command.set_defaults(handler=handler)
        if handler is keys_rotate_secret:
            command.add_argument("--grace-hours", type=float, default=24.0)
    hooks = sub.add_parser("webhooks", help="inspect and replay webhook deliveries")
    actions = hooks.add_subparsers(dest="action", required=True)
    actions.add_parser("failed", help=webhooks_failed.__doc__).set_defaults(handler=webhooks_failed)
    replay = actions.add_parser("replay", help=webhooks_replay.__doc__)
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int)
    which.add_argument("--all", action="store_true")
    replay.set_defaults(handler=webhooks_replay)
