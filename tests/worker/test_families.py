"""Model families: detection from a model's own files, SDXL and SD 2.x v-prediction through the
real worker path, kohya LoRAs, SDXL embeddings, and the refusals of each family's table.

The SDXL and SD 2.x models are the tiny ones built in code, installed under a models folder with
the tiny preset off, so the loading code that real weights go through is the code under test.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from api.app import create_app
from darkroom import families, model_ids
from darkroom.families import UnrecognisedModelError
from darkroom.identities import Family, Operation, TinyModel
from darkroom.jobspec import JobSpec, batch_key
from darkroom.settings import Settings
from db.repositories.keys import IssuedKey
from tests.api.test_submit import IMG2IMG as EXAMPLE
from worker.models import tiny, tiny_addons
from worker.models.cache import ModelCache
from worker.pipelines.generate import check_family, generate, load_for, run_loaded
from worker.pipelines.request import GenerationRequest, LoraSpec

#: The largest pixel-channel difference between a batched image and the same request alone.
PIXEL_TOLERANCE = 2
LONG_PROMPT = "a lighthouse on a cliff above a stormy sea, " * 4  # > 75 tokens: two windows
SDXL_MODEL, SD2_MODEL, FLUX_MODEL = "my-sdxl", "my-sd2-v", "my-flux"


def _index(folder: Path, index: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# --- detection (torch-free in the API; tensors here only to write the files) ------------------


@pytest.mark.parametrize(
    ("index", "family"),
    [
        ({"_class_name": "StableDiffusionPipeline"}, Family.SD),
        ({"_class_name": "StableDiffusionXLPipeline"}, Family.SDXL),
        ({"_class_name": "StableDiffusionXLImg2ImgPipeline"}, Family.SDXL),  # the refiner's class
        ({"_class_name": "FluxPipeline"}, Family.FLUX),
        # A fine-tune with its own class name: the components decide.
        ({"_class_name": "MyXL", "unet": ["d", "U"], "text_encoder_2": ["t", "C"]}, Family.SDXL),
        (
            {"_class_name": "MyFlux", "transformer": ["d", "F"], "text_encoder_2": ["t", "T5"]},
            Family.FLUX,
        ),
    ],
)
def test_a_folders_family_comes_from_its_model_index(
    tmp_path: Path, index: dict[str, Any], family: str
) -> None:
    assert families.detect_folder(_index(tmp_path / "m", index)) == family


def test_a_folder_of_no_known_family_is_refused_naming_what_was_found(tmp_path: Path) -> None:
    folder = _index(
        tmp_path / "kandinsky", {"_class_name": "KandinskyV22Pipeline", "unet": ["d", "U"]}
    )
    with pytest.raises(
        UnrecognisedModelError, match="KandinskyV22Pipeline pipeline with components unet"
    ):
        families.detect_folder(folder)


def _checkpoint(path: Path, names: list[str]) -> Path:
    tensors = {name: torch.zeros(1) for name in names}
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tensors}, path)
    else:
        save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize(
    ("names", "family"),
    [
        (
            ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"],
            Family.SD,
        ),
        (["model.diffusion_model.out.0.weight", "cond_stage_model.model.transformer.x"], Family.SD),
        (
            [
                "conditioner.embedders.0.transformer.x",
                "conditioner.embedders.1.model.ln_final.weight",
            ],
            Family.SDXL,
        ),
        (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], Family.FLUX),
        (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], Family.FLUX),
    ],
)
def test_a_single_files_family_comes_from_its_tensor_names(
    tmp_path: Path, names: list[str], family: str, suffix: str
) -> None:
    assert families.detect_file(_checkpoint(tmp_path / f"m{suffix}", names)) == family


def test_a_lora_or_garbage_as_a_model_file_is_refused_naming_what_was_found(tmp_path: Path) -> None:
    lora = _checkpoint(tmp_path / "lora.safetensors", ["lora_unet_down_blocks_0.lora_up.weight"])
    with pytest.raises(UnrecognisedModelError, match="1 tensors under lora_unet_down_blocks_0"):
        families.detect_file(lora)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(UnrecognisedModelError, match=r"junk\.safetensors"):
        families.detect_file(tmp_path / "junk.safetensors")
    (tmp_path / "evil.ckpt").write_bytes(b"not a zip")
    with pytest.raises(UnrecognisedModelError, match="no torch zip checkpoint"):
        families.detect_file(tmp_path / "evil.ckpt")


def test_detection_never_unpickles_a_ckpt(tmp_path: Path) -> None:
    """A pickle that would run code when loaded is only searched as bytes."""
    path = tmp_path / "trap.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        # GLOBAL os.system + REDUCE: unpickling this would run a command.
        archive.writestr("trap/data.pkl", b"cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(UnrecognisedModelError):
        families.detect_file(path)
    assert not Path("pwned").exists()


# --- SDXL and SD 2.x through the worker ------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder: tiny SDXL and SD 2.x-v pipelines, LoRAs (diffusers and kohya format from
    the same weights), an SDXL embedding and a VAE, as an operator would install them."""
    root = tmp_path_factory.mktemp("models")
    build = tmp_path_factory.mktemp("build")
    tiny.ensure_tiny_family_model(build, TinyModel.SDXL_IMG2IMG)
    tiny.ensure_tiny_family_model(build, TinyModel.SD2_V_IMG2IMG)
    tiny.ensure_tiny_family_model(build, TinyModel.FLUX_IMG2IMG)
    (build / TinyModel.SDXL_IMG2IMG).rename(root / SDXL_MODEL)
    (build / TinyModel.SD2_V_IMG2IMG).rename(root / SD2_MODEL)
    (build / TinyModel.FLUX_IMG2IMG).rename(root / FLUX_MODEL)
    (root / "loras").mkdir()
    for layout in tiny_addons.FLUX_LORA_LAYOUTS:  # the same weights in each layout
        save_file(
            tiny_addons.flux_lora(layout, seed=3),
            str(root / "loras" / f"flux-{layout}.safetensors"),
        )
    for family, stem in ((Family.SDXL, "xl"), (Family.SD, "sd")):
        tiny_addons.ensure_tiny_lora(root / "loras" / f"{stem}-peft.safetensors", "same", family)
        layers = load_file(str(root / "loras" / f"{stem}-peft.safetensors"))
        save_file(tiny_addons.kohya_lora(layers), str(root / "loras" / f"{stem}-kohya.safetensors"))
        # The same UNet part with the text encoders' parts, as model sites ship kohya LoRAs.
        text = tiny_addons.kohya_text_encoder_lora(family, seed=7)
        with_text = tiny_addons.kohya_lora(layers) | text
        save_file(with_text, str(root / "loras" / f"{stem}-kohya-te.safetensors"))
        first_encoder = {k: v for k, v in with_text.items() if not k.startswith("lora_te2_")}
        save_file(first_encoder, str(root / "loras" / f"{stem}-kohya-te1.safetensors"))
    tiny_addons.ensure_tiny_lora(root / "loras" / "xl-other.safetensors", "other", Family.SDXL)
    tiny_addons.ensure_tiny_embedding(
        root / "embeddings" / "xl-emb.safetensors", "xl-emb", Family.SDXL
    )
    tiny_addons.ensure_tiny_vae(root / "vae" / "my-vae", "my-vae")
    return root


