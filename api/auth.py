"""The caller's key, looked up in the same thread-pool hop and short session as the work.

A request must never hold a database connection across two thread-pool hops: with more threads
than connections, requests that hold a connection while waiting for a thread, and threads that
wait for a connection, deadlock the API under about a hundred concurrent requests. So the key
lookup is not a dependency of its own: `run_keyed` authenticates and then runs the route's work
in one function, in one thread, in one session that is closed before the thread is returned.

Valid keys are kept for `api_key_cache_s` (by digest, never by plaintext), so a poll usually
costs no key query at all; that is also how long a revoked key keeps working on this process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.errors import INVALID_KEY, ApiError
from darkroom.settings import Settings
from db.models import ApiKey
from db.repositories.keys import active_keys_by_digest, hash_key
from db.session import read_scope, session_scope

T = TypeVar("T")
#: The route's work: given the request's session and the caller's key, its answer.
Work = Callable[[Session, ApiKey], T]


class KeyCache:
    """Valid keys by digest for `ttl_s` seconds; at most `max_entries` (the oldest go first)."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, ApiKey]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> ApiKey | None:
        """The cached key for `digest`, if it is still fresh."""
        with self._lock:
            entry = self._entries.get(digest)
        if entry is None or entry[0] <= time.monotonic():
            return None
        return entry[1]

    def put(self, digest: str, key: ApiKey) -> None:
        """Remember a key that was just found valid (detached from its session)."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))  # dicts keep insertion order
            self._entries[digest] = (time.monotonic() + self.ttl_s, key)


def cached_key(cache: KeyCache, presented: str | None) -> ApiKey | None:
    """The key for `presented` when the cache vouches for it; None means "ask the database"
    (`authenticate`), not "invalid". Needs no thread: the event loop may call it."""
    return cache.get(hash_key(presented)) if presented else None


def authenticate(session: Session, cache: KeyCache, presented: str | None) -> ApiKey:
    """The active key for `presented`, from the cache or one query; 401 otherwise."""
    if not presented:
        raise ApiError(401, INVALID_KEY)
    digest = hash_key(presented)
    key = cache.get(digest)
    if key is not None:
        return key
    key = active_keys_by_digest(session, [digest]).get(digest)
    if key is None:
        raise ApiError(401, INVALID_KEY)
    # Detached, so that a later rollback of this session cannot expire what the cache holds.
    session.expunge(key)
    cache.put(digest, key)
    return key


def run_keyed(
    settings: Settings,
    cache: KeyCache,
    presented: str | None,
    work: Work[T],
    read_only: bool = False,
) -> T:
    """In one short session: authenticate, then do the work; commits on success. With
    `read_only` (work that only reads, such as a poll) nothing is committed and each
    statement runs on its own (`db.session.read_scope`): no BEGIN or COMMIT round trips."""
    scope = read_scope if read_only else session_scope
    with scope(settings.resolved_database_url) as session:
        return work(session, authenticate(session, cache, presented))


async def keyed(
    request: Request, presented: str | None, work: Work[T], *, read_only: bool = False
) -> T:
    """`run_keyed` in one hop to the thread pool, with the app's settings and key cache."""
    settings: Settings = request.app.state.settings
    cache = get_key_cache(request)
    return await run_in_threadpool(run_keyed, settings, cache, presented, work, read_only)


def get_key_cache(request: Request) -> KeyCache:
    """The app's key cache."""
    cache: KeyCache = request.app.state.key_cache
    return cache


def key_cache_for(settings: Settings) -> KeyCache:
    """A key cache sized by the settings."""
    return KeyCache(settings.api_key_cache_s)
