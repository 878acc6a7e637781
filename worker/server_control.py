"""The worker's side of server management: control commands sent by services.server.

Celery runs control commands in the consumer's event loop; with the solo pool that loop is idle
only between jobs, so a command never runs beside a job: dropping models or checking an image
cannot disturb a running denoise.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
from PIL import Image

from darkroom.model_ids import resolve_safety_checker
from darkroom.settings import Settings
from worker.images import ImageInputError, fetch_image
from worker.models.cache import SAFETY_CHECKER, ComponentSource, ModelCache
from worker.pipelines.safety import flag_images

log = logging.getLogger(__name__)


def gpu_details() -> list[dict[str, Any]]:
    """Each visible GPU's name and memory in MiB (used is the device's, all processes)."""
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        found.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "memory_used_mb": (total - free) // 2**20,
                "memory_total_mb": total // 2**20,
            }
        )
    return found


def library_versions() -> dict[str, str]:
    """The versions that decide what a worker can run."""
    import diffusers
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def release_memory() -> None:
    """Give freed tensors back: to the allocator, then the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_image(url: str, settings: Settings, cache: ModelCache) -> dict[str, Any]:
    """Fetch `url` through the SSRF guard and run the safety checker on it."""
    try:
        image: Image.Image = fetch_image(url, settings)
    except ImageInputError as refused:
        return {"error": str(refused)}
    source = ComponentSource(SAFETY_CHECKER, resolve_safety_checker(settings, ""))
    checker, _seconds = cache.component(source)
    [flagged] = flag_images(checker, [image])
    return {"nsfw": flagged}