@pytest.fixture(scope="module")
def installed(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), models_dir=models)


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(max_entries=4, device="cpu")


def _request(model_id: str = SDXL_MODEL, **fields: Any) -> GenerationRequest:
    base: dict[str, Any] = {
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
        **fields,
    }
    return GenerationRequest(**base)


def _pixels(request: GenerationRequest, cache: ModelCache, settings: Settings) -> np.ndarray:
    [image] = generate(request, cache, settings).images
    assert image.size == (request.width, request.height)
    return np.asarray(image, dtype=np.int16)


def test_an_installed_sdxl_folder_runs_sdxl_img2img(installed: Settings, cache: ModelCache) -> None:
    spec = model_ids.resolve_model(Operation.IMG2IMG, SDXL_MODEL, installed)
    assert (spec.family, spec.sources[0].class_name) == (
        Family.SDXL,
        "StableDiffusionXLImg2ImgPipeline",
    )
    first = generate(_request(), cache, installed).images[0]
    again = generate(_request(), cache, installed).images[0]
    other_seed = generate(_request(seeds=(6,)), cache, installed).images[0]
    assert first.tobytes() == again.tobytes()  # same seed, same bytes
    assert first.tobytes() != other_seed.tobytes()


def test_sdxl_batched_requests_give_the_images_each_gives_alone(
    installed: Settings, cache: ModelCache
) -> None:
    requests = [
        _request(prompt="a red barn", seeds=(1, 2)),
        _request(prompt="a blue boat", negative_prompt="fog", seeds=(3,)),
        _request(prompt=LONG_PROMPT, seeds=(4,)),  # two windows: its own call in the batch
    ]
    loaded = load_for(requests, cache, installed)
    together = run_loaded(loaded, requests, cache, installed)
    worst = 0
    for request, result in zip(requests, together, strict=True):
        alone = generate(request, cache, installed).images
        for a, b in zip(result.images, alone, strict=True):
            worst = max(worst, int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()))
    assert worst <= PIXEL_TOLERANCE


