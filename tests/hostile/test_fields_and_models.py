"""Hostile clients: oversized fields, client-chosen Hub ids, and the lesser security items.

Each test is the defence of one threat in docs/SECURITY.md ("Request fields, model ids and
the operator's browser"): field caps at the API, the prompt's token cap in the worker, model ids
resolved against what the operator installed or listed, the dashboard's image policy, the
access log's key redaction, an expired base64 output's fetch, and the SSRF guard's special
IPv6 ranges (checked on address literals: nothing is ever connected to).
"""

from __future__ import annotations

import base64
import logging
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update
from starlette.datastructures import QueryParams

from api.app import create_app
from darkroom import model_ids
from darkroom.identities import Operation
from darkroom.jobspec import JobSpec
from darkroom.limits import (
    CHUNK_TOKENS,
    MAX_EMBEDDINGS,
    MAX_ID_CHARS,
    MAX_IMAGE_URL_CHARS,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_WINDOWS,
    MAX_WEBHOOK_URL_CHARS,
)
from darkroom.logs import RedactKeysInAccessLog
from darkroom.model_ids import ModelSpec, PipelineSource
from darkroom.queue import make_celery
from darkroom.settings import Settings, get_settings
from darkroom.urlguard import UnsafeURLError, check_url
from db.models import Job, JobOutput, JobState, utcnow
from db.repositories import jobs
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from tests.api.test_submit import IMG2IMG, MIXER_V5, PIX2PIX, post
from tests.support.rows import queued_job
from tests.support.servers import ImageServer, png
from tests.worker.conftest import model_cache, tiny_settings  # noqa: F401 - fixtures
from worker.jobs import WorkerRuntime, run_job
from worker.models.cache import ModelCache
from worker.models.weights import UnknownModelError, resolve_lora, resolve_model
from worker.pipelines.generate import generate
from worker.pipelines.prompts import encode_prompts
from worker.pipelines.request import GenerationRequest
from worker.sweeper import expire_temporary_outputs

IMG2IMG_PATH = "/api/v1/enterprise/img2img"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def refusal(response: Any) -> dict[str, list[str]]:
    """The field messages of a 422 in the error shape."""
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["status"] == "error"
    messages: dict[str, list[str]] = answer["message"]
    return messages


# --- item 8: every field has a cap -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [("/api/v5/pix2pix", PIX2PIX), ("/api/v5/img_mixer", MIXER_V5), (IMG2IMG_PATH, IMG2IMG)],
)
def test_prompts_longer_than_the_cap_are_refused_naming_the_field(
    client: TestClient, api_key: IssuedKey, path: str, body: dict[str, Any]
) -> None:
    at_cap = post(client, path, api_key, {**body, "prompt": "p" * MAX_PROMPT_CHARS})
    assert at_cap.status_code == 200, at_cap.text

    too_long = post(client, path, api_key, {**body, "prompt": "p" * (MAX_PROMPT_CHARS + 1)})
    assert refusal(too_long) == {
        "prompt": [f"prompt must be at most {MAX_PROMPT_CHARS} characters"]
    }
    negative = post(
        client, path, api_key, {**body, "negative_prompt": "n" * (MAX_PROMPT_CHARS + 1)}
    )
    assert refusal(negative) == {
        "negative_prompt": [f"negative_prompt must be at most {MAX_PROMPT_CHARS} characters"]
    }


def test_a_three_megabyte_prompt_is_refused_at_once(client: TestClient, api_key: IssuedKey) -> None:
    started = time.perf_counter()
    response = post(client, "/api/v5/pix2pix", api_key, {**PIX2PIX, "prompt": "x" * 3_000_000})
    elapsed = time.perf_counter() - started
    assert list(refusal(response)) == ["prompt"]
    assert len(response.content) < 200  # the refusal does not echo the prompt back
    assert elapsed < 5  # measured about 0.1 s; before the cap it was accepted and stored


