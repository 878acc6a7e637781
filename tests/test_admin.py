"""The operator commands, run as a user would (`darkroom ...` subprocesses) on Postgres."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from darkroom.settings import Settings
from db.models import DeliveryState, WebhookDelivery
from db.repositories import keys
from db.session import session_scope
from tests.support.rows import failed_with_delivery
from tests.support.servers import WebhookReceiver
from tests.support.system import darkroom
from worker.webhooks.dispatcher import deliver


def run(settings: Settings, *args: str) -> list[dict[str, Any]]:
    """Run a darkroom command against the test database; its JSON lines."""
    env = {**os.environ, "DARKROOM_DATABASE_URL": settings.resolved_database_url}
    return [json.loads(line) for line in darkroom(env, *args).splitlines() if line.startswith("{")]


def test_keys_create_list_revoke(settings: Settings) -> None:
    [created] = run(settings, "keys", "create", "--name", "ops-test")
    assert created["key"].startswith("dk_")
    assert created["webhook_secret"].startswith("whsec_")

    listed = [row for row in run(settings, "keys", "list") if row["name"] == "ops-test"]
    assert len(listed) == 1
    assert created["key"] not in json.dumps(listed)  # only a prefix is ever shown
    assert created["key"].startswith(listed[0]["prefix"])

    [revoked] = run(settings, "keys", "revoke", listed[0]["prefix"])
    assert revoked["revoked_at"] is not None
    with session_scope(settings.resolved_database_url) as session:
        assert keys.find_active_key(session, created["key"]) is None


def test_rotated_secret_co_signs_during_the_grace_period(
    settings: Settings, receiver: WebhookReceiver
) -> None:
    [created] = run(settings, "keys", "create", "--name", "rotating")
    with session_scope(settings.resolved_database_url) as session:
        key = keys.find_active_key(session, created["key"])
        assert key is not None
        key_id = key.id
    [rotated] = run(settings, "keys", "rotate-secret", str(key_id), "--grace-hours", "1")
    assert rotated["webhook_secret"] != created["webhook_secret"]

    delivery_id = failed_with_delivery(settings, key_id, receiver.url)
    deliver(delivery_id, settings)

    [hook] = receiver.snapshot()
    for secret in (created["webhook_secret"], rotated["webhook_secret"]):
        assert Webhook(secret).verify(hook.body, hook.headers)["status"] == "failed"
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 44).verify(hook.body, hook.headers)


def test_failed_deliveries_are_listed_and_replayed_with_the_same_id(
    settings: Settings, receiver: WebhookReceiver
) -> None:
    [created] = run(settings, "keys", "create", "--name", "replayer")
    with session_scope(settings.resolved_database_url) as session:
        key = keys.find_active_key(session, created["key"])
        assert key is not None
        key_id = key.id
    receiver.respond = lambda _r: (410, {})
    delivery_id = failed_with_delivery(settings, key_id, receiver.url)
    deliver(delivery_id, settings)
    failed = [row for row in run(settings, "webhooks", "failed") if row["id"] == delivery_id]
    assert failed[0]["last_error"] == "HTTP 410"

    receiver.respond = lambda _r: (200, {})
    [replayed] = run(settings, "webhooks", "replay", "--id", str(delivery_id))
    deliver(delivery_id, settings)

    first, second = receiver.snapshot()
    assert replayed["webhook_id"] == first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        assert row.state == DeliveryState.DELIVERED
