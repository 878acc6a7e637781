"""load_model's code path in one process: request_install, then the installer's steps.

Files are served from a loopback server (the guard's allow-list lets 127.0.0.1 through, as for
init images); the database is the tests' Postgres.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, save, save_file
from sqlalchemy import select

from darkroom.settings import Settings
from db.models import ModelInstall, WebhookDelivery
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services import model_folder, models
from tests.models.conftest import FileServer, Served, TinyFiles, TinySdxl, models_folder
from worker.installer import Installer


@pytest.fixture
def install_settings(settings: Settings, tmp_path: Path, tiny_files: TinyFiles) -> Settings:
    """The test settings with a models folder holding only the SD configuration."""
    root = models_folder(tmp_path / "models", tiny_files)
    return settings.model_copy(update={"models_dir": root, "install_lease_s": 5.0})


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _load(settings: Settings, body: dict[str, str], key_id: int | None) -> models.Started:
    with session_scope(settings.resolved_database_url) as session:
        return models.request_install(session, settings, models.parse_load_model(body), key_id)


def _run(settings: Settings, started: models.Started) -> dict[str, object]:
    assert Installer(settings, None).run_one(started.install_id)
    with session_scope(settings.resolved_database_url) as session:
        install = session.get(ModelInstall, started.install_id)
        assert install is not None
        return models.describe(install)


def _leftovers(settings: Settings) -> list[str]:
    """Anything in the staging folder after an install ended."""
    assert settings.models_dir is not None
    staging = settings.models_dir / model_folder.STAGING
    return [p.name for p in staging.iterdir()] if staging.exists() else []


def test_single_file_checkpoint_is_converted_once_with_signed_webhook_queued(
    install_settings: Settings, file_server: FileServer, tiny_files: TinyFiles, api_key: IssuedKey
) -> None:
    file_server.files["/m.safetensors"] = Served(tiny_files.sd_checkpoint)
    model_id = _id("brought")
    body = {
        "url": file_server.url("/m.safetensors"),
        "model_id": model_id,
        "model_type": "custom_ckpt",
        "webhook": "http://127.0.0.1:9/hook",
    }
    started = _load(install_settings, body, api_key.row.id)
    assert started.message == "model load started"
    again = _load(install_settings, body, api_key.row.id)
    assert (again.install_id, again.message) == (
        started.install_id,
        "model load already in progress",
    )
    found = _run(install_settings, started)
    assert found["model_status"] == "ready", found
    assert found["family"] == "sd"
    assert found["format"] == "safetensors"
    assert found["sha256"] == hashlib.sha256(tiny_files.sd_checkpoint).hexdigest()
    assert install_settings.models_dir is not None
    folder = install_settings.models_dir / model_id
    assert (folder / "model_index.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert _leftovers(install_settings) == []
    assert _load(install_settings, body, api_key.row.id).message == "model already loaded"
    with session_scope(install_settings.resolved_database_url) as session:
        delivery = session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.model_install_id == started.install_id)
        )
        assert delivery is not None
        assert delivery.job_id is None
        assert delivery.api_key_id == api_key.row.id
        payload = json.loads(delivery.payload)
    assert payload["status"] == "success"
    assert payload["model_id"] == model_id
    with session_scope(install_settings.resolved_database_url) as session:
        assert models.delete(session, install_settings, model_id) == ["model"]
    assert not folder.exists()


def test_a_half_precision_single_file_converts_to_a_half_precision_folder(
    install_settings: Settings, file_server: FileServer, tiny_files: TinyFiles
) -> None:
    """The folder keeps the file's dtype: at diffusers' default float32 an fp16 or bf16 file
    doubled on disk (a 24 GB Flux file: 48 GB) and in memory while converting."""
    half = {name: tensor.half() for name, tensor in load(tiny_files.sd_checkpoint).items()}
    file_server.files["/half.safetensors"] = Served(save(half))
    model_id = _id("half")
    body = {"url": file_server.url("/half.safetensors"), "model_id": model_id}
    found = _run(install_settings, _load(install_settings, body, None))
    assert found["model_status"] == "ready", found
    with session_scope(install_settings.resolved_database_url) as session:
        assert models.verify(session, install_settings, model_id)["dtype"] == "float16"
    assert install_settings.models_dir is not None
    unet = install_settings.models_dir / model_id / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.stat().st_size < len(tiny_files.sd_checkpoint) / 2


def test_kohya_lora_and_embedding_install_into_their_folders(
    install_settings: Settings, file_server: FileServer, tiny_files: TinyFiles
) -> None:
    file_server.files["/k.safetensors"] = Served(tiny_files.kohya_lora)
    file_server.files["/e.safetensors"] = Served(tiny_files.embedding)
    lora, emb = _id("lora"), _id("emb")
    for url, name, kind in (
        ("/k.safetensors", lora, "lora"),
        ("/e.safetensors", emb, "embeddings"),
    ):
        body = {"url": file_server.url(url), "model_id": name, "model_type": kind}
        found = _run(install_settings, _load(install_settings, body, None))
        assert found["model_status"] == "ready", found
    assert install_settings.models_dir is not None
    assert (install_settings.models_dir / "loras" / f"{lora}.safetensors").is_file()
    assert (install_settings.models_dir / "embeddings" / f"{emb}.safetensors").is_file()
    with session_scope(install_settings.resolved_database_url) as session:
        listed = {row["model_id"]: row for row in models.list_all(session, install_settings)}
    assert listed[lora]["model_type"] == "lora"
    assert listed[emb]["family"] == "sd"


class _Evil:
    """A pickle that would run a command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_bad_inputs_fail_clearly_and_leave_nothing(
    install_settings: Settings, file_server: FileServer, tiny_files: TinyFiles, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Evil(marker)}, tmp_path / "evil.ckpt")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "unknown.safetensors"))
    file_server.files |= {
        "/page.html": Served(b"<html>not a model</html>"),
        "/short.safetensors": Served(
            tiny_files.sd_checkpoint[:5000], announce=len(tiny_files.sd_checkpoint)
        ),
        "/unknown.safetensors": Served((tmp_path / "unknown.safetensors").read_bytes()),
        "/evil.ckpt": Served((tmp_path / "evil.ckpt").read_bytes()),
    }
    expected = {
        "/page.html": "did not give a model",
        "/short.safetensors": "truncated",
        "/unknown.safetensors": "Unknown model family",
        "/evil.ckpt": "pickle holds code",
        "/missing.safetensors": "HTTP 404",
    }
    for path, words in expected.items():
        model_id = _id("bad")
        found = _run(
            install_settings,
            _load(install_settings, {"url": file_server.url(path), "model_id": model_id}, None),
        )
        assert found["model_status"] == "failed"
        assert words in str(found["error"]), (path, found["error"])
        assert install_settings.models_dir is not None
        assert not (install_settings.models_dir / model_id).exists()
    assert not marker.exists()  # the pickle's command never ran
    assert _leftovers(install_settings) == []


