"""Reading what waits in a Redis queue, as kombu stores it: JSON with a base64 body."""

from __future__ import annotations

import base64
import json

import redis


def published(client: redis.Redis, queue: str) -> list[tuple[str, int]]:
    """(task name, record id) of every message waiting in `queue`."""
    found = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        assert message["properties"]["body_encoding"] == "base64"
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        [record_id] = args
        found.append((message["headers"]["task"], int(record_id)))
    return found


def published_ids(broker_url: str, queue: str) -> list[int]:
    """The record ids waiting in `queue`, oldest first."""
    client = redis.Redis.from_url(broker_url)
    try:
        return [record_id for _task, record_id in published(client, queue)]
    finally:
        client.close()