def test_loras_and_embeddings_are_capped(client: TestClient, api_key: IssuedKey) -> None:
    loras = [f"lora-{i}" for i in range(MAX_LORAS + 1)]
    embeddings = [f"emb-{i}" for i in range(MAX_EMBEDDINGS + 1)]

    fine = post(
        client,
        IMG2IMG_PATH,
        api_key,
        {**IMG2IMG, "lora_model": loras[:-1], "embeddings_model": ",".join(embeddings[:-1])},
    )
    six = post(client, IMG2IMG_PATH, api_key, {**IMG2IMG, "lora_model": ",".join(loras)})
    many = post(client, IMG2IMG_PATH, api_key, {**IMG2IMG, "lora_model": ["l"] * 2000})
    eleven = post(client, IMG2IMG_PATH, api_key, {**IMG2IMG, "embeddings_model": embeddings})
    strengths = post(
        client, IMG2IMG_PATH, api_key, {**IMG2IMG, "lora_model": "a", "lora_strength": [0.5] * 6}
    )

    assert fine.status_code == 200, fine.text
    assert refusal(six) == {"lora_model": [f"lora_model must name at most {MAX_LORAS} LoRAs"]}
    assert refusal(many) == refusal(six)
    assert refusal(eleven) == {
        "embeddings_model": [f"embeddings_model must name at most {MAX_EMBEDDINGS} embeddings"]
    }
    assert list(refusal(strengths)) == ["lora_strength"]


@pytest.mark.parametrize(
    ("path", "change", "field"),
    [
        (IMG2IMG_PATH, {"model_id": "m" * (MAX_ID_CHARS + 1)}, "model_id"),
        (IMG2IMG_PATH, {"vae": "v" * (MAX_ID_CHARS + 1)}, "vae"),
        (IMG2IMG_PATH, {"scheduler": "s" * (MAX_ID_CHARS + 1)}, "scheduler"),
        (IMG2IMG_PATH, {"lora_model": "l" * (MAX_ID_CHARS + 1)}, "lora_model"),
        (IMG2IMG_PATH, {"embeddings_model": "e" * (MAX_ID_CHARS + 1)}, "embeddings_model"),
        ("/api/v5/pix2pix", {"track_id": "t" * (MAX_ID_CHARS + 1)}, "track_id"),
        (
            "/api/v5/pix2pix",
            {"webhook": "http://127.0.0.1:9/" + "w" * MAX_WEBHOOK_URL_CHARS},
            "webhook",
        ),
        (
            "/api/v5/pix2pix",
            {"init_image": "http://127.0.0.1:9/" + "i" * MAX_IMAGE_URL_CHARS},
            "init_image",
        ),
        (
            IMG2IMG_PATH,
            {"init_image": "http://127.0.0.1:9/" + "i" * MAX_IMAGE_URL_CHARS},
            "init_image",
        ),
        (
            "/api/v5/img_mixer",
            {"init_image": ["http://127.0.0.1:9/a.png"] * 5000, "init_image_weights": None},
            "init_image",
        ),
    ],
)
def test_ids_urls_and_lists_past_their_cap_are_refused(
    client: TestClient, api_key: IssuedKey, path: str, change: dict[str, Any], field: str
) -> None:
    body = {**{"/api/v5/pix2pix": PIX2PIX, "/api/v5/img_mixer": MIXER_V5}.get(path, IMG2IMG)}
    messages = refusal(post(client, path, api_key, {**body, **change}))
    assert list(messages) == [field]
    assert "at most" in messages[field][0]


def test_the_answer_stays_small_with_every_field_at_its_cap(
    client: TestClient, api_key: IssuedKey
) -> None:
    url = "http://127.0.0.1:9/" + "u" * (MAX_IMAGE_URL_CHARS - 20)
    longest = {
        "prompt": "p" * MAX_PROMPT_CHARS,
        "negative_prompt": "n" * MAX_PROMPT_CHARS,
        "track_id": "t" * MAX_ID_CHARS,
        "webhook": "http://127.0.0.1:9/" + "w" * (MAX_WEBHOOK_URL_CHARS - 20),
    }
    ids = ["i" * (MAX_ID_CHARS - 3) + f"{n:03}" for n in range(MAX_EMBEDDINGS)]
    img2img = {
        **IMG2IMG,
        **longest,
        "init_image": url,
        "model_id": ids[0],
        "vae": ids[1],
        "lora_model": ids[:MAX_LORAS],
        "embeddings_model": ids,
    }
    mixer = {**MIXER_V5, **longest, "init_image": [url] * 4, "init_image_weights": [1] * 4}
    for path, body in ((IMG2IMG_PATH, img2img), ("/api/v5/img_mixer", mixer)):
        answer = post(client, path, api_key, body)
        assert answer.status_code == 200, answer.text
        # meta echoes the request: bounded by the caps (a 14 MiB prompt used to make 15.7 MB).
        assert len(answer.content) < 48_000