@pytest.mark.parametrize(("model_id", "stem"), [(SDXL_MODEL, "xl"), (SD2_MODEL, "sd")])
def test_a_kohya_lora_gives_the_image_of_the_same_lora_in_diffusers_format(
    installed: Settings, cache: ModelCache, model_id: str, stem: str
) -> None:
    plain = _pixels(_request(model_id), cache, installed)
    peft = _pixels(_request(model_id, loras=(LoraSpec(f"{stem}-peft", 1.0),)), cache, installed)
    kohya = _pixels(_request(model_id, loras=(LoraSpec(f"{stem}-kohya", 1.0),)), cache, installed)
    assert np.abs(peft - plain).max() > 0  # the LoRA changes the image
    assert np.abs(kohya - peft).max() <= PIXEL_TOLERANCE  # and kohya's keys were converted
    after = _pixels(_request(model_id), cache, installed)
    assert np.array_equal(after, plain)  # unloaded again


@pytest.mark.parametrize(("model_id", "stem"), [(SDXL_MODEL, "xl"), (SD2_MODEL, "sd")])
def test_a_kohya_loras_text_encoder_part_changes_the_image(
    installed: Settings, cache: ModelCache, model_id: str, stem: str
) -> None:
    """`lora_te_*` (SD) and `lora_te1_*` / `lora_te2_*` (SDXL) are loaded into the text encoders:
    the same LoRA without them gives another image, and unloading restores the model."""
    plain = _pixels(_request(model_id), cache, installed)
    unet_only = _pixels(
        _request(model_id, loras=(LoraSpec(f"{stem}-kohya", 1.0),)), cache, installed
    )
    with_text = _pixels(
        _request(model_id, loras=(LoraSpec(f"{stem}-kohya-te", 1.0),)), cache, installed
    )
    assert np.abs(with_text - unet_only).max() > 0
    if model_id == SDXL_MODEL:  # the second encoder's part counts too
        first = LoraSpec(f"{stem}-kohya-te1", 1.0)
        first_only = _pixels(_request(model_id, loras=(first,)), cache, installed)
        assert np.abs(first_only - unet_only).max() > 0
        assert np.abs(first_only - with_text).max() > 0
    assert np.array_equal(_pixels(_request(model_id), cache, installed), plain)


def test_several_sdxl_loras_at_once_each_with_its_strength(
    installed: Settings, cache: ModelCache
) -> None:
    one = _pixels(_request(loras=(LoraSpec("xl-kohya", 1.0),)), cache, installed)
    both = _pixels(
        _request(loras=(LoraSpec("xl-kohya", 1.0), LoraSpec("xl-other", 0.8))), cache, installed
    )
    weaker = _pixels(
        _request(loras=(LoraSpec("xl-kohya", 1.0), LoraSpec("xl-other", 0.2))), cache, installed
    )
    assert np.abs(both - one).max() > 0
    assert np.abs(both - weaker).max() > 0


def test_sdxl_embedding_long_prompt_clip_skip_vae_and_schedulers(
    installed: Settings, cache: ModelCache
) -> None:
    plain = _pixels(_request(prompt="xl-emb barn"), cache, installed)
    embedded = _pixels(_request(prompt="xl-emb barn", embeddings=("xl-emb",)), cache, installed)
    assert np.abs(embedded - plain).max() > 0  # the token now has clip_l and clip_g vectors
    long_prompt = _pixels(_request(prompt=LONG_PROMPT), cache, installed)
    cut = _pixels(_request(prompt=LONG_PROMPT[:40]), cache, installed)
    assert np.abs(long_prompt - cut).max() > 0  # words past 75 tokens count on both encoders
    skipped = _pixels(_request(clip_skip=2), cache, installed)
    assert np.abs(skipped - _pixels(_request(), cache, installed)).max() > 0
    with_vae = _pixels(_request(vae="my-vae"), cache, installed)
    assert np.abs(with_vae - _pixels(_request(), cache, installed)).max() > 0
    for scheduler in ("DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"):
        image = _pixels(_request(scheduler=scheduler, tomesd=True), cache, installed)
        assert image.shape == (64, 64, 3)


