"""The worker's side of id resolution: `darkroom.model_ids` decides, this builds tiny weights.

`darkroom.model_ids` is free of torch so that the API can refuse unknown ids; under the tiny preset
the paths it returns may not exist yet, so the worker builds them here (lazily, once per id)
before loading them. Real weights are never built, only located.
"""

from __future__ import annotations

from pathlib import Path

from darkroom import model_ids
from darkroom.identities import Family
from darkroom.model_ids import ModelSpec, PipelineSource, UnknownModelError, is_tiny
from darkroom.settings import Settings
from worker.models import tiny, tiny_addons

__all__ = [
    "ModelSpec",
    "PipelineSource",
    "UnknownModelError",
    "resolve_embedding",
    "resolve_lora",
    "resolve_model",
    "resolve_safety_checker",
    "resolve_vae",
]


def resolve_model(operation: str, model_id: str | None, settings: Settings) -> ModelSpec:
    """The pipelines for `operation` and `model_id`, tiny ones built first when needed."""
    spec = model_ids.resolve_model(operation, model_id, settings)
    if is_tiny(settings):
        tiny.ensure_tiny_models(settings.tiny_models_dir)
        if model_id in model_ids.TINY_FAMILY_MODELS:
            _family, name = model_ids.TINY_FAMILY_MODELS[model_id]
            tiny.ensure_tiny_family_model(settings.tiny_models_dir, name)
    return spec


def resolve_lora(name: str, settings: Settings, family: Family = Family.SD) -> str:
    """A LoRA file or repo id; under the tiny preset the file is built from the id, for the
    tiny model of `family`."""
    location = model_ids.resolve_lora(name, settings, family)
    if is_tiny(settings):
        tiny_addons.ensure_tiny_lora(Path(location), name, family)
    return location


def resolve_vae(name: str, settings: Settings) -> str:
    """A VAE folder or repo id; under the tiny preset the folder is built from the id."""
    location = model_ids.resolve_vae(name, settings)
    if is_tiny(settings):
        tiny_addons.ensure_tiny_vae(Path(location), name)
    return location


def resolve_embedding(name: str, settings: Settings, family: Family = Family.SD) -> str:
    """An embedding file or repo id; under the tiny preset the file is built from the id, for
    the tiny model of `family`."""
    location = model_ids.resolve_embedding(name, settings, family)
    if is_tiny(settings):
        tiny_addons.ensure_tiny_embedding(Path(location), name, family)
    return location


def resolve_safety_checker(settings: Settings, prompt: str) -> str:
    """The safety checker's folder or repo id (see `darkroom.model_ids.resolve_safety_checker`)."""
    if is_tiny(settings):
        tiny.ensure_tiny_models(settings.tiny_models_dir)
    return model_ids.resolve_safety_checker(settings, prompt)
