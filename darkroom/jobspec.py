"""The validated, normalised description of one job: written by the API, read by the worker.

Whatever spelling a client used (`steps` or `num_inference_steps`, a comma string or an array),
the job row stores this one shape, so the worker never re-parses client input.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from darkroom.identities import Family, ModelKind, Operation, SafetyCheckerType
from darkroom.limits import MAX_SEED


class LoraRef(BaseModel):
    """One LoRA of a request and the strength it is applied with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    strength: float


class JobSpec(BaseModel):
    """Everything the worker needs to run a job. The seed is always concrete (drawn at submit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    operation: Operation
    prompt: str
    negative_prompt: str = ""
    init_images: list[str]
    image_weights: list[float] | None = None
    width: int | None = None
    height: int | None = None
    steps: int
    guidance_scale: float
    strength: float = 0.7
    image_guidance_scale: float = 1.5
    seed: int
    samples: int = 1
    model_id: str | None = None
    #: The model's family (`darkroom.families`), read from its files at submit; None on rows
    #: written before families existed (all SD 1.x) and for pix2pix and the mixer.
    family: Family | None = None
    scheduler: str | None = None
    use_karras_sigmas: bool = False
    algorithm_type: str | None = None
    loras: list[LoraRef] = []
    vae: str | None = None
    embeddings: list[str] = []
    clip_skip: int | None = None
    tomesd: bool = False
    safety_checker: bool = False
    safety_checker_type: SafetyCheckerType = "sensitive_content_text"
    base64_output: bool = False
    temp: bool = False
    track_id: str | int | None = None

    @property
    def seeds(self) -> list[int]:
        """One seed per sample: seed, seed+1, ... (wrapping within 32 bits)."""
        return [(self.seed + index) % (MAX_SEED + 1) for index in range(self.samples)]

    def to_row(self) -> dict[str, Any]:
        """The JSON stored in `jobs.params`."""
        return self.model_dump(mode="json")

    def names(self, kind: ModelKind) -> set[str]:
        """The ids of models of `kind` this job loads (delete_model refuses to remove them)."""
        if kind == ModelKind.LORA:
            return {lora.name for lora in self.loras}
        if kind == ModelKind.EMBEDDING:
            return set(self.embeddings)
        named = self.model_id if kind == ModelKind.MODEL else self.vae
        return {named} if named is not None else set()


#: The fields that one pipeline call shares among all of its samples: jobs can run as one batch
#: only when these are equal. Prompts, seeds, sample counts, init images, clip skip and the
#: safety checker are per sample (or per job) and so may differ within a batch.
_SHARED_FIELDS = (
    "operation",
    "model_id",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "scheduler",
    "use_karras_sigmas",
    "algorithm_type",
    "loras",
    "vae",
    "embeddings",
    "tomesd",
)
#: Shared only by the operation that reads it.
_OPERATION_FIELDS = {Operation.IMG2IMG: ("strength",), Operation.PIX2PIX: ("image_guidance_scale",)}
#: Bumped whenever the meaning of a key changes, so that old rows never batch with new ones.
_BATCH_KEY_VERSION = "batch-v2"


def shared_fields(operation: str) -> tuple[str, ...]:
    """The fields that jobs of `operation` must agree on to share a pipeline call (the worker's
    `GenerationRequest` has fields of the same names)."""
    return (*_SHARED_FIELDS, *_OPERATION_FIELDS.get(Operation(operation), ()))


def batch_key(spec: JobSpec) -> str | None:
    """A short hash of what jobs must share to run in one pipeline call; None: never batched.

    The image mixer is never batched (its prior runs per seed and its images per job). The
    worker still checks the exact size and prompt length before stacking jobs (a `width` of
    None takes the init image's size), so equal keys are necessary, not sufficient.
    """
    if spec.operation == Operation.IMG_MIXER:
        return None
    shared = spec.model_dump(mode="json", include=set(shared_fields(spec.operation)))
    # The family runs a different pipeline: never one call for two families, even should one
    # model id come to name another family's files while jobs wait.
    shared["family"] = spec.family
    text = json.dumps([_BATCH_KEY_VERSION, shared], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def describe(spec: JobSpec, file_prefix: str, warnings: list[str]) -> dict[str, Any]:
    """The `meta` object of responses, in the hosted API's field names."""
    meta: dict[str, Any] = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "W": spec.width,
        "H": spec.height,
        "guidance_scale": spec.guidance_scale,
        "steps": spec.steps,
        "n_samples": spec.samples,
        "seed": spec.seed,
        "seeds": spec.seeds,
        "init_image": ",".join(_shown(url) for url in spec.init_images),
        "file_prefix": file_prefix,
        "outdir": "out",
    }
    meta.update(_operation_meta(spec))
    if warnings:
        meta["warnings"] = warnings
    return meta


def _shown(url: str) -> str:
    """An init image as meta shows it: URLs as given, inline images only by their size."""
    if url.startswith("data:"):
        return f"<base64 image, {len(url.partition(',')[2])} characters>"
    return url


def _operation_meta(spec: JobSpec) -> dict[str, Any]:
    """The fields only one operation has."""
    if spec.operation == Operation.IMG2IMG:
        return _img2img_meta(spec)
    if spec.operation == Operation.PIX2PIX:
        return {"image_guidance_scale": spec.image_guidance_scale}
    weights = spec.image_weights or []
    return {"init_image_weights": ",".join(f"{weight:g}" for weight in weights)}


def _img2img_meta(spec: JobSpec) -> dict[str, Any]:
    """The enterprise page's echo of its many options, in its spellings."""
    return {
        "strength": spec.strength,
        "model_id": spec.model_id,
        "model_family": spec.family,
        "scheduler": spec.scheduler,
        "use_karras_sigmas": _yes_no(spec.use_karras_sigmas),
        "algorithm_type": spec.algorithm_type,
        "lora_model": ",".join(lora.name for lora in spec.loras) or None,
        "lora_strength": ",".join(f"{lora.strength:g}" for lora in spec.loras) or None,
        "vae": spec.vae,
        "embeddings_model": ",".join(spec.embeddings) or None,
        "clip_skip": spec.clip_skip,
        "tomesd": _yes_no(spec.tomesd),
        "safetychecker": _yes_no(spec.safety_checker),
        "safety_checker_type": spec.safety_checker_type,
        "base64": _yes_no(spec.base64_output),
        "temp": _yes_no(spec.temp),
    }


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"
