"""Flux as Black Forest Labs ship it: one original-layout file holding the transformer alone
(`flux1-dev.safetensors`, and most Flux fine-tunes after it), its VAE and text encoders read
from the configuration folder `configs/flux/`, through the worker's real loading path.

diffusers' Flux converter splits a single block's joined projection at Flux.1's own width (3072,
written into the converter), so no narrower file converts: the file here is one double and one
single block at that width (530 M parameters, 1 GB in bf16), written once per module, with the
tiny Flux model's VAE and text encoders around it.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from darkroom import families, model_ids
from darkroom.identities import Family, ModelKind, Operation, TinyModel
from darkroom.settings import Settings
from db.migrate import upgrade_to_head
from db.session import session_scope
from services import models
from tests.worker.test_families import _request as families_request
from worker.installer import Installer
from worker.models import tiny, tiny_shapes
from worker.models.cache import ModelCache
from worker.models.checkpoints import flux_checkpoint
from worker.pipelines.generate import generate, load_for
from worker.pipelines.request import GenerationRequest

MODEL = "flux1-fine"
BORROWED = ("vae", "text_encoder", "text_encoder_2")


def _wide_transformer(guidance: bool = True) -> Any:
    """The tiny Flux transformer at Flux.1's width, 24 heads of 128; with dev's guidance input,
    or without (schnell's shape)."""
    torch.manual_seed(7)
    model = tiny_shapes.flux_transformer(guidance, heads=24, head_dim=128, rope_axes=(16, 56, 56))
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux_file(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """A models folder holding `flux1-fine.safetensors` (the transformer alone, original layout;
    dev-shaped or schnell-shaped) and `configs/flux/` (the tiny Flux pipeline with the wide
    dev-shaped transformer's config and no transformer weights: one folder serves both, as one
    FLUX.1-dev folder does for a user's dev and schnell files); and the transformer's state."""
    root = tmp_path_factory.mktemp("flux-file")
    tiny.ensure_tiny_family_model(root / "build", TinyModel.FLUX_IMG2IMG)
    models = root / "models"
    config = models / model_ids.SINGLE_FILE_CONFIGS / "flux"
    shutil.copytree(root / "build" / TinyModel.FLUX_IMG2IMG, config)
    shutil.rmtree(config / "transformer")
    _wide_transformer(guidance=True).save_config(str(config / "transformer"))
    transformer = _wide_transformer(guidance=request.param == "dev")
    checkpoint = models / f"{MODEL}.safetensors"
    save_file(flux_checkpoint(transformer), str(checkpoint))
    yield models, transformer.state_dict()
    checkpoint.unlink()  # 1 GB


def _request(model_id: str = MODEL) -> GenerationRequest:
    """test_families' small img2img request, at Flux's usual guidance."""
    return families_request(model_id, guidance_scale=3.5)


def test_a_transformer_only_flux_file_runs_with_its_configuration_folders_other_parts(
    tmp_path: Path, flux_file: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    """The file's transformer, exactly (with a guidance input if the file has one, whatever
    the folder's config says); the folder's VAE and text encoders, exactly; and a job runs on
    them. (diffusers alone fails on the VAE: it converts one from the file, which has none;
    and builds a schnell file's transformer with dev's guidance input, left without weights.)"""
    models, transformer_state = flux_file
    settings = Settings(data_dir=tmp_path, models_dir=models)
    probed = families.probe_file(models / f"{MODEL}.safetensors")
    guided = any(key.startswith("time_text_embed.guidance") for key in transformer_state)
    assert (probed.family, probed.borrowed) == (Family.FLUX, BORROWED)
    assert probed.embedded_guidance is guided
    spec = model_ids.resolve_model(Operation.IMG2IMG, MODEL, settings)
    assert (spec.family, spec.sources[0].class_name) == (Family.FLUX, "FluxImg2ImgPipeline")

    cache = ModelCache(max_entries=1, device="cpu")
    [pipe] = load_for([_request()], cache, settings).pipelines
    assert pipe.transformer.config.guidance_embeds is guided
    loaded = pipe.transformer.state_dict()
    assert set(loaded) == set(transformer_state)
    assert all(torch.equal(loaded[k].to(torch.bfloat16), v) for k, v in transformer_state.items())
    config = models / model_ids.SINGLE_FILE_CONFIGS / "flux"
    vae = tiny_shapes._diffusers.AutoencoderKL.from_pretrained(str(config), subfolder="vae")
    assert all(
        torch.equal(pipe.vae.state_dict()[k], v.to(pipe.vae.dtype))
        for k, v in vae.state_dict().items()
    )

    [image] = generate(_request(), cache, settings).images
    pixels = np.asarray(image, dtype=np.int16)
    assert image.size == (64, 64)
    assert pixels.std() > 0


def test_a_file_whose_missing_parts_have_no_weights_in_the_configuration_folder_is_refused(
    tmp_path: Path,
) -> None:
    """Refused at submit (torch-free: the file's header and the folder's listing), naming the
    parts the folder must hold with their weights."""
    models = tmp_path / "models"
    config = models / model_ids.SINGLE_FILE_CONFIGS / "flux"
    for part in ("transformer", *BORROWED):
        (config / part).mkdir(parents=True)
        (config / part / "config.json").write_text("{}")
    (config / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    transformer_only = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}
    save_file(transformer_only, str(models / "f.safetensors"))
    settings = Settings(data_dir=tmp_path, models_dir=models)
    with pytest.raises(model_ids.UnknownModelError) as refused:
        model_ids.resolve_model(Operation.IMG2IMG, "f", settings)
    assert "without vae, text_encoder, text_encoder_2" in str(refused.value)
    assert "configs/flux/, which has no weights for them" in str(refused.value)
    # An all-in-one file (ComfyUI's layout) carries its VAE: the folder need not.
    all_in_one = {
        "double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1),
        "vae.decoder.conv_in.weight": torch.zeros(1),
    }
    save_file(all_in_one, str(models / "g.safetensors"))
    assert families.probe_file(models / "g.safetensors").borrowed == BORROWED[1:]
    (config / "text_encoder" / "model.safetensors").write_bytes(b"")
    with pytest.raises(model_ids.UnknownModelError, match="without text_encoder_2;"):
        model_ids.resolve_model(Operation.IMG2IMG, "g", settings)


def test_the_installer_converts_a_transformer_only_flux_file_to_a_folder_that_runs_alike(
    tmp_path: Path, flux_file: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    """`darkroom models add flux1-fine.safetensors` (the installer, as load_model runs it):
    one folder with the file's transformer in its own dtype (bf16) and its guidance input or
    not, and the configuration folder's other parts; it gives the single file's image."""
    models_dir, transformer_state = flux_file
    settings = Settings(data_dir=tmp_path, models_dir=models_dir)
    upgrade_to_head(settings.resolved_database_url)
    source = (models_dir / f"{MODEL}.safetensors").as_uri()
    installed = f"installed-{uuid.uuid4().hex[:6]}"
    request = models.InstallRequest(ModelKind.MODEL, installed, source, {})
    with session_scope(settings.resolved_database_url) as session:
        started = models.request_install(session, settings, request, None)
    assert Installer(settings, None).run_one(started.install_id)
    with session_scope(settings.resolved_database_url) as session:
        found = models.verify(session, settings, installed)
    try:
        assert (found["model_status"], found["family"]) == ("ready", "flux"), found
        assert found["dtype"] == "bfloat16"
        transformer_config = json.loads(
            (models_dir / installed / "transformer" / "config.json").read_text()
        )
        guided = any(key.startswith("time_text_embed.guidance") for key in transformer_state)
        assert transformer_config["guidance_embeds"] is guided

        cache = ModelCache(max_entries=1, device="cpu")
        from_folder = generate(_request(model_id=installed), cache, settings).images[0]
        from_file = generate(_request(), cache, settings).images[0]
        difference = np.abs(np.asarray(from_folder, np.int16) - np.asarray(from_file, np.int16))
        assert difference.mean() < 2.0  # the folder's VAE and encoders in bf16, as the file's
    finally:
        shutil.rmtree(models_dir / installed, ignore_errors=True)  # 1 GB