def test_sd2_v_prediction_keeps_its_prediction_type_under_any_scheduler(
    installed: Settings, cache: ModelCache
) -> None:
    spec = model_ids.resolve_model(Operation.IMG2IMG, SD2_MODEL, installed)
    assert spec.family == Family.SD
    loaded = load_for([_request(SD2_MODEL)], cache, installed)
    assert loaded.pipelines[0].scheduler.config.prediction_type == "v_prediction"
    from worker.pipelines.schedulers import build_scheduler

    euler = build_scheduler(
        "EulerDiscreteScheduler", loaded.pipelines[0].scheduler.config, True, None
    )
    assert euler.config.prediction_type == "v_prediction"
    assert _pixels(_request(SD2_MODEL, scheduler="EulerDiscreteScheduler"), cache, installed).any()


# --- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"scheduler": "DDPMScheduler"}, "scheduler", "flow-matching"),
        ({"algorithm_type": "dpmsolver++"}, "algorithm_type", "no DPM-Solver"),
        ({"clip_skip": 2}, "clip_skip", "no CLIP skip"),
        ({"embeddings": ("easyneg",)}, "embeddings_model", "no textual-inversion"),
        ({"width": 72}, "width", "multiple of 16"),
    ],
)
def test_the_worker_refuses_what_flux_cannot_apply(
    fields: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ValueError, match=f"{field}: .*{words}"):
        check_family(Family.FLUX, _request(**fields))
    check_family(Family.SDXL, _request(**fields))  # all of these apply to SDXL


def test_the_batch_key_includes_the_family() -> None:
    spec = JobSpec(
        operation=Operation.IMG2IMG, prompt="p", init_images=["http://127.0.0.1:1/a.png"],
        steps=2, guidance_scale=7, seed=1, model_id="m", family=Family.SD,
    )  # fmt: skip
    assert batch_key(spec) != batch_key(spec.model_copy(update={"family": Family.SDXL}))


# --- refusals at submit (the API reads the family from the files, without torch) --------------


@pytest.fixture
def flux_client(settings: Settings, tmp_path: Path) -> Iterator[TestClient]:
    """The API with a Flux folder (its index only: the API never loads weights) and an SD one."""
    models = tmp_path / "models"
    _index(models / "my-flux", {"_class_name": "FluxPipeline"})
    _index(models / "my-sd", {"_class_name": "StableDiffusionPipeline"})
    _index(models / "my-kandinsky", {"_class_name": "KandinskyV22Pipeline"})
    (models / "embeddings").mkdir()
    (models / "embeddings" / "easyneg.safetensors").touch()
    real = settings.model_copy(update={"model_preset": "", "models_dir": models})
    with TestClient(create_app(real)) as client:
        yield client


def _post(client: TestClient, key: IssuedKey, **fields: Any) -> Any:
    body = {**EXAMPLE, "model_id": "my-flux", "scheduler": None, "tomesd": "no", **fields}
    return client.post("/api/v1/enterprise/img2img", json={"key": key.plaintext, **body})


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"scheduler": "DDPMScheduler"}, "scheduler", "own flow-matching scheduler"),
        ({"algorithm_type": "dpmsolver++"}, "algorithm_type", "no DPM-Solver"),
        ({"clip_skip": 2}, "clip_skip", "no CLIP skip"),
        ({"tomesd": "yes"}, "tomesd", "transformer backbone"),
        ({"embeddings_model": "easyneg"}, "embeddings_model", "no textual-inversion"),
        ({"negative_prompt": "blurry"}, "negative_prompt", "no negative prompt"),
        ({"width": "520"}, "width", "multiple of 16"),
        ({"height": "776"}, "height", "multiple of 16"),
    ],
)
def test_flux_refuses_each_field_it_cannot_apply_before_queueing(
    flux_client: TestClient, api_key: IssuedKey, fields: dict[str, Any], field: str, words: str
) -> None:
    response = _post(flux_client, api_key, **fields)
    assert response.status_code == 422, response.text
    messages = response.json()["message"]
    assert list(messages) == [field]
    assert words in messages[field][0]