def test_prompts_past_the_token_windows_fail_in_the_worker(
    tiny_settings: Settings,  # noqa: F811 - fixture
    model_cache: ModelCache,  # noqa: F811 - fixture
) -> None:
    # The tiny tokenizer is character-level: "a " is one token, so N words are N tokens.
    pipe = model_cache.get(resolve_model(Operation.IMG2IMG, None, tiny_settings))[0].pipelines[0]
    most = MAX_PROMPT_WINDOWS * CHUNK_TOKENS
    embeds, negative = encode_prompts(pipe, "a " * most, "", None)
    assert embeds.shape[1] == negative.shape[1] == 77 * MAX_PROMPT_WINDOWS

    with pytest.raises(ValueError, match=f"The prompt is too long: {most + 1} tokens"):
        encode_prompts(pipe, "a " * (most + 1), "", None)
    with pytest.raises(ValueError, match="The negative prompt is too long"):
        encode_prompts(pipe, "a house", "b " * (most + 1), None)


def test_a_job_whose_prompt_has_too_many_windows_fails_with_a_clear_message(
    settings: Settings,
    tiny_settings: Settings,  # noqa: F811 - fixture
    model_cache: ModelCache,  # noqa: F811 - fixture
    api_key: IssuedKey,
) -> None:
    shared = settings.model_copy(update={"data_dir": tiny_settings.data_dir})
    runtime = WorkerRuntime(settings=shared, broker=make_celery(shared), cache=model_cache)
    encoded = base64.b64encode(png(64, 64, (9, 9, 9))).decode()
    inline = f"data:application/octet-stream;base64,{encoded}"
    most = MAX_PROMPT_WINDOWS * CHUNK_TOKENS

    def job(prompt: str) -> int:
        spec = JobSpec(
            operation=Operation.IMG2IMG,
            prompt=prompt,
            init_images=[inline],
            steps=2,
            strength=0.5,
            guidance_scale=7.0,
            seed=1,
            width=64,
            height=64,
        )
        return queued_job(shared, api_key.row.id, spec=spec)

    fits, too_long = job("a " * most), job("a " * (most + 1))
    for job_id in (fits, too_long):
        run_job(job_id, runtime)

    with session_scope(shared.resolved_database_url) as session:
        ok, failed = session.get(Job, fits), session.get(Job, too_long)
        assert ok is not None
        assert failed is not None
        assert ok.state == JobState.SUCCESS, ok.error
        assert failed.state == JobState.FAILED
        assert failed.error == (
            f"The prompt is too long: {most + 1} tokens, at most {most}"
            f" ({MAX_PROMPT_WINDOWS} windows of 77 tokens, {CHUNK_TOKENS} of them text) are"
            " accepted."
        )