def test_refusals_at_load_time(install_settings: Settings, file_server: FileServer) -> None:
    for model_id in ("../escape", "a/../../b", ".hidden", "loras", "a/b/c"):
        with pytest.raises(models.InstallRefusedError):
            models.parse_load_model(
                {"url": file_server.url("/x.safetensors"), "model_id": model_id}
            )
    with pytest.raises(models.InstallRefusedError, match="controlnet"):
        models.parse_load_model(
            {"url": "http://127.0.0.1/x", "model_id": "c", "model_type": "controlnet"}
        )
    with pytest.raises(models.InstallRefusedError, match="url"):
        models.parse_load_model({"url": "file:///etc/passwd", "model_id": "c"})
    model_id = _id("twice")
    _load(install_settings, {"url": file_server.url("/a.safetensors"), "model_id": model_id}, None)
    with pytest.raises(models.InstallRefusedError, match="another URL") as refused:
        _load(
            install_settings, {"url": file_server.url("/b.safetensors"), "model_id": model_id}, None
        )
    assert refused.value.status == 409


def test_sdxl_single_file_and_embedding_with_load_model_v2(
    install_settings: Settings, file_server: FileServer, tiny_files: TinyFiles, tiny_sdxl: TinySdxl
) -> None:
    assert install_settings.models_dir is not None
    shutil.copytree(tiny_sdxl.folder, install_settings.models_dir / "configs" / "sdxl")
    file_server.files |= {
        "/xl.safetensors": Served(tiny_sdxl.checkpoint),
        "/sd.safetensors": Served(tiny_files.sd_checkpoint),
        "/xl-emb.safetensors": Served(tiny_sdxl.embedding),
    }
    xl = {"model_category": "stable_diffusion_xl", "model_format": "safetensors"}
    cases = [
        ({"url": file_server.url("/xl.safetensors"), **xl}, "ready", "sdxl"),
        ({"url": file_server.url("/sd.safetensors"), **xl}, "failed", None),
        (
            {"url": file_server.url("/xl-emb.safetensors"), "model_category": "embeddings"},
            "ready",
            "sdxl",
        ),
    ]
    for body, state, family in cases:
        model_id = _id("xl")
        request = models.parse_load_model_v2({**body, "model_id": model_id})
        with session_scope(install_settings.resolved_database_url) as session:
            started = models.request_install(session, install_settings, request, None)
        found = _run(install_settings, started)
        assert found["model_status"] == state, found
        if state == "ready":
            assert found["family"] == family
        else:
            assert "model_category names Stable Diffusion XL" in str(found["error"])
    assert _leftovers(install_settings) == []


