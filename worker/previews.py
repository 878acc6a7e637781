"""Preview images of running jobs, projected from the latents without a second VAE pass.

Every few denoising steps (DARKROOM_PREVIEW_EVERY_STEPS, 0 = off) the step hook turns the
latents of each running job's first sample into a small JPEG (at most PREVIEW_MAX_SIDE pixels a
side, a few KB): one fixed linear map per family from the latent channels to RGB, applied per
latent pixel, so a preview costs a 3xC matrix product over a 64x64 grid (for 512 px), not a
decode. The maps are the well-known latent-to-RGB factors that ComfyUI's previews use
(`comfy/latent_formats.py`: SD15, SDXL, Flux), for the latents as the sampler sees them (scaled
by the VAE's scaling factor, and for Flux shifted and packed in 2x2 patches). A latent space
with another channel count (tiny test models, unknown families) is shown by its first three
channels, each stretched to its own range: a picture of the structure, not of the colours.

The pipeline call hands its latents over through `offer` (worker.pipelines.batch calls it from
the diffusers step callback, in the same thread) to the `LatentTap` opened around the batch
(`open_tap`); the step hook then asks `PreviewMaker.previews` for the running jobs' images.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

#: The longest side of a preview, in pixels.
PREVIEW_MAX_SIDE = 128
#: JPEG quality of a preview: a blurry few-KB picture is what it is for.
PREVIEW_QUALITY = 70
PREVIEW_MEDIA_TYPE = "image/jpeg"

Factors = tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]
# (factors: one RGB row per latent channel, bias) by family; ComfyUI's latent_formats.py.
_SD_FACTORS: Factors = (
    (
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
    (0.0, 0.0, 0.0),
)
_SDXL_FACTORS: Factors = (
    (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    (0.1084, -0.0175, -0.0011),
)
_FLUX_FACTORS: Factors = (
    (
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    (-0.0329, -0.0718, -0.0851),
)


@dataclass
class LatentTap:
    """The latest latents of the running pipeline call and the pipeline's class name."""

    latents: torch.Tensor | None = None
    pipeline: str = ""


_current_tap: ContextVar[LatentTap | None] = ContextVar("darkroom_latent_tap", default=None)


def open_tap(tap: LatentTap) -> Token[LatentTap | None]:
    """Make `tap` receive the latents of the pipeline calls this context makes from now on."""
    return _current_tap.set(tap)


def close_tap(token: Token[LatentTap | None]) -> None:
    """Stop the tap that `open_tap` opened with this token."""
    _current_tap.reset(token)


def offer(pipe: Any, tensors: dict[str, Any]) -> None:
    """Hand a step's latents to the open tap, if any (a reference: nothing is copied)."""
    tap = _current_tap.get()
    latents = tensors.get("latents")
    if tap is not None and isinstance(latents, torch.Tensor):
        tap.latents, tap.pipeline = latents, type(pipe).__name__


def factors_for(pipeline: str, channels: int) -> Factors | None:
    """The family's latent-to-RGB map for this pipeline class, if its channel count fits."""
    if "Flux" in pipeline:
        table = _FLUX_FACTORS
    elif "XL" in pipeline:
        table = _SDXL_FACTORS
    else:
        table = _SD_FACTORS
    return table if len(table[0]) == channels else None


def unpack(packed: torch.Tensor, width: int, height: int) -> torch.Tensor | None:
    """Flux's packed latents of one sample (tokens, 4C: 2x2 patches) as (C, h, w); None when
    the token count does not fit the image's aspect."""
    tokens, features = packed.shape
    rows = max(1, round(math.sqrt(tokens * height / max(width, 1))))
    cols = tokens // rows
    if rows * cols != tokens or features % 4:
        return None
    channels = features // 4
    grid = packed.reshape(rows, cols, channels, 2, 2).permute(2, 0, 3, 1, 4)
    return grid.reshape(channels, rows * 2, cols * 2)


def to_rgb(latent: torch.Tensor, pipeline: str) -> torch.Tensor:
    """One sample's latents (C, h, w) as RGB in 0..1, (3, h, w), on the latents' device."""
    latent = latent.float()
    table = factors_for(pipeline, latent.shape[0])
    if table is None:
        first = latent[:3] if latent.shape[0] >= 3 else latent[:1].expand(3, -1, -1)
        low = first.amin(dim=(1, 2), keepdim=True)
        high = first.amax(dim=(1, 2), keepdim=True)
        return (first - low) / (high - low).clamp(min=1e-6)
    weights = torch.tensor(table[0], device=latent.device)  # (C, 3)
    bias = torch.tensor(table[1], device=latent.device).view(3, 1, 1)
    rgb = torch.einsum("chw,cr->rhw", latent, weights) + bias
    return ((rgb + 1) / 2).clamp(0, 1)


def encode_jpeg(rgb: torch.Tensor) -> bytes:
    """An RGB tensor (3, h, w) in 0..1 as a JPEG of at most PREVIEW_MAX_SIDE a side."""
    pixels = (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(pixels, "RGB")
    image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=PREVIEW_QUALITY)
    return out.getvalue()


def preview_of(latents: torch.Tensor, pipeline: str, width: int, height: int) -> bytes | None:
    """One sample's latents (4-D layout's (C, h, w), or Flux's packed (tokens, 4C)) as a
    preview JPEG; None when their layout is not one we know."""
    with torch.no_grad():
        if latents.dim() == 2:
            unpacked = unpack(latents, width, height)
            if unpacked is None:
                return None
            latents = unpacked
        if latents.dim() != 3:
            return None
        return encode_jpeg(to_rgb(latents, pipeline))


@dataclass
class PreviewMaker:
    """Previews of the jobs of one batch, every `every` steps, from the tap's latents.

    `samples[i]` and `sizes[i]` are the sample count and (width, height) of batch job i; the
    latents of a running call are laid out request by request (worker.pipelines.batch), so job
    i's first sample sits after the samples of the running jobs before it.
    """

    tap: LatentTap
    every: int
    samples: Sequence[int]
    sizes: Sequence[tuple[int, int]]
    last_done: int = field(default=-1)

    def due(self, done: int) -> bool:
        """Whether `done` steps call for a new preview (a new call of the batch counts its
        steps from 1 again: its first step makes one)."""
        if self.every <= 0:
            return False
        return self.last_done < 0 or done < self.last_done or done - self.last_done >= self.every

    def previews(self, running: Sequence[int], done: int) -> dict[int, bytes]:
        """A preview per running job (by batch index) when one is due and the latents' layout
        is known; nothing otherwise (a call split by prompt length shows none)."""
        latents = self.tap.latents
        if latents is None or not self.due(done):
            return {}
        if latents.shape[0] != sum(self.samples[i] for i in running):
            return {}
        self.last_done = done
        made, offset = {}, 0
        for index in running:
            width, height = self.sizes[index]
            image = preview_of(latents[offset], self.tap.pipeline, width, height)
            if image is not None:
                made[index] = image
            offset += self.samples[index]
        return made
