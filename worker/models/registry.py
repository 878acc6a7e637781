"""Where the weights for an (operation, model_id) pair come from.

- `model_preset == "tiny"`: every model id resolves to the tiny models built in code
  (`worker.models.tiny`), so tests and demos never download anything.
- `model_id` None: the operation's default Hugging Face repositories.
- `model_id` naming a folder under `settings.models_dir`: that folder.
- anything else: a Hugging Face repository id.

The image mixer needs two pipelines (Kandinsky 2.2's prior and decoder); a `model_id` for it
replaces the decoder and keeps the default prior, which all Kandinsky 2.2 decoders share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from darkroom.settings import Settings
from worker.models import tiny
from worker.pipelines.request import IMG2IMG, IMG_MIXER, PIX2PIX

# Hub repo ids and local folder names: no leading dot, slash or dash, no "..", no backslash.
_VALID_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)?")


class UnknownModelError(ValueError):
    """A model id that cannot name any model."""


@dataclass(frozen=True)
class PipelineSource:
    """One diffusers pipeline class and the folder or Hub repo id to load it from."""

    class_name: str
    location: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything an operation loads; hashable, so it doubles as the cache key."""

    operation: str
    sources: tuple[PipelineSource, ...]


@dataclass(frozen=True)
class _Default:
    class_name: str
    repo_id: str
    tiny_name: str


# Per operation, the pipelines it runs in order; a model_id replaces the last one.
_DEFAULTS: dict[str, tuple[_Default, ...]] = {
    IMG2IMG: (
        _Default(
            "StableDiffusionImg2ImgPipeline",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            tiny.SD_IMG2IMG,
        ),
    ),
    PIX2PIX: (
        _Default(
            "StableDiffusionInstructPix2PixPipeline",
            "timbrooks/instruct-pix2pix",
            tiny.INSTRUCT_PIX2PIX,
        ),
    ),
    IMG_MIXER: (
        _Default(
            "KandinskyV22PriorPipeline",
            "kandinsky-community/kandinsky-2-2-prior",
            tiny.KANDINSKY_PRIOR,
        ),
        _Default(
            "KandinskyV22Pipeline",
            "kandinsky-community/kandinsky-2-2-decoder",
            tiny.KANDINSKY_DECODER,
        ),
    ),
}


def resolve_model(operation: str, model_id: str | None, settings: Settings) -> ModelSpec:
    """The pipelines to load for `operation` when asked for `model_id`."""
    defaults = _DEFAULTS.get(operation)
    if defaults is None:
        raise ValueError(f"Unknown operation {operation!r}; expected one of {sorted(_DEFAULTS)}.")
    if model_id is not None and not _VALID_ID.fullmatch(model_id):
        raise UnknownModelError(f"{model_id!r} is not a valid model id.")
    if settings.model_preset == "tiny":
        tiny.ensure_tiny_models(settings.tiny_models_dir)
        locations = [str(settings.tiny_models_dir / d.tiny_name) for d in defaults]
    else:
        locations = [d.repo_id for d in defaults]
        if model_id is not None:
            locations[-1] = _locate(model_id, settings.models_dir)
    pairs = zip(defaults, locations, strict=True)
    return ModelSpec(operation, tuple(PipelineSource(d.class_name, loc) for d, loc in pairs))


def _locate(model_id: str, models_dir: Path | None) -> str:
    """A folder under `models_dir` when one has this name, else the id as a Hub repo id."""
    if models_dir is not None and (models_dir / model_id).is_dir():
        return str((models_dir / model_id).resolve())
    return model_id
