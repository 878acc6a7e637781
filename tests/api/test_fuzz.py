"""Fuzzing the HTTP API: schemathesis over the OpenAPI spec of a real `darkroom up`.

Every operation of /openapi.json gets schema-conforming and schema-violating requests (half
of the submit bodies are a reference body with some fields fuzzed, so that they reach past
validation into storage and the queue). Whatever arrives, the service must answer without a
5xx, in the error shape `{"status": "error", "message": str | {field: [str]}}` when it
refuses, as JSON unless it serves a PNG; and afterwards it must still run a job.

No fuzzed URL leaves the machine: every http(s) URL in a body is pointed at 127.0.0.1:9
before it is sent, and the system runs with an empty DARKROOM_URL_ALLOWLIST, so its SSRF guard
refuses those too: the worker and the webhook dispatcher never connect anywhere.

The second half holds deterministic reproducers of the 5xx bugs this fuzzing found (since
fixed), run against the production profile (Postgres) in-process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.core.result import Ok

from api.app import create_app
from darkroom.settings import Settings
from db.repositories.keys import IssuedKey
from tests.api.test_submit import IMG2IMG, MIXER_V5, MIXER_V6, PIX2PIX
from tests.support.system import RunningSystem, darkroom_up

#: Cases per operation and generation mode (11 operations x 2 modes).
EXAMPLES = 80
LOOPBACK = "127.0.0.1:9"
REFERENCE_BODIES: dict[str, dict[str, Any]] = {
    "/api/v5/img_mixer": MIXER_V5,
    "/api/v6/image_editing/img_mixer": MIXER_V6,
    "/api/v5/pix2pix": PIX2PIX,
    "/api/v1/enterprise/img2img": IMG2IMG,
}
JOB_ID_PARAMS = ("job_id", "request_id", "id")
MAX_DB_INTEGER = 2**31 - 1  # Postgres `integer`; SQLite's own limit is 2**63 - 1
AnyCase = Case[Any]


def loopback_urls(value: Any) -> Any:
    """`value` with every http(s) URL in it, comma-separated ones too, aimed at 127.0.0.1:9."""
    if isinstance(value, dict):
        return {key: loopback_urls(item) for key, item in value.items()}
    if isinstance(value, list):
        return [loopback_urls(item) for item in value]
    if not isinstance(value, str) or "//" not in value:
        return value
    text = ",".join(_loopback_url(part) for part in value.split(","))
    # Read as one URL (webhook, img2img's init_image) or as a list, no host but ours remains.
    if all(_host(part) in (None, "127.0.0.1") for part in [text, *text.split(",")]):
        return text
    return f"http://{LOOPBACK}/x.png"


def _host(text: str) -> str | None:
    try:
        return urlsplit(text.strip()).hostname
    except ValueError:
        return None


def _loopback_url(text: str) -> str:
    try:
        parts = urlsplit(text.strip())
    except ValueError:
        return text  # not a URL the API accepts either
    if parts.scheme in ("http", "https") or parts.netloc:
        return parts._replace(netloc=LOOPBACK).geturl()
    return text


@dataclass
class Failure:
    """One request whose answer broke a rule."""

    method: str
    path: str
    body: str
    status: int
    answer: str
    problems: list[str]

    def __str__(self) -> str:
        return (
            f"{self.method} {self.path} body={self.body[:300]}\n"
            f"  -> {self.status} {self.answer[:300]}\n  " + "; ".join(self.problems)
        )


def response_problems(status: int, content_type: str, content: bytes) -> list[str]:
    """What is wrong with one answer: 5xx, a non-JSON answer, or an error not in the shape."""
    problems = []
    if status >= 500:
        problems.append(f"server error {status}")
    if content_type.startswith("image/png"):
        return problems if status == 200 else [*problems, "PNG with a non-200 status"]
    if content_type.startswith("text/event-stream"):
        # A job's live events (GET /api/v1/jobs/{id}/events): a stream, refusals stay JSON.
        return problems if status == 200 else [*problems, "event stream with a non-200 status"]
    if not content_type.startswith("application/json"):
        return [*problems, f"content-type {content_type!r} is not JSON"]
    try:
        answer = json.loads(content)
    except ValueError:
        return [*problems, "body is not JSON"]
    if status >= 400 or (isinstance(answer, dict) and answer.get("status") == "error"):
        problems += error_shape_problems(answer)
    return problems


def error_shape_problems(answer: Any) -> list[str]:
    """{"status": "error", "message": str | {field: [str, ...]}}, plus retry_after only."""
    if not isinstance(answer, dict):
        return ["error answer is not an object"]
    problems = []
    if answer.get("status") != "error":
        problems.append("error answer without status 'error'")
    extra = set(answer) - {"status", "message", "retry_after"}
    if extra:
        problems.append(f"unexpected keys {sorted(extra)}")
    if "retry_after" in answer and type(answer["retry_after"]) not in (int, float):
        problems.append("retry_after is not a number")
    message = answer.get("message")
    if isinstance(message, dict):
        if not message or not all(
            isinstance(field, str)
            and isinstance(sentences, list)
            and sentences
            and all(isinstance(sentence, str) for sentence in sentences)
            for field, sentences in message.items()
        ):
            problems.append("message object is not {field: [str, ...]}")
    elif not isinstance(message, str) or not message:
        problems.append("message is neither a sentence nor {field: [str, ...]}")
    return problems


@pytest.fixture
def fuzzed_system(tmp_path: Path) -> Iterator[RunningSystem]:
    """`darkroom up`, embedded profile, empty allowlist, per-key limits out of the way."""
    env = {
        "DARKROOM_DATA_DIR": str(tmp_path / "data"),
        "DARKROOM_DATABASE_URL": "",
        "DARKROOM_BROKER_URL": "",
        "DARKROOM_MODEL_PRESET": "tiny",
        "DARKROOM_URL_ALLOWLIST": "",
        "DARKROOM_MAX_JOBS_PER_MINUTE_PER_KEY": "100000",
        "DARKROOM_MAX_ACTIVE_JOBS_PER_KEY": "100000",
        "DARKROOM_WEBHOOK_SCHEDULE_S": "0",
    }
    with darkroom_up(env, tmp_path) as system:
        yield system


@pytest.mark.slow
def test_fuzzed_requests_get_no_5xx_and_the_error_shape(fuzzed_system: RunningSystem) -> None:
    system = fuzzed_system
    key = system.create_key()["key"]
    schema = schemathesis.openapi.from_url(system.base_url + "/openapi.json", timeout=30)
    failures: list[Failure] = []
    sent: dict[int, int] = {}

    def send(case: AnyCase, data: st.DataObject) -> None:
        headers: dict[str, str] = {}
        if isinstance(case.body, dict):
            body = dict(case.body)
            reference = REFERENCE_BODIES.get(case.path)
            if reference is not None and body and data.draw(st.booleans(), label="anchor"):
                fuzzed = data.draw(st.sets(st.sampled_from(sorted(body))), label="kept")
                body = {**reference, **{name: body[name] for name in fuzzed}}
            if data.draw(st.booleans(), label="key in body"):
                body["key"] = key
            else:
                headers["Authorization"] = f"Bearer {key}"
            case.body = loopback_urls(body)
        else:
            headers["Authorization"] = f"Bearer {key}"
        response = case.call(base_url=system.base_url, headers=headers, timeout=60)
        sent[response.status_code] = sent.get(response.status_code, 0) + 1
        content_type = ",".join(
            value
            for name, values in response.headers.items()
            if name.lower() == "content-type"
            for value in values
        )
        problems = response_problems(response.status_code, content_type, response.content)
        if not problems:
            return
        request_body = response.request.body or b""
        failures.append(
            Failure(
                method=case.method,
                path=case.formatted_path,
                body=request_body.decode(errors="replace")
                if isinstance(request_body, bytes)
                else str(request_body),
                status=response.status_code,
                answer=response.content.decode(errors="replace"),
                problems=problems,
            )
        )

    operations = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise AssertionError(f"/openapi.json is not a valid schema: {result.err()}")
        operations.append(result.ok())
    assert len(operations) >= 11, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
            def fuzz(case: AnyCase, data: st.DataObject) -> None:
                send(case, data)

            try:
                fuzz()
            except hypothesis.errors.Unsatisfiable:
                # Nothing can violate the schema of an operation without inputs (GET /health).
                assert mode is GenerationMode.NEGATIVE, operation.label

    assert system.process.poll() is None, system.log_tail()
    assert not failures, f"{len(failures)} bad answers (statuses sent: {sent}):\n" + "\n".join(
        str(failure) for failure in failures[:40]
    )
    assert httpx.get(system.base_url + "/health", timeout=10).status_code == 200
    assert_worker_still_runs_a_job(system, key)
    print(f"statuses: {sorted(sent.items())}")


def assert_worker_still_runs_a_job(system: RunningSystem, key: str) -> None:
    """A valid pix2pix job reaches a terminal state (it fails: its image URL is refused)."""
    answer = system.post("/api/v5/pix2pix", {**PIX2PIX, "key": key, "steps": 1})
    assert answer["status"] == "processing", answer
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        done = system.post(f"/api/v5/fetch/{answer['id']}", {"key": key})
        if done["status"] != "processing":
            assert done["status"] in ("success", "failed"), done
            return
        time.sleep(0.5)
    raise AssertionError(f"job {answer['id']} still processing\n{system.log_tail()}")


# --- deterministic reproducers (production profile, in-process) ------------------------------


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


URL = "http://127.0.0.1:9/a.png"
HOSTILE_BODIES = [
    pytest.param(
        b'{"prompt": "x", "init_image": "' + URL.encode() + b'", "seed": 1' + b"0" * 400 + b"}",
        id="integer beyond float range",
    ),
    pytest.param(
        b'{"prompt": "x", "steps": ' + b"1" * 5000 + b"}",
        id="integer of 5000 digits",
    ),
    pytest.param(
        b"[" * 100_000 + b"]" * 100_000,
        id="deeply nested array",
    ),
    pytest.param(b'{"prompt": NaN, "key": "x"}', id="NaN literal"),
    pytest.param(b'{"prompt": "\xff"}', id="invalid UTF-8"),
    pytest.param(b"", id="empty body"),
    pytest.param(b"null", id="null body"),
]


@pytest.mark.parametrize("raw", HOSTILE_BODIES)
@pytest.mark.parametrize("path", sorted(REFERENCE_BODIES))
def test_hostile_body_gets_a_4xx_in_the_error_shape(
    client: TestClient, api_key: IssuedKey, path: str, raw: bytes
) -> None:
    response = client.post(
        path,
        content=raw,
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {api_key.plaintext}",
        },
    )
    assert 400 <= response.status_code < 500, response.text
    assert not error_shape_problems(response.json()), response.text


NUL_OR_LONG = [
    pytest.param(
        {"track_id": "t" * 201},
        id="track_id of 201 characters",
    ),
    pytest.param(
        {"track_id": 10**300},
        id="integer track_id of 301 digits",
    ),
    pytest.param(
        {"track_id": "a\x00b"},
        id="NUL in track_id",
    ),
    pytest.param(
        {"webhook": "http://127.0.0.1:9/\x00"},
        id="NUL in webhook",
    ),
    pytest.param({"prompt": "a\x00b"}, id="NUL in prompt"),
    pytest.param({"negative_prompt": "\x00"}, id="NUL in negative_prompt"),
]


@pytest.mark.parametrize("change", NUL_OR_LONG)
def test_text_the_database_cannot_store_is_not_a_5xx(
    client: TestClient, api_key: IssuedKey, change: dict[str, Any]
) -> None:
    response = client.post("/api/v5/pix2pix", json={**PIX2PIX, **change, "key": api_key.plaintext})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert not error_shape_problems(response.json()), response.text


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(
            ("/api/v5/fetch/" + "9" * 30, {}),
            id="path",
        ),
        pytest.param(
            ("/api/v1/enterprise/fetch", {"request_id": "9" * 30}),
            id="request_id",
        ),
        pytest.param(
            ("/api/v5/fetch/" + str(2**31), {}),
            id="path just past int32",
        ),
        pytest.param(("/api/v5/fetch/-1", {}), id="negative"),
    ],
)
def test_fetch_with_a_huge_id_is_a_404(
    client: TestClient, api_key: IssuedKey, request_: tuple[str, dict[str, Any]]
) -> None:
    path, body = request_
    response = client.post(path, json={**body, "key": api_key.plaintext})
    assert response.status_code == 404, response.text
    assert not error_shape_problems(response.json()), response.text
