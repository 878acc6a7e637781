"""The enterprise model endpoints in process: keys, the hosted API's error shapes, refusals."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.routes.enterprise_server import NOT_ADMIN
from darkroom.settings import Settings
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from tests.api.test_submit import IMG2IMG
from tests.models.conftest import TinyFiles, models_folder

E = "/api/v1/enterprise"
ENDPOINTS = (
    "load_model",
    "load_model_v2",
    "load_vae",
    "verify_model",
    "get_all_models",
    "delete_model",
)


@pytest.fixture
def model_settings(settings: Settings, tmp_path: Path, tiny_files: TinyFiles) -> Settings:
    root = models_folder(tmp_path / "models", tiny_files)
    return settings.model_copy(update={"models_dir": root, "model_preset": ""})


@pytest.fixture
def client(model_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(model_settings)) as test_client:
        yield test_client


@pytest.fixture
def admin(model_settings: Settings) -> str:
    with session_scope(model_settings.resolved_database_url) as session:
        return create_key(session, f"ops-{uuid.uuid4().hex[:6]}", admin=True).plaintext


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_only_admin_keys_manage_models(
    client: TestClient, api_key: IssuedKey, endpoint: str
) -> None:
    refused = client.post(f"{E}/{endpoint}", json={"key": api_key.plaintext, "model_id": "x"})
    assert refused.status_code == 403
    assert refused.json() == {"status": "error", "message": NOT_ADMIN}
    assert client.post(f"{E}/{endpoint}", json={"model_id": "x"}).status_code == 401


def test_bad_loads_are_refused_in_the_error_shape(client: TestClient, admin: str) -> None:
    url = "http://127.0.0.1:9/m.safetensors"
    cases = [
        ({"url": url, "model_id": "../escape"}, 422, "not a valid model_id"),
        ({"url": url, "model_id": "configs"}, 422, "keeps for itself"),
        ({"url": url, "model_id": "c", "model_type": "controlnet"}, 422, "ControlNet"),
        ({"url": "ftp://127.0.0.1/m.ckpt", "model_id": "c"}, 422, "http(s) link"),
        ({"model_id": "c"}, 422, "url field is required"),
    ]
    for body, status, words in cases:
        answer = client.post(f"{E}/load_model", json={"key": admin, **body})
        assert answer.status_code == status, answer.json()
        assert answer.json()["status"] == "error"
        assert words in answer.json()["message"], answer.json()
    v2 = client.post(
        f"{E}/load_model_v2",
        json={"key": admin, "url": url, "model_id": "c", "model_category": "sd9"},
    )
    assert v2.status_code == 422
    assert "model_category" in v2.json()["message"]


def test_second_load_of_an_id_joins_or_is_refused(client: TestClient, admin: str) -> None:
    model_id = f"twice-{uuid.uuid4().hex[:6]}"
    body = {"key": admin, "url": "http://127.0.0.1:9/a.safetensors", "model_id": model_id}
    first = client.post(f"{E}/load_model", json=body).json()
    assert first["message"] == "model load started"
    assert (
        client.post(f"{E}/load_model", json=body).json()["message"]
        == "model load already in progress"
    )
    other = client.post(f"{E}/load_model", json={**body, "url": "http://127.0.0.1:9/b.safetensors"})
    assert other.status_code == 409
    verified = client.post(f"{E}/verify_model", json={"key": admin, "model_id": model_id}).json()
    assert (verified["status"], verified["model_status"]) == ("success", "queued")
    listed = client.post(f"{E}/get_all_models", json={"key": admin}).json()
    assert model_id in [row["model_id"] for row in listed["models"]]
    deleted = client.post(f"{E}/delete_model", json={"key": admin, "model_id": model_id})
    assert deleted.json()["status"] == "success"
    missing = client.post(f"{E}/verify_model", json={"key": admin, "model_id": model_id})
    assert missing.status_code == 404


def test_a_model_in_use_by_queued_jobs_is_not_deleted(
    client: TestClient, admin: str, model_settings: Settings, tiny_files: TinyFiles
) -> None:
    assert model_settings.models_dir is not None
    model_id = f"busy-{uuid.uuid4().hex[:6]}"
    (model_settings.models_dir / model_id).symlink_to(
        tiny_files.sd_folder, target_is_directory=True
    )
    submitted = client.post(
        "/api/v1/enterprise/img2img",
        json={
            **IMG2IMG,
            "key": admin,
            "model_id": model_id,
            "init_image": "http://127.0.0.1:9/x.png",
        },
    )
    assert submitted.json()["status"] == "processing", submitted.json()
    refused = client.post(f"{E}/delete_model", json={"key": admin, "model_id": model_id})
    assert refused.status_code == 409
    assert "in use by 1 queued" in refused.json()["message"]
    assert (model_settings.models_dir / model_id).exists()


def test_loras_and_embeddings_in_use_by_queued_jobs_are_not_deleted(
    client: TestClient, admin: str, model_settings: Settings, tiny_files: TinyFiles
) -> None:
    """The jobs' stored params name LoRAs as `loras: [{name, strength}]` and embeddings as
    `embeddings: [...]`: both are found there (the check once read fields no row has)."""
    root = model_settings.models_dir
    assert root is not None
    lora, embedding = f"l-{uuid.uuid4().hex[:6]}", f"e-{uuid.uuid4().hex[:6]}"
    (root / "loras").mkdir(exist_ok=True)
    (root / "loras" / f"{lora}.safetensors").write_bytes(tiny_files.kohya_lora)
    (root / "embeddings").mkdir(exist_ok=True)
    (root / "embeddings" / f"{embedding}.safetensors").write_bytes(tiny_files.embedding)
    body = {**IMG2IMG, "key": admin, "init_image": "http://127.0.0.1:9/x.png"}
    body |= {"model_id": None, "lora_model": lora, "embeddings_model": embedding}
    submitted = client.post("/api/v1/enterprise/img2img", json=body)
    assert submitted.json()["status"] == "processing", submitted.json()
    for name, path in (
        (lora, root / "loras" / f"{lora}.safetensors"),
        (embedding, root / "embeddings" / f"{embedding}.safetensors"),
    ):
        refused = client.post(f"{E}/delete_model", json={"key": admin, "model_id": name})
        assert refused.status_code == 409, refused.json()
        assert "in use by 1 queued" in refused.json()["message"]
        assert path.exists()


def test_delete_model_removes_models_only_never_the_folders_kept_for_other_kinds(
    client: TestClient, admin: str, model_settings: Settings, tiny_files: TinyFiles
) -> None:
    """`vae`, `loras`, `configs`, `configs/sd` or `sd15/unet` name no model: 404, and nothing
    is removed (each once removed a whole folder: every VAE, every LoRA, a model's UNet)."""
    root = model_settings.models_dir
    assert root is not None
    shutil.copytree(tiny_files.sd_folder, root / "sd15")
    (root / "vae" / "myvae").mkdir(parents=True)
    (root / "vae" / "myvae" / "config.json").write_text("{}")
    (root / "vae" / "myvae" / "inner").mkdir()
    (root / "loras").mkdir()
    (root / "loras" / "style.safetensors").write_bytes(tiny_files.kohya_lora)
    kept = [root / "sd15" / "unet", root / "vae" / "myvae", root / "loras", root / "configs" / "sd"]
    for model_id in ("vae", "loras", "configs", "configs/sd", "sd15/unet", "myvae/inner"):
        answer = client.post(f"{E}/delete_model", json={"key": admin, "model_id": model_id})
        assert answer.status_code == 404, (model_id, answer.json())
        assert all(path.exists() for path in kept), model_id
    for model_id in ("configs/sd", "sd15/unet"):  # nor do they run as models
        refused = client.post(
            "/api/v1/enterprise/img2img",
            json={
                **IMG2IMG,
                "key": admin,
                "model_id": model_id,
                "init_image": "http://127.0.0.1:9/x.png",
            },
        )
        assert refused.status_code == 422, refused.json()
    removed = client.post(f"{E}/delete_model", json={"key": admin, "model_id": "myvae"})
    assert removed.json()["removed"] == ["vae"], removed.json()
    assert not (root / "vae" / "myvae").exists()
    assert (root / "sd15" / "unet").exists()