def test_flux_takes_the_example_body_and_sd_takes_the_same_fields(
    flux_client: TestClient, api_key: IssuedKey
) -> None:
    accepted = _post(flux_client, api_key)  # the page's defaults (tomesd omitted) are fine
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["meta"]["model_family"] == Family.FLUX
    sd = _post(flux_client, api_key, model_id="my-sd", scheduler="DDPMScheduler", clip_skip=2)
    assert sd.status_code == 200, sd.text
    assert sd.json()["meta"]["model_family"] == Family.SD
    unknown = _post(flux_client, api_key, model_id="my-kandinsky")
    assert unknown.status_code == 422
    assert "KandinskyV22Pipeline" in unknown.json()["message"]["model_id"][0]


# --- Flux (the tiny preset's `tiny-flux` id) --------------------------------------------------


def _flux(**fields: Any) -> GenerationRequest:
    return _request("tiny-flux", **{"guidance_scale": 3.5, "negative_prompt": "ignored", **fields})


def test_tiny_flux_img2img_is_deterministic_batches_and_takes_guidance_and_loras(
    tiny_settings: Settings, cache: ModelCache
) -> None:
    spec = model_ids.resolve_model(Operation.IMG2IMG, "tiny-flux", tiny_settings)
    assert (spec.family, spec.sources[0].class_name) == (Family.FLUX, "FluxImg2ImgPipeline")
    first = _pixels(_flux(), cache, tiny_settings)
    assert np.array_equal(first, _pixels(_flux(), cache, tiny_settings))
    # Dev-shaped: guidance is a model input, so it changes the image.
    assert np.abs(_pixels(_flux(guidance_scale=7.0), cache, tiny_settings) - first).max() > 0
    lora = _pixels(_flux(loras=(LoraSpec("flux-style", 1.0),)), cache, tiny_settings)
    assert np.abs(lora - first).max() > 0
    assert np.array_equal(_pixels(_flux(), cache, tiny_settings), first)  # LoRA unloaded
    tall = generate(_flux(height=96), cache, tiny_settings).images[0]
    assert tall.size == (64, 96)
    requests = [_flux(seeds=(1, 2)), _flux(prompt="a boat", seeds=(3,))]
    together = run_loaded(load_for(requests, cache, tiny_settings), requests, cache, tiny_settings)
    for request, result in zip(requests, together, strict=True):
        for a, b in zip(result.images, generate(request, cache, tiny_settings).images, strict=True):
            assert (
                np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= PIXEL_TOLERANCE
            )


def test_flux_loras_in_kohya_comfyui_and_bfl_layouts_give_their_diffusers_twins_image(
    installed: Settings, cache: ModelCache
) -> None:
    """Flux LoRAs as sd-scripts (kohya), ComfyUI and Black Forest Labs write them, fused q/k/v
    layers included, apply exactly as the same weights in diffusers' layout; then unload."""
    plain = _pixels(_request(FLUX_MODEL), cache, installed)
    twin = _pixels(_request(FLUX_MODEL, loras=(LoraSpec("flux-diffusers", 1.0),)), cache, installed)
    assert np.abs(twin - plain).max() > 0
    for layout in ("kohya", "comfyui", "bfl"):
        lora = (LoraSpec(f"flux-{layout}", 1.0),)
        image = _pixels(_request(FLUX_MODEL, loras=lora), cache, installed)
        assert np.abs(image - twin).max() <= PIXEL_TOLERANCE, layout
    assert np.array_equal(_pixels(_request(FLUX_MODEL), cache, installed), plain)


def test_a_lora_that_adapts_nothing_is_refused_not_ignored(
    installed: Settings, cache: ModelCache
) -> None:
    """An SD LoRA on a Flux model matches no layer: diffusers only warns, the job is refused."""
    with pytest.raises(ValueError, match="'sd-peft' has no layers of this model"):
        generate(_request(FLUX_MODEL, loras=(LoraSpec("sd-peft", 1.0),)), cache, installed)
    assert _pixels(_request(FLUX_MODEL), cache, installed).any()  # nothing left loaded