# --- item 10: model ids resolve against what the operator installed --------------------------


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A models folder with one pipeline, one LoRA, one VAE and one embedding."""
    models = tmp_path / "models"
    (models / "my-sd").mkdir(parents=True)
    # The family is read from model_index.json (an index naming no known pipeline is refused).
    (models / "my-sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (models / "vae" / "my-vae").mkdir(parents=True)
    (models / "loras").mkdir()
    (models / "loras" / "detail.safetensors").touch()
    (models / "embeddings").mkdir()
    (models / "embeddings" / "easyneg.pt").touch()
    return models


@pytest.fixture
def real(settings: Settings, installed: Path) -> Settings:
    """Production-like settings: models from `installed`, one Hub id listed by the operator."""
    return settings.model_copy(
        update={"model_preset": "", "models_dir": installed, "hub_models": ["acme/listed-sd"]}
    )


def test_unlisted_hub_ids_are_refused_at_submit_in_each_field(
    real: Settings, api_key: IssuedKey
) -> None:
    unlisted = {
        "model_id": "stranger/huge-model",
        "lora_model": "stranger/lora",
        "vae": "stranger/vae",
        "embeddings_model": "stranger/embedding",
    }
    with TestClient(create_app(real)) as client:
        refused = post(client, IMG2IMG_PATH, api_key, {**IMG2IMG, **unlisted})
        installed_ids = {
            "model_id": "my-sd",
            "lora_model": "detail",
            "vae": "my-vae",
            "embeddings_model": "easyneg",
        }
        accepted = post(client, IMG2IMG_PATH, api_key, {**IMG2IMG, **installed_ids})
        listed = post(client, IMG2IMG_PATH, api_key, {**IMG2IMG, "model_id": "acme/listed-sd"})

    messages = refusal(refused)
    assert set(messages) == set(unlisted)
    assert "Unknown model id 'stranger/huge-model'. Installed: my-sd;" in messages["model_id"][0]
    assert "Installed: detail;" in messages["lora_model"][0]
    assert "Installed: my-vae;" in messages["vae"][0]
    assert "Installed: easyneg;" in messages["embeddings_model"][0]
    assert all(
        "DARKROOM_HUB_MODELS" in m[0] and "acme/listed-sd" in m[0] for m in messages.values()
    )
    assert accepted.status_code == 200, accepted.text
    assert listed.status_code == 200, listed.text


def test_the_operators_list_and_the_defaults_are_the_only_downloads(real: Settings) -> None:
    assert model_ids.resolve_vae("acme/listed-sd", real) == "acme/listed-sd"
    assert model_ids.may_download("acme/listed-sd", real)
    default = model_ids.default_model_id(Operation.IMG2IMG)
    assert model_ids.resolve_model(Operation.IMG2IMG, default, real).sources[0].location == default
    assert model_ids.may_download(default, real)
    assert model_ids.may_download(model_ids.SAFETY_CHECKER_REPO, real)
    assert not model_ids.may_download("stranger/huge-model", real)
    assert not model_ids.may_download(str(real.models_dir), real)  # a path is never downloaded
    with pytest.raises(UnknownModelError, match="at most 200 characters"):
        model_ids.resolve_lora("x" * 201, real)


def test_the_worker_refuses_unlisted_ids_before_loading_anything(real: Settings) -> None:
    with pytest.raises(UnknownModelError, match="stranger/lora"):
        resolve_lora("stranger/lora", real)
    cache = ModelCache(device="cpu")
    request = GenerationRequest(
        operation=Operation.IMG2IMG,
        model_id="stranger/huge-model",
        prompt="a house",
        negative_prompt="",
        images=(Image.new("RGB", (64, 64)),),
        image_weights=(),
        width=64,
        height=64,
        steps=2,
        guidance_scale=7.0,
        seeds=(1,),
    )
    with pytest.raises(UnknownModelError, match="stranger/huge-model"):
        generate(request, cache, real)
    assert len(cache) == 0  # nothing was loaded, or tried


class _NetworkAttempts:
    """Records every host name resolution and connection the process attempts, and refuses
    them all before any packet is sent: the Hub is never reached, whatever is asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hosts: list[str] = []
        real_connect = socket.socket.connect

        def resolve(host: Any, *_args: Any, **_kwargs: Any) -> Any:
            self.hosts.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, "refused by the test")

        def connect(sock: socket.socket, address: Any) -> None:
            if sock.family == socket.AF_UNIX:
                real_connect(sock, address)
                return
            self.hosts.append(str(address))
            raise ConnectionRefusedError("refused by the test")

        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        monkeypatch.setattr(socket.socket, "connect", connect)


def _load(cache: ModelCache, repo: str) -> None:
    source = PipelineSource("StableDiffusionImg2ImgPipeline", repo)
    with pytest.raises(Exception):  # noqa: B017, PT011 - nothing to load either way
        cache.get(ModelSpec(Operation.IMG2IMG, (source,)))


def test_the_model_cache_loads_unlisted_hub_ids_from_local_files_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The cache asks the process's settings (a worker's) which Hub ids it may download.
    monkeypatch.setenv("DARKROOM_HUB_MODELS", "acme/listed-sd")
    get_settings.cache_clear()
    try:
        attempts = _NetworkAttempts(monkeypatch)
        cache = ModelCache(device="cpu")
        _load(cache, "acme/listed-sd")
        assert attempts.hosts, "a listed id is downloaded (here: refused by the test)"
        # The listed load also let huggingface_hub try its once-per-process fetch of an "agent
        # harnesses" list, which it makes whatever local_files_only says; from here on, any
        # attempt would be the unlisted model's.
        attempts.hosts.clear()
        _load(cache, "stranger/huge-model")
        assert attempts.hosts == []  # local files only: not even a name was resolved
    finally:
        get_settings.cache_clear()


# --- item 11: the operator's browser, the access log, expired outputs, the SSRF guard --------

ADMIN_TOKEN = "7c1e9a3f5b2d48e6a0f4c8b1d3e5f709"


def test_the_dashboard_loads_images_only_from_its_own_origin(settings: Settings) -> None:
    board = settings.model_copy(update={"admin_token": ADMIN_TOKEN})
    with TestClient(create_app(board)) as client:
        page = client.get("/dashboard")
        script = client.get("/dashboard/dashboard.js").text
    policy = dict(
        part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";")
    )
    assert policy["img-src"] == "'self' blob:"  # no http: or https: sources
    assert policy["default-src"] == "'none'"
    # Inputs are rendered as text: the only `.src =` is the output's blob URL.
    assert script.count(".src =") == 1
    assert "image.src = URL.createObjectURL(blob)" in script
    assert "input.url" in script
    assert "image.src = input.url" not in script


