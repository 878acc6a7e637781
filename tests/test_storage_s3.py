"""S3 storage against a real S3-protocol server on 127.0.0.1 (moto's server mode).

Every link is fetched with a plain HTTP client, as a user's browser would. Moto does not check
signatures or expiry, so a presigned link's lifetime is read back from the link itself.
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session

from api.app import create_app
from darkroom.queue import make_celery
from darkroom.s3storage import S3Storage, s3_client
from darkroom.settings import Settings
from darkroom.storage import make_storage
from db.models import Job, Upload, utcnow
from db.repositories import jobs, uploads
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from services.links import OutputLinks
from services.responses import run_output_filename
from services.server import UPLOAD_LIFETIME
from tests.api.test_fetch import submit_pix2pix
from tests.api.test_submit import IMG2IMG, PIX2PIX, post
from tests.conftest import fresh_database
from tests.support.rows import queued_job
from tests.support.s3 import AWS_ENV, moto_s3
from tests.support.servers import ImageServer, WebhookReceiver
from tests.support.system import darkroom_up, production_env
from tests.test_storage import PNG, finish_job
from worker.sweeper import (
    adopt_unrecorded_uploads,
    expire_temporary_outputs,
    expire_uploads,
    sweep_once,
)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, and AWS credentials in the environment."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A new, empty bucket for one test."""
    name = f"darkroom-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint, "us-east-1").create_bucket(Bucket=name)
    return name


def s3_settings(settings: Settings, endpoint: str, bucket: str, **fields: object) -> Settings:
    """The test settings moved onto the bucket, validated like settings read from the env."""
    base = settings.model_dump(exclude={"storage", "s3_bucket", "s3_endpoint_url", "s3_region"})
    values = {"storage": "s3", "s3_bucket": bucket, "s3_endpoint_url": endpoint}
    return Settings.model_validate({**base, **values, "s3_region": "us-east-1", **fields})


@pytest.fixture
def presigned(settings: Settings, s3_endpoint: str, bucket: str) -> Settings:
    """S3 storage with presigned links."""
    return s3_settings(settings, s3_endpoint, bucket, output_links="presigned")


def keys_in(endpoint: str, bucket: str) -> list[str]:
    listing = s3_client(endpoint, "us-east-1").list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def download(url: str) -> httpx.Response:
    """GET a link as a client would (loopback only), without following redirects."""
    assert url.startswith("http://127.0.0.1:")
    return httpx.get(url, timeout=10)


def lifetime(url: str) -> tuple[datetime, int]:
    """When a SigV4 presigned link was signed and for how many seconds it is valid."""
    query = parse_qs(urlsplit(url).query)
    signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%S%z")
    return signed, int(query["X-Amz-Expires"][0])


def test_save_read_delete_in_the_bucket(s3_endpoint: str, bucket: str) -> None:
    storage = S3Storage(bucket, prefix="out/", endpoint_url=s3_endpoint, region="us-east-1")
    storage.save("a-0.png", b"first")
    storage.save("a-0.png", PNG)

    assert storage.read("a-0.png") == PNG
    assert keys_in(s3_endpoint, bucket) == ["out/a-0.png"]
    head = s3_client(s3_endpoint, "us-east-1").head_object(Bucket=bucket, Key="out/a-0.png")
    assert head["ContentType"] == "image/png"
    assert storage.path("a-0.png") is None
    storage.delete("a-0.png")
    storage.delete("a-0.png")  # already gone is fine
    assert keys_in(s3_endpoint, bucket) == []
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/out/a-0.png"):
        storage.read("a-0.png")


def test_make_storage_picks_the_bucket(presigned: Settings, bucket: str) -> None:
    storage = make_storage(presigned)
    assert isinstance(storage, S3Storage)
    assert storage.bucket == bucket


