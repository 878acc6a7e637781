"""The worker's generation path on tiny random models: sizes, seeds, mixing, errors, cache."""

from __future__ import annotations

import io
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from PIL import Image

from darkroom.identities import Operation, TinyModel
from darkroom.settings import Settings
from worker.models.cache import ModelCache
from worker.models.tiny import ensure_tiny_models
from worker.models.tiny_shapes import build_once
from worker.models.weights import UnknownModelError, resolve_model
from worker.pipelines.generate import generate
from worker.pipelines.mixer import mixing_weights
from worker.pipelines.request import GenerationRequest


def noise_image(seed: int, width: int = 80, height: int = 60) -> Image.Image:
    """A random RGB picture, different for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_request(operation: str, **changes: Any) -> GenerationRequest:
    """A small, fast request for `operation`; mixer requests mix two images."""
    mixer = operation == Operation.IMG_MIXER
    request = GenerationRequest(
        operation=cast(Operation, operation),  # unknown ones too: `generate` refuses them
        model_id=None,
        prompt="a red house",
        negative_prompt="",
        images=(noise_image(1), noise_image(2)) if mixer else (noise_image(1),),
        image_weights=(0.5, 0.7) if mixer else (),
        width=64,
        height=48,
        steps=3,
        guidance_scale=7.5,
        seeds=(11, 12),
    )
    return replace(request, **changes)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def run_png(request: GenerationRequest, cache: ModelCache, settings: Settings) -> list[bytes]:
    return [png_bytes(image) for image in generate(request, cache, settings).images]


@pytest.mark.parametrize(
    ("operation", "width", "height"),
    [
        (Operation.IMG2IMG, 64, 48),
        (Operation.PIX2PIX, 48, 64),
        (Operation.IMG_MIXER, 72, 40),
    ],  # 72x40 is off the 64 grid
)
def test_one_rgb_image_per_seed_at_the_requested_size(
    operation: str, width: int, height: int, tiny_settings: Settings, model_cache: ModelCache
) -> None:
    request = make_request(operation, width=width, height=height, seeds=(1, 2, 3))
    result = generate(request, model_cache, tiny_settings)
    assert [(image.size, image.mode) for image in result.images] == [((width, height), "RGB")] * 3
    assert result.pipeline_seconds > 0


def test_img2img_at_512_with_20_steps_takes_seconds(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    request = make_request(
        Operation.IMG2IMG,
        images=(noise_image(3, 512, 512),),
        width=512,
        height=512,
        steps=20,
        seeds=(5,),
    )
    started = time.perf_counter()
    result = generate(request, model_cache, tiny_settings)
    # About 3 s alone on 2 cores; a VAE that downsampled by 4 instead of 8 would take minutes.
    assert time.perf_counter() - started < 45
    assert result.images[0].size == (512, 512)


@pytest.mark.parametrize("operation", [Operation.IMG2IMG, Operation.PIX2PIX, Operation.IMG_MIXER])
def test_same_seeds_give_identical_png_bytes(
    operation: str, tiny_settings: Settings, model_cache: ModelCache
) -> None:
    request = make_request(operation)
    first = run_png(request, model_cache, tiny_settings)
    second = run_png(make_request(operation), model_cache, tiny_settings)
    assert first == second


@pytest.mark.parametrize("operation", [Operation.IMG2IMG, Operation.PIX2PIX, Operation.IMG_MIXER])
def test_different_seeds_give_different_images(
    operation: str, tiny_settings: Settings, model_cache: ModelCache
) -> None:
    first, second = run_png(make_request(operation, seeds=(1, 2)), model_cache, tiny_settings)
    (third,) = run_png(make_request(operation, seeds=(3,)), model_cache, tiny_settings)
    assert len({first, second, third}) == 3


def test_each_sample_depends_only_on_its_own_seed(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    pair = generate(
        make_request(Operation.IMG2IMG, seeds=(7, 8)), model_cache, tiny_settings
    ).images
    alone = generate(make_request(Operation.IMG2IMG, seeds=(8,)), model_cache, tiny_settings).images
    # Batched kernels may round differently from single ones, hence a tolerance, not bytes.
    difference = np.abs(np.asarray(pair[1], dtype=int) - np.asarray(alone[0], dtype=int))
    assert difference.max() <= 2


@pytest.mark.parametrize("position", [0, 1, 2])
def test_mixer_image_of_weight_zero_has_no_influence(
    position: int, tiny_settings: Settings, model_cache: ModelCache
) -> None:
    base = make_request(Operation.IMG_MIXER)
    images, weights = list(base.images), list(base.image_weights)
    images.insert(position, noise_image(99))
    weights.insert(position, 0.0)
    with_zero = replace(base, images=tuple(images), image_weights=tuple(weights))
    assert run_png(with_zero, model_cache, tiny_settings) == run_png(
        base, model_cache, tiny_settings
    )


def test_mixer_weights_change_the_output(tiny_settings: Settings, model_cache: ModelCache) -> None:
    even = run_png(
        make_request(Operation.IMG_MIXER, image_weights=(1.0, 1.0)), model_cache, tiny_settings
    )
    skewed = run_png(
        make_request(Operation.IMG_MIXER, image_weights=(1.0, 3.0)), model_cache, tiny_settings
    )
    assert even[0] != skewed[0]


def test_mixer_prompt_is_a_condition(tiny_settings: Settings, model_cache: ModelCache) -> None:
    outputs = {
        run_png(make_request(Operation.IMG_MIXER, prompt=prompt), model_cache, tiny_settings)[0]
        for prompt in ("", "a red house", "a blue boat")
    }
    assert len(outputs) == 3


@pytest.mark.parametrize("operation", [Operation.IMG2IMG, Operation.PIX2PIX, Operation.IMG_MIXER])
def test_one_step_is_enough(
    operation: str, tiny_settings: Settings, model_cache: ModelCache
) -> None:
    """The documented range starts at 1 (the mixer's prior scheduler divided by zero there).
    img2img needs steps x strength >= 1: strength 1.0 here."""
    request = make_request(operation, steps=1, strength=1.0)
    assert len(run_png(request, model_cache, tiny_settings)) == len(request.seeds)


def test_mixing_weights_drop_zeros_and_normalise() -> None:
    assert mixing_weights((0.0, 1.0, 3.0), has_prompt=False) == [0.25, 0.75]
    assert mixing_weights((1.0, 0.0, 2.0), has_prompt=True) == [0.25, 0.5, 0.25]
    assert mixing_weights((1.0, 2.0), has_prompt=True) == mixing_weights((1.0, 0.0, 2.0), True)


@pytest.mark.parametrize(
    ("image_weights", "has_prompt", "expected"),
    [
        ((1e308, 1e308), True, [0.5, 0.5, 0.0]),  # the sum overflowed to inf: all zeros
        ((1e308, 1e308, 1e308, 1e308), False, [0.25, 0.25, 0.25, 0.25]),
        ((5e-324, 5e-324), False, [0.5, 0.5]),  # subnormal: the sum alone would still do
        ((1e30, 1e-30), False, [1.0, 0.0]),
    ],
)
def test_mixing_weights_are_a_proper_mix_for_any_finite_weights(
    image_weights: tuple[float, ...], has_prompt: bool, expected: list[float]
) -> None:
    """The API accepts any finite weight (up to 1.8e308): the weights that come out sum to 1."""
    weights = mixing_weights(image_weights, has_prompt)
    assert weights == pytest.approx(expected, abs=1e-12)
    assert math.fsum(weights) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("operation", "changes", "message"),
    [
        (Operation.PIX2PIX, {"images": (noise_image(1), noise_image(2))}, "takes 1 init images"),
        (Operation.IMG2IMG, {"images": ()}, "takes 1 init images"),
        (
            Operation.IMG_MIXER,
            {"images": (noise_image(1),) * 5, "image_weights": (1.0,) * 5},
            "1 to 4",
        ),
        (Operation.IMG_MIXER, {"image_weights": (1.0,)}, "one weight per image"),
        (Operation.IMG_MIXER, {"image_weights": (1.0, -0.5)}, "must not be negative"),
        (Operation.IMG_MIXER, {"prompt": "", "image_weights": (0.0, 0.0)}, "positive weight"),
        (Operation.IMG2IMG, {"seeds": (1, 2, 3, 4, 5)}, "samples"),
        (Operation.IMG2IMG, {"seeds": ()}, "samples"),
        (Operation.IMG2IMG, {"width": 60}, "multiples of 8"),
        ("outpaint", {}, "Unknown operation"),
        (Operation.IMG2IMG, {"model_id": "../secrets"}, "not a valid model id"),
    ],
)
def test_impossible_requests_raise_value_error(
    operation: str,
    changes: dict[str, Any],
    message: str,
    tiny_settings: Settings,
    model_cache: ModelCache,
) -> None:
    with pytest.raises(ValueError, match=message):
        generate(make_request(operation, **changes), model_cache, tiny_settings)


def test_cache_loads_once_and_reports_load_time(tiny_settings: Settings) -> None:
    cache = ModelCache(device="cpu")
    spec = resolve_model(Operation.IMG2IMG, None, tiny_settings)
    first, first_seconds = cache.get(spec)
    second, second_seconds = cache.get(spec)
    assert second is first
    assert first_seconds > 0
    assert second_seconds == 0.0
    assert len(cache) == 1


def test_cache_evicts_the_least_recently_used(tiny_settings: Settings) -> None:
    cache = ModelCache(max_entries=2, device="cpu")
    img2img, pix2pix, mixer = (
        resolve_model(op, None, tiny_settings)
        for op in (Operation.IMG2IMG, Operation.PIX2PIX, Operation.IMG_MIXER)
    )
    cache.get(img2img)
    cache.get(pix2pix)
    cache.get(img2img)  # now pix2pix is the least recently used
    cache.get(mixer)
    assert img2img in cache
    assert mixer in cache
    assert pix2pix not in cache


def test_generate_reports_load_time_only_on_first_use(tiny_settings: Settings) -> None:
    cache = ModelCache(device="cpu")
    request = make_request(Operation.PIX2PIX, seeds=(1,), steps=1)
    assert generate(request, cache, tiny_settings).model_load_seconds > 0
    assert generate(request, cache, tiny_settings).model_load_seconds == 0.0


def test_tiny_preset_resolves_every_model_id_to_the_tiny_folders(tiny_settings: Settings) -> None:
    for model_id in (None, "stable-diffusion-v1-5/stable-diffusion-v1-5", "anything"):
        spec = resolve_model(Operation.IMG2IMG, model_id, tiny_settings)
        (source,) = spec.sources
        assert Path(source.location) == tiny_settings.tiny_models_dir / "sd-img2img"
    mixer = resolve_model(Operation.IMG_MIXER, None, tiny_settings)
    assert [Path(s.location).name for s in mixer.sources] == [
        "kandinsky-prior",
        "kandinsky-decoder",
    ]


def test_real_preset_resolves_defaults_local_folders_and_hub_ids(tmp_path: Path) -> None:
    (tmp_path / "models" / "my-sd").mkdir(parents=True)
    # The family is read from the folder's files (an empty folder is no model).
    index = '{"_class_name": "StableDiffusionPipeline"}'
    (tmp_path / "models" / "my-sd" / "model_index.json").write_text(index)
    hub = ["someone/their-model", "someone/decoder"]  # Hub ids only when the operator lists them
    settings = Settings(data_dir=tmp_path, models_dir=tmp_path / "models", hub_models=hub)

    def locations(operation: str, model_id: str | None) -> list[str]:
        return [s.location for s in resolve_model(operation, model_id, settings).sources]

    assert locations(Operation.PIX2PIX, None) == ["timbrooks/instruct-pix2pix"]
    assert locations(Operation.IMG2IMG, "my-sd") == [str((tmp_path / "models" / "my-sd").resolve())]
    assert locations(Operation.IMG2IMG, "someone/their-model") == ["someone/their-model"]
    assert locations(Operation.IMG_MIXER, "someone/decoder") == [
        "kandinsky-community/kandinsky-2-2-prior",
        "someone/decoder",
    ]


@pytest.mark.parametrize("model_id", ["", "../x", "a/../../b", "/etc", "a\\b", ".hidden", "a/b/c"])
def test_invalid_model_ids_are_refused(model_id: str, tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError):
        resolve_model(Operation.IMG2IMG, model_id, Settings(data_dir=tmp_path))


def test_ensure_tiny_models_is_idempotent(tiny_settings: Settings) -> None:
    root = tiny_settings.tiny_models_dir
    before = {path.name: path.stat().st_ino for path in root.iterdir()}
    ensure_tiny_models(root)
    after = {path.name: path.stat().st_ino for path in root.iterdir()}
    assert after == before
    # LoRA, VAE and embedding folders, and the other families' tiny models, appear only once
    # a request names one (the family tests of the same session may have built them).
    on_demand = {
        "loras",
        "vae",
        "embeddings",
        TinyModel.SDXL_IMG2IMG,
        TinyModel.SD2_V_IMG2IMG,
        TinyModel.FLUX_IMG2IMG,
    }
    assert sorted(set(before) - on_demand) == [
        "instruct-pix2pix",
        "kandinsky-decoder",
        "kandinsky-prior",
        "safety-checker",
        "safety-checker-always",
        "sd-img2img",
    ]


class _PipelineBuiltMeanwhile:
    """Stands in for a pipeline while another process finishes the same target first."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def save_pretrained(self, folder: Path) -> None:
        (self.target / "theirs").mkdir(parents=True)
        (folder / "ours").mkdir(parents=True)


def test_building_a_tiny_model_tolerates_losing_a_race(tmp_path: Path) -> None:
    target = tmp_path / "sd-img2img"
    build_once(target, lambda _workdir: _PipelineBuiltMeanwhile(target))
    assert [path.name for path in tmp_path.iterdir()] == ["sd-img2img"]  # no staging left
    assert [path.name for path in target.iterdir()] == ["theirs"]