@pytest.mark.parametrize("spelling", ["key", "%6Bey", "KEY", "k%65y", "%256Bey", "Key"])
def test_every_spelling_of_the_key_parameter_is_redacted(spelling: str) -> None:
    path = f"/outputs/ab-0.png?size=1&{spelling}=dk_secret123&x=2"
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", path, "1.1", 200),
        None,
    )
    assert RedactKeysInAccessLog().filter(record)
    line = record.getMessage()
    assert "dk_secret123" not in line
    assert f"?size=1&{spelling}=[redacted]&x=2" in line


def test_percent_encoded_key_names_do_authenticate() -> None:
    """Why the redaction decodes names: the server reads `%6Bey` and `k%65y` as `key`."""
    assert QueryParams("%6Bey=dk_1")["key"] == "dk_1"
    assert QueryParams("k%65y=dk_2")["key"] == "dk_2"


def test_an_expired_temporary_base64_output_fetches_cleanly(
    settings: Settings, own_pg_url: str, image_server: ImageServer
) -> None:
    own = settings.model_copy(update={"database_url": own_pg_url})
    with session_scope(own_pg_url) as session:
        key = create_key(session, "expiry")
    body = {**IMG2IMG, "init_image": image_server.url("/red.png"), "base64": "yes", "temp": "yes"}
    with TestClient(create_app(own)) as client:
        job_id = post(client, IMG2IMG_PATH, key, body).json()["id"]
        name = _finish(own, job_id, expires_at=utcnow() + timedelta(hours=1))
        fetch = f"/api/v1/enterprise/fetch/{job_id}"

        fresh = client.post(fetch, json={"key": key.plaintext})
        _expire(own, job_id)
        expired = client.post(fetch, json={"key": key.plaintext})
        assert expire_temporary_outputs(own) == 1
        assert not (own.outputs_dir / name).exists()
        swept = client.post(fetch, json={"key": key.plaintext})

    assert fresh.json()["output"] == [base64.b64encode(png(8, 8, (1, 2, 3))).decode()]
    for answer in (expired, swept):
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert (data["status"], data["output"]) == ("success", [])
        assert "expired" in data["message"]
        assert data["proxy_links"]  # the link stays, and answers 410 Gone


def _finish(settings: Settings, job_id: int, expires_at: Any) -> str:
    """Play the worker's part: claim the job, write its PNG, record it as a temporary output."""
    with session_scope(settings.resolved_database_url) as session:
        outcome, job = jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)
        assert outcome == jobs.ClaimOutcome.CLAIMED
        assert job is not None
        name = f"{job.file_prefix}-0.png"
        settings.outputs_dir.mkdir(parents=True, exist_ok=True)
        (settings.outputs_dir / name).write_bytes(png(8, 8, (1, 2, 3)))
        record = jobs.OutputRecord(0, name, 8, 8, 7, expires_at=expires_at)
        assert jobs.complete_job(
            session, job_id, outputs=[record], meta=job.meta, generation_time=0.5
        )
    return name


def _expire(settings: Settings, job_id: int) -> None:
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(JobOutput)
            .where(JobOutput.job_id == job_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


@pytest.mark.parametrize(
    "address",
    [
        "fec0::1",  # site-local (deprecated, still routed inside some sites)
        "fef0::abcd",
        "2002:7f00:1::",  # 6to4 carrying 127.0.0.1
        "2002:a00:1::1",  # 6to4 carrying 10.0.0.1
        "2002:a9fe:a9fe::",  # 6to4 carrying 169.254.169.254
        "3fff::1",  # documentation (RFC 9637)
        "64:ff9b::a00:1",  # NAT64 carrying 10.0.0.1
        "2001::1",  # Teredo
        "2001:db8::1",  # documentation
    ],
)
def test_special_ipv6_ranges_are_refused(address: str) -> None:
    # A literal address resolves locally: nothing is sent anywhere.
    with pytest.raises(UnsafeURLError, match="non-public address"):
        check_url(f"http://[{address}]/hook", [])


def test_6to4_of_a_public_address_stays_allowed() -> None:
    assert check_url("http://[2002:5db8:d822::1]/", []).port == 80  # 93.184.216.34


def test_the_caps_are_documented() -> None:
    parameters = (ROOT / "docs" / "PARAMETERS.md").read_text()
    security = (ROOT / "docs" / "SECURITY.md").read_text()
    for number in (MAX_PROMPT_CHARS, MAX_LORAS, MAX_EMBEDDINGS, MAX_ID_CHARS):
        assert f"{number:,}" in parameters or str(number) in parameters
    assert f"{MAX_PROMPT_WINDOWS} windows of 77 tokens" in parameters
    assert "DARKROOM_HUB_MODELS" in security
