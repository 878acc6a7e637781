"""Shared fixtures: a fresh Postgres database, a Redis database, loopback servers, settings.

Integration tests talk to the real services on 127.0.0.1 (override with DARKROOM_TEST_PG and
DARKROOM_TEST_REDIS). Every test session gets its own database and its own queue names.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import text
from sqlalchemy.orm import Session

from darkroom.settings import Settings
from db.migrate import upgrade_to_head
from db.models import ApiKey
from db.repositories.keys import IssuedKey, create_key
from db.session import session_factory, session_scope
from tests.support.servers import ImageServer, WebhookReceiver, png

PG_ADMIN = os.environ.get("DARKROOM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DARKROOM_TEST_REDIS", "redis://127.0.0.1:6379/15")


def _sqlalchemy_url(conninfo: str, database: str) -> str:
    base = conninfo.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{database}"


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new migrated Postgres database, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _sqlalchemy_url(PG_ADMIN, name)
    try:
        upgrade_to_head(url)
        yield url
    finally:
        session_factory(url).kw["bind"].dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """The test session's shared database."""
    with fresh_database("darkroom_test") as url:
        yield url


@pytest.fixture
def own_pg_url() -> Iterator[str]:
    """A database for one test alone: for code that sweeps every row, like the sweeper."""
    with fresh_database("darkroom_own") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The tests' Redis database. It is not emptied: several test sessions may share it at once,
    and each test publishes to queue names of its own (see `settings`)."""
    redis.Redis.from_url(REDIS_URL).ping()
    return REDIS_URL


@pytest.fixture
def settings(tmp_path: Path, pg_url: str, redis_url: str) -> Settings:
    """Production-profile settings on the test database, with queues no other run shares."""
    suffix = uuid.uuid4().hex[:8]
    return Settings(
        data_dir=tmp_path / "data",
        database_url=pg_url,
        broker_url=redis_url,
        public_url="http://127.0.0.1:8000",
        model_preset="tiny",
        url_allowlist=["127.0.0.1/32"],
        job_queue=f"test.jobs.{suffix}",
        webhook_queue=f"test.webhooks.{suffix}",
        webhook_schedule_s=[0.0, 0.2, 0.2, 0.2],
        webhook_jitter=0.0,
        webhook_timeout_s=2.0,
    )


@pytest.fixture
def db(pg_url: str) -> Iterator[Session]:
    """A session on the test database (tests commit through it like a request would)."""
    session = session_factory(pg_url)()
    yield session
    session.rollback()
    session.close()


@pytest.fixture
def api_key(pg_url: str) -> IssuedKey:
    """A fresh API key on the test database."""
    with session_scope(pg_url) as session:
        return create_key(session, f"test-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    """Serves test images on 127.0.0.1: /red.png, /blue.png, /green.jpg, /wide.png, /text.txt."""
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (96, 64), (20, 160, 40)).save(jpeg, format="JPEG")
    server = ImageServer(
        {
            "/red.png": (png(64, 64, (200, 30, 30)), "image/png"),
            "/blue.png": (png(64, 64, (30, 30, 200)), "image/png"),
            "/green.jpg": (jpeg.getvalue(), "image/jpeg"),
            "/wide.png": (png(160, 96, (120, 120, 20)), "image/png"),
            "/text.txt": (b"this is not an image", "text/plain"),
        }
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A webhook receiver on 127.0.0.1 answering 200 unless a test says otherwise."""
    hook = WebhookReceiver()
    hook.start()
    yield hook
    hook.stop()


def key_row(session: Session, issued: IssuedKey) -> ApiKey:
    """The key's row in `session`."""
    row = session.get(ApiKey, issued.row.id)
    assert row is not None
    return row


def count_rows(session: Session, table: str, where: str = "true") -> int:
    """Rows in `table` matching `where` (test helper for 'nothing duplicated' checks)."""
    return int(session.execute(text(f"SELECT count(*) FROM {table} WHERE {where}")).scalar_one())  # noqa: S608
