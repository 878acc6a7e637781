"""The typed input and output of one generation, free of torch and diffusers imports.

The worker decodes a job row into a `GenerationRequest`, hands it to `generate`, and stores the
images of the `GenerationResult`. The API tier has already validated ranges; `generate` still
refuses combinations that no pipeline can run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from darkroom.identities import Operation

#: Called after every denoising step with (steps done, steps in all); it may raise to stop.
StepHook = Callable[[int, int], None]


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA applied for one request, at its own scale."""

    name: str  # a LoRA id (see darkroom.model_ids)
    strength: float  # its adapter weight; 0 leaves the model unchanged


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: what to run, on which images, with which settings and seeds."""

    operation: Operation
    model_id: str | None  # None: the operation's default model
    prompt: str
    negative_prompt: str  # "" when none
    images: tuple[Image.Image, ...]  # decoded RGB init images
    image_weights: tuple[float, ...]  # img_mixer only: one per image, each >= 0
    width: int  # output size, a multiple of SIDE_MULTIPLE, at most MAX_SIDE (darkroom.limits)
    height: int
    steps: int  # denoising steps, 1..MAX_STEPS
    guidance_scale: float  # MIN_GUIDANCE_SCALE..MAX_GUIDANCE_SCALE
    strength: float = 0.7  # img2img: how far from the init image to go
    image_guidance_scale: float = 1.5  # pix2pix: how closely to follow the init image
    seeds: tuple[int, ...] = (0,)  # one per sample
    # img2img and pix2pix only; the image mixer refuses anything but these defaults.
    scheduler: str | None = None  # a diffusers scheduler class name; None: the model's own
    use_karras_sigmas: bool = False  # applied where the scheduler's config has it
    algorithm_type: str | None = None  # "dpmsolver+++" or a diffusers value, where supported
    loras: tuple[LoraSpec, ...] = ()
    vae: str | None = None  # a VAE id
    embeddings: tuple[str, ...] = ()  # textual-inversion ids; each id is also its prompt token
    clip_skip: int | None = None  # 1..MAX_CLIP_SKIP, A1111's: 1 (like None) is the last layer
    tomesd: bool = False  # token merging in the highest-resolution attention layers
    # Every operation.
    safety_checker: bool = False
    safety_checker_type: str = "sensitive_content_text"  # a `SafetyCheckerType`
    # Called after every denoising step with (steps done, steps in all); it may raise to stop
    # the run (job cancel). img2img runs fewer steps than `steps` (strength), hence the total.
    on_step: StepHook | None = field(default=None, compare=False)


@dataclass(frozen=True)
class GenerationResult:
    """The images of one generation and where its time went."""

    images: list[Image.Image]  # one per seed, each exactly width x height, RGB
    pipeline_seconds: float  # the diffusion calls only
    model_load_seconds: float  # 0.0 when the model (and its VAE, checker) was already resident
    nsfw: list[bool] = field(default_factory=list)  # per image; filled in by `generate`

    def __post_init__(self) -> None:
        if not self.nsfw:
            self.nsfw.extend([False] * len(self.images))