def allow_public_reads(endpoint: str, bucket: str) -> None:
    """The bucket policy an operator sets for DARKROOM_OUTPUT_LINKS=public."""
    statement = {
        "Effect": "Allow",
        "Principal": "*",
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{bucket}/*",
    }
    policy = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
    s3_client(endpoint, "us-east-1").put_bucket_policy(Bucket=bucket, Policy=policy)


def test_public_links_download_the_png_from_a_public_bucket(s3_endpoint: str, bucket: str) -> None:
    own_url = S3Storage(bucket, prefix="p/", endpoint_url=s3_endpoint, region="us-east-1")
    cdn = f"{s3_endpoint}/{bucket}/"  # a CDN in front of the bucket's root, played by moto
    behind_cdn = S3Storage(bucket, prefix="p/", endpoint_url=s3_endpoint, public_url=cdn)
    own_url.save("a-0.png", PNG)

    assert download(own_url.public_link("a-0.png")).status_code == 403  # private: unsigned fails
    allow_public_reads(s3_endpoint, bucket)
    for storage in (own_url, behind_cdn):
        link = storage.public_link("a-0.png")
        assert link == f"{s3_endpoint}/{bucket}/p/a-0.png"
        response = download(link)
        assert response.status_code == 200
        assert response.content == PNG


def test_presigned_links_download_the_png_and_carry_the_ttl(
    presigned: Settings, s3_endpoint: str
) -> None:
    links = OutputLinks.from_settings(presigned)
    links.storage.save("a-0.png", PNG)

    link = links.link("a-0.png")

    assert link.startswith(f"{s3_endpoint}/{presigned.s3_bucket}/a-0.png?")
    signed, ttl_s = lifetime(link)
    assert ttl_s == presigned.presign_ttl_s == 3600
    assert abs((utcnow() - signed).total_seconds()) < 5
    response = download(link)  # the bucket is private: only a signed link gets the object
    assert response.status_code == 200
    assert response.content == PNG
    assert download(link.split("?")[0]).status_code == 403


def test_a_temporary_outputs_presigned_link_ends_with_it(presigned: Settings) -> None:
    links = OutputLinks.from_settings(presigned)

    soon = links.link("a-0.png", utcnow() + timedelta(seconds=30))
    later = links.link("a-0.png", utcnow() + timedelta(days=2))
    gone = links.link("a-0.png", utcnow() - timedelta(seconds=1))

    assert 28 <= lifetime(soon)[1] <= 30
    assert lifetime(later)[1] == 3600
    assert gone == f"{presigned.public_url}/outputs/a-0.png"  # the API answers 410 there


def test_links_are_signed_for_the_outside_endpoint(presigned: Settings) -> None:
    outside = presigned.model_copy(update={"s3_public_endpoint_url": "https://s3.example.com"})
    link = OutputLinks.from_settings(outside).link("a-0.png")
    assert link.startswith(f"https://s3.example.com/{presigned.s3_bucket}/a-0.png?X-Amz-")


def test_fetch_answers_presigned_links_and_base64_from_the_bucket(
    presigned: Settings, s3_endpoint: str, api_key: IssuedKey, db: Session
) -> None:
    storage = make_storage(presigned)
    with TestClient(create_app(presigned)) as client:
        linked = submit_pix2pix(client, api_key)
        inline = post(client, "/api/v1/enterprise/img2img", api_key, {**IMG2IMG, "base64": "yes"})
        inline_id = inline.json()["id"]
        finish_job(db, storage, linked)
        name = finish_job(db, storage, inline_id)

        answer = client.post(f"/api/v5/fetch/{linked}", json={"key": api_key.plaintext}).json()
        encoded = client.post(
            "/api/v1/enterprise/fetch", json={"key": api_key.plaintext, "request_id": inline_id}
        ).json()

    assert answer["status"] == "success"
    assert answer["output"].startswith(f"{s3_endpoint}/{presigned.s3_bucket}/")
    assert download(answer["output"]).content == PNG
    assert encoded["output"] == [base64.b64encode(PNG).decode()]
    assert download(encoded["proxy_links"][0]).content == PNG
    assert not (presigned.outputs_dir / name).exists()


def test_the_api_route_redirects_to_a_fresh_presigned_link(
    settings: Settings, s3_endpoint: str, bucket: str, api_key: IssuedKey, db: Session
) -> None:
    behind_api = s3_settings(settings, s3_endpoint, bucket)  # output_links=api, the default
    with TestClient(create_app(behind_api)) as client:
        job_id = submit_pix2pix(client, api_key)
        name = finish_job(db, make_storage(behind_api), job_id)
        answer = client.post(f"/api/v5/fetch/{job_id}", json={"key": api_key.plaintext}).json()
        redirect = client.get(f"/outputs/{name}", follow_redirects=False)

    assert answer["output"] == f"{settings.public_url}/outputs/{name}"
    assert redirect.status_code == 307
    target = redirect.headers["location"]
    assert lifetime(target)[1] == behind_api.presign_ttl_s
    response = download(target)
    assert response.content == PNG
    assert response.headers["content-type"] == "image/png"


def test_key_mode_checks_the_key_before_redirecting(
    settings: Settings, s3_endpoint: str, bucket: str, api_key: IssuedKey, db: Session
) -> None:
    private = s3_settings(settings, s3_endpoint, bucket, output_access="key")
    with TestClient(create_app(private)) as client:
        name = finish_job(db, make_storage(private), submit_pix2pix(client, api_key))
        anonymous = client.get(f"/outputs/{name}", follow_redirects=False)
        owner = client.get(
            f"/outputs/{name}",
            headers={"authorization": f"Bearer {api_key.plaintext}"},
            follow_redirects=False,
        )

    assert anonymous.status_code == 404
    assert owner.status_code == 307
    assert download(owner.headers["location"]).content == PNG


def test_the_sweeper_deletes_expired_objects_from_the_bucket(
    settings: Settings, s3_endpoint: str, bucket: str
) -> None:
    with fresh_database("darkroom_own") as url:  # the sweeper sweeps every row
        own = s3_settings(settings, s3_endpoint, bucket, database_url=url)
        storage = make_storage(own)
        with session_scope(url) as session:
            key = create_key(session, "sweep")
        with TestClient(create_app(own)) as client, session_scope(url) as db:
            expired = finish_job(
                db, storage, submit_pix2pix(client, key), expires_at=utcnow() - timedelta(1)
            )
            kept = finish_job(db, storage, submit_pix2pix(client, key))

        assert expire_temporary_outputs(own) == 1

    assert expired != kept
    assert keys_in(s3_endpoint, bucket) == [kept]


def test_the_listing_names_objects_under_the_prefix_with_size_and_time(
    s3_endpoint: str, bucket: str
) -> None:
    storage = S3Storage(bucket, prefix="out/", endpoint_url=s3_endpoint, region="us-east-1")
    other = S3Storage(bucket, prefix="elsewhere/", endpoint_url=s3_endpoint, region="us-east-1")
    before = utcnow() - timedelta(seconds=5)
    for name in ("upload-a.png", "upload-b.png", "job-0.png"):
        storage.save(name, PNG)
    other.save("upload-c.png", PNG)

    listed = sorted(storage.listing("upload-"), key=lambda file: file.name)
    assert [(file.name, file.size_bytes) for file in listed] == [
        ("upload-a.png", len(PNG)),
        ("upload-b.png", len(PNG)),
    ]
    assert all(before <= file.modified <= utcnow() + timedelta(seconds=5) for file in listed)


def test_uploads_without_rows_in_the_bucket_are_given_their_expiry(
    settings: Settings, s3_endpoint: str, bucket: str
) -> None:
    with fresh_database("darkroom_own") as url:
        own = s3_settings(settings, s3_endpoint, bucket, database_url=url)
        name = f"upload-{uuid.uuid4().hex}.png"
        make_storage(own).save(name, PNG)  # as base64_to_url stored them before rows existed
        assert adopt_unrecorded_uploads(own) == 0  # too young: its request may be committing
        assert adopt_unrecorded_uploads(own, min_age_s=0) == 1
        with session_scope(url) as session:
            row = uploads.get_upload(session, name)
            assert row is not None
            assert abs((row.expires_at - utcnow() - UPLOAD_LIFETIME).total_seconds()) < 60
            session.execute(  # its 24 hours pass
                update(Upload)
                .where(Upload.filename == name)
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )
        assert expire_uploads(own) == 1
    assert keys_in(s3_endpoint, bucket) == []


def test_the_sweeper_deletes_a_dead_runs_unrecorded_objects(
    settings: Settings, s3_endpoint: str, bucket: str
) -> None:
    with fresh_database("darkroom_own") as url:
        own = s3_settings(settings, s3_endpoint, bucket, database_url=url)
        storage = make_storage(own)
        with session_scope(url) as session:
            key_id = create_key(session, "dead-run").row.id
        job_id = queued_job(own, key_id)
        with session_scope(url) as session:  # a worker claims it, writes, and dies
            jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)
            job = session.get_one(Job, job_id)
            job.lease_until = utcnow() - timedelta(seconds=1)
            dead = run_output_filename(job, 0, "1-0badc0de")
            later = run_output_filename(job, 0, "2-5eedf00d")
        storage.save(dead, PNG)
        storage.save(later, PNG)

        assert sweep_once(own, make_celery(own)).requeued_jobs == 1
    assert keys_in(s3_endpoint, bucket) == [later]


@pytest.mark.slow
def test_a_real_job_stores_its_output_in_the_bucket_end_to_end(
    tmp_path: Path,
    own_pg_url: str,
    redis_url: str,
    s3_endpoint: str,
    bucket: str,
    image_server: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    env = {
        **AWS_ENV,
        **production_env(tmp_path / "data", own_pg_url, redis_url, "s3"),
        "DARKROOM_STORAGE": "s3",
        "DARKROOM_S3_BUCKET": bucket,
        "DARKROOM_S3_ENDPOINT_URL": s3_endpoint,
        "DARKROOM_S3_PREFIX": "outputs/",
        "DARKROOM_OUTPUT_LINKS": "presigned",
    }
    with darkroom_up(env, tmp_path) as system:
        key = system.create_key()
        body = {**PIX2PIX, "init_image": image_server.url("/red.png"), "steps": 3}
        answer = system.post(
            "/api/v5/pix2pix", {**body, "key": key["key"], "webhook": receiver.url}
        )
        done = system.wait_for(answer["fetch_result"].removeprefix(system.base_url), key["key"])
        assert done["status"] == "success", (done, system.log_tail())
        hook = first_webhook(receiver)

    # The object is named after the run that stored it: `{file_prefix}-0-{attempt}-{random}`.
    [object_key] = keys_in(s3_endpoint, bucket)
    assert object_key.startswith(f"outputs/{done['meta']['file_prefix']}-0-1-")
    name = object_key.removeprefix("outputs/")
    assert not (tmp_path / "data" / "outputs" / name).exists()
    for link in (done["output"], str(hook["output"])):
        assert link.startswith(f"{s3_endpoint}/{bucket}/{object_key}?X-Amz-")
        with Image.open(io.BytesIO(download(link).content)) as image:
            assert (image.format, image.size) == ("PNG", (64, 64))


def first_webhook(receiver: WebhookReceiver, timeout: float = 60) -> dict[str, object]:
    """The first webhook payload that arrives (the dispatcher sends it after the job ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        received = receiver.snapshot()
        if received:
            payload: dict[str, object] = json.loads(received[0].body)
            return payload
        time.sleep(0.2)
    raise AssertionError("no webhook arrived")