def test_load_vae_converts_an_original_layout_file(
    install_settings: Settings, file_server: FileServer, tiny_files: TinyFiles, tmp_path: Path
) -> None:
    import diffusers

    from worker.models.checkpoints import _vae_state

    vae_class: Any = diffusers.AutoencoderKL
    vae = vae_class.from_pretrained(str(tiny_files.sd_folder / "vae"))
    state = {
        k.removeprefix("first_stage_model."): v.contiguous() for k, v in _vae_state(vae).items()
    }
    save_file(state, str(tmp_path / "vae.safetensors"))
    file_server.files["/vae.safetensors"] = Served((tmp_path / "vae.safetensors").read_bytes())
    vae_id = _id("vae")
    request = models.parse_load_vae({"url": file_server.url("/vae.safetensors"), "vae_id": vae_id})
    with session_scope(install_settings.resolved_database_url) as session:
        started = models.request_install(session, install_settings, request, None)
    found = _run(install_settings, started)
    assert found["model_status"] == "ready", found
    assert install_settings.models_dir is not None
    installed = vae_class.from_pretrained(str(install_settings.models_dir / "vae" / vae_id))
    assert all(
        torch.equal(value, installed.state_dict()[k]) for k, value in vae.state_dict().items()
    )


def test_an_a1111_pt_embedding_installs_and_loads_its_vectors(
    install_settings: Settings, file_server: FileServer, tiny_files: TinyFiles, tmp_path: Path
) -> None:
    """The original textual-inversion `.pt` layout (`string_to_token` a tensor, the vectors in
    `string_to_param["*"]`, as A1111 reads it) is installed as a safetensors file holding the
    vectors alone, which the worker loads: the token gets the file's vectors."""
    import diffusers

    from worker.pipelines import options

    vectors = torch.randn(2, 32)  # two vectors of the tiny text encoder's width
    original = {
        "string_to_token": {"*": torch.tensor(265)},
        "string_to_param": {"*": vectors},
        "name": "old-style",
        "step": 3000,
    }
    torch.save(original, tmp_path / "old.pt")
    file_server.files["/old.pt"] = Served((tmp_path / "old.pt").read_bytes())
    emb = _id("old-emb")
    body = {"url": file_server.url("/old.pt"), "model_id": emb, "model_type": "embeddings"}
    found = _run(install_settings, _load(install_settings, body, None))
    assert found["model_status"] == "ready", found
    assert (found["family"], found["format"]) == ("sd", "ckpt")
    assert install_settings.models_dir is not None
    installed = install_settings.models_dir / "embeddings" / f"{emb}.safetensors"
    pipeline_class: Any = diffusers.StableDiffusionImg2ImgPipeline
    pipe = pipeline_class.from_pretrained(
        str(tiny_files.sd_folder), safety_checker=None, requires_safety_checker=False
    )
    with options._embeddings(pipe, (("<old>", str(installed)),)):
        prompt = pipe.maybe_convert_prompt("<old>", pipe.tokenizer)  # "<old> <old>_1"
        ids = pipe.tokenizer(prompt, add_special_tokens=False).input_ids
        assert len(ids) == 2  # one token per vector
        rows = pipe.text_encoder.get_input_embeddings().weight[ids]
        assert torch.equal(rows, vectors)


