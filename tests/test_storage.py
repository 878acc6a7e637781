"""Local output storage, the storage settings, and the API's /outputs/ route on local disk."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.app import create_app
from darkroom.settings import Settings
from darkroom.storage import LocalStorage, Storage, make_storage
from db.models import utcnow
from db.repositories import jobs
from db.repositories.keys import IssuedKey
from services.links import OutputLinks
from tests.api.test_fetch import submit_pix2pix
from tests.support.servers import png

PNG = png(8, 8, (10, 200, 90))


def finish_job(
    db: Session, storage: Storage, job_id: int, *, expires_at: datetime | None = None
) -> str:
    """Play the worker's part: claim the job, store one PNG through `storage`, record success."""
    outcome, job = jobs.claim_job(db, job_id, lease_s=60, max_attempts=3)
    assert outcome == jobs.ClaimOutcome.CLAIMED
    assert job is not None
    name = f"{job.file_prefix}-0.png"
    storage.save(name, PNG)
    record = jobs.OutputRecord(0, name, 8, 8, 7, expires_at=expires_at)
    assert jobs.complete_job(db, job_id, outputs=[record], meta=dict(job.meta), generation_time=1)
    db.commit()
    return name


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_local_save_read_overwrite_delete(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "outputs")
    storage.save("a-0.png", b"first")
    storage.save("a-0.png", PNG)

    assert storage.read("a-0.png") == PNG
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["a-0.png"]
    assert storage.path("a-0.png") == tmp_path / "outputs" / "a-0.png"
    storage.delete("a-0.png")
    storage.delete("a-0.png")  # already gone is fine
    assert storage.path("a-0.png") is None
    with pytest.raises(FileNotFoundError):
        storage.read("a-0.png")


def test_local_files_have_no_direct_links(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert storage.public_link("a-0.png") is None
    assert storage.presigned_link("a-0.png", 60) is None


def test_the_default_is_local_storage_behind_api_links(settings: Settings) -> None:
    storage = make_storage(settings)
    assert isinstance(storage, LocalStorage)
    assert storage.root == settings.outputs_dir
    links = OutputLinks.from_settings(settings, storage)
    assert links.link("a-0.png") == "http://127.0.0.1:8000/outputs/a-0.png"
    assert links.direct("a-0.png") is None


def test_storage_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_STORAGE", "s3")
    monkeypatch.setenv("DARKROOM_S3_BUCKET", "outputs")
    monkeypatch.setenv("DARKROOM_S3_PREFIX", "img/")
    monkeypatch.setenv("DARKROOM_OUTPUT_LINKS", "presigned")
    monkeypatch.setenv("DARKROOM_PRESIGN_TTL_S", "900")

    settings = Settings()

    assert (settings.storage, settings.s3_bucket, settings.s3_prefix) == ("s3", "outputs", "img/")
    assert (settings.output_links, settings.presign_ttl_s) == ("presigned", 900)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"storage": "s3"}, "DARKROOM_STORAGE=s3 needs DARKROOM_S3_BUCKET."),
        (
            {"output_links": "presigned"},
            "DARKROOM_OUTPUT_LINKS=presigned needs DARKROOM_STORAGE=s3",
        ),
        ({"output_links": "public"}, "DARKROOM_OUTPUT_LINKS=public needs DARKROOM_STORAGE=s3"),
        (
            {"storage": "s3", "s3_bucket": "b", "output_links": "public", "output_access": "key"},
            "DARKROOM_OUTPUT_ACCESS=key needs DARKROOM_OUTPUT_LINKS=api",
        ),
        ({"presign_ttl_s": 0}, "greater than or equal to 1"),
        ({"presign_ttl_s": 8 * 24 * 3600}, "less than or equal to 604800"),
    ],
)
def test_inconsistent_storage_settings_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.model_validate(fields)


def test_the_route_streams_a_local_file(
    client: TestClient, settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    name = finish_job(db, make_storage(settings), submit_pix2pix(client, api_key))

    download = client.get(f"/outputs/{name}")

    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert download.content == PNG


def test_an_expired_temporary_output_is_gone_even_after_the_sweep(
    client: TestClient, settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    storage = make_storage(settings)
    expired = utcnow() - timedelta(seconds=1)
    name = finish_job(db, storage, submit_pix2pix(client, api_key), expires_at=expired)

    before_sweep = client.get(f"/outputs/{name}")
    storage.delete(name)
    after_sweep = client.get(f"/outputs/{name}")

    assert before_sweep.status_code == after_sweep.status_code == 410
    assert after_sweep.json()["message"] == "This temporary link has expired."


def test_a_recorded_output_whose_file_is_missing_is_404(
    client: TestClient, settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    storage = make_storage(settings)
    name = finish_job(db, storage, submit_pix2pix(client, api_key))
    storage.delete(name)

    assert client.get(f"/outputs/{name}").status_code == 404
