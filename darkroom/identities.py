"""The identities every tier passes around, defined once as types; free of torch.

Each is a `StrEnum` whose values are the strings already stored in job rows, batch keys, queue
messages and model specs: a member compares equal to its value, so rows written before these
types existed read back unchanged and no migration is needed.
"""

from __future__ import annotations

import enum
from typing import Literal, get_args


class Operation(enum.StrEnum):
    """Which pipeline a job runs."""

    IMG2IMG = "img2img"
    PIX2PIX = "pix2pix"
    IMG_MIXER = "img_mixer"


class Family(enum.StrEnum):
    """A model family: a dimension beside the operation (`darkroom.families` describes each)."""

    SD = "sd"  # Stable Diffusion 1.x/2.x
    SDXL = "sdxl"
    FLUX = "flux"


class ModelKind(enum.StrEnum):
    """What an install brings (`model_installs.kind`, `model_type` in the model endpoints'
    answers): a pipeline, or an add-on that a request names."""

    MODEL = "model"
    LORA = "lora"
    EMBEDDING = "embedding"
    VAE = "vae"


class TinyModel(enum.StrEnum):
    """The tiny test models (`model_preset == "tiny"`): folders under `tiny_models_dir` that the
    worker builds in code (`worker.models.tiny`) and the API resolves ids to."""

    SD_IMG2IMG = "sd-img2img"
    INSTRUCT_PIX2PIX = "instruct-pix2pix"
    KANDINSKY_PRIOR = "kandinsky-prior"
    KANDINSKY_DECODER = "kandinsky-decoder"
    SAFETY_CHECKER = "safety-checker"
    SAFETY_CHECKER_ALWAYS = "safety-checker-always"
    # Tiny img2img models of the other families, built only when a request names them.
    SDXL_IMG2IMG = "sdxl-img2img"
    SD2_V_IMG2IMG = "sd2-v-img2img"
    FLUX_IMG2IMG = "flux-img2img"


#: What a sample the safety checker flags becomes (`safety_checker_type`; the first is the
#: default). A `Literal`, not an enum: the API's validation messages list these values as they
#: always have.
SafetyCheckerType = Literal["sensitive_content_text", "blur", "pixelate", "black"]
SAFETY_CHECKER_TYPES: tuple[str, ...] = get_args(SafetyCheckerType)


class FailureReason(enum.StrEnum):
    """Why a job failed: given by the code that fails it, counted by metrics under this label
    (`darkroom_job_failures`), never recovered from the message."""

    CANCELED = "canceled"  # a client's cancel, or a cleared queue
    WORKER_LOST = "worker_lost"  # every attempt ended with its worker gone
    INTERNAL = "internal"  # a bug or a fault of ours, answered with a generic message
    STORAGE = "storage"  # the images were generated, the write failed
    REJECTED = "rejected"  # the request could not be run as asked (bad input, unreadable image)