@pytest.mark.parametrize(
    ("family", "image", "asked", "size"),
    [
        (Family.FLUX, (104, 72), (None, None), (96, 64)),  # the image's size, rounded down
        (Family.FLUX, (64, 64), (None, None), (64, 64)),
        # 992x432 would be nearer in area, 976x432 is nearer the image's 2.27 aspect.
        (Family.FLUX, (1000, 440), (None, None), (976, 432)),
        (Family.FLUX, (100, 70), (128, None), (128, 80)),  # the client's side is kept
        (Family.FLUX, (2000, 1300), (None, None), (1008, 656)),  # scaled into 1024 first
        (Family.SD, (104, 72), (None, None), (104, 72)),  # multiples of 8 suffice
    ],
)
def test_a_flux_size_taken_from_the_image_is_rounded_to_16_keeping_its_aspect(
    family: Family,
    image: tuple[int, int],
    asked: tuple[int | None, int | None],
    size: tuple[int, int],
) -> None:
    from worker.families import output_size

    assert output_size(family, *asked, Image.new("RGB", image)) == size


def test_the_sdxl_refiner_runs_as_an_img2img_model(tmp_path: Path, cache: ModelCache) -> None:
    """The refiner's shape (bigG encoder only, aesthetic-score conditioning) is SDXL img2img."""
    models = tmp_path / "models"
    tiny.ensure_tiny_variant(models / "my-refiner", "sdxl-refiner")
    settings = Settings(data_dir=tmp_path, models_dir=models)
    spec = model_ids.resolve_model(Operation.IMG2IMG, "my-refiner", settings)
    assert (spec.family, spec.sources[0].class_name) == (
        Family.SDXL,
        "StableDiffusionXLImg2ImgPipeline",
    )
    refined = _request("my-refiner", prompt=LONG_PROMPT, negative_prompt="fog")
    first = _pixels(refined, cache, settings)
    assert np.array_equal(first, _pixels(refined, cache, settings))
    assert np.abs(_pixels(_request("my-refiner"), cache, settings) - first).max() > 0


def test_a_schnell_shaped_flux_runs_without_a_guidance_input(
    tmp_path: Path, cache: ModelCache
) -> None:
    """Schnell's transformer has no guidance embedding: guidance_scale changes nothing."""
    models = tmp_path / "models"
    tiny.ensure_tiny_variant(models / "my-schnell", "flux-schnell")
    settings = Settings(data_dir=tmp_path, models_dir=models)
    assert model_ids.model_family("my-schnell", settings) == Family.FLUX
    low = _pixels(_request("my-schnell", guidance_scale=1.0), cache, settings)
    assert np.array_equal(low, _pixels(_request("my-schnell", guidance_scale=9.0), cache, settings))


class _CanceledError(Exception):
    """What a job's step hook raises when its cancel is seen."""


@pytest.mark.parametrize("model_id", ["tiny-sdxl", "tiny-flux", "tiny-sd2-v"])
def test_each_family_makes_four_samples_reports_progress_checks_safety_and_cancels(
    tiny_settings: Settings, cache: ModelCache, model_id: str
) -> None:
    steps: list[tuple[int, int]] = []
    four = _request(
        model_id,
        steps=4,
        seeds=(1, 2, 3, 4),
        safety_checker=True,
        on_step=lambda done, total: steps.append((done, total)),
    )
    result = generate(four, cache, tiny_settings)
    assert len({image.tobytes() for image in result.images}) == 4  # one image per seed
    assert result.nsfw == [False] * 4
    assert steps[-1][0] == steps[-1][1] > 1  # step k of n, up to the last
    flagged = _request(model_id, prompt=f"{model_ids.TINY_NSFW_MARKER} a barn", safety_checker=True)
    assert generate(flagged, cache, tiny_settings).nsfw == [True]

    def cancel(done: int, _total: int) -> None:
        raise _CanceledError

    with pytest.raises(_CanceledError):
        generate(_request(model_id, steps=4, on_step=cancel), cache, tiny_settings)
    again = generate(_request(model_id, steps=4, seeds=(1,)), cache, tiny_settings).images[0]
    alone_vs_batched = np.asarray(again, np.int16) - np.asarray(result.images[0], np.int16)
    assert np.abs(alone_vs_batched).max() <= PIXEL_TOLERANCE  # nothing of the canceled run left