def test_the_size_limit_and_the_ssrf_guard_apply_to_downloads(
    install_settings: Settings, file_server: FileServer, tiny_files: TinyFiles
) -> None:
    """A file over DARKROOM_MODEL_MAX_BYTES fails before its body is kept; a loopback URL that
    the allow-list does not open is refused by the same guard as images, and nothing is fetched."""
    file_server.files["/m.safetensors"] = Served(tiny_files.sd_checkpoint)
    url = file_server.url("/m.safetensors")
    small = install_settings.model_copy(update={"model_max_bytes": 1000})
    found = _run(small, _load(small, {"url": url, "model_id": _id("big")}, None))
    assert found["model_status"] == "failed"
    assert "the limit is 1000 (DARKROOM_MODEL_MAX_BYTES)" in str(found["error"])
    # An embedding has a far smaller allowance than a checkpoint (an endless download found by a
    # probe wrote 12 GB as a "LoRA"): refused from its Content-Length, before its body.
    file_server.files["/huge-emb.safetensors"] = Served(b"x" * 64, announce=64 * 1024**2 + 1)
    body = {
        "url": file_server.url("/huge-emb.safetensors"),
        "model_id": _id("emb"),
        "model_type": "embeddings",
    }
    found = _run(install_settings, _load(install_settings, body, None))
    assert found["model_status"] == "failed"
    assert f"the limit is {64 * 1024**2} (the embedding limit)" in str(found["error"])
    guarded = install_settings.model_copy(update={"url_allowlist": []})
    before = len(file_server.ranges)
    found = _run(guarded, _load(guarded, {"url": url, "model_id": _id("ssrf")}, None))
    assert found["model_status"] == "failed"
    assert "non-public address" in str(found["error"])
    assert len(file_server.ranges) == before  # no request reached the server
    assert _leftovers(install_settings) == []


def test_verify_model_tells_the_weights_dtype(
    install_settings: Settings, tiny_files: TinyFiles, tmp_path: Path
) -> None:
    """Read from a safetensors header (the denoiser's, for a folder); None for a `.ckpt`."""
    root = install_settings.models_dir
    assert root is not None
    shutil.copytree(tiny_files.sd_folder, root / "by-hand")  # float32
    (root / "loras").mkdir()
    save_file(
        {"x.lora_down.weight": torch.zeros(2, dtype=torch.float16)},
        str(root / "loras" / "half.safetensors"),
    )
    torch.save({"state_dict": {}}, root / "old.ckpt")
    with session_scope(install_settings.resolved_database_url) as session:
        assert models.verify(session, install_settings, "by-hand")["dtype"] == "float32"
        assert models.verify(session, install_settings, "half")["dtype"] == "float16"
        assert models.verify(session, install_settings, "old")["dtype"] is None
