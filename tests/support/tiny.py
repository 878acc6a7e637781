"""The tiny models' settings and a small request for them: shared by the worker tests and the
CUDA tests, which run without the project's conftests (the GPU machine has no Postgres)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from darkroom.identities import Operation
from darkroom.settings import Settings
from worker.models.tiny import ensure_tiny_models
from worker.pipelines.request import GenerationRequest


def tiny_settings_at(data_dir: Path) -> Settings:
    """Settings of the tiny preset under `data_dir`, with its models already built."""
    settings = Settings(data_dir=data_dir, model_preset="tiny")
    ensure_tiny_models(settings.tiny_models_dir)
    return settings


def small_request(operation: str = Operation.IMG2IMG, **fields: Any) -> GenerationRequest:
    """A 64x64, four-step request with two samples; `fields` override any of its fields."""
    base: dict[str, Any] = {
        "operation": operation,
        "model_id": None,
        "prompt": "a quiet harbour at dawn",
        "negative_prompt": "",
        "images": (Image.new("RGB", (64, 64), (40, 90, 200)),),
        "image_weights": (),
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.0,
        "seeds": (21, 22),
        **fields,
    }
    return GenerationRequest(**base)
