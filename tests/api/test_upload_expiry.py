"""Uploads (base64_to_url / upload_image) expire like temporary outputs: after 24 hours the
link answers 404 and the sweeper deletes the file. Real Postgres, storage and sweeper."""

from __future__ import annotations

import base64
import io
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update

from api.app import create_app
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import Upload, utcnow
from db.repositories import uploads
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from services.server import UPLOAD_LIFETIME
from worker.jobs import TEMP_LIFETIME
from worker.sweeper import adopt_unrecorded_uploads, expire_uploads, sweep_once

E = "/api/v1/enterprise"


@pytest.fixture
def settings(settings: Settings, own_pg_url: str) -> Settings:
    """A database of the test's own: the sweeper sweeps every row."""
    return settings.model_copy(update={"database_url": own_pg_url})


@pytest.fixture
def api_key(own_pg_url: str) -> IssuedKey:
    with session_scope(own_pg_url) as session:
        return create_key(session, "uploads")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _upload(client: TestClient, key: IssuedKey) -> str:
    """Store a small PNG through upload_image; its file name."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(out, format="PNG")
    body = {"key": key.plaintext, "image": base64.b64encode(out.getvalue()).decode()}
    answer = client.post(f"{E}/upload_image", json=body)
    assert answer.status_code == 200, answer.text
    link: str = answer.json()["link"]
    return link.rsplit("/", 1)[1]


def _expire(settings: Settings, filename: str) -> None:
    """Move the upload's expiry into the past, as 24 hours would."""
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Upload)
            .where(Upload.filename == filename)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


def test_uploads_live_as_long_as_temporary_outputs() -> None:
    assert UPLOAD_LIFETIME == TEMP_LIFETIME


def test_an_upload_is_recorded_with_its_expiry_and_key(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    before = utcnow()
    name = _upload(client, api_key)
    with session_scope(settings.resolved_database_url) as session:
        row = uploads.get_upload(session, name)
        assert row is not None
        assert row.api_key_id == api_key.row.id
        assert row.size_bytes > 0
        assert before + UPLOAD_LIFETIME <= row.expires_at <= utcnow() + UPLOAD_LIFETIME
        assert row.deleted_at is None
    assert client.get(f"/uploads/{name}").status_code == 200


def test_an_expired_upload_is_refused_then_deleted_by_the_sweeper(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    name, kept = _upload(client, api_key), _upload(client, api_key)
    _expire(settings, name)
    # Past its life the link is gone at once, before the sweeper has run.
    assert (settings.outputs_dir / name).exists()
    assert client.get(f"/uploads/{name}").status_code == 404

    report = sweep_once(settings, make_celery(settings))
    assert report.expired_uploads >= 1

    assert not (settings.outputs_dir / name).exists()
    with session_scope(settings.resolved_database_url) as session:
        row = uploads.get_upload(session, name)
        assert row is not None
        assert row.deleted_at is not None
    assert client.get(f"/uploads/{name}").status_code == 404
    # The other upload is untouched.
    assert (settings.outputs_dir / kept).exists()
    assert client.get(f"/uploads/{kept}").status_code == 200
    assert expire_uploads(settings) == 0  # each expired file is deleted once


def _legacy_upload(settings: Settings, age: timedelta) -> str:
    """An upload file as base64_to_url stored them before uploads had rows, `age` old."""
    name = f"upload-{uuid.uuid4().hex}.png"
    path = settings.outputs_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG legacy")
    written = (utcnow() - age).timestamp()
    os.utime(path, (written, written))
    return name


def test_uploads_stored_before_they_had_rows_expire_from_when_they_were_written(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    stale = _legacy_upload(settings, timedelta(hours=30))
    recent = _legacy_upload(settings, timedelta(hours=2))
    fresh = _legacy_upload(settings, timedelta(seconds=5))  # its request may be committing
    recorded = _upload(client, api_key)
    aged = (utcnow() - timedelta(hours=2)).timestamp()
    os.utime(settings.outputs_dir / recorded, (aged, aged))
    other = settings.outputs_dir / "not-an-upload.png"
    other.write_bytes(b"x")
    assert client.get(f"/uploads/{stale}").status_code == 200  # no row: it never expired

    assert adopt_unrecorded_uploads(settings) == 2  # stale and recent; the rest left alone
    assert adopt_unrecorded_uploads(settings) == 0  # once each
    with session_scope(settings.resolved_database_url) as session:
        for name, age in ((stale, timedelta(hours=30)), (recent, timedelta(hours=2))):
            row = uploads.get_upload(session, name)
            assert row is not None
            expected = utcnow() - age + UPLOAD_LIFETIME
            assert abs((row.expires_at - expected).total_seconds()) < 60
            assert (row.api_key_id, row.size_bytes) == (None, len(b"\x89PNG legacy"))
        assert uploads.get_upload(session, fresh) is None
        assert len(uploads.recorded_names(session, [recorded])) == 1
    assert client.get(f"/uploads/{stale}").status_code == 404  # its 24 hours are over

    sweep_once(settings, make_celery(settings))
    assert not (settings.outputs_dir / stale).exists()
    for kept in (recent, fresh, recorded):
        assert (settings.outputs_dir / kept).exists()
    assert other.exists()
