"""`POST /v1/images/edits` in process, through the official `openai` package: what it stores,
and its errors in OpenAI's shape (the jobs themselves run in test_openai_client.py)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.app import create_app
from darkroom.identities import Operation
from darkroom.settings import Settings
from db.repositories import jobs
from db.repositories.keys import IssuedKey
from tests.support.servers import png

RED = png(64, 64, (200, 30, 30))
BLUE = png(64, 64, (30, 30, 200))


@pytest.fixture
def no_wait(settings: Settings) -> Iterator[TestClient]:
    """The API with no sync wait and no worker: every accepted edit outlives its wait."""
    with TestClient(create_app(settings.model_copy(update={"sync_wait_max_s": 0}))) as client:
        yield client


def sdk(client: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=key, base_url="http://testserver/v1", http_client=client, max_retries=0
    )


def job_of(error: openai.APIStatusError) -> int:
    """The job id an edit that outlived its wait names."""
    found = re.search(r"job (\d+)", error.message)
    assert found is not None, error.message
    return int(found.group(1))


def test_one_image_is_an_img2img_job_with_the_upload_inline(
    no_wait: TestClient, api_key: IssuedKey, db: Session
) -> None:
    with pytest.raises(openai.APIStatusError) as outlived:
        sdk(no_wait, api_key.plaintext).images.edit(
            image=("red.png", RED, "image/png"),
            prompt="a blue square",
            n=2,
            size="64x64",
            response_format="b64_json",
            model="dall-e-2",
            extra_body={"steps": 3, "strength": 0.4},
        )
    assert outlived.value.status_code == 504
    job = jobs.get_job(db, job_of(outlived.value))
    assert job is not None
    assert job.operation == Operation.IMG2IMG
    assert job.endpoint == "openai"
    [image] = job.params["init_images"]
    assert base64.b64decode(image.partition(",")[2]) == RED
    assert (job.params["width"], job.params["height"], job.params["samples"]) == (64, 64, 2)
    assert (job.params["steps"], job.params["strength"]) == (3, 0.4)
    assert job.params["model_id"] is None  # OpenAI's model names mean the default model
    assert job.params["base64_output"] is True
    assert job.params["prompt"] == "a blue square"


def test_several_images_are_a_mixer_job(
    no_wait: TestClient, api_key: IssuedKey, db: Session
) -> None:
    with pytest.raises(openai.APIStatusError) as outlived:
        sdk(no_wait, api_key.plaintext).images.edit(
            image=[("red.png", RED, "image/png"), ("blue.png", BLUE, "image/png")],
            prompt="purple",
        )
    job = jobs.get_job(db, job_of(outlived.value))
    assert job is not None
    assert job.operation == Operation.IMG_MIXER
    decoded = [base64.b64decode(uri.partition(",")[2]) for uri in job.params["init_images"]]
    assert decoded == [RED, BLUE]
    assert job.params["image_weights"] == [1.0, 1.0]
    assert job.params["base64_output"] is False


def test_errors_take_openais_shape(no_wait: TestClient, api_key: IssuedKey) -> None:
    with pytest.raises(openai.AuthenticationError) as bad_key:
        sdk(no_wait, "not-a-key").images.edit(image=("a.png", RED, "image/png"), prompt="x")
    with pytest.raises(openai.BadRequestError) as bad_size:
        sdk(no_wait, api_key.plaintext).images.edit(
            image=("a.png", RED, "image/png"), prompt="x", size="8x8"
        )
    with pytest.raises(openai.BadRequestError) as masked:
        sdk(no_wait, api_key.plaintext).images.edit(
            image=("a.png", RED, "image/png"), mask=("m.png", RED, "image/png"), prompt="x"
        )
    no_image = no_wait.post(
        "/v1/images/edits",
        data={"prompt": "x"},
        files={"other": ("a.txt", b"x")},
        headers={"Authorization": f"Bearer {api_key.plaintext}"},
    )

    assert bad_key.value.body == {
        "message": "Invalid Api Key",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert bad_size.value.body["param"] == "size"  # type: ignore[index]
    assert "between 64 and 1024" in bad_size.value.message
    assert masked.value.body["param"] == "mask"  # type: ignore[index]
    assert no_image.status_code == 400
    assert no_image.json()["error"]["param"] == "image"


def test_an_idempotency_key_makes_a_retried_edit_the_same_job(
    no_wait: TestClient, api_key: IssuedKey
) -> None:
    edits = sdk(no_wait, api_key.plaintext).images
    outlived = []
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as error:
            edits.edit(
                image=("red.png", RED, "image/png"),
                prompt="x",
                extra_headers={"Idempotency-Key": "edit-1"},
            )
        outlived.append(job_of(error.value))
    assert outlived[0] == outlived[1]
