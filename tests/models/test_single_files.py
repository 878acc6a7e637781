"""SD 2.x single files through load_model: converted with their own configuration folder
(`configs/sd2/`, not SD 1.x's) and prediction type, so the installed folder gives exactly the
image the single file gives.

The tiny SD 2.x v-prediction model is written in the original layout (OpenCLIP keys), as a
`.safetensors` and a `.ckpt`; the models folder holds both configurations, SD 1.x's and
SD 2.x's, as an operator prepares it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from darkroom.families import SD2_CONFIG
from darkroom.identities import Family, ModelKind, Operation, TinyModel
from darkroom.settings import Settings
from db.models import ModelInstall
from db.session import session_scope
from services import models
from tests.models.conftest import FileServer, Served, TinyFiles, models_folder
from worker.installer import Installer
from worker.models import tiny, tiny_addons
from worker.models.cache import ModelCache
from worker.pipelines.generate import generate
from worker.pipelines.request import GenerationRequest

SOURCE = "sd2-source"


@dataclass(frozen=True)
class TinySd2:
    """The tiny SD 2.x v-prediction folder and its original-layout single files by suffix."""

    folder: Path
    files: dict[str, Path]


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory) -> TinySd2:
    build = tmp_path_factory.mktemp("tiny-sd2")
    tiny.ensure_tiny_family_model(build, TinyModel.SD2_V_IMG2IMG)
    folder = build / TinyModel.SD2_V_IMG2IMG
    files = {}
    for suffix in (".safetensors", ".ckpt"):
        files[suffix] = build / f"sd2{suffix}"
        tiny_addons.write_sd_checkpoint(folder, files[suffix])
    return TinySd2(folder, files)


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(max_entries=2, device="cpu")


@pytest.fixture
def sd2_settings(
    settings: Settings, tmp_path: Path, tiny_files: TinyFiles, tiny_sd2: TinySd2
) -> Settings:
    """A models folder with SD 1.x's configuration (configs/sd/) and SD 2.x's (configs/sd2/)."""
    root = models_folder(tmp_path / "models", tiny_files)
    shutil.copytree(tiny_sd2.folder, root / "configs" / SD2_CONFIG)
    shutil.copytree(tiny_sd2.folder, root / SOURCE)  # the folder the files were written from
    return settings.model_copy(update={"models_dir": root, "install_lease_s": 5.0})


def _request(model_id: str) -> GenerationRequest:
    fields: dict[str, Any] = {
        "operation": Operation.IMG2IMG,
        "model_id": model_id,
        "prompt": "a red barn",
        "negative_prompt": "",
        "images": (Image.new("RGB", (64, 64), (180, 60, 40)),),
        "image_weights": (),
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 7.0,
        "seeds": (5,),
    }
    return GenerationRequest(**fields)


def _pixels(model_id: str, models_dir: Path, cache: ModelCache) -> np.ndarray:
    """The image `model_id` gives for a fixed seed (real loading code: no tiny preset)."""
    settings = Settings(data_dir=models_dir.parent / "data", models_dir=models_dir)
    [image] = generate(_request(model_id), cache, settings).images
    return np.asarray(image, dtype=np.int16)


def _install(settings: Settings, request: models.InstallRequest) -> dict[str, Any]:
    """Queue `request` as load_model does and run the installer on it; what verify_model says."""
    with session_scope(settings.resolved_database_url) as session:
        started = models.request_install(session, settings, request, None)
    assert Installer(settings, None).run_one(started.install_id)
    with session_scope(settings.resolved_database_url) as session:
        install = session.get(ModelInstall, started.install_id)
        assert install is not None
        return models.describe(install)


def _prediction_type(folder: Path) -> str:
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return str(scheduler["prediction_type"])


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_an_sd2_single_file_is_converted_with_its_own_config_and_gives_the_files_image(
    sd2_settings: Settings,
    file_server: FileServer,
    tiny_sd2: TinySd2,
    cache: ModelCache,
    suffix: str,
) -> None:
    file_server.files[f"/sd2{suffix}"] = Served(tiny_sd2.files[suffix].read_bytes())
    model_id = f"sd2-{uuid.uuid4().hex[:8]}"
    request = models.parse_load_model(
        {"url": file_server.url(f"/sd2{suffix}"), "model_id": model_id}
    )
    found = _install(sd2_settings, request)
    assert found["model_status"] == "ready", found
    assert (found["family"], found["format"]) == (Family.SD, suffix.lstrip("."))
    root = sd2_settings.models_dir
    assert root is not None
    folder = root / model_id
    # configs/sd2/ (v_prediction, as SD 2.1's own folder): not configs/sd/ (SD 1.x, epsilon).
    assert _prediction_type(folder) == "v_prediction"
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text["hidden_act"] == "gelu"  # the OpenCLIP encoder of the SD 2.x configuration
    shutil.copy(tiny_sd2.files[suffix], root / f"single{suffix}")  # the file as a worker loads it
    assert np.array_equal(_pixels(model_id, root, cache), _pixels("single", root, cache))
    assert np.array_equal(_pixels(model_id, root, cache), _pixels(SOURCE, root, cache))


def test_a_declared_prediction_type_is_saved_in_the_converted_folder(
    sd2_settings: Settings, file_server: FileServer, tiny_sd2: TinySd2, cache: ModelCache
) -> None:
    """A sidecar beside a local file (`darkroom models add PATH`) or load_model's
    `prediction_type` declare epsilon: the folder's scheduler says so, and it gives the image
    the single file with that sidecar gives."""
    root = sd2_settings.models_dir
    assert root is not None
    local = root.parent / "brought" / "eps.safetensors"
    local.parent.mkdir()
    shutil.copy(tiny_sd2.files[".safetensors"], local)
    local.with_suffix(".json").write_text('{"prediction_type": "epsilon"}')
    by_sidecar = f"eps-{uuid.uuid4().hex[:8]}"
    source = local.resolve().as_uri()
    found = _install(sd2_settings, models.InstallRequest(ModelKind.MODEL, by_sidecar, source))
    assert found["model_status"] == "ready", found
    assert _prediction_type(root / by_sidecar) == "epsilon"

    file_server.files["/sd2.safetensors"] = Served(tiny_sd2.files[".safetensors"].read_bytes())
    by_field = f"eps-{uuid.uuid4().hex[:8]}"
    body = {
        "url": file_server.url("/sd2.safetensors"),
        "model_id": by_field,
        "prediction_type": "epsilon",
    }
    found = _install(sd2_settings, models.parse_load_model(body))
    assert found["model_status"] == "ready", found
    assert _prediction_type(root / by_field) == "epsilon"

    shutil.copy(local, root / "single-eps.safetensors")
    shutil.copy(local.with_suffix(".json"), root / "single-eps.json")
    eps = _pixels("single-eps", root, cache)
    assert np.array_equal(_pixels(by_sidecar, root, cache), eps)
    assert np.array_equal(_pixels(by_field, root, cache), eps)
    assert np.abs(_pixels(SOURCE, root, cache) - eps).max() > 0  # v differs
    with pytest.raises(models.InstallRefusedError, match="prediction_type must be one of"):
        models.parse_load_model({**body, "prediction_type": "x0"})
