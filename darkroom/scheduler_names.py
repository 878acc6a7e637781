"""The scheduler names of the enterprise page: which can run img2img and which cannot.

Torch-free, so the API refuses impossible names before queueing and the worker builds from the
same list (worker/pipelines/schedulers.py).
"""

from __future__ import annotations

#: The page's names that can run img2img (they implement `add_noise`).
IMG2IMG_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
)
#: Named on the page but unable to noise an init image (no usable `add_noise`): refused.
REFUSED_SCHEDULERS = (
    "DDIMInverseScheduler",
    "IPNDMScheduler",
    "KarrasVeScheduler",
    "ScoreSdeVeScheduler",
)
