"""The validated, normalised description of one job: written by the API, read by the worker.

Whatever spelling a client used (`steps` or `num_inference_steps`, a comma string or an array),
the job row stores this one shape, so the worker never re-parses client input.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from db.models import Operation


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
    scheduler: str | None = None
    track_id: str | int | None = None

    @property
    def seeds(self) -> list[int]:
        """One seed per sample: seed, seed+1, ... (wrapping within 32 bits)."""
        return [(self.seed + index) % 2**32 for index in range(self.samples)]

    def to_row(self) -> dict[str, Any]:
        """The JSON stored in `jobs.params`."""
        return self.model_dump(mode="json")


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
        "init_image": ",".join(spec.init_images),
        "file_prefix": file_prefix,
        "outdir": "out",
    }
    meta.update(_operation_meta(spec))
    if warnings:
        meta["warnings"] = warnings
    return meta


def _operation_meta(spec: JobSpec) -> dict[str, Any]:
    """The fields only one operation has."""
    if spec.operation == Operation.IMG2IMG:
        return {"strength": spec.strength, "model_id": spec.model_id, "scheduler": spec.scheduler}
    if spec.operation == Operation.PIX2PIX:
        return {"image_guidance_scale": spec.image_guidance_scale}
    weights = spec.image_weights or []
    return {"init_image_weights": ",".join(f"{weight:g}" for weight in weights)}