@pytest.mark.slow  # about 10 s each on a CPU: the VAE runs at full resolution
@pytest.mark.parametrize("model_id", ["tiny-sdxl", "tiny-flux", "tiny-sd2-v"])
def test_each_family_makes_the_pages_largest_size(
    tiny_settings: Settings, cache: ModelCache, model_id: str
) -> None:
    request = _request(model_id, width=1024, height=1024, steps=1, strength=1.0)
    [image] = generate(request, cache, tiny_settings).images
    assert image.size == (1024, 1024)


def test_a_hub_repos_family_comes_from_its_cached_model_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listed Hub id in the local Hugging Face cache is detected like a folder; one not cached
    yet is taken as SD 1.x (documented: pre-download SDXL and Flux repos)."""
    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--acme--xl-model"
    _index(repo / "snapshots" / revision, {"_class_name": "StableDiffusionXLPipeline"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    settings = Settings(data_dir=tmp_path, hub_models=["acme/xl-model", "acme/not-cached"])
    spec = model_ids.resolve_model(Operation.IMG2IMG, "acme/xl-model", settings)
    assert (spec.family, spec.sources[0].class_name) == (
        Family.SDXL,
        "StableDiffusionXLImg2ImgPipeline",
    )
    assert model_ids.model_family("acme/not-cached", settings) == Family.SD


def test_flux_sizes_must_be_multiples_of_16(tiny_settings: Settings, cache: ModelCache) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        generate(_flux(width=72), cache, tiny_settings)


# --- single-file checkpoints: found beside the folders, configured locally --------------------


def test_a_single_file_resolves_with_its_familys_local_config(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    names = [
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.ln_final.weight",
        "first_stage_model.decoder.conv_in.weight",
        "model.diffusion_model.out.2.bias",
    ]
    checkpoint = _checkpoint(models / "juggernaut.safetensors", names)
    settings = Settings(data_dir=tmp_path, models_dir=models)
    with pytest.raises(model_ids.UnknownModelError, match=r"configs/sdxl/ .* is missing"):
        model_ids.resolve_model(Operation.IMG2IMG, "juggernaut", settings)
    _index(models / "configs" / Family.SDXL, {"_class_name": "StableDiffusionXLPipeline"})
    spec = model_ids.resolve_model(Operation.IMG2IMG, "juggernaut", settings)
    [source] = spec.sources
    assert spec.family == Family.SDXL
    assert (source.class_name, source.location) == (
        "StableDiffusionXLImg2ImgPipeline",
        str(checkpoint.resolve()),
    )
    assert source.single_file_config == str((models / "configs" / Family.SDXL).resolve())
    assert model_ids.model_family("juggernaut", settings) == Family.SDXL
    # A LoRA dropped where models go is refused, naming what it holds.
    _checkpoint(models / "stray.safetensors", ["lora_unet_x.lora_down.weight"])
    with pytest.raises(model_ids.UnknownModelError, match=r"stray\.safetensors holds 1 tensors"):
        model_ids.resolve_model(Operation.IMG2IMG, "stray", settings)


def _build_tiny(root: Path, model: TinyModel) -> Path:
    """Build the tiny model `model` under `root`; its folder."""
    if model in (TinyModel.SD_IMG2IMG, TinyModel.INSTRUCT_PIX2PIX):
        tiny.ensure_tiny_models(root)
    else:
        tiny.ensure_tiny_family_model(root, model)
    return root / model


def _install_single_file(tmp_path: Path, model: TinyModel, config: str, suffix: str) -> Path:
    """A models folder with the tiny `model` as the folder `folder/`, as the single file
    `single<suffix>` in the original layout, and as the configuration folder `configs/<config>/`;
    the models folder."""
    models = tmp_path / "models"
    built = _build_tiny(tmp_path / "build", model)
    shutil.copytree(built, models / "folder")
    shutil.copytree(built, models / "configs" / config)
    tiny_addons.write_sd_checkpoint(models / "folder", models / f"single{suffix}")
    return models


@pytest.mark.parametrize(
    ("model", "config", "suffix"),
    [
        (TinyModel.SD_IMG2IMG, "sd", ".safetensors"),
        (TinyModel.SDXL_IMG2IMG, "sdxl", ".safetensors"),
        (TinyModel.SD2_V_IMG2IMG, "sd2", ".safetensors"),  # OpenCLIP ViT-H keys
        (TinyModel.SD2_V_IMG2IMG, "sd2", ".ckpt"),  # read with torch.load(weights_only=True)
    ],
)
def test_a_single_file_in_the_original_layout_gives_the_folders_image(
    tmp_path: Path, cache: ModelCache, model: TinyModel, config: str, suffix: str
) -> None:
    """A tiny model written as one A1111-layout file loads through `from_single_file` with the
    local config folder, and runs exactly as the folder it came from."""
    models = _install_single_file(tmp_path, model, config, suffix)
    settings = Settings(data_dir=tmp_path, models_dir=models)
    probed = families.probe_file(models / f"single{suffix}")
    assert (probed.config, probed.prediction_type) == (config, None)
    spec = model_ids.resolve_model(Operation.IMG2IMG, "single", settings)
    assert spec.family == probed.family == families.detect_folder(models / "folder")
    assert spec.sources[0].single_file_config == str((models / "configs" / config).resolve())
    from_folder = _pixels(_request("folder"), cache, settings)
    from_file = _pixels(_request("single"), cache, settings)
    assert np.array_equal(from_file, from_folder)


def test_an_sd2_files_prediction_type_comes_from_its_sidecar_else_its_config(
    tmp_path: Path, cache: ModelCache
) -> None:
    """v-prediction and epsilon SD 2.x files have the same tensors: `<name>.json` or A1111's
    `<name>.yaml` says which; without one, `configs/sd2/` (here v_prediction, as SD 2.1) does."""
    models = _install_single_file(tmp_path, TinyModel.SD2_V_IMG2IMG, "sd2", ".safetensors")
    sidecars = {
        "eps-json": ("json", '{"prediction_type": "epsilon"}'),
        "eps-yaml": ("yaml", "model:\n  params:\n    linear_start: 0.00085\n"),
        "v-yaml": ("yaml", 'model:\n  params:\n    parameterization: "v"\n'),
    }
    for name, (suffix, text) in sidecars.items():
        shutil.copy(models / "single.safetensors", models / f"{name}.safetensors")
        (models / f"{name}.{suffix}").write_text(text)
    settings = Settings(data_dir=tmp_path, models_dir=models)

    def prediction(model_id: str) -> str:
        [pipe] = load_for([_request(model_id)], cache, settings).pipelines
        return str(pipe.scheduler.config.prediction_type)

    assert [prediction(m) for m in ("single", "eps-json", "eps-yaml", "v-yaml")] == [
        "v_prediction", "epsilon", "epsilon", "v_prediction",
    ]  # fmt: skip
    v_image = _pixels(_request("single"), cache, settings)
    assert np.array_equal(_pixels(_request("v-yaml"), cache, settings), v_image)
    assert np.abs(_pixels(_request("eps-json"), cache, settings) - v_image).max() > 0
    (models / "eps-json.json").write_text('{"prediction_type": "x0"}')
    with pytest.raises(model_ids.UnknownModelError, match="prediction_type must be one of"):
        model_ids.resolve_model(Operation.IMG2IMG, "eps-json", settings)


class _RunsACommand:
    """Unpickling this runs `touch <path>`: what a hostile `.ckpt` does with full unpickling."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return os.system, (f"touch {self.path}",)


def test_a_ckpt_that_would_run_code_is_refused_when_loaded(
    tmp_path: Path, cache: ModelCache
) -> None:
    """A `.ckpt` whose pickle calls a function passes detection (only its bytes are searched)
    and is refused when loaded (`torch.load(weights_only=True)`): the command never runs."""
    models = _install_single_file(tmp_path, TinyModel.SD2_V_IMG2IMG, "sd2", ".safetensors")
    witness = tmp_path / "pwned"
    trap = {"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": _RunsACommand(witness)}
    torch.save({"state_dict": trap}, models / "trap.ckpt")
    settings = Settings(data_dir=tmp_path, models_dir=models)
    assert model_ids.resolve_model(Operation.IMG2IMG, "trap", settings).family == Family.SD
    with pytest.raises(OSError, match="Unable to load weights"):
        generate(_request("trap"), cache, settings)
    assert not witness.exists()
